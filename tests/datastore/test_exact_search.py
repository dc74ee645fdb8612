"""Exact top-k search with torch (datastore/exact.py): equal to faiss's exact Flat search and to a float64
brute force; sharded over 2 real ranks (gloo) = one process; the fp16 scan + fp32 rescoring path."""
import numpy as np
import pytest
import torch

from trime_dist.datastore.exact import _pad_to_k, merge_topk, rescore, shard_range, topk_chunked

from dist_helpers import run_distributed


def _case(seed, M=3000, Q=37, D=24):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(M, D, generator=g).half()        # the store keeps fp16 keys
    queries = torch.randn(Q, D, generator=g)
    return keys, queries


def _brute(keys, queries, k):
    """float64 reference: (scores [Q, k], ids [Q, k]) sorted descending."""
    s = queries.double() @ keys.double().T
    top = s.topk(k, dim=1)
    return top.values, top.indices


@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_topk_equals_float64_brute_force_and_faiss(seed):
    from trime_dist.datastore import index as dsi

    keys, queries = _case(seed)
    k = 17
    s, i = topk_chunked(queries, keys, k, chunk=500)                                  # chunks: a merge per chunk
    ref_s, ref_i = _brute(keys, queries, k)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-5, atol=1e-5)
    f_s, f_i = dsi.brute_force_search(keys.float().numpy(), queries.numpy(), k)      # faiss Flat on the same keys
    np.testing.assert_array_equal(i.numpy(), f_i)
    np.testing.assert_allclose(s.numpy(), f_s, rtol=1e-5, atol=1e-5)


def test_fp16_scan_with_fp32_rescoring_finds_the_exact_neighbours():
    keys, queries = _case(3, M=2000, D=64)
    k = 10
    _, cand = topk_chunked(queries, keys, k + 8, chunk=700, compute_dtype=torch.float16)
    s, i = rescore(queries, keys, cand, k, query_chunk=8)
    ref_s, ref_i = _brute(keys, queries, k)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-5, atol=1e-5)


def test_shards_padding_and_merge():
    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_range(2, r, 3) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
    s, i = _pad_to_k(torch.tensor([[3.0, 1.0]]), torch.tensor([[5, 2]]), 4)
    assert s.tolist() == [[3.0, 1.0, float("-inf"), float("-inf")]] and i.tolist() == [[5, 2, -1, -1]]
    s, i = merge_topk(torch.tensor([[3.0, 1.0, 4.0, 0.5]]), torch.tensor([[0, 1, 10, 11]]), 2)
    assert s.tolist() == [[4.0, 3.0]] and i.tolist() == [[10, 0]]


class _Store:
    """The two fields ExactIndex reads, over one in-memory part written to disk."""

    def __init__(self, path, keys, write=True):
        import os

        if write:   # write=False: the files are there already (ranks writing them at once would race)
            os.makedirs(path, exist_ok=True)
            np.save(os.path.join(path, "keys-a.npy"), keys[:1100])
            np.save(os.path.join(path, "keys-b.npy"), keys[1100:])
        self.path = str(path)
        self.meta = {"count": len(keys), "dim": keys.shape[1],
                     "parts": [{"keys": "keys-a.npy"}, {"keys": "keys-b.npy"}]}
        self.first_ids = np.array([0, 1100])


def _sharded_search(rank, world_size, path, keys, queries, k, write=True):
    from trime_dist.datastore.exact import ExactIndex

    index = ExactIndex(_Store(path, keys, write), torch.device("cpu"), rank, world_size)
    return index.lo, index.hi, index.search(torch.from_numpy(queries), k)


def test_two_rank_sharded_search_equals_one_process(tmp_path):
    keys, queries = _case(5, M=2501)
    keys, queries = keys.numpy(), queries.numpy()
    k = 9
    _Store(tmp_path / "store", keys)   # written once, before the ranks read it
    results = run_distributed(_sharded_search, 2, args=(str(tmp_path / "store"), keys, queries, k, False))
    (lo0, hi0, (s0, i0)), (lo1, hi1, (s1, i1)) = results
    assert (lo0, hi0, lo1, hi1) == (0, 1251, 1251, 2501)   # each rank holds half the keys, across the part boundary
    ref_s, ref_i = _brute(torch.from_numpy(keys), torch.from_numpy(queries), k)
    for s, i in ((s0, i0), (s1, i1)):                        # every rank gets the merged answer
        assert torch.equal(i, ref_i)
        torch.testing.assert_close(s.double(), ref_s, rtol=1e-5, atol=1e-5)
    # more neighbours asked than keys: padded with -1 like faiss
    _, _, (s, i) = _sharded_search(0, 1, str(tmp_path / "one"), keys[:5], queries, 8)
    assert (i[:, 5:] == -1).all() and torch.isinf(s[:, 5:]).all() and (i[:, :5] >= 0).all()



_ASKED = {0: [slice(0, 5), slice(5, 20), slice(0, 0)], 1: [slice(20, None), slice(0, 0), slice(3, 4)]}


def _rounds_of_own_queries(rank, world_size, path, keys, queries):
    """Three search rounds in which the ranks ask different queries (rank 1 none in round 2, rank 0 none in 3),
    with k = 4 over an ip store, then k = 7 over an l2 one."""
    from trime_dist.datastore.exact import ExactIndex

    out = []
    for k, metric in ((4, "ip"), (7, "l2")):
        index = ExactIndex(_Store(path, keys, write=False), torch.device("cpu"), rank, world_size, metric=metric)
        out.append([index.search(torch.from_numpy(queries[a]), k) for a in _ASKED[rank]])
    return out


def test_two_rank_sharded_search_of_each_ranks_own_queries(tmp_path):
    """Each rank's own queries (any number, none included) are searched over both shards: the brute force over
    all keys, for ip and l2."""
    keys, queries = _case(6, M=1801, Q=30)
    keys, queries = keys.numpy(), queries.numpy()
    _Store(tmp_path / "s", keys)
    got = run_distributed(_rounds_of_own_queries, 2, args=(str(tmp_path / "s"), keys, queries))
    kk = torch.from_numpy(keys).double()
    for rank in (0, 1):
        for (k, metric), rounds in zip(((4, "ip"), (7, "l2")), got[rank]):
            for (s, i), a in zip(rounds, _ASKED[rank]):
                q = torch.from_numpy(queries[a]).double()
                ref = (q @ kk.T) if metric == "ip" else -((q[:, None, :] - kk[None]) ** 2).sum(2)
                top = ref.topk(k, dim=1)
                assert i.shape == (len(q), k) and torch.equal(i, top.indices)
                torch.testing.assert_close(s.double(), top.values, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float16])
def test_l2_topk_equals_float64_brute_force_and_faiss(compute_dtype):
    """metric l2: the k smallest ||q - k||^2, scored -||q - k||^2 (faiss METRIC_L2, negated), fp32 scan or fp16
    scan + fp32 rescoring."""
    from trime_dist.datastore import index as dsi

    keys, queries = _case(4, M=2000, D=32)
    keys = (keys.float() * torch.linspace(0.2, 3.0, 2000)[:, None]).half()   # norms differ: l2 order != ip order
    k = 12
    if compute_dtype == torch.float32:
        s, i = topk_chunked(queries, keys, k, chunk=600, metric="l2")
    else:
        _, cand = topk_chunked(queries, keys, k + 8, chunk=600, compute_dtype=compute_dtype, metric="l2")
        s, i = rescore(queries, keys, cand, k, query_chunk=8, metric="l2")
    d2 = ((queries.double()[:, None, :] - keys.double()[None]) ** 2).sum(2)      # [Q, M]
    ref = (-d2).topk(k, dim=1)
    assert torch.equal(i, ref.indices)
    torch.testing.assert_close(s.double(), ref.values, rtol=1e-4, atol=1e-3)
    assert not torch.equal(i, _brute(keys, queries, k)[1])                       # not the inner-product neighbours
    f_s, f_i = dsi.brute_force_search(keys.float().numpy(), queries.numpy(), k, metric="l2")
    np.testing.assert_array_equal(i.numpy(), f_i)
    np.testing.assert_allclose(s.numpy(), f_s, rtol=1e-4, atol=1e-3)


# ---- the block-pruned selection (entering_candidates): exact against a float64 dense torch.topk

def _dense_top(keys, queries, k, metric):
    """float64 dense reference: torch.topk over the full [Q, M] similarity matrix."""
    kk, q = keys.double(), queries.double()
    ref = (q @ kk.T) if metric == "ip" else -((q[:, None, :] - kk[None]) ** 2).sum(2)
    return ref, ref.topk(k, dim=1)


def _assert_exact_top(s, i, ref, top, k):
    """Same top-k scores as the reference; each id is a distinct key whose own score is the one reported; the
    same ids wherever the k-th score is not tied (a tie may keep either of the tied keys, as torch.topk)."""
    torch.testing.assert_close(s.double(), top.values, rtol=1e-5, atol=1e-4)
    assert i.shape == (ref.shape[0], k) and (i >= 0).all()
    assert all(len(set(row)) == k for row in i.tolist())
    torch.testing.assert_close(ref.gather(1, i), top.values, rtol=1e-5, atol=1e-4)
    kth = top.values[:, -1:]
    untied = ((ref - kth).abs() < 1e-6).sum(1) == 1
    assert untied.any()
    for r in untied.nonzero().flatten().tolist():
        assert set(i[r].tolist()) == set(top.indices[r].tolist())


@pytest.mark.parametrize("M, k, chunk, metric", [
    (24000, 16, 1 << 18, "ip"),       # one chunk, 64-key blocks
    (24011, 200, 9000, "ip"),         # 32-key blocks, a partial last block, the k-th best so far as a floor
    (24011, 100, 8001, "l2"),         # l2: norms combined before the selection
    (3000, 700, 1000, "ip"),          # too few blocks: the plain selection
])
def test_block_pruned_topk_equals_float64_dense_topk(M, k, chunk, metric):
    g = torch.Generator().manual_seed(100 + k)
    keys = torch.randn(M, 16, generator=g)
    keys = (keys * torch.rand(M, 1, generator=g) * 2).half()          # norms differ: l2 order != ip order
    queries = torch.randn(29, 16, generator=g)
    s, i = topk_chunked(queries, keys, k, chunk=chunk, metric=metric)
    ref, top = _dense_top(keys, queries, k, metric)
    _assert_exact_top(s, i, ref, top, k)
    s_old, i_old = topk_chunked(queries, keys, k, chunk=chunk, metric=metric, select="topk")
    torch.testing.assert_close(s, s_old, rtol=0, atol=0)                # the same scores as the full selection


def test_block_pruned_selection_keeps_few_candidates_and_ties():
    """Random scores: far fewer candidates than columns, holding the row's top-k; tied scores (duplicated keys,
    a floor equal to scores) keep the right values."""
    from trime_dist.datastore.exact import entering_candidates

    g = torch.Generator().manual_seed(7)
    scores = torch.randn(8, 50000, generator=g)
    s, c = entering_candidates(scores, 64)
    assert 64 <= s.shape[1] < 50000 // 10                              # pruned: the check can fail
    assert torch.equal(scores.gather(1, c.clamp(min=0))[c >= 0], s[c >= 0])
    assert torch.equal(s.topk(64, dim=1).values, scores.topk(64, dim=1).values)
    tied = torch.randint(0, 5, (8, 50000), generator=g).float()       # every score tied many times
    s, c = entering_candidates(tied, 300)
    assert torch.equal(s.topk(300, dim=1).values, tied.topk(300, dim=1).values)
    # a floor: entries equal to it cannot enter (the earlier key keeps a tie); those above it all stay
    floor = torch.full((8,), 3.0)
    s, c = entering_candidates(tied, 300, floor)
    assert ((s > 3) | torch.isinf(s)).all()
    assert torch.equal((s == 4).sum(1), (tied == 4).sum(1))

    # duplicated keys across chunks: top-k scores equal the dense reference, each id scored as reported
    keys = torch.randn(2000, 8, generator=g).half().repeat(12, 1)      # [24000, 8], each key 12 times
    queries = torch.randn(5, 8, generator=g)
    s, i = topk_chunked(queries, keys, 40, chunk=7000)
    ref, top = _dense_top(keys, queries, 40, "ip")
    torch.testing.assert_close(s.double(), top.values, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref.gather(1, i), top.values, rtol=1e-5, atol=1e-4)
    assert all(len(set(row)) == 40 for row in i.tolist())


def test_two_rank_sharded_block_pruned_search_equals_float64_dense(tmp_path):
    """2 gloo ranks, each searching its half of 24,001 keys with the block-pruned selection (k = 48 and 300):
    every rank's merged answer is the dense float64 top-k."""
    g = torch.Generator().manual_seed(11)
    keys = torch.randn(24001, 16, generator=g).half().numpy()
    queries = torch.randn(21, 16, generator=g).numpy()
    _Store(tmp_path / "big", keys)
    for k in (48, 300):
        results = run_distributed(_sharded_search, 2, args=(str(tmp_path / "big"), keys, queries, k, False))
        ref, top = _dense_top(torch.from_numpy(keys), torch.from_numpy(queries), k, "ip")
        for _, _, (s, i) in results:
            _assert_exact_top(s, i, ref, top, k)
