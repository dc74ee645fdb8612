"""Run a function in W real gloo processes (torch.multiprocessing, a free TCP port) and collect
what each rank returns; for testing collectives against a single-process reference."""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trime_dist.core.launch_env import free_port


def _worker(rank: int, fn, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    # Done: leave without interpreter teardown. DeepSpeed's CPU shared-memory all-reduce (loaded by
    # tests that build models under zero.Init) can abort in its C++ destructors at exit ("terminate
    # called without an active exception"), which would fail a rank whose result is already saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout_s: float = 180.0) -> list:
    """Call fn(rank, world_size, *args) in `world_size` gloo processes; return [result of rank 0, ...].

    fn must be a module-level (picklable) function; its result is passed back with torch.save.
    A rank that raises fails the call with its traceback; a hang fails it after timeout_s.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(fn, world_size, free_port(), out_dir, args),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{world_size} ranks running {fn.__name__} did not finish in {timeout_s}s")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]
