"""The model config: the built-in transformer's architecture, or a Hugging Face model folder to start from."""
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
    pretrained: str = opt("", "local Hugging Face model folder (config.json + safetensors) to start from; the "
                          "architecture fields above come from its config.json (setting one otherwise is an error)")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in backward (less memory)")
