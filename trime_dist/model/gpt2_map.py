"""The built-in transformer as a Hugging Face GPT-2 (GPT2LMHeadModel): its config and weights, exactly.

Both are pre-LN decoders with learned positions, exact GELU, LayerNorm eps 1e-5 and attention scaled by
1/sqrt(head dim); GPT-2's Conv1D stores weights as [in, out], the transpose of nn.Linear's [out, in].
Anything that does not map exactly is refused, naming it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from trime_dist.model.config import ModelConfig

# ModelConfig fields with a GPT-2 counterpart, and those that do not change the function the model computes.
MAPPED = {"vocab_size", "n_layers", "d_model", "n_heads", "d_ffn", "max_seq_len", "dropout", "tie_embeddings"}
NOT_ARCHITECTURE = {"pretrained", "activation_checkpointing"}
LN_EPS = 1e-5  # nn.LayerNorm's default, used by every built-in norm

# built-in name -> (GPT-2 name, transpose): per block, then the model's own.
BLOCK_MAP = {
    "ln_attn.weight": ("ln_1.weight", False), "ln_attn.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True), "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln_ffn.weight": ("ln_2.weight", False), "ln_ffn.bias": ("ln_2.bias", False),
    "ffn.up.weight": ("mlp.c_fc.weight", True), "ffn.up.bias": ("mlp.c_fc.bias", False),
    "ffn.down.weight": ("mlp.c_proj.weight", True), "ffn.down.bias": ("mlp.c_proj.bias", False),
}
TOP_MAP = {
    "tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
    "ln_out.weight": "transformer.ln_f.weight", "ln_out.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}


def check_maps_onto_gpt2(cfg: ModelConfig) -> None:
    """Refuse a config with a field GPT-2 has no counterpart for (a later architecture option)."""
    if getattr(cfg, "pretrained", ""):
        raise ValueError(f"model.pretrained={cfg.pretrained!r}: a run from a pretrained model is exported as "
                         "its own architecture, not mapped onto GPT-2")
    unknown = sorted({f.name for f in dataclasses.fields(cfg)} - MAPPED - NOT_ARCHITECTURE)
    if unknown:
        raise ValueError(f"model.{unknown[0]} has no GPT-2 counterpart: the built-in model does not map onto "
                         "GPT-2 exactly (use --format safetensors)")


def gpt2_config(cfg: ModelConfig, eos_id: Optional[int] = None, pad_id: Optional[int] = None):
    """The transformers GPT2Config of the same architecture (dropouts from model.dropout)."""
    from transformers import GPT2Config

    check_maps_onto_gpt2(cfg)
    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.d_ffn, activation_function="gelu",  # exact erf GELU, as F.gelu
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=LN_EPS,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eos_id, eos_token_id=eos_id,
        pad_token_id=pad_id, architectures=["GPT2LMHeadModel"])


def builtin_to_gpt2_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The built-in state dict under GPT-2's names (Conv1D weights transposed); every key must map."""
    out, used = {}, set()
    for i in range(cfg.n_layers):
        for src, (dst, transpose) in BLOCK_MAP.items():
            key = f"blocks.{i}.{src}"
            if key in state:
                t = state[key]
                out[f"transformer.h.{i}.{dst}"] = t.t().contiguous() if transpose else t
                used.add(key)
    for src, dst in TOP_MAP.items():
        if src in state and not (src == "lm_head.weight" and cfg.tie_embeddings):
            out[dst] = state[src]
        used.add(src)
    unmapped = sorted(set(state) - used)
    if unmapped:
        raise ValueError(f"built-in weights {unmapped[:3]} have no GPT-2 counterpart: the model does not map "
                         "onto GPT-2 exactly (use --format safetensors)")
    return out


def build_gpt2(state: dict[str, torch.Tensor], cfg: ModelConfig, eos_id: Optional[int] = None,
               pad_id: Optional[int] = None):
    """A GPT2LMHeadModel holding the built-in weights (fp32, eval mode); refuses a partial mapping."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(gpt2_config(cfg, eos_id, pad_id))
    mapped = builtin_to_gpt2_state(state, cfg)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"the built-in weights do not fill GPT-2: missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    return model.float().eval()
