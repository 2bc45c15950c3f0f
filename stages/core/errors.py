"""The one exception type the CLI turns into a single line and exit code 1."""


class PipelineError(Exception):
    """An error a user can cause and fix (missing data, a bad file); the message says how."""
