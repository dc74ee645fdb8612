"""Tiny MPI helpers for the offline stages (prepare, BM25 grouping), with a 1-process fallback.

mpi4py is imported only when an MPI launcher (mpiexec, srun --mpi=pmi2/pmix) started this
process, or TRIME_USE_MPI=1; otherwise every helper acts as a world of one rank.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import traceback
from typing import Any, Iterator

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


def bcast(obj: Any, root: int = 0) -> Any:
    """`root`'s picklable `obj` on every rank."""
    return get_comm().bcast(obj, root=root)


def agreed(exc: BaseException) -> BaseException:
    """Mark an exception that every rank raises together (so exiting normally cannot hang a rank)."""
    exc.all_ranks = True
    return exc


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
