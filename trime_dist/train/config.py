"""The training stage's config: one dataclass per component, checked as a whole before any process starts.

Loaded as defaults < YAML < `a.b=c` overrides by trime_dist.core.config.load_config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from trime_dist.core.config import ConfigError, opt
from trime_dist.core.config import require as _require
from trime_dist.core.constants import OBJECTIVES, PLACEMENTS
from trime_dist.model.config import ModelConfig

SCHEDULES = ("cosine", "inverse_sqrt", "constant")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16", "bf16_autocast")
TRACKERS = ("tensorboard", "wandb")


@dataclass
class DataConfig:
    train: str = opt("", "prepared (or grouped) shard directory for training, or its URL (http(s), a "
                         "manifest.json URL, pipe:)")
    valid: Optional[str] = opt(None, "prepared shard directory (or URL) for validation (empty = none)")
    micro_batch_size: int = opt(8, "segments per rank per forward pass")
    global_batch_size: int = opt(16, "segments per optimizer step, over all ranks and accumulation")
    placement: str = opt("contiguous", "how a group is dealt to ranks", choices=PLACEMENTS)
    num_workers: int = opt(0, "loader worker processes per rank")
    shuffle_shards: bool = opt(True, "shuffle shard order each epoch (seeded; groups stay whole)")
    allow_ungrouped: bool = opt(False, "let objective.name=trime_ext train on data not grouped by "
                                "`trime group --method bm25` (memory is then the same text's neighbours)")


@dataclass
class ObjectiveConfig:
    name: str = opt("trime_local", "training objective", choices=OBJECTIVES)
    temperature: float = opt(1.0, "tau in sim = q.k / (sqrt(d) * tau)")
    cross_sent_ratio: float = opt(0.9, "trime_ext: probability that a micro-batch switches off local memory (drawn per "
                                  "rank and micro-batch from run.seed, as the original draws per forward pass)")
    ext_exclude_future: bool = opt(True, "trime_ext: a query's external memory leaves out the later segments of "
                                   "its own stream (its continuation, which BM25 groups often hold and a datastore "
                                   "never does at test time); earlier ones stay (they are long memory)")
    ce_warmup_steps: int = opt(0, "plain cross-entropy for the first N optimizer steps")
    ce_warmup_epochs: int = opt(0, "... or for the first N epochs (the paper: 3-9)")


@dataclass
class MemoryConfig:
    gather_grad: bool = opt(True, "remote keys carry gradients back (False = original code: detached)")
    tiled: bool = opt(True, "use the tiled objective (never builds the N x M matrix)")
    tile_size: int = opt(4096, "queries and keys per tile of the tiled objective (memory ~ tile_size^2 floats; "
                         "on an H200 4096 made trime_ext 1.07x the CE step at 247M where 1024 made it 2.2x)")


@dataclass
class OptimConfig:
    name: str = opt("adamw", "optimizer (sgd: plain SGD, updates are exactly lr x gradient)", choices=OPTIMIZERS)
    lr: float = opt(1e-3, "peak learning rate")
    weight_decay: float = opt(0.01, "weight decay (none on biases, norms, position table)")
    betas: tuple[float, float] = opt((0.9, 0.98), "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    schedule: str = opt("cosine", "learning-rate schedule after linear warmup", choices=SCHEDULES)
    warmup_steps: int = opt(50, "optimizer steps of linear warmup")
    min_lr_ratio: float = opt(0.1, "cosine floor as a fraction of lr")
    grad_clip: float = opt(1.0, "max global grad norm (0 = off)")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = opt(0, "ZeRO stage", choices=(0, 1, 2, 3))
    precision: str = opt("fp32", "fp32; bf16 = DeepSpeed's bf16 weights + fp32 master copy; bf16_autocast = fp32 "
                         "weights and optimizer, matmuls in bf16 under torch.autocast (torch AMP: on an H200 the "
                         "247M step ran 2x faster than DeepSpeed's bf16, see benchmarks/RESULTS.md)", choices=PRECISIONS)
    extra: dict[str, Any] = opt(doc="merged into the generated DeepSpeed JSON", factory=dict)


@dataclass
class RunConfig:
    out_dir: str = opt("runs/train", "run directory: config, metrics, checkpoints, model")
    seed: int = opt(1234, "seed of the model init and the data order")
    max_steps: int = opt(200, "optimizer steps (training stops at max_steps or max_epochs)")
    max_epochs: int = opt(1000, "passes over the training data at most")
    log_every: int = opt(10, "log (and write metrics) every N optimizer steps")
    eval_every: int = opt(0, "validate every N optimizer steps (0 = only at the end)")
    eval_batches: int = opt(0, "validation micro-batches per evaluation (0 = the whole split)")
    save_every: int = opt(100, "checkpoint every N optimizer steps (and always at the end)")
    keep_checkpoints: int = opt(2, "newest N step checkpoints are kept")
    threads: int = opt(0, "torch intra-op threads per rank (0 = leave as is)")
    compile: bool = opt(False, "torch.compile each transformer block (GPU; the first steps pay for compiling)")
    dist_timeout_s: int = opt(900, "seconds a rank waits for the others at process-group start and in any "
                              "collective (all-reduce, barrier) before it stops with an error naming the ranks "
                              "that did not answer; above the longest rank-0-only work (checkpoint, export)")
    net_interface: str = opt("", "network interface gloo and NCCL use between the nodes (sets GLOO_SOCKET_IFNAME "
                             "and NCCL_SOCKET_IFNAME; e.g. ib0, eth0); empty = the environment's or the libraries' "
                             "choice")
    trackers: list[str] = opt(doc="also log the metrics to these (rank 0): RUN/tensorboard, RUN/wandb (offline "
                              "unless WANDB_MODE is set)", factory=list, choices=TRACKERS)


@dataclass
class TrainConfig:
    model: ModelConfig = opt(doc="the transformer", factory=ModelConfig)
    data: DataConfig = opt(doc="training and validation shards, batch sizes", factory=DataConfig)
    objective: ObjectiveConfig = opt(doc="the TRIME objective", factory=ObjectiveConfig)
    memory: MemoryConfig = opt(doc="how the in-batch memory is gathered and scored", factory=MemoryConfig)
    optim: OptimConfig = opt(doc="optimizer and learning-rate schedule", factory=OptimConfig)
    deepspeed: DeepSpeedConfig = opt(doc="DeepSpeed engine settings", factory=DeepSpeedConfig)
    run: RunConfig = opt(doc="run directory, length, logging, checkpoints", factory=RunConfig)


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
    # (a Hugging Face config may set its own head_dim)
    _require(bool(m.pretrained) or m.d_model % m.n_heads == 0, "model.d_model",
             f"{m.d_model} is not divisible by model.n_heads={m.n_heads}")
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
    _require("activation_checkpointing" not in ds.extra, "deepspeed.extra.activation_checkpointing",
             "is not used (DeepSpeed's checkpointing needs model code calling it); set "
             "model.activation_checkpointing=true")
    if r.save_every <= 0:
        raise ConfigError("run.save_every: must be > 0")


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    return cfg.data.global_batch_size // (world_size * cfg.data.micro_batch_size)
