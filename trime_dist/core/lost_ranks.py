"""When a collective fails or times out, find which ranks are gone and say so in one line.

A rank killed mid-run makes gloo/NCCL raise on the others ("Connection closed by peer") or, if it hangs
instead, makes them wait until the process-group timeout. Either way the survivors then check in
through the rendezvous store (a TCPStore that rank 0 hosts at MASTER_ADDR:MASTER_PORT) and wait a
short grace period for each other; a store that cannot be reached means rank 0 is gone.

With more than two ranks, some survivors hear of the failure late: they still wait inside a collective
and cannot check in. So every rank also runs a Heartbeat, a thread that bumps a counter in the store
(collectives release the GIL): a rank is lost when it neither checks in nor beats during the grace
period. Torch is imported only when a check or a heartbeat runs.

Every rank also publishes its host name in the store once its process group exists (publish_host), so a
line can say where a lost rank ran: "rank 1 (node002) of 16 died or stopped answering". Rank 0's host is the
store's own (MASTER_ADDR), the one thing known when the store is gone.
"""
from __future__ import annotations

import datetime
import socket
import threading
import time

from trime_dist.core.launch_env import DistEnv, master_host, where

CHECK_IN_GRACE_S = 5.0    # survivors hear of a failure within a few seconds of each other
HEARTBEAT_S = 0.5         # a live rank's counter moves several times within the grace period
_STORE_HOST_EXTRA_S = 2.0
_KEY = "trime/lost_ranks/alive/{}"
_BEAT_KEY = "trime/lost_ranks/beat/{}"
_VERDICT_KEY = "trime/lost_ranks/verdict"  # the lost ranks, as the first rank to conclude found them
_ACK_KEY = "trime/lost_ranks/ack/{}"
_HOST_KEY = "trime/lost_ranks/host/{}"  # each rank's host name, set at start
_checking = threading.Event()  # set once this process runs find_lost_ranks
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


def publish_host(env: DistEnv, timeout_s: float = CHECK_IN_GRACE_S) -> None:
    """Write this rank's host name into the rendezvous store (call once the process group exists), so the
    others can say where it ran when it is lost."""
    if env.world_size == 1:
        return
    from torch.distributed import TCPStore

    store = TCPStore(env.master_addr, env.master_port, is_master=False, wait_for_workers=False,
                     timeout=datetime.timedelta(seconds=timeout_s))
    store.set(_HOST_KEY.format(env.rank), socket.gethostname())


def find_lost_ranks(env: DistEnv, grace_s: float = CHECK_IN_GRACE_S) -> dict[int, str]:
    """The ranks that neither check in nor beat within grace_s, each with its host ({0: its host} when rank
    0's store cannot be reached). The first rank to conclude publishes its verdict in the store; later
    checks, and the Heartbeat threads of ranks still blocked in a collective, report that same verdict."""
    from torch.distributed import TCPStore

    _checking.set()  # this rank reports for itself: its Heartbeat leaves the verdict alone
    rank_0_lost = {0: master_host(env)}
    if env.rank != 0 and not _reachable(env.master_addr, env.master_port, grace_s):
        return rank_0_lost  # (checked first: TCPStore logs every failed connection attempt with a C++ trace)
    try:
        store = TCPStore(env.master_addr, env.master_port, is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=grace_s))
        store.set(_KEY.format(env.rank), "1")
    except Exception:  # noqa: BLE001  (any failure to reach it: rank 0's process, which hosts it, is gone)
        return rank_0_lost if env.rank != 0 else {}
    try:
        missing = _missing_ranks(store, env, grace_s)
        # compare_set writes only where no verdict is yet, and returns the one that stands
        verdict = _parse(store.compare_set(_VERDICT_KEY, "", _format(missing)))
        store.set(_ACK_KEY.format(env.rank), "1")
        lost = _with_hosts(store, verdict, env)
        if env.rank == 0:  # the store's host stays until the live ranks have read the verdict
            _wait_for_acks(store, env, verdict, grace_s)
    except Exception:  # noqa: BLE001  (rank 0 went away while we waited)
        return rank_0_lost
    return lost


def _with_hosts(store, ranks: list[int], env: DistEnv) -> dict[int, str]:
    """{rank: the host it published} ("host unknown" for a rank lost before it published one)."""
    def host(r: int) -> str:
        key = _HOST_KEY.format(r)
        if store.check([key]):
            value = store.get(key)
            return value.decode() if isinstance(value, bytes) else value
        return master_host(env) if r == 0 else "host unknown"

    return {r: host(r) for r in ranks}


def _missing_ranks(store, env: DistEnv, grace_s: float) -> list[int]:
    others = [r for r in range(env.world_size) if r != env.rank]
    # rank 0 hosts the store: it looks a little longer, so it never closes the store under another
    # rank's last look (torch logs a C++ trace for each failed store request)
    deadline = time.monotonic() + grace_s + (_STORE_HOST_EXTRA_S if env.rank == 0 else 0.0)
    first_beats = {r: _beat(store, r) for r in others}
    beating: set[int] = set()
    while True:
        if store.check([_VERDICT_KEY]):  # another rank concluded first
            return _parse(store.get(_VERDICT_KEY))
        missing = [r for r in others if r not in beating and not store.check([_KEY.format(r)])]
        beating.update(r for r in missing if first_beats[r] is not None and _beat(store, r) != first_beats[r])
        missing = [r for r in missing if r not in beating]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def _wait_for_acks(store, env: DistEnv, lost: list[int], limit_s: float) -> None:
    waiting = [r for r in range(1, env.world_size) if r not in lost]
    deadline = time.monotonic() + limit_s
    while waiting and time.monotonic() < deadline:
        waiting = [r for r in waiting if not store.check([_ACK_KEY.format(r)])]
        time.sleep(0.1)


def _format(lost: list[int]) -> str:
    return ",".join(map(str, lost)) or "none"


def _parse(value) -> list[int]:
    text = value.decode() if isinstance(value, bytes) else value
    return [] if text == "none" else [int(r) for r in text.split(",")]


def _beat(store, rank: int):
    """Rank `rank`'s heartbeat counter (None when it runs no Heartbeat)."""
    key = _BEAT_KEY.format(rank)
    return store.get(key) if store.check([key]) else None


class Heartbeat:
    """A daemon thread that bumps this rank's counter in the rendezvous store every HEARTBEAT_S, so that
    find_lost_ranks counts a rank still waiting inside a collective as alive. When another rank has
    published a verdict, it ends this rank (its main thread may be blocked in C++) with the same one
    line. Start it once the process group exists; a store that goes away ends the thread quietly."""

    def __init__(self, env: DistEnv, stage: str, during: str):
        self.env, self.stage, self.during = env, stage, during
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trime-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        if self.env.world_size > 1:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        from torch.distributed import TCPStore

        try:
            store = TCPStore(self.env.master_addr, self.env.master_port, is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=CHECK_IN_GRACE_S))
            count = 0
            while not self._done.is_set():
                count += 1
                store.set(_BEAT_KEY.format(self.env.rank), str(count))
                if not _checking.is_set() and store.check([_VERDICT_KEY]):
                    self._stop_rank(store, _parse(store.get(_VERDICT_KEY)))
                self._done.wait(HEARTBEAT_S)
        except Exception:  # noqa: BLE001  (the store is gone: rank 0 exited; the checks say the rest)
            return

    def _stop_rank(self, store, verdict: list[int]) -> None:
        import logging
        import os
        import sys

        from trime_dist.core.constants import EXIT_RANK_LOST

        store.set(_ACK_KEY.format(self.env.rank), "1")
        lost = _with_hosts(store, verdict, self.env)
        print(f"trime {self.stage}: error: {where(self.env)}: {describe_lost(lost, self.env)} during "
              f"{self.during}; stopping this rank too", file=sys.stderr, flush=True)
        if self.env.rank == 0:
            _wait_for_acks(store, self.env, verdict, CHECK_IN_GRACE_S)
        logging.shutdown()
        os._exit(EXIT_RANK_LOST)  # the main thread may be blocked in a collective


def _reachable(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def describe_lost(lost: dict[int, str], env: DistEnv) -> str:
    """"rank 1 (node002) of 2 died or stopped answering", or what is known when every rank still answers."""
    if not lost:
        return f"all {env.world_size} ranks still answer"
    named = [f"{r} ({host})" for r, host in lost.items()]
    who = f"rank {named[0]}" if len(lost) == 1 else "ranks " + ", ".join(named)
    what = f"{who} of {env.world_size} died or stopped answering"
    if list(lost) == [0]:
        what += f" (its rendezvous store at {env.master_addr}:{env.master_port} is unreachable)"
    return what


def rank_lost_error(exc: BaseException, env: DistEnv, during: str) -> RankLost:
    """The one-line error for a peer failure seen by this rank `during` some phase (e.g. "training")."""
    reason = " ".join(str(exc).split())
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    return RankLost(f"{where(env)}: {describe_lost(find_lost_ranks(env), env)} during {during}; stopping this "
                    f"rank too ({type(exc).__name__}: {reason})")
