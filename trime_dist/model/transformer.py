"""Decoder-only transformer LM that also returns TRIME's memory keys.

Pre-LN blocks, causal attention via scaled_dot_product_attention, tied embeddings. The memory
key g(c) is the input of the LAST block's feed-forward sublayer after its layer norm
(TRIME's `last_ffn_input`). The model knows nothing about memory layouts or parallelism.
build_model gives this model, or a Hugging Face one (model/hf.py) when model.pretrained is set.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trime_dist.model.config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        # [B, T, D] -> [B, nh, T, hs]
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # [B, T, D]
        return self.proj(y)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ffn)
        self.down = nn.Linear(cfg.d_ffn, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention sublayer: its residual output and the feed-forward input after its layer norm."""
        x = x + self.drop(self.attn(self.ln_attn(x)))
        return x, self.ln_ffn(x)  # [B, T, D] each

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block output and the feed-forward input after its layer norm."""
        x, ffn_input = self.attend(x)  # ffn_input: TRIME's memory key when this is the last block
        return x + self.drop(self.ffn(ffn_input)), ffn_input


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _trunk(self, input_ids: torch.Tensor, last_ffn: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """input_ids [B, T] -> (last block's output [B, T, D], memory keys [B, T, D]); without last_ffn the
        last block stops at the key (its feed-forward is skipped) and no output is returned."""
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        pos = torch.arange(T, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))  # [B, T, D]
        for block in self.blocks[:-1]:
            x, _ = self._block(block, x)
        if not last_ffn:
            return None, self.blocks[-1].attend(x)[1]
        return self._block(self.blocks[-1], x)

    def _block(self, block: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            # Keep only the block's input; backward re-runs it (same dropout masks: the RNG state is
            # restored). Non-reentrant, so the memory key, an output of the block, keeps its gradient.
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, T] -> (vocab logits [B, T, V], memory keys [B, T, D])."""
        x, memory_keys = self._trunk(input_ids)
        logits = self.lm_head(self.ln_out(x))  # [B, T, V]
        return logits, memory_keys

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> memory keys [B, T, D], as forward() gives them, without the output layer
        or the last feed-forward (the datastore needs only the keys)."""
        return self._trunk(input_ids, last_ffn=False)[1]

    def compile_blocks(self) -> None:
        """torch.compile each block in place (torchtitan's per-block compile): parameter names, checkpoints
        and activation checkpointing are unchanged; the encode path's attend() stays eager."""
        for block in self.blocks:
            block.compile()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig, seed: Optional[int] = None) -> nn.Module:
    """The model with its initial weights (seeded when `seed` is given, the same on every rank): the
    built-in TransformerLM, or the HFCausalLM of model.pretrained's folder."""
    if cfg.pretrained:
        from trime_dist.model.hf import load_pretrained

        return load_pretrained(cfg, seed=seed)
    if seed is not None:
        torch.manual_seed(seed)
    return TransformerLM(cfg)
