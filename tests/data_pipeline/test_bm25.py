"""BM25 core of `trime group`: scores vs the per-pair formula (float64 loops), top-k vs brute force,
agreement with bm25s, the greedy chain vs a plain reference."""
import math
from collections import Counter

import numpy as np
import pytest

from data_pipeline.bm25 import (
    BM25Params,
    NeighbourIndex,
    count_matrix,
    document_frequencies,
    mean_pair_score,
    recall_at_k,
    topk_rows,
)
from data_pipeline.chain import cut_groups, greedy_chain


def _corpus(seed, n_docs=40, vocab=30, max_len=25):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)  # Zipf-like: frequent terms, repeats, rare terms
    p /= p.sum()
    return [rng.choice(vocab, size=int(rng.integers(1, max_len)), p=p).astype(np.int32) for _ in range(n_docs)]


def _reference_scores(docs, k1, b, min_df=1, max_df_ratio=1.0):
    """score(q, d) = sum over q's tokens (repeats count) of idf * tf / (tf + k1 (1 - b + b |d| / avgdl))."""
    n = len(docs)
    tfs = [Counter(d.tolist()) for d in docs]
    df = Counter(t for tf in tfs for t in tf)
    avgdl = sum(len(d) for d in docs) / n
    out = np.zeros((n, n))
    for i, q in enumerate(docs):
        for j, d in enumerate(docs):
            s = 0.0
            for t in q.tolist():
                if tfs[j][t] == 0 or df[t] < min_df or df[t] > max_df_ratio * n:
                    continue
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                s += idf * tfs[j][t] / (tfs[j][t] + k1 * (1 - b + b * len(d) / avgdl))
            out[i, j] = s
    return out


def _index(docs, vocab=30, **kw):
    counts = count_matrix(docs, vocab)
    return NeighbourIndex(counts, np.array([len(d) for d in docs]), document_frequencies(counts), BM25Params(**kw))


@pytest.mark.parametrize("use_numba", [False, True])  # scipy's sparse product / the compiled loop
@pytest.mark.parametrize("seed,k1,b,dense_df_ratio", [(0, 0.9, 0.4, 0.05), (1, 1.5, 0.75, 0.3), (2, 1.2, 0.0, 2.0),
                                                     (3, 0.5, 1.0, 0.0)])
def test_scores_match_per_pair_formula(seed, k1, b, dense_df_ratio, use_numba):
    docs = _corpus(seed)
    index = _index(docs, k1=k1, b=b, dense_df_ratio=dense_df_ratio, use_numba=use_numba)
    ref = _reference_scores(docs, k1, b)
    ours = index.scores(np.arange(len(docs))).astype(np.float64)
    off_diag = ~np.eye(len(docs), dtype=bool)  # df=1 terms are dropped: exact everywhere but the diagonal
    np.testing.assert_allclose(ours[off_diag], ref[off_diag], rtol=1e-5, atol=1e-5)
    df = document_frequencies(count_matrix(docs, 30))
    assert len(index.dense_terms) == (index.keep & (df >= dense_df_ratio * len(docs))).sum()


@pytest.mark.parametrize("min_df,max_df_ratio", [(3, 1.0), (1, 0.3), (2, 0.5)])
def test_frequency_cutoffs_match_formula(min_df, max_df_ratio):
    docs = _corpus(4)
    index = _index(docs, min_df=min_df, max_df_ratio=max_df_ratio)
    ref = _reference_scores(docs, 0.9, 0.4, min_df=min_df, max_df_ratio=max_df_ratio)
    ours = index.scores(np.arange(len(docs))).astype(np.float64)
    off_diag = ~np.eye(len(docs), dtype=bool)
    np.testing.assert_allclose(ours[off_diag], ref[off_diag], rtol=1e-5, atol=1e-5)


def test_scores_match_bm25s():
    bm25s = pytest.importorskip("bm25s")
    docs = _corpus(5, n_docs=60)
    retriever = bm25s.BM25(k1=0.9, b=0.4)  # its default method: Lucene idf and term weights
    retriever.index([d.tolist() for d in docs], show_progress=False)
    index = _index(docs)
    ours = index.scores(np.arange(len(docs)))
    for i, q in enumerate(docs):
        # bm25s maps token ids through its vocab_dict (plus an "empty" token): identity here
        assert all(retriever.vocab_dict[t] == t for t in range(30))
        ref = retriever.get_scores(q.tolist())
        mask = np.arange(len(docs)) != i
        np.testing.assert_allclose(ours[i, mask], ref[mask], rtol=1e-4, atol=1e-4)


def _brute_topk(scores, k):
    ids, vals = [], []
    for i, row in enumerate(scores):
        cand = [(-s, j) for j, s in enumerate(row) if j != i and s > 0]
        best = sorted(cand)[:k]
        ids.append([j for _, j in best] + [-1] * (k - len(best)))
        vals.append([-s for s, _ in best] + [0.0] * (k - len(best)))
    return np.array(ids), np.array(vals)


@pytest.mark.parametrize("use_numba", [False, True])
@pytest.mark.parametrize("k", [1, 5, 45])
def test_topk_matches_brute_force_with_ties(k, use_numba):
    docs = _corpus(6)
    docs += [d.copy() for d in docs[:10]]  # duplicate documents: exact score ties
    index = _index(docs, dense_df_ratio=0.5, use_numba=use_numba)
    ids, vals = index.topk(np.arange(len(docs)), k)
    ref_ids, ref_vals = _brute_topk(index.scores(np.arange(len(docs))), k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(vals, ref_vals, rtol=1e-6)


def test_topk_rows_breaks_ties_by_column():
    scores = np.array([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0]], dtype=np.float32)
    ids, vals = topk_rows(scores, 2)
    assert ids.tolist() == [[1, 2]] and vals.tolist() == [[3.0, 3.0]]
    ids, _ = topk_rows(scores, 6)
    assert ids.tolist() == [[1, 2, 4, 5, 0, -1]]  # non-positive scores are "no neighbour"


def test_mean_pair_score_matches_formula():
    docs = _corpus(7, n_docs=24)
    index = _index(docs)
    ref = _reference_scores(docs, 0.9, 0.4)
    groups = np.random.default_rng(0).permutation(24).reshape(6, 4)
    want = np.mean([ref[i, j] for g in groups for i in g for j in g if i != j])
    assert mean_pair_score(index, groups) == pytest.approx(want, rel=1e-5)
    members = groups[2]
    off_diag = ~np.eye(4, dtype=bool)
    np.testing.assert_allclose(index.pair_scores(members)[off_diag], ref[np.ix_(members, members)][off_diag],
                               rtol=1e-5)


def _reference_chain(neighbours, seed):
    fallback = list(np.random.default_rng(seed).permutation(len(neighbours)))
    order, used = [], set()
    cur = fallback[0]
    while True:
        order.append(cur)
        used.add(cur)
        if len(order) == len(neighbours):
            return order
        nxt = next((nb for nb in neighbours[cur] if nb >= 0 and nb not in used), None)
        cur = nxt if nxt is not None else next(f for f in fallback if f not in used)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_chain_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n, k = 50, 4
    neighbours = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    neighbours[rng.random((n, k)) < 0.2] = -1
    order = greedy_chain(neighbours, seed)
    assert order.tolist() == [int(x) for x in _reference_chain(neighbours, seed)]
    assert sorted(order.tolist()) == list(range(n))
    groups, dropped = cut_groups(order, 8)
    assert groups.shape == (6, 8) and dropped.tolist() == order[48:].tolist()


def _reference_pruned_topk(docs, k, query_terms, candidates, k1=0.9, b=0.4):
    """Dense float64 pruned search: each query keeps its m terms of largest count x idf (ties: smaller id),
    its best `candidates` documents under those terms only (ties: smaller id) are rescored with every
    term, the top-k of those returned. Exact top-k of the same scores as a second result."""
    n, vocab = len(docs), 1 + max(int(d.max()) for d in docs)
    tf = np.zeros((n, vocab))
    for i, d in enumerate(docs):
        np.add.at(tf[i], d, 1.0)
    df = (tf > 0).sum(0)
    idf = np.log(1 + (n - df + 0.5) / (df + 0.5)) * (df >= 2)                        # df <= 1 never scored
    lens = np.array([len(d) for d in docs], dtype=np.float64)
    w = idf * tf / np.where(tf > 0, tf + k1 * (1 - b + b * lens[:, None] / lens.mean()), 1.0)  # [N, V]
    exact = tf @ w.T                                                                  # [N, N] query x doc
    pruned_ids, exact_ids = np.full((n, k), -1), np.full((n, k), -1)
    for q in range(n):
        terms = sorted((t for t in range(vocab) if tf[q, t] > 0 and idf[t] > 0), key=lambda t: (-tf[q, t] * idf[t], t))
        sel = np.zeros(vocab)
        sel[terms[:query_terms]] = 1.0
        approx = (tf[q] * sel) @ w.T                                                  # [N]
        cand = sorted((d for d in range(n) if d != q and approx[d] > 0), key=lambda d: (-approx[d], d))[:candidates]
        best = sorted(cand, key=lambda d: (-exact[q, d], d))[:k]
        pruned_ids[q, :len(best)] = best
        ref = sorted((d for d in range(n) if d != q and exact[q, d] > 0), key=lambda d: (-exact[q, d], d))[:k]
        exact_ids[q, :len(ref)] = ref
    return pruned_ids, exact_ids


@pytest.mark.parametrize("seed,query_terms,candidates", [(8, 2, 5), (9, 3, 8), (10, 1, 6), (11, 100, 100)])
def test_pruned_search_and_its_recall_match_dense_reference(seed, query_terms, candidates):
    docs = _corpus(seed, n_docs=60, vocab=40, max_len=30)
    k = 5
    index = _index(docs, vocab=40, query_terms=query_terms, candidates=candidates)
    ids, vals = index.topk(np.arange(len(docs)), k)
    exact_ids, _ = index.exact_topk(np.arange(len(docs)), k)
    ref_pruned, ref_exact = _reference_pruned_topk(docs, k, query_terms, candidates)
    np.testing.assert_array_equal(ids, ref_pruned)
    np.testing.assert_array_equal(exact_ids, ref_exact)
    exact_scores = index.scores(np.arange(len(docs)))  # the pruned mode reports exact scores of what it found
    found = ids >= 0
    np.testing.assert_allclose(vals[found], np.take_along_axis(exact_scores, np.maximum(ids, 0), 1)[found],
                               rtol=1e-5)
    want = np.mean([len(set(p[p >= 0]) & set(e[e >= 0])) / max(1, (e >= 0).sum()) for p, e in zip(ref_pruned,
                                                                                                   ref_exact)])
    assert recall_at_k(ids, exact_ids) == pytest.approx(want, abs=1e-12)
    if query_terms >= 40:
        assert want == 1.0  # every term kept and every candidate rescored: the exact search
    else:
        assert want < 1.0   # a cut that matters on this corpus, so the comparison above is not trivial


def test_recall_at_k_counts_found_exact_neighbours():
    found = np.array([[1, 2, -1], [5, 6, 7], [-1, -1, -1]])
    exact = np.array([[2, 3, -1], [7, 6, 5], [-1, -1, -1]])
    assert recall_at_k(found, exact) == pytest.approx((0.5 + 1.0 + 1.0) / 3)
