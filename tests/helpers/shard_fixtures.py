"""Small hand-made shard directories for loader and training tests (exact, known contents)."""
from __future__ import annotations

import os

import numpy as np

from trime_dist.core import shards


def pattern_tokens(rng: np.random.Generator, length: int, vocab_size: int, noise: float) -> np.ndarray:
    """A learnable stream: next = (7 * prev + 3) mod V (ids >= 2), replaced by a random id w.p. `noise`."""
    out = np.empty(length, dtype=np.int32)
    out[0] = rng.integers(2, vocab_size)
    for i in range(1, length):
        nxt = 2 + (7 * int(out[i - 1]) + 3) % (vocab_size - 2)
        out[i] = rng.integers(2, vocab_size) if rng.random() < noise else nxt
    return out


def write_segment_dir(out_dir: str, stream_lengths: list[int], seq_len: int, vocab_size: int = 50,
                      per_shard: int = 5, seed: int = 0, noise: float = 1.0, real_tokenizer: bool = False) -> dict:
    """Streams cut into segments as `trime prepare` does (noise=1: uniform random tokens); returns the manifest."""
    rng = np.random.default_rng(seed)
    writer = shards.SegmentShardWriter(out_dir, rank=0, max_segments=per_shard)
    n_segments = n_tokens = 0
    for stream, length in enumerate(stream_lengths):
        tokens = pattern_tokens(rng, length, vocab_size, noise)
        for index, start in enumerate(range(0, length - 1, seq_len)):
            writer.add(stream, index, start, tokens[start:start + seq_len + 1])
            n_segments += 1
        n_tokens += length - 1
    entries = writer.close()
    manifest = {
        "format": shards.SEGMENTS_FORMAT, "seq_len": seq_len,
        # a real byte tokenizer file (stages that copy it need one), or a stand-in with V = vocab_size
        "tokenizer": _byte_tokenizer(out_dir) if real_tokenizer else {
            "file": "tokenizer.json", "sha256": "0" * 64, "kind": "test", "vocab_size": vocab_size,
            "eod_id": 1, "pad_id": 0},
        "stream_mode": "file", "segments": n_segments, "tokens": n_tokens, "streams": len(stream_lengths),
        "shards": entries,
    }
    shards.write_manifest(out_dir, manifest)
    return manifest


def _byte_tokenizer(out_dir: str) -> dict:
    """A real tokenizer file beside the shards (ids 2..vocab_size-1 of the streams are byte ids)."""
    from data_pipeline.tokenizer import build_tokenizer, tokenizer_info

    path = os.path.join(out_dir, shards.TOKENIZER_FILE)
    build_tokenizer("byte", [], 0).save(path)
    return {"file": shards.TOKENIZER_FILE, **tokenizer_info(path)}


def all_segments(out_dir: str) -> dict[str, np.ndarray]:
    manifest = shards.read_manifest(out_dir)
    out = {}
    for path in shards.shard_paths(out_dir, manifest):
        for key, tokens, _ in shards.iter_segments(path):
            out[key] = tokens
    return out


def key_of(stream: int, order: int) -> str:
    return shards.segment_key(int(stream), int(order))


__all__ = ["write_segment_dir", "all_segments", "key_of", "os"]


def write_pattern_splits(root, valid: bool = True, real_tokenizer: bool = False,
                         valid_real_tokenizer: bool = False) -> None:
    """ROOT/train (12 learnable streams of 700 tokens, 32-token segments) and ROOT/valid (2 of 300): the data
    the training, signal, resume, lost-rank, launcher and GPU tests train on."""
    write_segment_dir(str(os.path.join(root, "train")), [700] * 12, seq_len=32, vocab_size=50, per_shard=40,
                      noise=0.2, real_tokenizer=real_tokenizer)
    if valid:
        write_segment_dir(str(os.path.join(root, "valid")), [300] * 2, seq_len=32, vocab_size=50, per_shard=40,
                          noise=0.2, seed=1, real_tokenizer=valid_real_tokenizer)
