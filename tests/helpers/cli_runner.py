"""Paths of the checkout and the one way tests run the `trime` command line: one process, DeepSpeed ranks
or MPI ranks, in a subprocess whose failure shows the end of its output."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)   # the venv's console scripts: trime, deepspeed, mpiexec
MPIEXEC = os.path.join(BIN, "mpiexec")
CONFIGS = os.path.join(REPO, "configs")


def trime_command(args, ranks: int = 1, launcher: str = "deepspeed") -> list[str]:
    """The command line of `trime ARGS` on `ranks` ranks: one process, the DeepSpeed launcher or mpiexec."""
    args = [str(a) for a in args]
    if ranks == 1:
        return [sys.executable, "-m", "trime_dist.cli", *args]
    if launcher == "mpi":
        return [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "trime_dist.cli", *args]
    if launcher != "deepspeed":
        raise ValueError(f"launcher {launcher!r}: expected 'deepspeed' or 'mpi'")
    from trime_dist.core.launch_env import free_port

    return [f"{BIN}/deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), f"{BIN}/trime", *args]


def run_trime(args, ranks: int = 1, *, launcher: str = "deepspeed", check: bool = True, cwd: str = REPO,
              env: Optional[dict] = None, timeout: float = 600, context=None) -> subprocess.CompletedProcess:
    """Run `trime ARGS` (see trime_command) with one CPU thread per rank; with check, a failure raises
    AssertionError with the command, the tails of stdout and stderr, and `context()` (e.g. job logs)."""
    from trime_dist.core.launch_env import free_port

    full_env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                    MASTER_PORT=str(free_port()), **(env or {}))
    cmd = trime_command(args, ranks, launcher)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        extra = f"\n{context()}" if context else ""
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
                             f"{extra}")
    return proc
