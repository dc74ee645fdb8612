"""Tokenizers for prepare: built-in kinds made with HF `tokenizers` (byte-level BPE, raw bytes, characters),
or any given Hugging Face tokenizer (a tokenizer.json or a save_pretrained folder).

Built-in kinds round-trip text exactly (decode(encode(text)) == text) and reserve `<pad>` = 0 and
`<eod>` = 1. A given tokenizer ends documents with its EOS token (or a named one) and needs no pad
token. The tokenizer is saved as tokenizer.json next to the shards; loading it gives identical ids.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from trime_dist.core.io import sha256_file

log = logging.getLogger(__name__)

PAD, EOD, UNK = "<pad>", "<eod>", "<unk>"
KINDS = ("bpe", "byte", "char")
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # a HF folder's special-token settings
# A bare tokenizer.json names no EOS token: the first of these it holds (as a special token) ends documents.
KNOWN_EOD = (EOD, "<|endoftext|>", "</s>", "<|end_of_text|>")


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
    # A special token's text in a document ("<eod>", "<|endoftext|>") is text, not the special token.
    tok.encode_special_tokens = True
    return tok


def _check_special(tok, where: str) -> None:
    if tok.token_to_id(PAD) != 0 or tok.token_to_id(EOD) is None:
        raise ValueError(f"{where}: tokenizer must have {PAD} as id 0 and an {EOD} token "
                         f"(got {PAD}={tok.token_to_id(PAD)}, {EOD}={tok.token_to_id(EOD)})")


def tokenizer_from_str(text: str, where: str = "<string>"):
    """A `tokenizers.Tokenizer` from tokenizer.json text, in text mode (special tokens in documents are text)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
        raise ValueError(f"{where}: not a valid tokenizers JSON file ({e})") from None
    return _text_mode(tok)


# ----------------------------------------------------------------------------- a given tokenizer (--tokenizer)

@dataclass
class TokenizerSource:
    """What `--tokenizer PATH` names: a tokenizer.json, or a Hugging Face tokenizer folder (save_pretrained)."""
    path: str                  # as given
    json_path: str             # the tokenizer.json
    text: str                  # its text, byte for byte (the manifest's sha256 is of this file)
    side: dict[str, str]       # the folder's special-token settings: file name -> text (empty for a bare file)


def read_tokenizer_source(path: str) -> TokenizerSource:
    """Read a tokenizer.json file or a HF tokenizer folder (tokenizer.json + tokenizer_config.json and/or
    special_tokens_map.json, which name the EOS and pad tokens)."""
    json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(json_path):
        hint = ("the folder has no tokenizer.json: only fast tokenizers are supported; write one with "
                "AutoTokenizer.from_pretrained(...).save_pretrained(...)") if os.path.isdir(path) \
            else "give a tokenizer.json file or a Hugging Face tokenizer folder"
        raise FileNotFoundError(f"tokenizer file not found: {json_path} ({hint})")
    side = {}
    if os.path.isdir(path):
        for name in SIDE_FILES:
            if os.path.isfile(os.path.join(path, name)):
                side[name] = _read_text(os.path.join(path, name))
    return TokenizerSource(path, json_path, _read_text(json_path), side)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", newline="") as f:  # newline="": keep the bytes (and so the sha256)
        return f.read()


def configured_special(src: TokenizerSource) -> Optional[dict[str, Optional[str]]]:
    """{"eos_token", "pad_token"} as the folder's settings name them (tokenizer_config.json first, as
    transformers reads it, then special_tokens_map.json); None for a bare tokenizer.json, which names neither."""
    if not src.side:
        return None
    out: dict[str, Optional[str]] = {"eos_token": None, "pad_token": None}
    for name in SIDE_FILES:
        if name not in src.side:
            continue
        try:
            settings = json.loads(src.side[name])
        except json.JSONDecodeError as e:
            raise ValueError(f"{os.path.join(src.path, name)}: invalid JSON ({e})") from None
        for key in out:
            value = settings.get(key) if isinstance(settings, dict) else None
            if isinstance(value, dict):  # older files: {"content": "...", "__type": "AddedToken", ...}
                value = value.get("content")
            if out[key] is None and isinstance(value, str):
                out[key] = value
    return out


def _special_added(tok) -> set[str]:
    return {t.content for t in tok.get_added_tokens_decoder().values() if t.special}


def _default_eod(tok, special: Optional[dict], where: str) -> str:
    """The tokenizer's EOS token: the folder's eos_token, or for a bare tokenizer.json (which has no such
    field) the first of KNOWN_EOD that it holds as a special token."""
    if special is not None:
        if special["eos_token"] is None:
            raise ValueError(f"{where}: the tokenizer has no EOS token (no eos_token in "
                             f"{' or '.join(SIDE_FILES)}); name the end-of-document token with --eod-token")
        return special["eos_token"]
    added = _special_added(tok)
    for token in KNOWN_EOD:
        if token in added:
            return token
    raise ValueError(f"{where}: a tokenizer.json does not name its EOS token and this one has none of the special "
                     f"tokens {', '.join(KNOWN_EOD)}; name the end-of-document token with --eod-token")


def describe_tokenizer(tok, special: Optional[dict] = None, eod_token: Optional[str] = None,
                       where: str = "<tokenizer>") -> dict:
    """dict(kind, vocab_size, eod_token, eod_id, pad_id) of a tokenizer (the manifest's entry, less file/sha256).

    eod: `eod_token`, else the tokenizer's EOS token. pad_id: the pad token's id, else the eod id -- any id
    works, padding is never a target nor a memory key (lengths mark it). vocab_size counts added tokens.
    """
    eod = eod_token or _default_eod(tok, special, where)
    eod_id = tok.token_to_id(eod)
    if eod_id is None:
        what = "--eod-token" if eod_token else "its EOS token"
        raise ValueError(f"{where}: {what} {eod!r} is not in the tokenizer's vocabulary")
    if eod not in _special_added(tok):
        log.warning("%s: end-of-document token %r is an ordinary token: a document holding it as text also "
                    "gets id %d", where, eod, eod_id)
    pad = special["pad_token"] if special is not None else PAD
    pad_id = tok.token_to_id(pad) if pad is not None else None
    builtin = tok.token_to_id(PAD) == 0 and eod == EOD
    return {"kind": tokenizer_kind(tok) if builtin else "hf",
            "vocab_size": max(tok.get_vocab(with_added_tokens=True).values()) + 1,  # ids need not be dense
            "eod_token": eod, "eod_id": eod_id, "pad_id": eod_id if pad_id is None else pad_id}


def load_tokenizer(path: str):
    """A tokenizers.Tokenizer from a tokenizer.json file or a HF tokenizer folder."""
    src = read_tokenizer_source(path)
    return tokenizer_from_str(src.text, src.json_path)


def tokenizer_kind(tok) -> str:
    """bpe | byte | char, read from the tokenizer's structure (tokenizer.json has no free metadata)."""
    spec = json.loads(tok.to_str())
    if (spec.get("decoder") or {}).get("type") == "Fuse":
        return "char"
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and not pre.get("use_regex", True) and not spec["model"].get("merges"):
        return "byte"
    return "bpe"


def tokenizer_info(path: str, eod_token: Optional[str] = None) -> dict:
    """dict(kind, vocab_size, eod_token, eod_id, pad_id, sha256) of a tokenizer file or HF folder (the
    manifest's entry; sha256 is of the tokenizer.json)."""
    src = read_tokenizer_source(path)
    tok = tokenizer_from_str(src.text, src.json_path)
    return {**describe_tokenizer(tok, configured_special(src), eod_token, path), "sha256": sha256_file(src.json_path)}


def encode_docs(tok, docs: list[str]) -> list[list[int]]:
    """Token ids of each document (no special tokens added)."""
    return [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]


def decode(tok, ids) -> str:
    """Text of `ids` (a document's tokens, without the end-of-document token); exact inverse of encode_docs."""
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
