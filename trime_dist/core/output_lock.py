"""One job per output: the exclusive lock every writing stage takes on its output for the whole job.

The lock is a file holding JSON {host, pid, started, command, ...}. It is made by writing the JSON to a
file of our own and hard-linking it to the lock's name: link() fails when the name exists, on local disks
and on NFS alike, and a reader never sees a half-written lock (O_CREAT|O_EXCL then write would show an
empty file for a moment). fcntl.flock was not chosen: it does not reach across hosts on NFS and says
nothing about who holds it. Filesystems without hard links fall back to O_CREAT|O_EXCL.

A lock whose holder is gone is taken over: on this host when its pid is not running, or is running but
started at another time (the pid was reused), or the host rebooted since; on any host when it was an
earlier run of this same SLURM job (SLURM ends a run before it requeues the job). Any other lock of
another host is never taken over: nothing here can tell whether that job is alive, so the message says
how to remove it.

Multi-rank jobs: the lock belongs to the job. Only rank 0 takes it; MPI stages share the outcome with
every rank (core.mpi.plan_on_root). Torch stages take it before their process group exists (so a refusal
comes at once), and the other ranks, which write nothing before the group and cannot make one without
rank 0, only read it: a lock of another job (its job key differs, core.launch_env.job_key) that is alive
stops them too, instead of leaving them waiting for a rank 0 that is gone.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shlex
import socket
import sys
import time
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger(__name__)

LOCK_NAME = ".trime-lock"  # inside an output folder; beside a file output it is .NAME.trime-lock
_READ_RETRIES = 10         # an empty lock file (the O_EXCL fallback, being written) is read again this often
_TAKEOVER_TRIES = 3        # other jobs racing for a stale lock: give up after this many rounds
OTHER_HOST_WAIT_S = 60.0   # a rank other than 0 waits this long for rank 0 to take over another host's lock


class OutputLocked(ValueError):
    """Another job holds the output (a ValueError: the CLI prints it as one line and exits 2)."""


def lock_path(output: str, inside: bool = True) -> str:
    """Where the lock of `output` lives: in the folder (a stage that writes into it), or beside it (a file,
    or a folder renamed into place at the end)."""
    output = os.path.abspath(output)
    if inside:
        return os.path.join(output, LOCK_NAME)
    return os.path.join(os.path.dirname(output), f".{os.path.basename(output)}{LOCK_NAME}")


# ----------------------------------------------------------------------------- who holds it

def _proc_start_ticks(pid: int) -> Optional[int]:
    """When `pid` started (clock ticks after boot, /proc/PID/stat field 22); None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name, which may hold spaces


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _record(output: str, command: Optional[str], job: str) -> dict:
    pid = os.getpid()
    return {"output": os.path.abspath(output), "job": job, "host": socket.gethostname(), "pid": pid,
            "pid_start_ticks": _proc_start_ticks(pid), "boot_id": _boot_id(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **_slurm_run(),
            "command": command or _command_line(), "token": secrets.token_hex(8)}


def _command_line() -> str:
    """This process's command as the user typed it: `trime train ...` also under `python -m trime_dist.cli`."""
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) in ("trime", "cli.py", "__main__.py"):
        argv = ["trime", *[a for a in argv[1:] if not a.startswith("--local_rank")]]
    return shlex.join(argv)[:300]


def _slurm_run() -> dict:
    """{slurm_job, slurm_restart}: which run of which SLURM job this is ({} outside SLURM)."""
    job = os.environ.get("SLURM_JOB_ID")
    return {"slurm_job": job, "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)} if job else {}


def describe(holder: dict) -> str:
    """`host h, pid 12, started 2026-01-01 10:00:00 UTC: trime train ...`"""
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
            f": {holder.get('command', '?')}")


def dead_reason(holder: dict) -> Optional[str]:
    """Why the holder is gone (its lock may be taken over); None while it may be alive, and for a job of
    another host unless it was an earlier run of our own SLURM job."""
    ours = _slurm_run()
    if ours and holder.get("slurm_job") == ours["slurm_job"] and \
            isinstance(holder.get("slurm_restart"), int) and holder["slurm_restart"] < ours["slurm_restart"]:
        return f"it was run {holder['slurm_restart']} of SLURM job {ours['slurm_job']}, now requeued as run " \
               f"{ours['slurm_restart']}"
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return f"pid {pid!r} is not a process id"
    boot = _boot_id()
    if boot and holder.get("boot_id") and holder["boot_id"] != boot:
        return "the host has rebooted since"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} is not running"
    except PermissionError:
        pass  # alive, another user's
    ticks = _proc_start_ticks(pid)
    if ticks is not None and holder.get("pid_start_ticks") is not None and ticks != holder["pid_start_ticks"]:
        return f"pid {pid} is now another process (it started at another time)"
    return None


# ----------------------------------------------------------------------------- the lock file

def _read(path: str) -> Optional[tuple[dict, tuple[int, int]]]:
    """(the holder's record, the file's identity) or None when there is no lock file."""
    for _ in range(_READ_RETRIES):
        try:
            with open(path) as f:
                text, st = f.read(), os.fstat(f.fileno())
        except FileNotFoundError:
            return None
        if text:
            break
        time.sleep(0.1)  # made by the O_EXCL fallback and not written yet
    try:
        holder = json.loads(text)
        problem = None if isinstance(holder, dict) else "not a JSON object"
    except ValueError as e:
        problem = f"not JSON: {e}"
    if problem:
        raise ValueError(f"lock file {path} is not a trime lock ({problem}): if no job is writing that output, "
                         "delete it and rerun")
    return holder, (st.st_dev, st.st_ino)


def _create(path: str, record: dict) -> bool:
    """Make the lock file holding `record`; False when one exists already."""
    data = (json.dumps(record, indent=1) + "\n").encode("utf-8")
    mine = f"{path}.{record['token']}"
    with open(mine, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(mine, path)
        return True
    except FileExistsError:
        # over NFS a link() whose reply was lost reports EEXIST although it was made: the count tells
        return os.stat(mine).st_nlink == 2
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        return _create_exclusive(path, data)  # a filesystem without hard links
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(mine)


def _create_exclusive(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _remove_if_same(path: str, identity: tuple[int, int], token: str) -> None:
    """Remove the lock file if it is still the one judged stale: renamed away first, so of two jobs taking
    over the same stale lock only one removes it; a lock that turns out newer is put back."""
    aside = f"{path}.stale-{token}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another job removed it first
    st = os.stat(aside)
    if (st.st_dev, st.st_ino) != identity:  # a job that took it over meanwhile: give its lock back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    os.remove(aside)


def acquire(output: str, *, inside: bool = True, command: Optional[str] = None, job: str = "") -> dict:
    """Take the lock of `output` for this process (the output folder is made when missing); returns our
    record. OutputLocked naming the holder when another job has it; ValueError for a corrupt lock file."""
    path = lock_path(output, inside)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = _record(output, command, job)
    for _ in range(_TAKEOVER_TRIES):
        if _create(path, record):
            return record
        found = _read(path)
        if found is None:
            continue  # released meanwhile
        holder, identity = found
        reason = dead_reason(holder)
        if reason is None:
            raise OutputLocked(_refusal(output, path, holder))
        log.warning("taking over the lock of %s left by a job that is gone (%s): %s", output, describe(holder), reason)
        _remove_if_same(path, identity, record["token"])
    raise OutputLocked(f"output {os.path.abspath(output)}: other jobs keep taking its lock {path}; try again")


def check_not_held(output: str, job: str, *, inside: bool = True) -> None:
    """A rank other than 0: OutputLocked when a live job other than `job` holds `output` (nothing is
    written; rank 0 of this job takes the lock, or takes over a stale one). A lock of another host is
    waited for (up to OTHER_HOST_WAIT_S): this rank cannot tell whether its holder is alive, but rank 0 may be
    on that host and take it over: a rerun after a killed 2-node job found the lock of the dead rank 0 on
    nodeA from nodeB's rank before the new rank 0 had replaced it, and stopped the job with no line."""
    path = lock_path(output, inside)
    deadline = time.monotonic() + OTHER_HOST_WAIT_S
    while True:
        found = _read(path)
        if found is None or found[0].get("job") == job or dead_reason(found[0]) is not None:
            return
        if found[0].get("host") == socket.gethostname() or time.monotonic() >= deadline:
            raise OutputLocked(_refusal(output, path, found[0]))
        time.sleep(0.2)


def _refusal(output: str, path: str, holder: dict) -> str:
    output = os.path.abspath(output)
    if holder.get("host") == socket.gethostname():
        return f"output {output} is in use by another job ({describe(holder)}); lock file {path}"
    return (f"output {output} is in use by a job on another host ({describe(holder)}); it cannot be checked "
            f"from here: if that job is dead, delete {path} and rerun")


def release(output: str, record: dict, *, inside: bool = True) -> None:
    """Remove our lock file; one another job took over (it judged us gone) is left to it."""
    path = lock_path(output, inside)
    try:
        found = _read(path)
    except ValueError:
        found = None
    if found is None or found[0].get("token") != record["token"]:
        log.warning("the lock of %s is no longer ours (%s); leaving it", output,
                    describe(found[0]) if found else "no lock file")
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


@contextlib.contextmanager
def output_lock(output: str, *, rank: int = 0, bcast: Optional[Callable[[Any], Any]] = None,
                inside: bool = True) -> Iterator[None]:
    """Hold the lock of `output` for the block: rank 0 takes it and removes it on the way out (errors and
    the stop-by-signal exit included). With `bcast` (an MPI stage's mpi.bcast) every rank raises rank 0's
    refusal; without (torch stages, before their group exists) the other ranks check the lock file
    themselves (check_not_held). Either way the refusal is marked as every rank's (core.mpi.agreed), so
    only rank 0 prints it. Rank 0 leaves the block after the other ranks have written everything (each
    stage ends in a collective)."""
    from trime_dist.core.launch_env import discover_env, job_key
    from trime_dist.core.mpi import agreed, plan_on_root

    record = None
    made_folder = inside and not os.path.isdir(output)
    job = job_key(discover_env())

    def take() -> None:
        nonlocal record
        record = acquire(output, inside=inside, job=job)

    try:
        if bcast is not None:
            plan_on_root(take, rank=rank, bcast=bcast)
        elif rank == 0:
            take()
        else:
            check_not_held(output, job, inside=inside)
    except ValueError as e:
        agreed(e)
        raise
    try:
        yield
    finally:
        if record is not None:
            release(output, record, inside=inside)
            if made_folder:  # a job that wrote nothing leaves no empty output folder behind
                with contextlib.suppress(OSError):
                    os.rmdir(output)
