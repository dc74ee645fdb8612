"""The exported model of a run (`RUN/model/`): fp32 safetensors weights + config + identity, loadable
without DeepSpeed.

Later stages (datastore, eval) load models only through here, and use `model_id` (a hash of the tensor
contents, not of a file's bytes) to tie a datastore to the exact weights that produced it. Runs from
`model.pretrained` record "architecture": "hf" and the Hugging Face config, and are rebuilt from it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
from typing import Any, Optional

import torch
import torch.nn as nn

from trime_dist.core.config import load_config, save_config
from trime_dist.core.io import atomic_path, atomic_write_json, read_json
from trime_dist.model.config import ModelConfig

MODEL_DIR = "model"
INFO_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS = "weights.pt"    # torch pickle of runs before safetensors: still read, tensors only
TOKENIZER_FILE = "tokenizer.json"
BUILTIN, HF = "builtin", "hf"


def export_model(state_dict: dict, model_cfg: ModelConfig, run_dir: str, info: dict,
                 run_config: Optional[Any] = None, *, hf_config: Optional[dict] = None,
                 tokenizer_file: Optional[str] = None) -> str:
    """Write RUN/model/{model.safetensors, config.yaml, tokenizer.json, model.json}.

    `info` (step, objective, data hashes, ...) goes into model.json; `run_config`, the run's whole resolved
    config, into config.yaml for people to read; `hf_config` (HFCausalLM.hf_config_dict()) marks a run from
    model.pretrained; `tokenizer_file`, the training data's tokenizer, is copied beside the weights."""
    return write_model_dir(os.path.join(run_dir, MODEL_DIR), state_dict, model_cfg, info, run_config,
                           hf_config=hf_config, tokenizer_file=tokenizer_file)


def write_model_dir(out: str, state_dict: dict, model_cfg: ModelConfig, info: dict,
                    run_config: Optional[Any] = None, *, hf_config: Optional[dict] = None,
                    tokenizer_file: Optional[str] = None) -> str:
    """Each file is written atomically; model.json goes last (it marks the export complete), and an older
    model.json is removed first, so a crash never pairs new weights with the old identity."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, INFO_FILE))
    state = untie_state_dict(state_dict, build_skeleton(model_cfg, hf_config))
    with atomic_path(os.path.join(out, WEIGHTS_FILE)) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, LEGACY_WEIGHTS))  # a re-export over an old run: one weights file
    if run_config is not None:
        save_config(run_config, os.path.join(out, "config.yaml"))
    if tokenizer_file and os.path.abspath(tokenizer_file) != os.path.abspath(os.path.join(out, TOKENIZER_FILE)):
        with atomic_path(os.path.join(out, TOKENIZER_FILE)) as tmp:
            shutil.copyfile(tokenizer_file, tmp)
    arch = {"architecture": HF, "hf_config": hf_config} if hf_config is not None else {"architecture": BUILTIN}
    atomic_write_json(os.path.join(out, INFO_FILE), {
        **{k: v for k, v in info.items() if k not in ("model_id", "weights_sha256")},
        "weights": WEIGHTS_FILE, "tensors_sha256": tensors_sha256(state), **arch,
        "model": dataclasses.asdict(model_cfg)})
    return out


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of the tensors' names, dtypes, shapes and values: equal weights give equal hashes, whatever
    file they came from."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_skeleton(model_cfg: ModelConfig, hf_config: Optional[dict] = None) -> nn.Module:
    """The model's modules on the meta device (no memory, no init): enough to see which weights are tied."""
    with torch.device("meta"):
        return build_architecture(model_cfg, hf_config)


def build_architecture(model_cfg: ModelConfig, hf_config: Optional[dict] = None) -> nn.Module:
    """A randomly initialised model of the exported architecture (never reads model.pretrained)."""
    if hf_config is not None:
        from trime_dist.model.hf import hf_from_config

        return hf_from_config(hf_config)
    from trime_dist.model.transformer import TransformerLM

    return TransformerLM(model_cfg)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters reachable under several names (lm_head tied to the embedding)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def untie_state_dict(state: dict, skeleton: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied aliases (safetensors refuses shared tensors; the model re-ties them),
    as contiguous fp32-or-native CPU tensors."""
    aliases = tied_aliases(skeleton)
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in aliases}


def resolve_model_dir(path: str) -> str:
    """Accept a run directory or its model/ directory."""
    candidate = os.path.join(path, MODEL_DIR)
    return candidate if os.path.isfile(os.path.join(candidate, INFO_FILE)) else path


def read_model_info(path: str) -> tuple[str, dict]:
    """(model dir, its model.json) for a run or model directory; one-line errors for anything else."""
    model_dir = resolve_model_dir(path)
    info_path = os.path.join(model_dir, INFO_FILE)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"no trained model in {path}: expected {info_path} "
                                "(written by `trime train` at the end of a run)")
    info = read_json(info_path, "model info")
    if not isinstance(info.get("model"), dict):
        raise ValueError(f"{info_path}: no 'model' section with the architecture")
    if info.get("architecture", BUILTIN) not in (BUILTIN, HF):
        raise ValueError(f"{info_path}: unknown architecture {info['architecture']!r} (expected builtin or hf)")
    if info.get("architecture") == HF and not isinstance(info.get("hf_config"), dict):
        raise ValueError(f"{info_path}: architecture 'hf' without an 'hf_config' section")
    return model_dir, info


def load_state(model_dir: str, info: dict) -> tuple[dict, str]:
    """(state dict, model_id) from model.safetensors, or from the weights.pt pickle of older runs (whose
    model_id stays the file hash recorded then, so their datastores still match)."""
    path = os.path.join(model_dir, WEIGHTS_FILE)
    if os.path.isfile(path) and "tensors_sha256" in info:
        from safetensors.torch import load_file

        return load_file(path), info["tensors_sha256"][:16]
    legacy = os.path.join(model_dir, LEGACY_WEIGHTS)
    if os.path.isfile(legacy) and "weights_sha256" in info:
        return load_legacy_weights(legacy), info["weights_sha256"][:16]
    raise FileNotFoundError(f"{model_dir}: no weights matching {INFO_FILE} (expected {WEIGHTS_FILE}, or "
                            f"{LEGACY_WEIGHTS} from older runs)")


def load_legacy_weights(path: str) -> dict:
    """An old run's weights.pt: tensors only (weights_only); a file holding any other object is refused
    with one line, never unpickled."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise ValueError(f"{path}: holds a non-allowed object{what}, not loaded (unpickling it could run code); "
                         "use a model exported as model.safetensors, or one from a trusted run") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable weights file, truncated or corrupt ({e})") from None


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load an exported model: returns (model in eval mode, model.json info with its `model_id`).

    The model is a TransformerLM, or an HFCausalLM for "architecture": "hf"; both give
    forward(ids) -> (logits, keys) and encode(ids) -> keys."""
    model_dir, info = read_model_info(path)
    where = f"{os.path.join(model_dir, INFO_FILE)} [model]"
    model_cfg = load_config(ModelConfig, values=info["model"], where=where)
    model = build_architecture(model_cfg, info.get("hf_config") if info.get("architecture") == HF else None)
    state, info["model_id"] = load_state(model_dir, info)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - set(tied_aliases(model)) or unexpected:
        raise ValueError(f"{model_dir}: the weights do not match {INFO_FILE}: missing "
                         f"{sorted(set(missing) - set(tied_aliases(model)))}, unexpected {sorted(unexpected)}")
    return model.to(device).eval(), info


def check_tokenizer(info: dict, manifest: dict, data_dir: str, model_path: str) -> None:
    """Refuse data tokenized with another tokenizer than the model's (info: load_model's model.json;
    manifest: the data's shard manifest). A model without a recorded tokenizer is not checked."""
    data_tok, model_tok = manifest["tokenizer"]["sha256"], info.get("tokenizer_sha256")
    if model_tok not in (None, data_tok):
        raise ValueError(f"{data_dir} was tokenized with tokenizer {data_tok[:12]}..., but the model {model_path} "
                         f"was trained with tokenizer {model_tok[:12]}...: its token ids mean other tokens "
                         "(prepare the data with the model's tokenizer)")
