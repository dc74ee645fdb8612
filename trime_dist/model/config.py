"""The built-in transformer's architecture config."""
from __future__ import annotations

from dataclasses import dataclass

from trime_dist.core.config import opt


@dataclass
class ModelConfig:
    vocab_size: int = opt(0, "0 = take it from the data's tokenizer")
    n_layers: int = opt(2, "transformer blocks")
    d_model: int = opt(128, "residual width D")
    n_heads: int = opt(4, "attention heads (D % n_heads == 0)")
    d_ffn: int = opt(512, "feed-forward inner width")
    max_seq_len: int = opt(128, "longest segment the position table covers")
    dropout: float = opt(0.0, "dropout on attention probs, residual branches, embeddings")
    tie_embeddings: bool = opt(True, "output layer shares the input embedding matrix")
