"""Tiny Hugging Face tokenizers and causal LMs built locally (nothing can be downloaded in tests).

write_tiny_tokenizer(dir): a byte-level BPE PreTrainedTokenizerFast trained on a few hundred words,
EOS "<|endoftext|>", no pad token. write_tiny_model(dir, family, vocab_size, seed): a 2-layer,
hidden-32, 4-head, 64-position random model of the family, saved with save_pretrained (safetensors).
Both are deterministic: the same arguments give the same files. build_tiny_model(config, seed) gives the
in-memory model of any HF config (tests of other families and variants).
"""
from __future__ import annotations

import random
from pathlib import Path

FAMILIES = ("gpt2", "gpt_neox", "llama")
EOS = "<|endoftext|>"

_WORDS = (
    "the a an of to in and is was for on that with as by at from it this be are or have not "
    "model memory token train data batch loss step rank shard layer head key value query "
    "river mountain city house garden window light night morning summer winter water stone "
    "quick brown fox jumps over lazy dog small large green blue red yellow old new long short "
    "read write learn teach build carry open close begin end walk run speak listen think know"
).split()


def _corpus(n_lines: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n_lines)]


def write_tiny_tokenizer(directory, vocab_size: int = 300) -> Path:
    """Train a byte-level BPE on a fixed word list and save it as a HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   unk_token=EOS)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return directory


def tiny_config(family: str, vocab_size: int):
    """The tiny HF config of one family: 2 layers, hidden 32, 4 heads, 64 positions."""
    import transformers as tr

    if family == "gpt2":
        return tr.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2,
                             n_head=4, n_inner=64, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    if family == "gpt_neox":
        return tr.GPTNeoXConfig(vocab_size=vocab_size, max_position_embeddings=64,
                                hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, use_parallel_residual=True,
                                hidden_dropout=0.0, attention_dropout=0.0,
                                tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    if family == "llama":
        return tr.LlamaConfig(vocab_size=vocab_size, max_position_embeddings=64, hidden_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, tie_word_embeddings=False,
                              bos_token_id=0, eos_token_id=0)
    raise ValueError(f"unknown tiny model family {family!r} (known: {', '.join(FAMILIES)})")


def build_tiny_model(config, seed: int = 0):
    """A random causal LM of an HF config (float32), weights drawn larger than HF's init (std 0.1, not
    0.02) so that tests see real differences."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def write_tiny_model(directory, family: str, vocab_size: int, seed: int = 0) -> Path:
    """Save a tiny random `family` causal LM (float32, safetensors) to `directory`."""
    model = build_tiny_model(tiny_config(family, vocab_size), seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
