"""Shard I/O: segment and group shards round-trip, manifests are validated, corruption is caught."""
from __future__ import annotations

import os

import numpy as np
import pytest

from trime_dist.core import shards


def _random_segments(rng, n):
    out = []
    for i in range(n):
        length = int(rng.integers(1, 9))
        out.append((int(rng.integers(0, 3)) * 2**32 + i, int(rng.integers(0, 5)), int(rng.integers(0, 100)),
                    rng.integers(0, 1000, size=length + 1).astype(np.int32)))
    return out


def _write_segments(tmp_path, segs, per_shard=4):
    w = shards.SegmentShardWriter(str(tmp_path), rank=1, max_segments=per_shard)
    for stream, index, start, tokens in segs:
        w.add(stream, index, start, tokens)
    return w.close()


def test_segment_shards_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    segs = _random_segments(rng, 11)
    entries = _write_segments(tmp_path, segs)
    assert [e["path"] for e in entries] == [shards.segment_shard_name(1, i) for i in range(3)]
    assert [e["segments"] for e in entries] == [4, 4, 3]
    read = [s for e in entries for s in shards.iter_segments(os.path.join(tmp_path, e["path"]), e["sha256"])]
    assert len(read) == len(segs)
    for (key, tokens, meta), (stream, index, start, ref) in zip(read, segs):
        assert key == shards.segment_key(stream, index)
        assert tokens.dtype == np.int32 and np.array_equal(tokens, ref)
        assert meta == {"stream": stream, "index": index, "start": start, "length": len(ref) - 1}
    assert sum(e["tokens"] for e in entries) == sum(len(s[3]) - 1 for s in segs)
    assert entries[0]["first_key"] == read[0][0] and entries[-1]["last_key"] == read[-1][0]


def test_group_shards_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    w = shards.GroupShardWriter(str(tmp_path), max_groups=2, start_index=5)
    groups = []
    for g in range(3):
        tokens = rng.integers(0, 50, size=(4, 9)).astype(np.int32)  # [G, L + 1]
        metas = [{"stream": g, "index": r, "start": 8 * r, "length": 8} for r in range(4)]
        w.add(g, tokens, metas)
        groups.append((tokens, metas))
    entries = w.close()
    assert [e["path"] for e in entries] == ["group-00005.tar", "group-00006.tar"]
    assert [(e["groups"], e["segments"]) for e in entries] == [(2, 8), (1, 4)]
    read = [g for e in entries for g in shards.iter_groups(os.path.join(tmp_path, e["path"]))]
    for g, (key, tokens, meta) in enumerate(read):
        assert key == shards.group_key(g)
        assert np.array_equal(tokens, groups[g][0]) and meta == {"segments": groups[g][1]}
    with pytest.raises(ValueError, match="does not match"):
        w.add(9, np.zeros((3, 9), np.int32), groups[0][1])


def test_same_samples_give_same_bytes_and_are_not_rewritten(tmp_path):
    segs = _random_segments(np.random.default_rng(2), 5)
    first = _write_segments(tmp_path, segs)
    path = os.path.join(tmp_path, first[0]["path"])
    os.utime(path, (1, 1))
    again = _write_segments(tmp_path, segs)
    assert [e["sha256"] for e in again] == [e["sha256"] for e in first]
    assert all(e["reused"] for e in again) and os.stat(path).st_mtime == 1


def _manifest(entries):
    return {"format": shards.SEGMENTS_FORMAT, "seq_len": 8,
            "tokenizer": {"file": "tokenizer.json", "sha256": "0" * 64, "kind": "byte", "vocab_size": 258,
                          "eod_id": 1, "pad_id": 0},
            "stream_mode": "file", "segments": sum(e["segments"] for e in entries), "tokens": 0, "streams": 1,
            "shards": entries}


def test_read_manifest_validates(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        shards.read_manifest(str(tmp_path))
    entries = _write_segments(tmp_path, _random_segments(np.random.default_rng(3), 6))
    shards.write_manifest(str(tmp_path), _manifest(entries))
    m = shards.read_manifest(str(tmp_path))
    assert [os.path.basename(p) for p in shards.shard_paths(str(tmp_path), m)] == [e["path"] for e in entries]
    bad = _manifest(entries)
    del bad["seq_len"]
    shards.write_manifest(str(tmp_path), bad)
    with pytest.raises(ValueError, match="missing field 'seq_len'"):
        shards.read_manifest(str(tmp_path))
    bad = _manifest(entries)
    bad["format"] = "something/v0"
    shards.write_manifest(str(tmp_path), bad)
    with pytest.raises(ValueError, match="unknown format"):
        shards.read_manifest(str(tmp_path))
    bad = _manifest(entries)
    bad["segments"] += 1
    shards.write_manifest(str(tmp_path), bad)
    with pytest.raises(ValueError, match="shards hold 6 segments"):
        shards.read_manifest(str(tmp_path))


def test_corrupt_shard_is_named(tmp_path):
    entries = _write_segments(tmp_path, _random_segments(np.random.default_rng(4), 3), per_shard=10)
    path = os.path.join(tmp_path, entries[0]["path"])
    data = bytearray(open(path, "rb").read())
    shards.verify_shard(entries[0], str(tmp_path))  # intact: no error
    data[700:708] = b"\xff" * 8                        # inside the first sample's data
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=f"{path}: shard checksum mismatch"):
        shards.verify_shard(entries[0], str(tmp_path))
    with pytest.raises(ValueError, match="checksum mismatch"):
        list(shards.iter_segments(path, entries[0]["sha256"]))


def test_truncated_or_garbled_tar_is_named(tmp_path):
    entries = _write_segments(tmp_path, _random_segments(np.random.default_rng(5), 3), per_shard=10)
    path = os.path.join(tmp_path, entries[0]["path"])
    data = open(path, "rb").read()
    open(path, "wb").write(data[:1800])                 # cut inside a member
    with pytest.raises(ValueError, match=f"{path}: corrupt or truncated"):
        list(shards.iter_segments(path))
    open(path, "wb").write(data[:3072])                 # cut between samples: no end-of-archive marker
    with pytest.raises(ValueError, match=f"{path}: corrupt or truncated"):
        list(shards.iter_segments(path))
    open(path, "wb").write(data[:512] + b"\x00garbage" * 64 + data[1024:])  # header of member 2 garbled
    with pytest.raises(ValueError, match=path):
        list(shards.iter_segments(path))
    with pytest.raises(FileNotFoundError, match="shard not found"):
        list(shards.iter_segments(os.path.join(tmp_path, "nope.tar")))
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=entries[0]["path"]):
        shards.verify_shard(entries[0], str(tmp_path))
