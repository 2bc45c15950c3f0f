"""Ctrl-C / SIGTERM inside a held block (an MLflow write) wait for the block to end."""

import os
import signal
import time

import pytest

from stages.core import errors
from stages.core.errors import Interrupted


@pytest.fixture
def handler():
    old = signal.signal(signal.SIGTERM, errors.on_signal)
    yield
    signal.signal(signal.SIGTERM, old)


def test_a_signal_inside_a_held_block_is_raised_when_the_block_ends(handler):
    steps = []
    with pytest.raises(Interrupted) as caught, errors.held():
        with errors.held():  # nested: only the outermost end raises
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run by now
            steps.append("inner")
        steps.append("outer")
    assert steps == ["inner", "outer"] and caught.value.signum == signal.SIGTERM


def test_outside_a_held_block_the_signal_interrupts_at_once(handler):
    with pytest.raises(Interrupted):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    with errors.held():  # nothing pending is left over from before
        pass
