"""Tokenizers for prepare, built with HF `tokenizers`: byte-level BPE, raw bytes, or characters.

Every kind round-trips text exactly (decode(encode(text)) == text) and reserves `<pad>` = 0 and
`<eod>` = 1. The tokenizer is saved as tokenizer.json next to the shards; loading it gives
identical ids.
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator

from trime_dist.core.io import sha256_file

PAD, EOD, UNK = "<pad>", "<eod>", "<unk>"
KINDS = ("bpe", "byte", "char")


def _byte_level_parts(use_regex: bool):
    from tokenizers import decoders, pre_tokenizers

    # add_prefix_space=False keeps the text exactly; the byte-level alphabet covers every byte.
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    return pre, decoders.ByteLevel()


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on `texts` (an iterator of documents)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < 258 + 2:
        raise ValueError(f"bpe vocab size must be >= 260 (256 bytes + 2 special + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = _byte_level_parts(use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_byte_tokenizer():
    """One token per byte (enwik8-style): ids 0, 1 special, then the 256 byte values."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {PAD: 0, EOD: 1, **{ch: i + 2 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = _byte_level_parts(use_regex=False)
    tok.add_special_tokens([PAD, EOD])
    return tok


def build_char_tokenizer(texts: Iterable[str]):
    """One token per character seen in `texts`; unseen characters map to `<unk>` (id 2)."""
    from tokenizers import Tokenizer, decoders, models

    chars = set()
    for text in texts:
        chars.update(text)
    vocab = {PAD: 0, EOD: 1, UNK: 2, **{ch: i + 3 for i, ch in enumerate(sorted(chars))}}
    # No pre-tokenizer: BPE without merges splits a text into characters; Fuse joins them back.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([PAD, EOD, UNK])
    return tok


def build_tokenizer(kind: str, texts: Iterable[str], vocab_size: int):
    """Train/build a tokenizer of `kind` over `texts` (documents); returns a `tokenizers.Tokenizer`."""
    if kind == "bpe":
        tok = train_bpe(texts, vocab_size)
    elif kind == "byte":
        tok = build_byte_tokenizer()
    elif kind == "char":
        tok = build_char_tokenizer(texts)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}, expected one of {KINDS}")
    _check_special(tok, "<built tokenizer>")
    return _text_mode(tok)


def _text_mode(tok):
    # Literal "<eod>" in a document is text, not the end-of-document token.
    tok.encode_special_tokens = True
    return tok


def _check_special(tok, where: str) -> None:
    if tok.token_to_id(PAD) != 0 or tok.token_to_id(EOD) is None:
        raise ValueError(f"{where}: tokenizer must have {PAD} as id 0 and an {EOD} token "
                         f"(got {PAD}={tok.token_to_id(PAD)}, {EOD}={tok.token_to_id(EOD)})")


def tokenizer_from_str(text: str, where: str = "<string>"):
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
        raise ValueError(f"{where}: not a valid tokenizers JSON file ({e})") from None
    _check_special(tok, where)
    return _text_mode(tok)


def load_tokenizer(path: str):
    """Load a tokenizer.json written by this module (or any HF tokenizer with <pad>=0 and <eod>)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file not found: {path}") from None
    return tokenizer_from_str(text, path)


def tokenizer_kind(tok) -> str:
    """bpe | byte | char, read from the tokenizer's structure (tokenizer.json has no free metadata)."""
    spec = json.loads(tok.to_str())
    if (spec.get("decoder") or {}).get("type") == "Fuse":
        return "char"
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and not pre.get("use_regex", True) and not spec["model"].get("merges"):
        return "byte"
    return "bpe"


def tokenizer_info(path: str) -> dict:
    """dict(kind, vocab_size, eod_id, pad_id, sha256) of a tokenizer file (the manifest's entry)."""
    tok = load_tokenizer(path)
    return {"kind": tokenizer_kind(tok), "vocab_size": tok.get_vocab_size(),
            "eod_id": tok.token_to_id(EOD), "pad_id": tok.token_to_id(PAD), "sha256": sha256_file(path)}


def encode_docs(tok, docs: list[str]) -> list[list[int]]:
    """Token ids of each document (no special tokens added)."""
    return [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]


def decode(tok, ids) -> str:
    """Text of `ids` (a document's tokens, without <eod>); exact inverse of encode_docs."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def split_at_eod(ids, eod_id: int) -> Iterator[list[int]]:
    """Split a token stream into documents at `eod_id` (the terminator after each document)."""
    doc: list[int] = []
    for i in ids:
        if int(i) == eod_id:
            yield doc
            doc = []
        else:
            doc.append(int(i))
    if doc:
        yield doc
