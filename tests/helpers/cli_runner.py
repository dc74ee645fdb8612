"""Paths of the checkout and the one way tests run the `trime` command line (1 process or DeepSpeed ranks)."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)   # the venv's console scripts: trime, deepspeed, mpiexec
CONFIGS = os.path.join(REPO, "configs")


def run_trime(args, ranks=1, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if ranks == 1:
        cmd = [sys.executable, "-m", "trime_dist.cli", *args]
    else:
        from trime_dist.core.launch_env import free_port

        cmd = [f"{BIN}/deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
               f"{BIN}/trime", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
