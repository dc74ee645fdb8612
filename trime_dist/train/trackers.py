"""Experiment trackers beside metrics.jsonl (`run.trackers`): TensorBoard and Weights & Biases, rank 0 only.

Every record written to metrics.jsonl goes to each tracker too, its numeric fields as scalars at its
"step". TensorBoard writes event files to RUN/tensorboard; wandb writes RUN/wandb, offline unless the
user set WANDB_MODE (sync later with `wandb sync RUN/wandb/offline-run-*`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

from trime_dist.train.config import TRACKERS


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics record, without its step (strings and None are left out)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    def __init__(self, out_dir: str, resume_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, events past the resumed step are dropped, as metrics.jsonl drops its lines
        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step is not None else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps what it logged (the loop has no finally)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, out_dir: str, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "trime_dist"),
                              name=os.path.basename(os.path.abspath(out_dir)), dir=out_dir, config=config,
                              mode=os.environ.get("WANDB_MODE") or "offline")  # no network here: offline

    def log(self, step: int, values: dict[str, float]) -> None:
        # wandb cannot store inf/nan in summaries consistently; metrics.jsonl keeps them
        self.run.log({k: v for k, v in values.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        self.run.finish()


class RunMetrics:
    """metrics.jsonl plus the trackers: one write() per record, as MetricsLog.write."""

    def __init__(self, log, trackers: list):
        self.log, self.trackers = log, trackers

    def write(self, record: dict) -> None:
        self.log.write(record)
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(int(record.get("step", 0)), values)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def open_run_metrics(cfg, resume_step: Optional[int]) -> RunMetrics:
    """metrics.jsonl of cfg.run.out_dir (rank 0) and the trackers cfg.run.trackers names."""
    from trime_dist.train.metrics import MetricsLog

    log = MetricsLog(os.path.join(cfg.run.out_dir, "metrics.jsonl"), resume_step)
    trackers = []
    for name in dict.fromkeys(cfg.run.trackers):  # each once, in the order given
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(cfg.run.out_dir, resume_step))
        elif name == "wandb":
            trackers.append(WandbTracker(cfg.run.out_dir, dataclasses.asdict(cfg)))
        else:
            raise ValueError(f"run.trackers: unknown tracker {name!r}, allowed: {', '.join(TRACKERS)}")
    return RunMetrics(log, trackers)
