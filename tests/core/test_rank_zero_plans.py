"""Rank 0 plans, every rank gets the plan or the same error (core.mpi.plan_on_root, raise_first_error) under
2 real MPI ranks and 2 real gloo ranks; and the process-group bring-up (core.distributed.init_distributed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from trime_dist.core import mpi

from cli_runner import BIN, REPO
from dist_helpers import run_distributed

ENV = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")

MPI_SCRIPT = """
import json, sys
from trime_dist.core import mpi
out, mode = sys.argv[1], sys.argv[2]
r = mpi.rank()

def make_plan():
    if r != 0:
        raise AssertionError("only rank 0 plans")
    if mode == "fail":
        raise FileNotFoundError("input file not found: corpus.txt")
    return {"files": ["a", "b"]}

res = {}
try:
    with mpi.abort_on_error():  # an error not agreed by every rank would Abort the job instead
        res["plan"] = mpi.plan_on_root(make_plan, rank=r, bcast=mpi.bcast)
        mpi.raise_first_error(ValueError("bad shard") if r == 1 else None, f"rank {r}: ")
except (ValueError, FileNotFoundError) as e:
    res["error"] = [type(e).__name__, str(e), getattr(e, "all_ranks", False)]
open(f"{out}/r{r}.json", "w").write(json.dumps(res))
sys.exit(3 if "error" in res else 0)
"""


def _run_two_mpi_ranks(tmp_path, mode):
    script = tmp_path / "plan.py"
    script.write_text(MPI_SCRIPT)
    proc = subprocess.run([os.path.join(BIN, "mpiexec"), "-n", "2", sys.executable, str(script), str(tmp_path),
                           mode], capture_output=True, text=True, env=ENV, timeout=120)  # a hang fails here
    return proc, [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]


def test_mpi_error_on_rank_zero_is_raised_on_every_rank(tmp_path):
    proc, out = _run_two_mpi_ranks(tmp_path, "fail")
    assert proc.returncode == 3, proc.stderr[-2000:]  # both ranks exited normally (no MPI Abort)
    assert out == [{"error": ["FileNotFoundError", "input file not found: corpus.txt", True]}] * 2


def test_mpi_plan_reaches_every_rank_then_the_first_failing_rank_is_reported(tmp_path):
    proc, out = _run_two_mpi_ranks(tmp_path, "ok")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert out == [{"plan": {"files": ["a", "b"]}, "error": ["ValueError", "rank 1: bad shard", True]}] * 2


def _torch_worker(rank, world_size, fail):
    from trime_dist.core.distributed import broadcast_object

    def make_plan():
        if rank != 0:
            raise AssertionError("only rank 0 plans")
        if fail:
            raise ValueError(f"build.json: a build with different factory (rank {rank})")
        return {"part_segments": 12}

    try:
        return mpi.plan_on_root(make_plan, rank=rank, bcast=broadcast_object)
    except ValueError as e:
        return [type(e).__name__, str(e), e.all_ranks]


@pytest.mark.parametrize("fail", [False, True])
def test_torch_ranks_get_the_plan_or_rank_zeros_error(fail):
    out = run_distributed(_torch_worker, 2, args=(fail,))
    expected = ["ValueError", "build.json: a build with different factory (rank 0)", True] if fail else \
        {"part_segments": 12}
    assert out == [expected, expected]


def test_one_process_plan_and_errors():
    assert mpi.plan_on_root(lambda: [1, 2], rank=0, bcast=mpi.bcast) == [1, 2]
    with pytest.raises(ValueError, match="^nope$") as info:
        mpi.plan_on_root(_raise(PermissionError("nope")), rank=0, bcast=mpi.bcast)
    assert isinstance(info.value.__cause__, PermissionError)  # an OSError arrives as ValueError (one CLI line)
    with pytest.raises(KeyError):  # not a user error: raised as is, on rank 0 alone
        mpi.plan_on_root(_raise(KeyError("bug")), rank=0, bcast=mpi.bcast)
    mpi.raise_first_error(None)
    with pytest.raises(FileNotFoundError, match="^x: missing$"):
        mpi.raise_first_error(FileNotFoundError("missing"), "x: ")


def _raise(e):
    def fn():
        raise e
    return fn


BRING_UP = """
import json, os
import torch.distributed as dist
from trime_dist.core.distributed import init_distributed
calls = []
assert init_distributed().launcher == "single" and not dist.is_initialized()  # one process: no group
env = init_distributed(group_of_one=True, init_group=lambda backend: (calls.append(backend),
                                                                     dist.init_process_group(backend)))
again = init_distributed(group_of_one=True, init_group=calls.append)  # a group exists: nothing is done
print(json.dumps({"calls": calls, "world": dist.get_world_size(), "port": env.master_port,
                  "exported": [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")]}))
dist.destroy_process_group()
"""


def test_init_distributed_group_of_one_exports_the_env_and_uses_the_given_init():
    env = {k: v for k, v in ENV.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "PMI",
                                                              "OMPI_", "SLURM_", "PMIX", "MPI_"))}
    proc = subprocess.run([sys.executable, "-c", BRING_UP], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["calls"] == ["gloo"] and out["world"] == 1 and out["port"] != 29500  # a free port, not the default
    assert out["exported"] == ["0", "1", "0", str(out["port"])]


EXCHANGE_SCRIPT = """
import json, sys
import numpy as np
from trime_dist.core import mpi
r, R = mpi.rank(), mpi.size()
mine = np.arange(r * 10, r * 10 + 3 * r + 1, dtype=np.int32)  # ranks send different lengths (rank 0: 1)
gathered = mpi.allgatherv(mine)
got = mpi.alltoall([f"{r}->{d}" for d in range(R)])
open(f"{sys.argv[1]}/x{r}.json", "w").write(json.dumps({"gathered": gathered.tolist(), "dtype": str(gathered.dtype),
                                                       "got": got}))
"""


def test_allgatherv_and_alltoall_on_three_mpi_ranks(tmp_path):
    """Buffer Allgatherv of unequal lengths and the personalised exchange, vs the concatenation a single
    process computes."""
    script = tmp_path / "exchange.py"
    script.write_text(EXCHANGE_SCRIPT)
    proc = subprocess.run([os.path.join(BIN, "mpiexec"), "-n", "3", sys.executable, str(script), str(tmp_path)],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = [x for r in range(3) for x in range(r * 10, r * 10 + 3 * r + 1)]
    for r in range(3):
        out = json.loads((tmp_path / f"x{r}.json").read_text())
        assert out == {"gathered": want, "dtype": "int32", "got": [f"{s}->{r}" for s in range(3)]}
    assert mpi.allgatherv(np.arange(4)).tolist() == [0, 1, 2, 3]  # the one-process path
    assert mpi.alltoall(["only"]) == ["only"]
