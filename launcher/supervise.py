"""Run a launcher command (deepspeed, mpiexec, one process) so that a stop signal to `trime launch` reaches the
ranks and the launch waits for them: a training stopped this way saves its checkpoint and `trime launch`
exits with EXIT_STOPPED_BY_SIGNAL.

Why not plain subprocess.run: on one node the `deepspeed` runner has no signal handler, so SIGTERM kills it at
once while launch.py and the ranks keep training, orphaned. So:
- the command runs in its own process group: SIGTERM/SIGINT to `trime launch`'s group (Ctrl-C, a scheduler)
  reaches only this process, which signals the ranks itself (no runner dying at once, no launch.py
  SIGKILLing ranks 30 s into their checkpoint);
- the ranks get SIGTERM (SIGUSR1 stays SIGUSR1; SIGINT becomes SIGTERM, which `trime train` catches); later
  signals are not passed on: a second Ctrl-C cannot cut a checkpoint short;
- this process is a child subreaper: ranks orphaned by a runner that died anyway (SIGTERM sent to every process,
  as systemd does) stay its descendants, and it waits until every descendant has exited;
- the command gets SIGTERM if this process dies (even of SIGKILL): the ranks then see their runner gone
  (trime_dist/train/signals.py LauncherWatch) and stop with a checkpoint too;
- rank 0 writes the TRIME_STOPPED_MARKER file after the stop's checkpoint: its existence, not the runner's
  status (143 when it died of the signal), says the ranks stopped by signal.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

from trime_dist.core.constants import EXIT_STOPPED_BY_SIGNAL, STOPPED_MARKER_ENV

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
POLL_S = 0.5  # each poll walks /proc (psutil children): cheap at this rate on a busy node
# A rank gets the signal once it catches it (`trime train` does from its first lines), or after this long
# (a stage that never catches it: the signal ends it).
RANK_START_GRACE_S = 5.0
NOTE_EVERY_S = 30.0
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> bool:
    """Linux prctl(2) through libc; False where it is not available."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when `trime launch` dies, however it dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def exit_status(returncode: int) -> int:
    """A shell's status: death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def is_stage_process(cmdline: list[str]) -> bool:
    """`python [-u] .../bin/trime STAGE ...` or `python -m trime_dist.cli STAGE ...`: a rank; not a runner
    (deepspeed, `-m deepspeed.launcher.launch`, mpiexec, hydra's proxy) nor `trime launch` itself."""
    words = [a for a in cmdline if not a.startswith("-") or a == "-m"]  # python's and the stage's options out
    if len(words) >= 3 and words[1] == "-m":
        program, stage = words[2] == "trime_dist.cli", words[3:4]
    elif words and os.path.basename(words[0]) == "trime":
        program, stage = True, words[1:2]
    else:
        program, stage = len(words) >= 2 and os.path.basename(words[1]) == "trime", words[2:3]
    return program and stage != ["launch"]


def catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for `sig` (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(line for line in f if line.startswith("SigCgt:"))
        return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, StopIteration, ValueError):
        return False


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(proc) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def ranks_among(procs: dict) -> list:
    """The top stage processes (a rank's forked workers have its command line too: not them)."""
    import psutil

    stage = {pid for pid, p in procs.items() if is_stage_process(_cmdline(p))}
    out = []
    for pid in stage:
        try:
            if procs[pid].ppid() not in stage:
                out.append(procs[pid])
        except psutil.Error:
            pass
    return out


class Supervisor:
    """The command's process tree, the stop signals received, and which ranks were told."""

    def __init__(self, child: subprocess.Popen, signal_ranks: bool, received: list[int]):
        import psutil

        self.child, self.signal_ranks = child, signal_ranks
        self.tree: dict = {child.pid: psutil.Process(child.pid)}  # the live descendants
        self.seen: set[int] = {child.pid}                           # every descendant ever seen
        self.received = received                                    # appended by the signal handler
        self.handled = 0
        self.stop_sig: Optional[int] = None                         # what the ranks get
        self.told: set[int] = set()
        self.status: Optional[int] = None                           # the command's exit status
        self._next_note = 0.0

    def run(self) -> int:
        while True:
            self._reap()
            self._refresh_tree()
            self._act_on_signals()
            if self.status is not None and not self.tree:  # the command and every process under it are gone
                return self.status
            self._note_waiting()
            time.sleep(POLL_S)

    def _reap(self) -> None:
        """Wait for the command, and for the orphans of its tree re-parented to us (the subreaper)."""
        import psutil

        if self.status is None and self.child.poll() is not None:
            self.status = exit_status(self.child.returncode)
        for proc in psutil.Process().children():
            if proc.pid in self.seen and proc.pid != self.child.pid:
                try:
                    os.waitpid(proc.pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def _refresh_tree(self) -> None:
        import psutil

        for proc in list(self.tree.values()):
            try:
                for sub in proc.children(recursive=True):
                    self.tree.setdefault(sub.pid, sub)
                    self.seen.add(sub.pid)
            except psutil.Error:
                pass
        self.tree = {pid: p for pid, p in self.tree.items() if _running(p)}

    def _act_on_signals(self) -> None:
        new, self.handled = self.received[self.handled:], len(self.received)
        for signum in new:
            name = signal.Signals(signum).name
            if not self.signal_ranks:  # mpiexec (hydra passes signals on) or one process: theirs to handle
                if self.status is None:
                    _say(f"{name}: passing it on to {self.child.args[0]} (pid {self.child.pid})")
                    _kill(self.child.pid, signum)
            elif self.stop_sig is None:
                self.stop_sig = signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM
                _say(f"{name}: asking the ranks to save a checkpoint and stop "
                     f"({signal.Signals(self.stop_sig).name}); waiting for them")
            else:
                _say(f"{name}: already stopping, waiting for the ranks' checkpoint (SIGKILL the ranks to force)")
        if self.stop_sig is not None:
            self._tell_ranks()

    def _tell_ranks(self) -> None:
        """Signal each rank once, as soon as it catches the signal (ranks still starting get it later)."""
        import psutil

        for rank in ranks_among(self.tree):
            if rank.pid in self.told:
                continue
            try:
                ready = catches(rank.pid, self.stop_sig) or time.time() - rank.create_time() > RANK_START_GRACE_S
            except psutil.Error:  # gone meanwhile
                continue
            if ready:
                _kill(rank.pid, self.stop_sig)
                self.told.add(rank.pid)

    def _note_waiting(self) -> None:
        if self.stop_sig is None and self.status is None:
            return
        now = time.monotonic()
        if self._next_note == 0.0:
            self._next_note = now + NOTE_EVERY_S
        elif now >= self._next_note:
            self._next_note = now + NOTE_EVERY_S
            _say(f"waiting for {len(self.tree)} process(es) to exit: pids {sorted(self.tree)}")


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _say(text: str) -> None:
    print(f"trime launch: {text}", file=sys.stderr, flush=True)


def stopped_marker(env: dict) -> tuple[str, bool]:
    """The marker file rank 0 writes after a stop's checkpoint: the caller's (a SLURM script's), or a new
    temporary one (True: ours to remove)."""
    if env.get(STOPPED_MARKER_ENV):
        return env[STOPPED_MARKER_ENV], False
    fd, path = tempfile.mkstemp(prefix="trime-stopped-", suffix=".json")
    os.close(fd)
    os.unlink(path)  # rank 0 creates it; its existence is the answer
    return path, True


def run_supervised(cmd: list[str], env: dict, cwd: Optional[str], signal_ranks: bool) -> int:
    """Run `cmd` as described at the top; returns EXIT_STOPPED_BY_SIGNAL when the ranks stopped by signal
    with a checkpoint (the marker exists), else the command's exit status."""
    marker, ours = stopped_marker(env)
    env = dict(env, **{STOPPED_MARKER_ENV: marker})
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    started = time.time()
    received: list[int] = []
    # the handler only records; the loop acts (a signal during the start counts too)
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in STOP_SIGNALS}
    try:
        child = subprocess.Popen(cmd, env=env, cwd=cwd, process_group=0, preexec_fn=_die_with_parent)
        status = Supervisor(child, signal_ranks, received).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        stopped = os.path.getmtime(marker) >= started - 1
    except OSError:
        stopped = False
    if ours and os.path.exists(marker):
        os.unlink(marker)
    if stopped and status != EXIT_STOPPED_BY_SIGNAL:
        _say(f"the ranks saved a checkpoint and stopped (the runner's own status: {status}); "
             f"exit status {EXIT_STOPPED_BY_SIGNAL}")
    return EXIT_STOPPED_BY_SIGNAL if stopped else status
