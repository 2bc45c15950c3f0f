"""The exceptions the CLI turns into a single line: exit code 2 for parameters, 1 for the rest;
and how Ctrl-C / SIGTERM become `Interrupted`, held back while a block must not be cut."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


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


class _Held:
    depth = 0  # nesting of `held()` blocks now running
    pending: int | None = None  # a signal that arrived inside one


def on_signal(signum: int, frame: object) -> None:
    """The SIGINT/SIGTERM handler the CLI installs: raise Interrupted now, or, inside `held()`,
    when the outermost held block ends."""
    if _Held.depth:
        _Held.pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Defer Interrupted to the end of the block (for writes that must not stop half-way).

    Deferred in the handler rather than by blocking the signals: a signal blocked in the main
    thread is delivered to another thread (torch's, sqlite's), and Python still runs its
    handler in the main thread at once.
    """
    _Held.depth += 1
    try:
        yield
    finally:
        _Held.depth -= 1
        if not _Held.depth and _Held.pending is not None:
            signum, _Held.pending = _Held.pending, None
            raise Interrupted(signum)
