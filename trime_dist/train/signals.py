"""Stop training cleanly on SIGTERM / SIGUSR1, what SLURM sends at a time limit (`--signal`) or preemption.

The handler only records the signal; the loop agrees on it across ranks in the step's all-reduce,
finishes that optimizer step, saves a checkpoint and exits with EXIT_STOPPED_BY_SIGNAL.

SLURM may send its time-limit signal up to a minute early, so it can arrive while a rank still starts
(imports, DeepSpeed's set-up), where the default action would kill the rank: `catch_early` records it
from the first lines of `trime train`, and the loop's StopFlag takes it over.

A rank started by DeepSpeed's launcher also stops when that launcher is gone: on one node the `deepspeed`
runner has no signal handler, so SIGTERM to it alone kills it at once and leaves launch.py and the ranks
training, orphaned. LauncherWatch notices (at most once a second, where the loop reads the StopFlag) and the
rank stops as if signalled: the same agreed step, checkpoint, EXIT_STOPPED_BY_SIGNAL.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Optional

from trime_dist.core.constants import EXIT_STOPPED_BY_SIGNAL  # noqa: F401  (re-exported: the loop, the CLI)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StoppedBySignal(Exception):
    """Raised by the loop after the checkpoint of the stopping step is saved (every rank)."""

    def __init__(self, step: int, ckpt_dir: str, signal_name: Optional[str]):
        self.step, self.ckpt_dir, self.signal_name = step, ckpt_dir, signal_name
        super().__init__(f"stopped by {signal_name or 'a signal on another rank'} after step {step}; checkpoint "
                         f"saved in {ckpt_dir}: rerun with --auto-resume (or --resume) to continue")


CHECK_LAUNCHER_EVERY_S = 1.0


def _is_deepspeed_launch(cmdline: list[str]) -> bool:
    return "deepspeed.launcher.launch" in cmdline


def _is_deepspeed_runner(cmdline: list[str]) -> bool:
    # `deepspeed ARGS` runs as `python .../bin/deepspeed ARGS`
    return any(os.path.basename(a) in ("deepspeed", "ds") for a in cmdline[:2]) or \
        "deepspeed.launcher.runner" in cmdline


class LauncherWatch:
    """The DeepSpeed launcher processes above this rank: launch.py (its parent) and, when launch.py was started
    by it, the `deepspeed` runner above that. `gone()` says which one exited, checked at most once a second."""

    def __init__(self, launch_pid: int, runner=None):
        self.launch_pid = launch_pid
        self.runner = runner            # psutil.Process of the runner, or None (another node's runner, pdsh)
        self._next_check = 0.0

    @classmethod
    def of_this_rank(cls) -> Optional["LauncherWatch"]:
        """The watch of this process when DeepSpeed's launcher started it, else None."""
        from trime_dist.core.launch_env import started_by_deepspeed_launcher

        if not started_by_deepspeed_launcher():
            return None
        import psutil

        ppid = os.getppid()
        try:
            launch = psutil.Process(ppid)
            if not _is_deepspeed_launch(launch.cmdline()):
                return None
            runner = launch.parent()
            if runner is not None and not _is_deepspeed_runner(runner.cmdline()):
                runner = None
        except psutil.NoSuchProcess:  # launch.py exited just now: this rank is re-parented, the first check says so
            return cls(ppid)
        return cls(launch.pid, runner)

    def gone(self) -> Optional[str]:
        """'the exit of ...' once launch.py or the runner has exited; None while both run (or between checks)."""
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + CHECK_LAUNCHER_EVERY_S
        if os.getppid() != self.launch_pid:  # orphans are re-parented: launch.py is gone
            return f"the exit of its launcher (DeepSpeed's launch.py, pid {self.launch_pid})"
        if self.runner is not None and not _running(self.runner):
            return f"the exit of its launcher (the deepspeed runner, pid {self.runner.pid})"
        return None


def _running(proc) -> bool:
    """Alive and not a zombie (a dead runner stays a zombie until whoever started it waits for it)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class StopFlag:
    """Remembers the first STOP_SIGNALS signal received while installed (the handler does nothing else), or
    the exit of the DeepSpeed launcher above this rank (LauncherWatch), which counts as one."""

    def __init__(self):
        self.signal_name: Optional[str] = None
        self.launcher: Optional[LauncherWatch] = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        if self.signal_name is None and self.launcher is not None:
            self.signal_name = self.launcher.gone()
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
        # the launcher chain as it was at start-up (a runner that died since then is still noticed)
        self.launcher = _EARLY.launcher or LauncherWatch.of_this_rank()
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
    _EARLY.launcher = None
