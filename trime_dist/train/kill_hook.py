"""A test hook that simulates kill -9 of training at a chosen step (the fault-injection tests and
benchmarks/faults.py): TRIME_TRAIN_EXIT_AFTER_STEP=N ends every rank right after optimizer step N
(and its checkpoint, when step N saves one), without cleanup."""
from __future__ import annotations

import logging
import os

EXIT_ENV = "TRIME_TRAIN_EXIT_AFTER_STEP"
EXIT_CODE = 17  # what the datastore's hook (datastore/parts.py) exits with, too

log = logging.getLogger(__name__)


def maybe_exit_after_step(step: int) -> None:
    """Leave the process at once (os._exit: no finally, no atexit) when step == $TRIME_TRAIN_EXIT_AFTER_STEP."""
    value = os.environ.get(EXIT_ENV, "")
    if value and int(value) == step:
        log.warning("%s=%s: exiting after step %d (simulated kill)", EXIT_ENV, value, step)
        logging.shutdown()
        os._exit(EXIT_CODE)
