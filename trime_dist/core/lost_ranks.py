"""When a collective fails or times out, find which ranks are gone and say so in one line.

A rank killed mid-run makes gloo/NCCL raise on the others ("Connection closed by peer") or, if it hangs
instead, makes them wait until the process-group timeout. Either way the survivors then check in
through the rendezvous store (a TCPStore that rank 0 hosts at MASTER_ADDR:MASTER_PORT) and wait a
short grace period for each other: ranks that never check in are the lost ones; a store that cannot
be reached means rank 0 is gone. Torch is imported only when a check runs.
"""
from __future__ import annotations

import datetime
import socket
import time

from trime_dist.core.launch_env import DistEnv

CHECK_IN_GRACE_S = 5.0    # survivors hear of a failure within a few seconds of each other
_STORE_HOST_EXTRA_S = 2.0
_KEY = "trime/lost_ranks/alive/{}"
# messages of gloo / NCCL / c10d errors that mean "another rank is gone or stuck"
_PEER_FAILURE_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                         "timeout", "socket", "gloo", "nccl", "watchdog", "connection refused")


class RankLost(RuntimeError):
    """A collective failed because another rank died or stopped answering; the message is one line."""


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is what torch.distributed raises when another rank is gone (or a wait timed out)."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _PEER_FAILURE_MARKERS)


def find_lost_ranks(env: DistEnv, grace_s: float = CHECK_IN_GRACE_S) -> list[int]:
    """The ranks that do not check in within grace_s ([0] when rank 0's store cannot be reached)."""
    from torch.distributed import TCPStore

    if env.rank != 0 and not _reachable(env.master_addr, env.master_port, grace_s):
        return [0]  # (checked first: TCPStore logs every failed connection attempt with a C++ trace)
    try:
        store = TCPStore(env.master_addr, env.master_port, is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=grace_s))
        store.set(_KEY.format(env.rank), "1")
    except Exception:  # noqa: BLE001  (any failure to reach it: rank 0's process, which hosts it, is gone)
        return [0] if env.rank != 0 else []
    others = [r for r in range(env.world_size) if r != env.rank]
    # rank 0 hosts the store: it looks a little longer, so it never closes the store under another
    # rank's last look (torch logs a C++ trace for each failed store request)
    deadline = time.monotonic() + grace_s + (_STORE_HOST_EXTRA_S if env.rank == 0 else 0.0)
    while True:
        try:
            missing = [r for r in others if not store.check([_KEY.format(r)])]
        except Exception:  # noqa: BLE001  (rank 0 went away while we waited)
            return [0]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def _reachable(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def describe_lost(lost: list[int], env: DistEnv) -> str:
    """"rank 1 of 2 died or stopped answering", or what is known when every rank still answers."""
    if not lost:
        return f"all {env.world_size} ranks still answer"
    who = f"rank {lost[0]}" if len(lost) == 1 else "ranks " + ", ".join(map(str, lost))
    what = f"{who} of {env.world_size} died or stopped answering"
    if lost == [0]:
        what += f" (its rendezvous store at {env.master_addr}:{env.master_port} is unreachable)"
    return what


def rank_lost_error(exc: BaseException, env: DistEnv, during: str) -> RankLost:
    """The one-line error for a peer failure seen by this rank `during` some phase (e.g. "training")."""
    reason = " ".join(str(exc).split())
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    return RankLost(f"rank {env.rank}: {describe_lost(find_lost_ranks(env), env)} during {during}; stopping this "
                    f"rank too ({type(exc).__name__}: {reason})")
