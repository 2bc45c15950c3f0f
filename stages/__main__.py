"""`python -m stages <command>`: what dvc.yaml calls (see DESIGN.md on queued experiments)."""

from stages.cli import main

main()
