"""Fault injection for the crash tests (tests/test_crash.py).

`GRACEFUL_KILL_AT_STEP=N` in the environment makes a training loop send SIGKILL to its
own process right after step N: after that step's checkpoint (if any) was handed to
orbax, which may still be writing it, and with no chance to clean up, as a preempted
machine would. Unset, it costs one dictionary lookup a step.
"""

from __future__ import annotations

import os
import signal

KILL_AT_STEP = "GRACEFUL_KILL_AT_STEP"


def after_step(step: int) -> None:
  """Kills this process if the environment asks for it at `step`."""
  if os.environ.get(KILL_AT_STEP) == str(step):
    os.kill(os.getpid(), signal.SIGKILL)
