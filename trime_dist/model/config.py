"""The built-in transformer's architecture config."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 0          # 0 = take it from the data's tokenizer
    n_layers: int = 2            # transformer blocks
    d_model: int = 128           # residual width D
    n_heads: int = 4             # attention heads (D % n_heads == 0)
    d_ffn: int = 512             # feed-forward inner width
    max_seq_len: int = 128       # longest segment the position table covers
    dropout: float = 0.0         # dropout on attention probs, residual branches, embeddings
    tie_embeddings: bool = True  # output layer shares the input embedding matrix
