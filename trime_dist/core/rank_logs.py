"""Per-rank log files named by host: with TRIME_LOG_DIR set, every rank of a stage also writes its log lines to
DIR/STAGE[-JOB]-HOST-rankR.log, so the ranks of several nodes share one folder without two writing one file.

The launchers set it (`trime launch slurm`: the run's logs/ folder, beside SLURM's job log; `trime launch
deepspeed --hosts`: RUN_DIR/logs); JOB is SLURM_JOB_ID when there is one (a chain's jobs share the folder).
Files are appended to: a requeued or resumed job goes on in the same file. No torch here.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Optional

LOG_DIR_ENV = "TRIME_LOG_DIR"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def short_host() -> str:
    """This machine's name without the domain (what SLURM's %N and pdsh's prefixes show)."""
    return socket.gethostname().split(".")[0] or "localhost"


def rank_log_name(stage: str, host: str, rank: int, job_id: Optional[str] = None) -> str:
    """`train-nodeA-rank0.log`, or `train-1234-nodeA-rank0.log` in SLURM job 1234."""
    return f"{stage}-{job_id + '-' if job_id else ''}{host}-rank{rank}.log"


def add_rank_log_file(stage: str, rank: Optional[int] = None) -> Optional[logging.Handler]:
    """With TRIME_LOG_DIR set: a handler on the root logger writing this rank's lines to its file (returned,
    for a caller that runs stages in-process to remove); None otherwise."""
    folder = os.environ.get(LOG_DIR_ENV, "").strip()
    if not folder:
        return None
    if rank is None:
        from trime_dist.core.launch_env import discover_env

        rank = discover_env().rank
    path = os.path.join(folder, rank_log_name(stage, short_host(), rank, os.environ.get("SLURM_JOB_ID")))
    try:
        os.makedirs(folder, exist_ok=True)
        handler = logging.FileHandler(path, mode="a")
    except OSError as e:
        raise ValueError(f"{LOG_DIR_ENV}={folder}: cannot write the rank's log file {path}: {e}") from None
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    return handler
