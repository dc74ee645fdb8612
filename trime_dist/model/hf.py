"""Any Hugging Face causal LM as the trained model: vocabulary logits plus TRIME's memory keys.

The memory key is the built-in model's: the input of the LAST layer's feed-forward block after its norm
(TRIME's `last_ffn_input`). A forward pre-hook on that layer's `mlp` takes it, so the model's own forward
(its attention kernels, activation checkpointing, ZeRO-3 parameter hooks) runs unchanged. transformers is
imported inside functions: `trime --help` and the model's config never pay for it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import torch
import torch.nn as nn

from trime_dist.core.config import ConfigError
from trime_dist.model.config import ModelConfig

# model_type -> attribute of the base model that holds the decoder layers. In each family the last layer's
# `mlp` is fed its normed residual stream: GPT-2 ln_2(x + attn), GPT-NeoX post_attention_layernorm(x)
# (parallel residual) or post_attention_layernorm(x + attn), Llama/Mistral/Qwen post_attention_layernorm(x + attn).
LAYERS_OF = {"gpt2": "h", "gpt_neox": "layers", "llama": "layers", "mistral": "layers", "qwen2": "layers",
             "qwen3": "layers"}


class HFCausalLM(nn.Module):
    """A transformers causal LM with TrimeLM's interface: forward(ids) -> (logits, keys), encode(ids) -> keys.

    State-dict keys are the HF model's, prefixed with "hf_model."."""

    def __init__(self, hf_model: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.hf_model = hf_model
        self.cfg = cfg
        self._capture = False   # only the forward pass takes the key (not a checkpointed recomputation)
        self._key: Optional[torch.Tensor] = None
        key_module(hf_model).register_forward_pre_hook(self._take_key)

    def _take_key(self, module: nn.Module, args: tuple) -> None:
        if self._capture:
            self._key = args[0]  # [B, T, D]: the mlp's input, after the layer's norm

    def _run(self, net: nn.Module, input_ids: torch.Tensor):
        """Run `net` (the whole model or its base) on input_ids [B, T]; returns (its output, keys [B, T, D])."""
        T = input_ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len} "
                             f"(the model's max_position_embeddings)")
        self._capture, self._key = True, None
        try:
            out = net(input_ids=input_ids, use_cache=False)
            keys = self._key
        finally:
            self._capture, self._key = False, None
        if keys is None:
            raise RuntimeError(f"the memory-key hook on {type(key_module(self.hf_model)).__name__} did not run")
        return out, keys

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, T] -> (vocab logits [B, T, V], memory keys [B, T, D])."""
        out, keys = self._run(self.hf_model, input_ids)
        return out.logits, keys

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> memory keys [B, T, D], as forward() gives them, without the output layer."""
        return self._run(self.hf_model.base_model, input_ids)[1]

    def hf_config_dict(self) -> dict[str, Any]:
        return self.hf_model.config.to_dict()

    def enable_activation_checkpointing(self) -> None:
        """The HF model's own activation checkpointing, non-reentrant (so the hooked key keeps its gradient)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.hf_model, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def compile_blocks(self) -> None:
        """torch.compile each decoder layer in place but the last, whose memory-key hook is a Python side
        effect that must run eagerly."""
        for layer in decoder_layers(self.hf_model)[:-1]:
            layer.compile()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    model_type = hf_model.config.model_type
    if model_type not in LAYERS_OF:
        raise ValueError(f"model_type {model_type!r} is not supported for TRIME's memory keys (supported: "
                         f"{', '.join(LAYERS_OF)})")
    return getattr(hf_model.base_model, LAYERS_OF[model_type])


def key_module(hf_model: nn.Module) -> nn.Module:
    """The last decoder layer's feed-forward block, whose input is the memory key."""
    return decoder_layers(hf_model)[-1].mlp


# ----------------------------------------------------------------------------- config

def architecture_of(hf_config) -> dict[str, Any]:
    """The ModelConfig architecture fields of an HF config (the standard attribute names every config maps):
    what model.pretrained sets."""
    d = hf_config.hidden_size
    d_ffn = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 4 * d
    return {"vocab_size": hf_config.vocab_size, "n_layers": hf_config.num_hidden_layers, "d_model": d,
            "n_heads": hf_config.num_attention_heads, "d_ffn": d_ffn,
            "max_seq_len": hf_config.max_position_embeddings,
            "tie_embeddings": bool(getattr(hf_config, "tie_word_embeddings", False))}


def read_hf_config(path: str):
    """The HF config of a local model folder; a one-line ConfigError naming the folder otherwise."""
    if not os.path.isdir(path):
        raise ConfigError(f"model.pretrained={path}: no such folder (expected a local Hugging Face model "
                          "folder with config.json and the weights)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"model.pretrained={path}: not a Hugging Face model folder (no config.json in it)")
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.pretrained={path}: cannot read config.json: {_first_line(e)}") from None
    if hf_config.model_type not in LAYERS_OF:
        raise ConfigError(f"model.pretrained={path}: model_type {hf_config.model_type!r} is not supported "
                          f"(supported: {', '.join(LAYERS_OF)})")
    return hf_config


def pretrained_model_config(model_cfg: ModelConfig, hf_config=None) -> ModelConfig:
    """model_cfg with its architecture fields taken from model.pretrained's config.json. A field the user
    changed from its default must agree; model.dropout does not apply (the HF config has its own)."""
    path = model_cfg.pretrained
    hf_config = hf_config if hf_config is not None else read_hf_config(path)
    arch, defaults = architecture_of(hf_config), ModelConfig()
    for key, value in arch.items():
        given = getattr(model_cfg, key)
        if given != getattr(defaults, key) and given != value:
            raise ConfigError(f"model.{key}={given} disagrees with {os.path.join(path, 'config.json')} "
                              f"({value}); leave it unset with model.pretrained")
    if model_cfg.dropout != defaults.dropout:
        raise ConfigError(f"model.dropout={model_cfg.dropout}: not used with model.pretrained (the dropout "
                          f"settings in {os.path.join(path, 'config.json')} apply)")
    return dataclasses.replace(model_cfg, **arch)


# ----------------------------------------------------------------------------- building

def load_pretrained(model_cfg: ModelConfig, seed: Optional[int] = None) -> HFCausalLM:
    """The model of model.pretrained, fp32 (mixed precision is DeepSpeed's job), from local files only.

    Under transformers' DeepSpeed integration with ZeRO-3 (HfDeepSpeedConfig alive, see
    train/engine.py) from_pretrained builds it partitioned, under deepspeed.zero.Init."""
    from transformers import AutoModelForCausalLM

    hf_config = read_hf_config(model_cfg.pretrained)
    cfg = pretrained_model_config(model_cfg, hf_config)
    if seed is not None:
        torch.manual_seed(seed)  # only weights missing from the folder (none, normally) are drawn
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(model_cfg.pretrained, config=hf_config,
                                                        local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.pretrained={model_cfg.pretrained}: cannot load the weights: "
                         f"{_first_line(e)}") from None
    model = HFCausalLM(hf_model, cfg)
    if cfg.activation_checkpointing:
        model.enable_activation_checkpointing()
    return model


def hf_from_config(config: dict) -> HFCausalLM:
    """A randomly initialised HFCausalLM of an HF config dict (HFCausalLM.hf_config_dict()): an exported
    run is rebuilt with it, then its weights are loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config)
    model_type = values.pop("model_type", None)
    if model_type not in LAYERS_OF:
        raise ValueError(f"hf_config: model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(LAYERS_OF)})")
    hf_config = AutoConfig.for_model(model_type, **values)
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return HFCausalLM(hf_model, ModelConfig(**architecture_of(hf_config)))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
