"""Tiny MPI helpers for the offline stages (prepare, BM25 grouping), with a 1-process fallback.

mpi4py is imported only when an MPI launcher (mpiexec, srun --mpi=pmi2/pmix) started this
process, or TRIME_USE_MPI=1; otherwise every helper acts as a world of one rank.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import traceback
from typing import Any, Callable, Iterator, Optional

import numpy as np

from trime_dist.core.launch_env import launched_by_mpi


class _SingleComm:
    """The subset of mpi4py's communicator API the helpers use, for one process."""

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def Barrier(self) -> None:
        pass

    def gather(self, obj: Any, root: int = 0) -> list:
        return [obj]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather(self, obj: Any) -> list:
        return [obj]

    def alltoall(self, objs: list) -> list:
        return list(objs)


@functools.lru_cache(maxsize=1)
def get_comm():
    """MPI.COMM_WORLD under an MPI launcher, else a one-rank stand-in."""
    if not launched_by_mpi():
        return _SingleComm()
    from mpi4py import MPI

    return MPI.COMM_WORLD


def rank() -> int:
    return get_comm().Get_rank()


def size() -> int:
    return get_comm().Get_size()


def barrier() -> None:
    get_comm().Barrier()


def allreduce_sum(x: np.ndarray) -> np.ndarray:
    """Element-wise sum of `x` over ranks (same shape and dtype on every rank); returns a new array."""
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    comm = get_comm()
    if isinstance(comm, _SingleComm):
        out[...] = x
    else:
        from mpi4py import MPI

        comm.Allreduce(x, out, op=MPI.SUM)
    return out


def gather(obj: Any, root: int = 0) -> list | None:
    """Picklable `obj` of every rank as a list in rank order on `root`; None on other ranks."""
    return get_comm().gather(obj, root=root)


def allgather(obj: Any) -> list:
    return get_comm().allgather(obj)


def allgatherv(x: np.ndarray) -> np.ndarray:
    """Every rank's 1-D array `x` (same dtype everywhere, any length) concatenated in rank order, on every
    rank. Sent as raw buffers (MPI Allgatherv), not pickled: O(total) memory and no per-object copies;
    mpi4py >= 4 uses MPI-4 large-count calls, so a rank's share may pass 2**31 elements."""
    x = np.ascontiguousarray(x).ravel()
    comm = get_comm()
    if isinstance(comm, _SingleComm):
        return x.copy()
    sizes = np.empty(comm.Get_size(), dtype=np.int64)
    comm.Allgather(np.array([x.size], dtype=np.int64), sizes)
    out = np.empty(int(sizes.sum()), dtype=x.dtype)
    displs = np.zeros_like(sizes)
    np.cumsum(sizes[:-1], out=displs[1:])
    comm.Allgatherv(x, [out, (sizes.tolist(), displs.tolist())])  # datatype from the buffer's dtype
    return out


def alltoall(objs: list) -> list:
    """Personalised exchange: rank r sends picklable objs[d] to rank d and returns what every rank sent it,
    in rank order. Each message holds only what one rank sends one other rank."""
    return get_comm().alltoall(objs)


def bcast(obj: Any, root: int = 0) -> Any:
    """`root`'s picklable `obj` on every rank."""
    return get_comm().bcast(obj, root=root)


def agreed(exc: BaseException) -> BaseException:
    """Mark an exception that every rank raises together (so exiting normally cannot hang a rank)."""
    exc.all_ranks = True
    return exc


# ----------------------------------------------------------------------------- errors every rank agrees on

USER_ERRORS = (ValueError, FileNotFoundError, OSError)  # what one rank reports to all instead of crashing alone


def _portable(e: BaseException, prefix: str = "") -> tuple[bool, str]:
    """What travels to the other ranks: (is it a FileNotFoundError, the message)."""
    return isinstance(e, FileNotFoundError), prefix + str(e)


def _rebuild(error: tuple[bool, str]) -> BaseException:
    """The same error on every rank: FileNotFoundError or ValueError (an OSError too, so the CLI prints
    it as one line), with the failing rank's message, marked `agreed`."""
    return agreed((FileNotFoundError if error[0] else ValueError)(error[1]))


def plan_on_root(make_plan: Callable[[], Any], *, rank: int, bcast: Callable[[Any], Any],
                 errors: tuple = USER_ERRORS) -> Any:
    """Rank 0 runs make_plan(); every rank returns its result, or raises rank 0's error (see _rebuild).

    bcast(obj) sends rank 0's picklable obj to every rank: this module's bcast for MPI stages,
    core.distributed.broadcast_object for torch ones. Errors not in `errors` are raised on rank 0
    alone (a bug, not bad input: under MPI, abort_on_error then ends the job)."""
    box, cause = None, None
    if rank == 0:
        try:
            box = {"plan": make_plan()}
        except errors as e:
            box, cause = {"error": _portable(e)}, e
    box = bcast(box)
    if "error" in box:
        raise _rebuild(box["error"]) from cause  # rank 0 keeps the original traceback (--debug)
    return box["plan"]


def raise_first_error(error: Optional[BaseException], prefix: str = "") -> None:
    """Collective: when any rank passes an error, every rank raises the first one (in rank order, with
    `prefix` -- e.g. "rank 1: " -- before its message); otherwise returns on every rank."""
    errors = gather(None if error is None else _portable(error, prefix))
    first = bcast(next((e for e in errors if e), None) if errors is not None else None)
    if first:
        raise _rebuild(first) from error  # this rank's own error, if any, stays in the traceback (--debug)


@contextlib.contextmanager
def abort_on_error() -> Iterator[None]:
    """With several ranks, an exception raised on one rank only (not marked with `agreed`) aborts
    the whole MPI job: otherwise the other ranks would wait in their next collective forever."""
    try:
        yield
    except BaseException as e:
        if size() > 1 and not getattr(e, "all_ranks", False):
            traceback.print_exc()
            sys.stderr.flush()
            get_comm().Abort(1)
        raise
