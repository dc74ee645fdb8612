"""Configuration: one dataclass per stage component, loaded as defaults < YAML < `a.b=c` overrides.

Loading goes through OmegaConf structured configs, which reject unknown keys and wrong types
with the full key path; `validate_train_config` adds the cross-field checks.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


# ----------------------------------------------------------------------------- components

@dataclass
class ModelConfig:
    vocab_size: int = 0          # 0 = take it from the data's tokenizer
    n_layers: int = 2            # transformer blocks
    d_model: int = 128           # residual width D
    n_heads: int = 4             # attention heads (D % n_heads == 0)
    d_ffn: int = 512             # feed-forward inner width
    max_seq_len: int = 128       # longest segment the position table covers
    dropout: float = 0.0         # dropout on attention probs, residual branches, embeddings
    tie_embeddings: bool = True  # output layer shares the input embedding matrix


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


# ----------------------------------------------------------------------------- loading

T = TypeVar("T")

OBJECTIVES = ("ce", "trime_local", "trime_long", "trime_ext")
SCHEDULES = ("cosine", "inverse_sqrt", "constant")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
PLACEMENTS = ("contiguous", "interleaved")


def load_config(cls: type[T], yaml_path: Optional[str] = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from its defaults, then the YAML file, then `a.b=c` overrides (strict keys and types)."""
    try:
        merged = OmegaConf.structured(cls)
        if yaml_path:
            if not os.path.isfile(yaml_path):
                raise ConfigError(f"config file not found: {yaml_path}")
            with open(yaml_path) as f:
                try:
                    loaded = yaml.safe_load(f) or {}
                except yaml.YAMLError as e:
                    raise ConfigError(f"{yaml_path}: not valid YAML: {e}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"{yaml_path}: expected a mapping at the top level, got {type(loaded).__name__}")
            merged = OmegaConf.merge(merged, loaded)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key.path=value")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        # OmegaConf's message names the full key and the expected type; keep its first lines.
        msg = str(e).strip().splitlines()
        where = f" (in {yaml_path})" if yaml_path else ""
        raise ConfigError(f"invalid configuration{where}: " + " ".join(m.strip() for m in msg[:3])) from None


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str) -> None:
    """Write the resolved config as YAML (atomically)."""
    from trime_dist.io_utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(_plain(config_to_dict(cfg)), sort_keys=False))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


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
