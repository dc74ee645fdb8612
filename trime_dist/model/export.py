"""The exported model of a run (`RUN/model/`): fp32 weights + config + identity, loadable without DeepSpeed.

Later stages (datastore, eval) load models only through here, and use `model_id` to tie a
datastore to the exact weights that produced it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import torch

from trime_dist.core.config import load_config, save_config
from trime_dist.core.io import atomic_path, atomic_write_json, read_json, sha256_file
from trime_dist.model.config import ModelConfig
from trime_dist.model.transformer import TransformerLM, build_model

MODEL_DIR = "model"
INFO_FILE = "model.json"


def export_model(state_dict: dict, model_cfg: ModelConfig, run_dir: str, info: dict,
                 run_config: Optional[Any] = None) -> str:
    """Write RUN/model/{weights.pt, config.yaml, model.json} atomically (model.json last: it marks the
    export complete). `info` (step, objective, data hashes, ...) goes into model.json; `run_config`, the
    run's whole resolved config, into config.yaml for people to read."""
    out = os.path.join(run_dir, MODEL_DIR)
    os.makedirs(out, exist_ok=True)
    weights = os.path.join(out, "weights.pt")
    with atomic_path(weights) as tmp:
        torch.save(state_dict, tmp)
    if run_config is not None:
        save_config(run_config, os.path.join(out, "config.yaml"))
    atomic_write_json(os.path.join(out, INFO_FILE), {
        "weights_sha256": sha256_file(weights), **info, "model": dataclasses.asdict(model_cfg)})
    return out


def resolve_model_dir(path: str) -> str:
    """Accept a run directory or its model/ directory."""
    candidate = os.path.join(path, MODEL_DIR)
    return candidate if os.path.isfile(os.path.join(candidate, INFO_FILE)) else path


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[TransformerLM, dict]:
    """Load an exported model: returns (model in eval mode, model.json info with its `model_id`)."""
    model_dir = resolve_model_dir(path)
    info_path = os.path.join(model_dir, INFO_FILE)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"no trained model in {path}: expected {info_path} "
                                "(written by `trime train` at the end of a run)")
    info = read_json(info_path, "model info")
    if not isinstance(info.get("model"), dict):
        raise ValueError(f"{info_path}: no 'model' section with the architecture")
    model_cfg = load_config(ModelConfig, values=info["model"], where=f"{info_path} [model]")
    model = build_model(model_cfg)
    state = torch.load(os.path.join(model_dir, "weights.pt"), map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied_ok = {"lm_head.weight"} if model_cfg.tie_embeddings else set()
    if set(missing) - tied_ok or unexpected:
        raise ValueError(f"{model_dir}/weights.pt does not match its config: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    info["model_id"] = info["weights_sha256"][:16]
    return model.to(device).eval(), info


def check_tokenizer(info: dict, manifest: dict, data_dir: str, model_path: str) -> None:
    """Refuse data tokenized with another tokenizer than the model's (info: load_model's model.json;
    manifest: the data's shard manifest). A model without a recorded tokenizer is not checked."""
    data_tok, model_tok = manifest["tokenizer"]["sha256"], info.get("tokenizer_sha256")
    if model_tok not in (None, data_tok):
        raise ValueError(f"{data_dir} was tokenized with tokenizer {data_tok[:12]}..., but the model {model_path} "
                         f"was trained with tokenizer {model_tok[:12]}...: its token ids mean other tokens "
                         "(prepare the data with the model's tokenizer)")
