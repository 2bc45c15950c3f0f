"""`python -m stages <command>`: what dvc.yaml calls.

Not the `convnet` console script: in queued and --temp experiments an editable install's
script would import the main workspace's code instead of the experiment's own snapshot.
"""

from stages.cli import main

main()
