"""The exceptions the CLI turns into a single line: exit code 2 for parameters, 1 for the rest."""


class PipelineError(Exception):
    """An error a user can cause and fix (missing data, a bad file); the message says how."""


class ParamsError(ValueError):
    """A bad value in params.yaml or in a command-line override; the message names the key."""
