"""Which runner starts each `trime` stage: torch ranks (DeepSpeed launcher / srun), MPI ranks, or one process.

The launchers only consult this table; adding a stage means adding one line here.
"""
from __future__ import annotations

import os
import shlex
import sys
from typing import Optional

TORCH = "torch"    # one process per GPU (or CPU rank); rank from RANK/... or SLURM_PROCID/...
MPI = "mpi"        # MPI ranks: mpiexec -n R, or srun --mpi=pmi2
SINGLE = "single"  # one process

RUNNERS: dict[str, str] = {
    "corpus": SINGLE,
    "prepare": MPI,
    "group": MPI,
    "train": TORCH,
    "datastore": TORCH,
    "eval": SINGLE,  # one process (batched searches); give it a GPU
    "demo": SINGLE,
}


def split_stage(argv: list[str]) -> tuple[str, list[str]]:
    """`["train", "--config", ...]` -> ("train", [...]); a leading `--` and a `trime` word are dropped."""
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if argv and os.path.basename(argv[0]) == "trime":
        argv = argv[1:]
    if not argv:
        raise ValueError("no stage given: put it after `--`, e.g. `trime launch local --nproc 2 -- train "
                         "--config configs/tiny.yaml`")
    stage = argv[0]
    if stage not in RUNNERS:
        raise ValueError(f"unknown stage {stage!r}; expected one of: {', '.join(RUNNERS)}")
    return stage, argv[1:]


def runner_for(stage: str) -> str:
    if stage not in RUNNERS:
        raise ValueError(f"unknown stage {stage!r}; expected one of: {', '.join(RUNNERS)}")
    return RUNNERS[stage]


def env_bin(name: str) -> str:
    """A console script of this Python environment (trime, deepspeed, mpiexec), else the bare name."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else name


def train_checkpoint_dir(stage_args: list[str], workdir: str) -> Optional[str]:
    """RUN/checkpoints of a `trime train` command line (its config resolved as train would), absolute."""
    import argparse

    from trime_dist.core.config import load_config
    from trime_dist.train.cli import add_arguments
    from trime_dist.train.config import TrainConfig

    parser = argparse.ArgumentParser(prog="trime train", add_help=False)
    add_arguments(parser)
    args, _ = parser.parse_known_args(stage_args)
    config = args.config if args.config is None or os.path.isabs(args.config) else os.path.join(workdir, args.config)
    cfg = load_config(TrainConfig, config, args.overrides)
    if not cfg.run.out_dir:
        raise ValueError("train: run.out_dir is empty; set it in the config or as run.out_dir=DIR")
    return os.path.join(workdir, cfg.run.out_dir, "checkpoints")


def quote(cmd: list[str]) -> str:
    return shlex.join(cmd)
