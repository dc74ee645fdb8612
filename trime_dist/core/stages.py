"""The `trime` stages in one table: the module that implements each, how a launcher starts it, its help line.

The console script (trime_dist.cli) and the launchers (launcher/) only consult this table; adding a
stage means adding one line here. Module names are strings: nothing here imports a stage.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

TORCH = "torch"    # one process per GPU (or CPU rank); rank from RANK/... or SLURM_PROCID/...
MPI = "mpi"        # MPI ranks: mpiexec -n R, or srun --mpi=pmi2
SINGLE = "single"  # one process


@dataclass(frozen=True)
class Stage:
    module: str              # exposes add_arguments(parser) and run(args) -> int
    runner: Optional[str]    # TORCH | MPI | SINGLE; None = not started through `trime launch`
    help: str                # one line for `trime --help`


STAGES: dict[str, Stage] = {
    "corpus": Stage("data_pipeline.corpus", SINGLE,
                    "write the built-in synthetic corpus (train/valid/test text files)"),
    "prepare": Stage("data_pipeline.prepare", MPI,
                     "tokenize text into segment shards (MPI ranks share the input files)"),
    "group": Stage("data_pipeline.group", MPI,
                   "group segments into global batches: random | consecutive | bm25 (MPI)"),
    "train": Stage("trime_dist.train.cli", TORCH,
                   "train a model with DeepSpeed (run under `deepspeed` or `trime launch`)"),
    "datastore": Stage("trime_dist.datastore.cli", TORCH,
                       "build the kNN datastore and faiss index from a trained model"),
    # R ranks (one per GPU): whole streams dealt to the ranks, an exact store sharded over them
    "eval": Stage("trime_dist.eval.cli", TORCH, "perplexity under none / local / long / external memory (R ranks)"),
    "report": Stage("trime_dist.report.cli", SINGLE,
                    "a Markdown page with tables and PNG figures from run directories and eval results"),
    "export": Stage("trime_dist.model.cli", SINGLE, "write a run's model for other tools: --format hf | safetensors"),
    "launch": Stage("launcher.cli", None, "start a stage locally, on several nodes with DeepSpeed, or under SLURM"),
    "demo": Stage("trime_dist.demo", SINGLE, "the end-to-end pipeline on the built-in corpus (CPU, 2 ranks)"),
}


def launchable() -> list[str]:
    """The stages `trime launch` can start, in table order."""
    return [name for name, stage in STAGES.items() if stage.runner is not None]


def runner_for(stage: str) -> str:
    """TORCH, MPI or SINGLE; ValueError naming the launchable stages for anything else."""
    if stage not in STAGES or STAGES[stage].runner is None:
        raise ValueError(f"unknown stage {stage!r}; expected one of: {', '.join(launchable())}")
    return STAGES[stage].runner


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
    runner_for(argv[0])
    return argv[0], argv[1:]


def env_bin(name: str) -> str:
    """A console script of this Python environment (trime, deepspeed, mpiexec), else the bare name."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else name
