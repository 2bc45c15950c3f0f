"""The exceptions the CLI turns into a single line: exit code 2 for parameters, 1 for the rest."""


class PipelineError(Exception):
    """An error a user can cause and fix (missing data, a bad file); the message says how."""


class ParamsError(ValueError):
    """A bad value in params.yaml or in a command-line override; the message names the key."""


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM (`dvc queue kill`, a job scheduler).

    A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it: it unwinds
    through every `with` block (temporary files removed, the MLflow run ended FAILED) up to the
    CLI, which prints one line and exits with 128 + the signal number. A stage may re-raise it
    with `where` saying how far it got and how to go on.
    """

    def __init__(self, signum: int, where: str = "") -> None:
        super().__init__(signum, where)
        self.signum, self.where = signum, where

    def __str__(self) -> str:
        name = {2: "Ctrl-C (SIGINT)", 15: "SIGTERM"}.get(self.signum, f"signal {self.signum}")
        return f"interrupted by {name}" + (f"; {self.where}" if self.where else "")
