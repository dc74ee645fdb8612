"""The one module that imports DeepSpeed (with deepspeed_fastpath.py, its one override): engine construction,
LR schedules, checkpoints.

The DeepSpeed JSON is derived from the project's own config (GPT-NeoX's good idea), so batch
arithmetic cannot drift between the two.
"""
from __future__ import annotations

import glob
import logging
import math
import os
import shutil
from typing import Any, Optional

import torch

from trime_dist.train.config import OptimConfig, TrainConfig, grad_accum_steps

log = logging.getLogger(__name__)


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed config from TrainConfig: batch sizes, ZeRO stage, precision, optimizer, clipping."""
    op, ds = cfg.optim, cfg.deepspeed
    config: dict[str, Any] = {
        "train_batch_size": cfg.data.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, world_size),
        # ZeRO-0 without DeepSpeed's bf16: the loop clips (clip_gradients, torch's one-pass norm) where DeepSpeed
        # would take one norm per parameter and an all-reduce of the result every step.
        "gradient_clipping": 0.0 if clips_in_loop(cfg) else op.grad_clip,
        "zero_optimization": zero_settings(ds.zero_stage),
        "bf16": {"enabled": ds.precision == "bf16"},
        # The optimizer is torch's (build_optimizer), handed to deepspeed.initialize: DeepSpeed's own AdamW
        # on CPU JIT-compiles C++ ops at the first start of every environment (minutes, and a lock file
        # that a killed start leaves behind). ZeRO partitions any torch optimizer; SGD must be acknowledged.
        "zero_allow_untested_optimizer": op.name != "adamw",
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if ds.precision == "bf16_autocast":
        # torch AMP inside the engine (DeepSpeed switches off an autocast entered outside it otherwise);
        # DeepSpeed then also communicates the Linear layers' gradients in bf16.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    # The LR schedule is a torch LambdaLR passed to deepspeed.initialize (see lr_factor), not a
    # DeepSpeed "scheduler" entry: DeepSpeed's warmup schedulers run the first two steps at lr 0.
    return _deep_merge(config, ds.extra)


def zero_settings(stage: int) -> dict[str, Any]:
    """The cheapest ZeRO settings per stage for the host (benchmarks/bench_host_overhead.py measures them):
    per-parameter Python work in DeepSpeed's step is what a GPU waits on for a model of ~200 tensors."""
    settings: dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        # Not copying every gradient into a contiguous buffer in its backward hook and again into the
        # partition: a model within reduce_bucket_size gets gradients that are views of one flat buffer per group
        # (deepspeed_flat_grads, which needs this off); a larger one is flattened once per bucket when reduced.
        settings["contiguous_gradients"] = False
    if stage == 3:
        # The same for ZeRO-3 (its reduce-scatter flattens its list of gradients itself; deepspeed_fastpath_zero3's
        # gradient hook is this case). Gradients wait for their reduce at most reduce_bucket_size elements either way.
        settings["contiguous_gradients"] = False
    return settings


def clips_in_loop(cfg: TrainConfig) -> bool:
    """Whether train_step clips the gradients itself (clip_gradients) instead of DeepSpeed: ZeRO-0, where
    every rank holds all of them, in fp32 weights (not DeepSpeed's bf16 optimizer, which clips its master copy)."""
    return cfg.optim.grad_clip > 0 and cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision != "bf16" \
        and "gradient_clipping" not in cfg.deepspeed.extra


def clip_gradients(engine, max_norm: float) -> torch.Tensor:
    """Clip the module's (already all-reduced) gradients to max_norm in one pass; returns the norm before
    clipping (a device tensor: reading it is a host sync). Same rule as DeepSpeed's: x max_norm / (norm + 1e-6)."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=all(p.is_cuda for p in params) or None)


def lr_factor(step: int, op: OptimConfig, total_steps: int) -> float:
    """Multiplier of optim.lr for optimizer step `step` (0-based): linear warmup from lr/warmup_steps
    to lr, then cosine decay to min_lr_ratio * lr at total_steps, fairseq's inverse_sqrt, or constant."""
    warmup = max(op.warmup_steps, 0)
    if step < warmup:
        return (step + 1) / warmup
    if op.schedule == "constant":
        return 1.0
    if op.schedule == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return op.min_lr_ratio + (1.0 - op.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in (extra or {}).items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and embeddings' position table (1-D or position params)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "pos_emb" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_train_model(cfg: TrainConfig, world_size: int) -> torch.nn.Module:
    """The model to train, the same on every rank: built-in (seeded) or loaded from model.pretrained.

    Under ZeRO-3 a pretrained model is loaded partitioned: transformers' DeepSpeed integration (an
    HfDeepSpeedConfig of this run's DeepSpeed config, alive while from_pretrained runs) builds it under
    deepspeed.zero.Init, so no rank holds the whole model first."""
    from trime_dist.model.transformer import build_model

    if not (cfg.model.pretrained and cfg.deepspeed.zero_stage == 3):
        return build_model(cfg.model, seed=cfg.run.seed)
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds_config = HfDeepSpeedConfig(build_ds_config(cfg, world_size))  # transformers keeps only a weakref
    try:
        return build_model(cfg.model, seed=cfg.run.seed)
    finally:
        # Later HF models in this process (the export's meta-device skeleton) are built plainly.
        unset_hf_deepspeed_config()
        del hf_ds_config


def build_optimizer(groups: list[dict], op: OptimConfig) -> torch.optim.Optimizer:
    """torch's AdamW (decoupled weight decay) or plain SGD over the parameter groups of param_groups.
    AdamW is the fused (one-kernel) implementation when every parameter is on a GPU."""
    if op.name == "adamw":
        fused = all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)
        return torch.optim.AdamW(groups, lr=op.lr, betas=tuple(op.betas), eps=op.eps, weight_decay=op.weight_decay,
                                 fused=fused or None)
    return torch.optim.SGD(groups, lr=op.lr, weight_decay=op.weight_decay)


def build_engine(model: torch.nn.Module, cfg: TrainConfig, world_size: int):
    """Wrap the model in a DeepSpeed engine (process group already initialised)."""
    import deepspeed

    from trime_dist.train import deepspeed_fastpath

    ds_config = build_ds_config(cfg, world_size)
    optim_cfg, total = cfg.optim, cfg.run.max_steps

    def lr_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim_cfg, total))

    if cfg.deepspeed.zero_stage == 3:
        maybe_gather_per_block(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
        optimizer=lambda groups: build_optimizer(groups, optim_cfg), config=ds_config, lr_scheduler=lr_scheduler)
    if cfg.deepspeed.zero_stage == 0 and world_size == 1 and cfg.deepspeed.precision != "bf16":
        # One rank has nothing to average: DeepSpeed would still flatten, all-reduce and copy back every
        # gradient after each optimizer step's backward.
        engine.enable_backward_allreduce = False
    if cfg.deepspeed.zero_stage > 0:
        # the ZeRO gradient norm in one call instead of one per tensor (stock DeepSpeed on other versions)
        deepspeed_fastpath.install(engine.optimizer)
    return engine


def maybe_gather_per_block(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers and frees the parameters of each transformer block at once (as FSDP wraps per block),
    not of each of its ~10 submodules: an order of magnitude fewer hooks per step. The blocks are the items
    of the model's largest ModuleList; a model without one keeps DeepSpeed's per-module gathering."""
    from deepspeed.utils import set_z3_leaf_modules

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if lists:
        blocks = max(lists, key=len)
        set_z3_leaf_modules(model, sorted({type(b) for b in blocks}, key=lambda c: c.__name__))


def init_deepspeed_distributed(timeout_s: int = 1800, net_interface: str = "") -> None:
    """The process group (gloo on CPU, nccl on GPU) from the launcher env, made by DeepSpeed's own init
    so that its comm layer knows it (and binds the GPU as DeepSpeed does); one process gets a group too.
    timeout_s bounds the start and every collective (run.dist_timeout_s); net_interface: run.net_interface."""
    import datetime

    import deepspeed

    from trime_dist.core.distributed import init_distributed

    def init_group(backend: str) -> None:
        # Without LOCAL_SIZE DeepSpeed skips its CPU shared-memory all-reduce, which training never uses
        # (only inference_all_reduce does): no 64 MB /dev/shm buffer per rank, and no unbounded spin in
        # shm_initialize waiting for a peer's buffer that a dead peer (or a cleanup of /dev/shm) never provides.
        # Nor is that op built: DeepSpeed runs ninja for it at every start (seconds of start-up), and SLURM's
        # early time-limit signal, sent to every process of the job step, killed that ninja and the rank.
        import importlib

        # (not `import deepspeed.comm.torch as ...`: that finds the torch module deepspeed.comm imported)
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
        local_size = os.environ.pop("LOCAL_SIZE", None)
        build_shm_op, ds_torch_comm.build_shm_op = ds_torch_comm.build_shm_op, lambda: None
        try:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                       timeout=datetime.timedelta(seconds=timeout_s))
        finally:
            ds_torch_comm.build_shm_op = build_shm_op
            if local_size is not None:
                os.environ["LOCAL_SIZE"] = local_size

    init_distributed(group_of_one=True, init_group=init_group, net_interface=net_interface)


def current_lr(engine) -> float:
    return float(engine.get_lr()[0])


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(engine, ckpt_dir: str, step: int, client_state: dict, keep: int) -> str:
    """Save tag `step{N}`; DeepSpeed rewrites `latest` only after the tag is complete."""
    from trime_dist.core.distributed import barrier, get_rank
    from trime_dist.train.rng_state import save_rng_state

    tag = f"step{step:08d}"
    save_rng_state(ckpt_dir, tag, get_rank())  # per rank, before DeepSpeed writes `latest`
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)
    barrier()
    if get_rank() == 0 and keep > 0:
        tags = sorted(p for p in glob.glob(os.path.join(ckpt_dir, "step*")) if os.path.isdir(p))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return tag


def latest_tag(ckpt_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    return tag if os.path.isdir(os.path.join(ckpt_dir, tag)) else None


def check_latest_checkpoint(ckpt_dir: str) -> None:
    """Refuse (ValueError, one line) a latest checkpoint with a file that holds a pickled object."""
    from trime_dist.train.safe_load import check_checkpoint_files

    tag = latest_tag(ckpt_dir)
    if tag is not None:
        check_checkpoint_files(os.path.join(ckpt_dir, tag))


def load_checkpoint(engine, ckpt_dir: str) -> Optional[dict]:
    """Load the latest complete checkpoint (weights, optimizer, LR schedule, this rank's RNG streams);
    returns its client state (None when there is none). Call it last before training: the RNG streams
    continue from here. Nothing in the checkpoint is unpickled but tensors, containers and numbers
    (safe_load.py): a file holding anything else is refused with one line, on every rank."""
    from trime_dist.core.distributed import get_rank
    from trime_dist.train.rng_state import load_rng_state
    from trime_dist.train.safe_load import weights_only_loads

    check_latest_checkpoint(ckpt_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    with weights_only_loads(engine, where=os.path.join(ckpt_dir, tag)):
        path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise ValueError(f"{ckpt_dir}/{tag}: DeepSpeed could not load this checkpoint")
    load_rng_state(ckpt_dir, tag, get_rank())
    log.info("resumed from %s", path)
    return client_state


def full_state_dict(engine, ckpt_dir: str, tag: str, zero_stage: int) -> Optional[dict]:
    """fp32 weights of the whole model on rank 0 (consolidating ZeRO-3 partitions from the checkpoint)."""
    from trime_dist.core.distributed import get_rank

    if get_rank() != 0:
        return None
    if zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        from trime_dist.train.safe_load import weights_only_loads

        # the tag may be the resumed one (a run resumed at its last step saves no other)
        with weights_only_loads(where=os.path.join(ckpt_dir, tag)):
            return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
