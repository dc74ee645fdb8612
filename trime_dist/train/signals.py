"""Stop training cleanly on SIGTERM / SIGUSR1, what SLURM sends at a time limit (`--signal`) or preemption.

The handler only records the signal; the loop agrees on it across ranks in the step's all-reduce,
finishes that optimizer step, saves a checkpoint and exits with EXIT_STOPPED_BY_SIGNAL.

SLURM may send its time-limit signal up to a minute early, so it can arrive while a rank still starts
(imports, DeepSpeed's set-up), where the default action would kill the rank: `catch_early` records it
from the first lines of `trime train`, and the loop's StopFlag takes it over.
"""
from __future__ import annotations

import signal
from typing import Optional

from trime_dist.core.constants import EXIT_STOPPED_BY_SIGNAL  # noqa: F401  (re-exported: the loop, the CLI)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StoppedBySignal(Exception):
    """Raised by the loop after the checkpoint of the stopping step is saved (every rank)."""

    def __init__(self, step: int, ckpt_dir: str, signal_name: Optional[str]):
        self.step, self.ckpt_dir, self.signal_name = step, ckpt_dir, signal_name
        super().__init__(f"stopped by {signal_name or 'a signal on another rank'} after step {step}; checkpoint "
                         f"saved in {ckpt_dir}: rerun with --auto-resume (or --resume) to continue")


class StopFlag:
    """Remembers the first STOP_SIGNALS signal received while installed (the handler does nothing else)."""

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def install(self) -> "StopFlag":
        """Catch STOP_SIGNALS (main thread only, as Python requires); `restore` puts the old handlers back.
        A signal `catch_early` recorded before counts as received here."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.signal_name is None and _EARLY.signal_name is not None:
            self.signal_name = _EARLY.signal_name
            _EARLY.signal_name = None  # taken over: a later StopFlag (another train() call) starts clean
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


_EARLY = StopFlag()


def catch_early() -> None:
    """Record STOP_SIGNALS from now on instead of dying of them (the first thing `trime train` does); the
    next StopFlag.install() takes a recorded signal over, and its restore() comes back to this recorder."""
    if not _EARLY._previous:
        _EARLY.install()


def release_early() -> None:
    """Put back the handlers catch_early replaced, and forget a signal nobody took over."""
    _EARLY.restore()
    _EARLY.signal_name = None
