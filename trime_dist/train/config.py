"""The training stage's config: one dataclass per component, checked as a whole before any process starts.

Loaded as defaults < YAML < `a.b=c` overrides by trime_dist.core.config.load_config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from trime_dist.core.config import ConfigError
from trime_dist.core.config import require as _require
from trime_dist.model.config import ModelConfig


@dataclass
class DataConfig:
    train: str = ""              # prepared (or grouped) shard directory for training
    valid: Optional[str] = None  # prepared shard directory for validation (empty = none)
    micro_batch_size: int = 8    # segments per rank per forward pass
    global_batch_size: int = 16  # segments per optimizer step, over all ranks and accumulation
    placement: str = "contiguous"  # how a group is dealt to ranks: contiguous | interleaved
    num_workers: int = 0         # loader worker processes per rank
    shuffle_shards: bool = True  # shuffle shard order each epoch (seeded; groups stay whole)


@dataclass
class ObjectiveConfig:
    name: str = "trime_local"    # ce | trime_local | trime_long | trime_ext
    temperature: float = 1.0     # tau in sim = q.k / (sqrt(d) * tau)
    cross_sent_ratio: float = 0.9  # trime_ext: probability a step switches off local memory
    ce_warmup_steps: int = 0     # plain cross-entropy for the first N optimizer steps
    ce_warmup_epochs: int = 0    # ... or for the first N epochs (the paper: 3-9)


@dataclass
class MemoryConfig:
    gather_grad: bool = True     # remote keys carry gradients back (False = original code: detached)
    tiled: bool = True           # use the tiled objective (never builds the N x M matrix)
    tile_size: int = 1024        # keys per tile in the tiled objective


@dataclass
class OptimConfig:
    name: str = "adamw"          # adamw | sgd (plain SGD: updates are exactly lr x gradient)
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    schedule: str = "cosine"     # cosine | inverse_sqrt | constant (all after linear warmup)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1    # cosine floor as a fraction of lr
    grad_clip: float = 1.0       # max global grad norm (0 = off)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0          # 0 | 1 | 2 | 3
    precision: str = "fp32"      # fp32 | bf16
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed JSON


@dataclass
class RunConfig:
    out_dir: str = "runs/train"
    seed: int = 1234
    max_steps: int = 200         # optimizer steps (training stops at max_steps or max_epochs)
    max_epochs: int = 1000
    log_every: int = 10
    eval_every: int = 0          # 0 = only at the end
    eval_batches: int = 0        # validation micro-batches per evaluation (0 = the whole split)
    save_every: int = 100        # checkpoint every N optimizer steps (and always at the end)
    keep_checkpoints: int = 2    # newest N step checkpoints are kept
    threads: int = 0             # torch intra-op threads per rank (0 = leave as is)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)


OBJECTIVES = ("ce", "trime_local", "trime_long", "trime_ext")
SCHEDULES = ("cosine", "inverse_sqrt", "constant")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
PLACEMENTS = ("contiguous", "interleaved")


def validate_train_config(cfg: TrainConfig, world_size: int) -> None:
    """Cross-field checks that need the world size; raises ConfigError naming the key."""
    m, d, o, op, ds, r = cfg.model, cfg.data, cfg.objective, cfg.optim, cfg.deepspeed, cfg.run
    _require(o.name in OBJECTIVES, "objective.name", f"got {o.name!r}, allowed: {', '.join(OBJECTIVES)}")
    _require(op.name in OPTIMIZERS, "optim.name", f"got {op.name!r}, allowed: {', '.join(OPTIMIZERS)}")
    _require(op.schedule in SCHEDULES, "optim.schedule", f"got {op.schedule!r}, allowed: {', '.join(SCHEDULES)}")
    _require(ds.precision in PRECISIONS, "deepspeed.precision", f"got {ds.precision!r}, allowed: {', '.join(PRECISIONS)}")
    _require(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"got {ds.zero_stage}, allowed: 0, 1, 2, 3")
    _require(d.placement in PLACEMENTS, "data.placement", f"got {d.placement!r}, allowed: {', '.join(PLACEMENTS)}")
    _require(bool(d.train), "data.train", "is empty; set it to a directory made by `trime prepare` or `trime group`")
    _require(m.d_model % m.n_heads == 0, "model.d_model", f"{m.d_model} is not divisible by model.n_heads={m.n_heads}")
    for key, val in (("model.n_layers", m.n_layers), ("model.d_model", m.d_model), ("model.n_heads", m.n_heads),
                     ("model.d_ffn", m.d_ffn), ("model.max_seq_len", m.max_seq_len),
                     ("data.micro_batch_size", d.micro_batch_size), ("data.global_batch_size", d.global_batch_size),
                     ("run.max_steps", r.max_steps)):
        _require(val > 0, key, f"must be > 0, got {val}")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _require(o.temperature > 0, "objective.temperature", f"must be > 0, got {o.temperature}")
    _require(0.0 <= o.cross_sent_ratio <= 1.0, "objective.cross_sent_ratio", f"must be in [0, 1], got {o.cross_sent_ratio}")
    _require(op.lr > 0, "optim.lr", f"must be > 0, got {op.lr}")
    _require(cfg.memory.tile_size > 0, "memory.tile_size", f"must be > 0, got {cfg.memory.tile_size}")
    per_pass = world_size * d.micro_batch_size
    _require(d.global_batch_size % per_pass == 0, "data.global_batch_size",
             f"{d.global_batch_size} is not divisible by ranks x data.micro_batch_size = "
             f"{world_size} x {d.micro_batch_size} = {per_pass}")
    if r.save_every <= 0:
        raise ConfigError("run.save_every: must be > 0")


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    return cfg.data.global_batch_size // (world_size * cfg.data.micro_batch_size)
