"""A small topical segment corpus (with tokenizer.json) for the `trime group` tests."""
from __future__ import annotations

import os

import numpy as np

from trime_dist.core import shards
from trime_dist.core.io import atomic_write_text, sha256_file


def write_topic_corpus(out_dir: str, n_streams: int = 6, stream_len: int = 400, seq_len: int = 16,
                       vocab_size: int = 200, per_shard: int = 7, seed: int = 0) -> dict:
    """Streams whose tokens come from one of 4 topics (disjoint id ranges) plus shared common ids, so
    BM25 groups are far more similar than random ones. Returns the manifest."""
    rng = np.random.default_rng(seed)
    writer = shards.SegmentShardWriter(out_dir, rank=0, max_segments=per_shard)
    n_segments = n_tokens = 0
    topic_width = (vocab_size - 12) // 4
    for stream in range(n_streams):
        tokens = np.empty(stream_len, dtype=np.int32)
        for start in range(0, stream_len, seq_len):  # each segment picks its own topic
            lo = 12 + topic_width * int(rng.integers(4))
            n = len(tokens[start:start + seq_len])
            tokens[start:start + seq_len] = np.where(rng.random(n) < 0.3, rng.integers(2, 12, n),
                                                     rng.integers(lo, lo + topic_width, n))
        for index, start in enumerate(range(0, stream_len - 1, seq_len)):
            writer.add(stream, index, start, tokens[start:start + seq_len + 1])
            n_segments += 1
        n_tokens += stream_len - 1
    atomic_write_text(os.path.join(out_dir, "tokenizer.json"), '{"test": true}\n')
    manifest = {
        "format": shards.SEGMENTS_FORMAT, "seq_len": seq_len,
        "tokenizer": {"file": "tokenizer.json", "sha256": sha256_file(os.path.join(out_dir, "tokenizer.json")),
                      "kind": "char", "vocab_size": vocab_size, "eod_id": 1, "pad_id": 0},
        "stream_mode": "file", "segments": n_segments, "tokens": n_tokens, "streams": n_streams,
        "shards": [{k: v for k, v in e.items() if k != "reused"} for e in writer.close()],
    }
    shards.write_manifest(out_dir, manifest)
    return manifest
