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


# ----------------------------------------------------------------------------- reading a range, padding rows

def _segment_dir(tmp_path, n=11, per_shard=4):
    segs = _random_segments(np.random.default_rng(6), n)
    entries = _write_segments(tmp_path, segs, per_shard)
    manifest = _manifest(entries)
    manifest["tokenizer"]["vocab_size"] = 1000  # _random_segments' ids
    shards.write_manifest(str(tmp_path), manifest)
    return segs, shards.read_manifest(str(tmp_path))


def test_shard_offsets_number_samples_in_entry_order(tmp_path):
    _, m = _segment_dir(tmp_path)                                        # shards of 4, 4, 3 segments
    assert shards.shard_offsets(m).tolist() == [0, 4, 8, 11]
    assert shards.shard_offsets(m, m["shards"][::-1]).tolist() == [0, 3, 7, 11]
    grouped = dict(m, format=shards.GROUPS_FORMAT, shards=[dict(e, groups=1) for e in m["shards"]])
    assert shards.shard_offsets(grouped).tolist() == [0, 1, 2, 3]  # grouped shards count groups


def test_iter_range_reads_a_range_and_skips_shards_outside_it_unread(tmp_path):
    segs, m = _segment_dir(tmp_path)
    every = list(shards.iter_range(str(tmp_path), m))
    assert [i for i, _, _ in every] == list(range(11))
    assert all(np.array_equal(t, s[3]) and meta["index"] == s[1] for (_, t, meta), s in zip(every, segs))
    for start, end in [(0, 11), (3, 9), (4, 8), (5, 6), (10, None), (7, 7)]:
        got = [(i, t.tolist()) for i, t, _ in shards.iter_range(str(tmp_path), m, start, end)]
        assert got == [(i, t.tolist()) for i, t, _ in every[start:end]]
    first, last = (os.path.join(tmp_path, e["path"]) for e in (m["shards"][0], m["shards"][2]))
    os.rename(first, first + ".gone")                                   # shards 0 and 2 are not opened
    os.rename(last, last + ".gone")
    assert [i for i, _, _ in shards.iter_range(str(tmp_path), m, 4, 8)] == [4, 5, 6, 7]
    with pytest.raises(FileNotFoundError, match=r"shard listed in .*manifest.json not found: .*shard-r001"):
        list(shards.iter_range(str(tmp_path), m, 3, 5))
    # another shard order numbers the samples in that order (the loader's shuffled epochs)
    order = m["shards"][1:2]
    assert [t.tolist() for _, t, _ in shards.iter_range(str(tmp_path), m, 1, entries=order)] == \
        [s[3].tolist() for s in segs[5:8]]


def test_iter_range_check_refuses_what_the_manifest_does_not_say(tmp_path):
    _, m = _segment_dir(tmp_path)
    d = str(tmp_path)
    assert len(list(shards.iter_range(d, m, 0, None, check=True))) == 11
    with pytest.raises(ValueError, match=r"has \d+ targets but the manifest says seq_len=2"):
        list(shards.iter_range(d, dict(m, seq_len=2), check=True))
    small_vocab = dict(m, tokenizer=dict(m["tokenizer"], vocab_size=5))
    with pytest.raises(ValueError, match=r"outside the manifest's vocabulary \[0, 5\)"):
        list(shards.iter_range(d, small_vocab, check=True))
    fewer = dict(m, shards=[dict(m["shards"][0], segments=5)] + m["shards"][1:])
    with pytest.raises(ValueError, match="holds 4 segments but the manifest says 5"):
        list(shards.iter_range(d, fewer, 0, 3, check=True))            # checked although the range ends early
    more = dict(m, shards=[dict(m["shards"][0], segments=3)] + m["shards"][1:])
    with pytest.raises(ValueError, match="holds more segments than the 3 the manifest says"):
        list(shards.iter_range(d, more, 0, 3, check=True))
    path = os.path.join(d, m["shards"][1]["path"])
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=f"shard listed in {d}/manifest.json not found: {path}"):
        list(shards.iter_range(d, m, 4, 5, check=True))
    entries = _write_segments(tmp_path, _random_segments(np.random.default_rng(7), 4), per_shard=4)
    with pytest.raises(ValueError, match="checksum mismatch"):             # shard 0 rewritten with other segments
        list(shards.iter_range(d, m, 0, 1, check=True))
    assert entries[0]["path"] == m["shards"][0]["path"]


def test_iter_range_reads_grouped_shards(tmp_path):
    w = shards.GroupShardWriter(str(tmp_path), max_groups=2)
    for g in range(5):
        w.add(g, np.full((2, 5), g, np.int32), [{"stream": g, "index": r, "start": 0, "length": 4} for r in range(2)])
    m = {"format": shards.GROUPS_FORMAT, "shards": w.close(), "seq_len": 4,
         "tokenizer": {"vocab_size": 5}}
    got = list(shards.iter_range(str(tmp_path), m, 1, 4, check=True))
    assert [(i, int(t[0, 0]), t.shape) for i, t, _ in got] == [(1, 1, (2, 5)), (2, 2, (2, 5)), (3, 3, (2, 5))]
    with pytest.raises(ValueError, match="group 000000004 has token id 4 outside"):
        list(shards.iter_range(str(tmp_path), dict(m, tokenizer={"vocab_size": 4}), 4, check=True))


def test_pad_rows_against_a_loop():
    rng = np.random.default_rng(8)
    rows = [rng.integers(0, 50, size=int(n)).astype(np.int32) for n in (3, 1, 6, 2)]
    tokens, lengths = shards.pad_rows(rows, 8, pad_id=-1, n_rows=6)
    assert tokens.shape == (6, 8) and tokens.dtype == np.int32 and lengths.tolist() == [2, 0, 5, 1, 0, 0]
    for r in range(6):
        row = rows[r] if r < len(rows) else np.zeros(0, np.int32)
        assert tokens[r, :len(row)].tolist() == row.tolist() and (tokens[r, len(row):] == -1).all()
    tokens, lengths = shards.pad_rows(rows, None, 0, dtype=np.int64)  # width: the longest row
    assert tokens.shape == (4, 6) and tokens.dtype == np.int64 and lengths.tolist() == [2, 0, 5, 1]
    with pytest.raises(ValueError, match="row 2 has 6 tokens, more than the padded width 5"):
        shards.pad_rows(rows, 5, 0)
