"""SLURM settings for `trime launch slurm` / `slurm-chain`: one dataclass, per-stage overrides, strict YAML keys."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

from trime_dist.core.config import ConfigError, load_config, opt
from trime_dist.core.stages import TORCH, launchable, runner_for

_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")


@dataclass
class StageResources:
    """Per-stage overrides of SlurmConfig's resources (unset = the top-level value)."""
    nodes: Optional[int] = opt(None, "--nodes")
    tasks_per_node: Optional[int] = opt(None, "--ntasks-per-node (MPI stages; torch stages: one per GPU)")
    gpus_per_node: Optional[int] = opt(None, "--gpus-per-node")
    cpus_per_task: Optional[int] = opt(None, "--cpus-per-task")
    mem: Optional[str] = opt(None, "--mem per node")
    time: Optional[str] = opt(None, "--time limit")
    partition: Optional[str] = opt(None, "--partition")


@dataclass
class SlurmConfig:
    run_dir: str = opt("runs/slurm", "sbatch scripts, logs/ and jobs.jsonl are written here")
    job_name: str = opt("trime", "job names are JOB_NAME-STAGE")
    partition: Optional[str] = opt(None, "--partition (None = the cluster's default)")
    account: Optional[str] = opt(None, "--account")
    qos: Optional[str] = opt(None, "--qos")
    time: str = opt("01:00:00", "--time limit, [D-]HH:MM:SS")
    nodes: int = opt(1, "--nodes")
    tasks_per_node: int = opt(1, "MPI stages; torch stages without GPUs (one task = one CPU rank)")
    gpus_per_node: int = opt(0, "torch stages run one task per GPU; 0 = CPU ranks")
    cpus_per_task: int = opt(1, "--cpus-per-task (also OMP_NUM_THREADS unless env sets it)")
    mem: Optional[str] = opt(None, "--mem per node, e.g. 200G (None = cluster default)")
    mpi: str = opt("mpiexec", "how MPI stages start: mpiexec = MPICH's hydra inside the job (its own PMI server, "
                              "its proxies started with srun), or an `srun --mpi=` plugin: pmi2, pmix "
                              "(`srun --mpi=list`). pmi2 + MPICH 5 hangs MPI_Init at times across nodes: SLURM's "
                              "PMI-1 server reads a request in one 1024-byte read, MPICH's business card "
                              "segments can be longer")
    requeue: bool = opt(True, "--requeue: a requeued training job resumes from RUN/checkpoints")
    signal_before_limit_s: int = opt(120, "train jobs get --signal=USR1@N: SIGUSR1 N s before the time limit, "
                                          "to checkpoint and requeue (SLURM may send it up to 60 s earlier)")
    master_port: int = opt(0, "torch rendezvous port; 0 = 20000 + SLURM_JOB_ID % 20000")
    setup: list[str] = opt(doc="shell lines run first (module load, venv activation)", factory=list)
    env: dict[str, str] = opt(doc="variables exported in every job", factory=dict)
    sbatch_options: list[str] = opt(doc='more options, e.g. ["--exclusive"]', factory=list)
    stages: dict[str, StageResources] = opt(doc="per-stage resource overrides: stages.STAGE.KEY, KEY as in "
                                                "StageResources", factory=dict)
    chain: list[str] = opt(doc='slurm-chain steps: "STAGE ARGS..." in order', factory=list)


@dataclass
class JobResources:
    """What one stage's job asks for, after overrides (tasks_per_node already resolved)."""
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    mem: Optional[str]
    time: str
    partition: Optional[str]


def load_slurm_config(path: Optional[str], overrides: list[str] = ()) -> SlurmConfig:
    cfg = load_config(SlurmConfig, path, list(overrides))
    validate_slurm_config(cfg, path or "slurm config")
    return cfg


def validate_slurm_config(cfg: SlurmConfig, where: str) -> None:
    for name in cfg.stages:
        if name not in launchable():
            raise ConfigError(f"{where}: stages.{name}: unknown stage; expected one of {', '.join(launchable())}")
    for name in ("nodes", "tasks_per_node", "cpus_per_task"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{where}: {name}={getattr(cfg, name)}; expected at least 1")
    if cfg.signal_before_limit_s < 1:
        raise ConfigError(f"{where}: signal_before_limit_s={cfg.signal_before_limit_s}; expected at least 1 "
                          f"(seconds before the time limit)")
    if not re.match(r"^[a-z0-9_]+$", cfg.mpi):
        raise ConfigError(f"{where}: mpi={cfg.mpi!r}; expected mpiexec or an srun --mpi plugin name (pmi2, pmix)")
    if cfg.gpus_per_node < 0:
        raise ConfigError(f"{where}: gpus_per_node={cfg.gpus_per_node}; expected 0 or more")
    for label, value in [("time", cfg.time)] + [(f"stages.{s}.time", r.time) for s, r in cfg.stages.items()]:
        if value is not None and not _TIME.match(value):
            raise ConfigError(f"{where}: {label}={value!r}; expected [D-]HH:MM:SS, MM:SS or minutes")
    for option in cfg.sbatch_options:
        if not option.startswith("--") or "\n" in option:
            raise ConfigError(f"{where}: sbatch_options entry {option!r}; expected one option like '--exclusive'")


def resources_for(cfg: SlurmConfig, stage: str) -> JobResources:
    """The top-level resources with `stages.STAGE` overrides; torch stages get one task per GPU."""
    over = cfg.stages.get(stage, StageResources())
    pick = {f.name: getattr(over, f.name) if getattr(over, f.name) is not None else getattr(cfg, f.name)
            for f in dataclasses.fields(StageResources)}
    if runner_for(stage) == TORCH and pick["gpus_per_node"] > 0:
        if over.tasks_per_node is not None and over.tasks_per_node != pick["gpus_per_node"]:
            raise ConfigError(f"stages.{stage}: tasks_per_node={over.tasks_per_node} but gpus_per_node="
                              f"{pick['gpus_per_node']}; {stage} runs one task per GPU")
        pick["tasks_per_node"] = pick["gpus_per_node"]
    return JobResources(**pick)
