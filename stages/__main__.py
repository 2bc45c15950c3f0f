"""`python -m stages <command>`: what dvc.yaml calls.

Not the `convnet` console script: in queued and --temp experiments an editable install's
script would import the main workspace's code instead of the experiment's own snapshot.
"""

import sys


def main() -> None:
    """The CLI, with Ctrl-C from the first instant one line and exit 130: the CLI's handler
    (stages.cli.main) is installed once its modules are imported, which takes a while."""
    try:
        from stages.cli import main as cli

        cli()
    except KeyboardInterrupt:  # Python's own Ctrl-C, before the CLI's handler took over
        print("error: interrupted by Ctrl-C (SIGINT)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
