"""Streaming loader: rank split, exact resume, worker processes, bad inputs."""
import pytest
import torch

from trime_dist.core.constants import IGNORE_INDEX
from trime_dist.train.loader import (
    RankLoader,
    ShardDataset,
    iter_eval_batches,
)

from shard_fixtures import all_segments, key_of, write_segment_dir


@pytest.fixture
def seg_dir(tmp_path):
    # 7 streams of varied length: 30 segments of up to 8 targets, some short tail segments.
    write_segment_dir(str(tmp_path / "segs"), [20, 33, 9, 41, 17, 64, 50], seq_len=8, per_shard=4)
    return str(tmp_path / "segs")


def _keys(batch):
    return [key_of(s, i) for s, i in zip(batch.stream.tolist(), batch.stream_index.tolist())]


@pytest.mark.parametrize("placement", ["contiguous", "interleaved"])
def test_two_ranks_cover_each_segment_once(seg_dir, placement):
    segments = all_segments(seg_dir)
    G = 4
    ds = ShardDataset(seg_dir, G)
    n_groups = ds.groups_per_epoch()
    seen = []
    per_rank = {}
    for rank in range(2):
        loader = RankLoader(ShardDataset(seg_dir, G), rank, 2, placement, max_epochs=1)
        batches = [b for b, _ in loader]
        per_rank[rank] = batches
        assert len(batches) == n_groups  # same number of steps on each rank: nobody waits forever
        for b in batches:
            assert b.input_ids.shape == (G // 2, 8)
            for row, key in enumerate(_keys(b)):
                tokens = segments[key]
                n = len(tokens) - 1
                assert torch.equal(b.input_ids[row, :n], torch.from_numpy(tokens[:-1]).long())
                assert torch.equal(b.targets[row, :n], torch.from_numpy(tokens[1:]).long())
                assert (b.targets[row, n:] == IGNORE_INDEX).all()
            seen += _keys(b)
    assert len(seen) == len(set(seen)) == n_groups * G  # nothing duplicated
    assert len(segments) - len(seen) == len(segments) % G  # only the remainder is dropped
    # rows of one group get distinct row ids, the same on both ranks' view of the group
    ids = torch.cat([per_rank[0][0].row, per_rank[1][0].row]).tolist()
    assert sorted(ids) == list(range(G))


def test_resume_gives_same_next_batch(seg_dir):
    ds = ShardDataset(seg_dir, 2, shuffle_shards=True, seed=3)
    loader = RankLoader(ds, 1, 2, "contiguous")
    it = iter(loader)
    for _ in range(23):  # crosses an epoch boundary (15 groups per epoch)
        next(it)
    saved = loader.state.state_dict()
    expected = [next(it)[0] for _ in range(5)]
    resumed = RankLoader(ShardDataset(seg_dir, 2, shuffle_shards=True, seed=3), 1, 2, "contiguous")
    resumed.load_state_dict(saved)
    it2 = iter(resumed)
    got = [next(it2)[0] for _ in range(5)]
    for a, b in zip(expected, got):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.stream_index, b.stream_index)


def test_epochs_reshuffle_shards_deterministically(seg_dir):
    ds = ShardDataset(seg_dir, 2, shuffle_shards=True, seed=3)
    e0 = [e["path"] for e in ds.shard_order(0)]
    e1 = [e["path"] for e in ds.shard_order(1)]
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert e0 == [e["path"] for e in ShardDataset(seg_dir, 2, shuffle_shards=True, seed=3).shard_order(0)]


def test_workers_keep_order(seg_dir):
    plain = RankLoader(ShardDataset(seg_dir, 2), 0, 1, "contiguous", max_epochs=1)
    workers = RankLoader(ShardDataset(seg_dir, 2), 0, 1, "contiguous", max_epochs=1, num_workers=2)
    a = [b for b, _ in plain]
    b = [b for b, _ in workers]
    assert len(a) == len(b) > 0
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))


def test_eval_batches_keep_every_token(seg_dir):
    total = sum(len(t) - 1 for t in all_segments(seg_dir).values())
    counted = sum(b.n_tokens for r in range(2) for b in iter_eval_batches(seg_dir, r, 2, 4))
    assert counted == total


def test_grouped_size_mismatch_and_missing_manifest(tmp_path, seg_dir):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardDataset(str(tmp_path / "nothing"), 4)
    with pytest.raises(ValueError, match="no complete group"):
        RankLoader(ShardDataset(seg_dir, 64), 0, 1, "contiguous")


def test_corrupt_shard_is_named(seg_dir):
    ds = ShardDataset(seg_dir, 2)
    path = f"{seg_dir}/{ds.shard_entries[1]['path']}"
    data = bytearray(open(path, "rb").read())
    data[600:700] = b"\xff" * 100
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=ds.shard_entries[1]["path"]):
        ShardDataset(seg_dir, 2, verify=True)
