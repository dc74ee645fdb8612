"""The exported model of a run (`RUN/model/`): fp32 weights + config + identity, loadable without DeepSpeed.

Later stages (datastore, eval) load models only through here, and use `model_id` to tie a
datastore to the exact weights that produced it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from trime_dist.config import ModelConfig, TrainConfig, load_config
from trime_dist.io_utils import atomic_path, atomic_write_json, read_json, sha256_file
from trime_dist.model import TransformerLM

MODEL_DIR = "model"


def export_model(state_dict: dict, cfg: TrainConfig, run_dir: str, step: int, data_info: dict) -> str:
    """Write RUN/model/{weights.pt, config.yaml, model.json} atomically (info file last)."""
    from trime_dist.config import save_config

    out = os.path.join(run_dir, MODEL_DIR)
    os.makedirs(out, exist_ok=True)
    weights = os.path.join(out, "weights.pt")
    with atomic_path(weights) as tmp:
        torch.save(state_dict, tmp)
    save_config(cfg, os.path.join(out, "config.yaml"))
    atomic_write_json(os.path.join(out, "model.json"), {
        "weights_sha256": sha256_file(weights), "step": step, "objective": cfg.objective.name,
        "model": dataclasses.asdict(cfg.model), **data_info})
    return out


def resolve_model_dir(path: str) -> str:
    """Accept a run directory or its model/ directory."""
    candidate = os.path.join(path, MODEL_DIR)
    return candidate if os.path.isfile(os.path.join(candidate, "model.json")) else path


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[TransformerLM, TrainConfig, dict]:
    """Load an exported model: returns (model in eval mode, its TrainConfig, model.json info)."""
    model_dir = resolve_model_dir(path)
    info_path = os.path.join(model_dir, "model.json")
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"no trained model in {path}: expected {info_path} "
                                "(written by `trime train` at the end of a run)")
    info = read_json(info_path, "model info")
    cfg = load_config(TrainConfig, os.path.join(model_dir, "config.yaml"))
    model = build_model(cfg.model)
    state = torch.load(os.path.join(model_dir, "weights.pt"), map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied_ok = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
    if set(missing) - tied_ok or unexpected:
        raise ValueError(f"{model_dir}/weights.pt does not match its config: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    info["model_id"] = info["weights_sha256"][:16]
    return model.to(device).eval(), cfg, info


def build_model(cfg: ModelConfig, seed: Optional[int] = None) -> TransformerLM:
    if seed is not None:
        torch.manual_seed(seed)
    return TransformerLM(cfg)
