"""The one module that imports DeepSpeed: engine construction, LR schedules, checkpoints.

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

from trime_dist.config import TrainConfig, grad_accum_steps

log = logging.getLogger(__name__)


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed config from TrainConfig: batch sizes, ZeRO stage, precision, optimizer, clipping."""
    op, ds = cfg.optim, cfg.deepspeed
    config: dict[str, Any] = {
        "train_batch_size": cfg.data.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, world_size),
        "gradient_clipping": op.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": op.lr, "betas": list(op.betas), "eps": op.eps, "weight_decay": op.weight_decay}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if op.schedule == "cosine":
        config["scheduler"] = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.run.max_steps, "warmup_num_steps": max(op.warmup_steps, 1),
            "warmup_type": "linear", "warmup_min_ratio": 0.0, "cos_min_ratio": op.min_lr_ratio}}
    elif op.schedule == "constant":
        config["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": op.lr, "warmup_num_steps": max(op.warmup_steps, 1),
            "warmup_type": "linear"}}
    # inverse_sqrt has no DeepSpeed scheduler: build_engine passes a LambdaLR instead.
    return _deep_merge(config, ds.extra)


def inverse_sqrt_factor(step: int, warmup_steps: int) -> float:
    """fairseq's inverse_sqrt: linear warmup to 1, then sqrt(warmup / step)."""
    warmup = max(warmup_steps, 1)
    step = step + 1
    return step / warmup if step < warmup else math.sqrt(warmup / step)


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


def build_engine(model: torch.nn.Module, cfg: TrainConfig, world_size: int):
    """Wrap the model in a DeepSpeed engine (process group already initialised)."""
    import deepspeed

    ds_config = build_ds_config(cfg, world_size)
    lr_scheduler = None
    if cfg.optim.schedule == "inverse_sqrt":
        warmup = cfg.optim.warmup_steps
        lr_scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
            opt, lambda s: inverse_sqrt_factor(s, warmup))
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=ds_config, lr_scheduler=lr_scheduler)
    return engine


def init_deepspeed_distributed() -> None:
    """Let DeepSpeed set up the process group (gloo on CPU, nccl on GPU) from the launcher env."""
    import deepspeed

    from dataclasses import replace

    from trime_dist.distributed import backend_for_device, discover_env, export_env, free_port

    env = discover_env()
    if env.launcher == "single":  # DeepSpeed wants a process group even for one process
        env = replace(env, master_port=free_port())
    export_env(env)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    deepspeed.init_distributed(dist_backend=backend_for_device(), auto_mpi_discovery=False)


def current_lr(engine) -> float:
    return float(engine.get_lr()[0])


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(engine, ckpt_dir: str, step: int, client_state: dict, keep: int) -> str:
    """Save tag `step{N}`; DeepSpeed rewrites `latest` only after the tag is complete."""
    from trime_dist.distributed import barrier, get_rank

    tag = f"step{step:08d}"
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


def load_checkpoint(engine, ckpt_dir: str) -> Optional[dict]:
    """Load the latest complete checkpoint; returns its client state (None when there is none)."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise ValueError(f"{ckpt_dir}/{tag}: DeepSpeed could not load this checkpoint")
    log.info("resumed from %s", path)
    return client_state


def full_state_dict(engine, ckpt_dir: str, tag: str, zero_stage: int) -> Optional[dict]:
    """fp32 weights of the whole model on rank 0 (consolidating ZeRO-3 partitions from the checkpoint)."""
    from trime_dist.distributed import get_rank

    if get_rank() != 0:
        return None
    if zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
