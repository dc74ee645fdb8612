"""Okapi BM25 over token ids, scored all-pairs as sparse matrix products in query blocks (exact), or with
query-term pruning and exact rescoring of the best candidates (pruned, `BM25Params.query_terms` > 0).

Same scoring as bm25s's default ("lucene"): idf = log(1 + (N - df + 0.5) / (df + 0.5)),
score(q, d) = sum over q's tokens (repeats count) of idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl)).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.sparse as sp


@dataclass
class BM25Params:
    k1: float = 0.9             # term-frequency saturation (Pyserini's default)
    b: float = 0.4              # length normalisation (Pyserini's default)
    min_df: int = 1             # terms in fewer documents are not scored (df=1 terms never match another doc)
    max_df_ratio: float = 1.0   # terms in more than this fraction of documents are not scored (1.0 = keep all)
    dense_df_ratio: float = 0.05  # terms in at least this fraction of docs are scored with a dense matmul
    max_dense_terms: int = 1024   # at most this many dense terms (memory: max_dense_terms x docs x 4 bytes)
    use_numba: bool = True        # compiled sparse loop when numba is installed (else scipy's sparse product)
    query_terms: int = 0          # pruned mode: each query scored with its m highest-impact terms (0 = exact)
    candidates: int = 100         # pruned mode: best candidates rescored with the full query (>= k)


@functools.lru_cache(maxsize=1)
def _compiled_kernel() -> Optional[Callable]:
    try:
        from data_pipeline.bm25_numba import add_sparse_scores
    except ImportError:
        return None
    return add_sparse_scores


def pruned_kernels() -> tuple[Callable, Callable]:
    """(pruned_candidates, rescore) from bm25_numba."""
    try:
        from data_pipeline.bm25_numba import pruned_candidates, rescore
    except ImportError as e:
        raise ImportError("the pruned BM25 search (--query-terms > 0) needs numba: pip install numba") from e
    return pruned_candidates, rescore


def count_matrix(docs: Sequence[np.ndarray], vocab_size: int) -> sp.csr_matrix:
    """Term counts per document: [N, V] int32 CSR with sorted, summed indices."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    indptr = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs]) if len(docs) else np.zeros(0, np.int32)
    if indices.size and (indices.min() < 0 or indices.max() >= vocab_size):
        raise ValueError(f"token id out of range [0, {vocab_size}): min {indices.min()}, max {indices.max()}")
    data = np.ones(indices.size, dtype=np.int32)
    counts = sp.csr_matrix((data, indices, indptr), shape=(len(docs), vocab_size))
    counts.sum_duplicates()  # sorts indices and adds repeats -> term frequencies
    return counts


def document_frequencies(counts: sp.csr_matrix) -> np.ndarray:
    """Number of documents containing each term: [V] int64 (counts must have summed duplicates)."""
    return np.bincount(counts.indices, minlength=counts.shape[1]).astype(np.int64)


def lucene_idf(df: np.ndarray, n_docs: int) -> np.ndarray:
    """[V] float64; terms with df = 0 get 0 (they occur nowhere)."""
    df = np.asarray(df, dtype=np.float64)
    idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
    return np.where(df > 0, idf, 0.0)


def scored_terms(df: np.ndarray, n_docs: int, params: BM25Params) -> np.ndarray:
    """[V] bool: terms that take part in scoring. df <= 1 is dropped always (exact: such a term
    can only match its own document, and a segment's own score is never used)."""
    keep = (df >= max(2, params.min_df))
    if params.max_df_ratio < 1.0:
        keep &= df <= params.max_df_ratio * n_docs
    return keep


def weight_matrix(counts: sp.csr_matrix, doc_len: np.ndarray, idf: np.ndarray, avgdl: float,
                  keep: np.ndarray, k1: float, b: float) -> sp.csr_matrix:
    """BM25 term weights per document, [N, V] float32 CSR: idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)),
    with columns of unscored terms removed (set to zero and eliminated)."""
    tf = counts.data.astype(np.float64)
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    norm = k1 * (1.0 - b + b * np.asarray(doc_len, dtype=np.float64)[rows] / avgdl)
    w = idf[counts.indices] * tf / (tf + norm)
    w[~keep[counts.indices]] = 0.0
    weights = sp.csr_matrix((w.astype(np.float32), counts.indices.copy(), counts.indptr.copy()), shape=counts.shape)
    weights.eliminate_zeros()
    return weights


class NeighbourIndex:
    """All documents' BM25 weights, split into frequent terms (dense [F, N], scored by BLAS) and the
    rest (sparse [V, N]). Built identically on every rank; queries are rows of the count matrix.
    Pruned mode (params.query_terms > 0) keeps every term sparse and also the document-major weights
    [N, V] for rescoring."""

    def __init__(self, counts: sp.csr_matrix, doc_len: np.ndarray, df: np.ndarray, params: BM25Params,
                 n_total: Optional[int] = None, avgdl: Optional[float] = None):
        """counts: [N, V]; n_total / avgdl: the corpus's, when these N documents are only part of it."""
        n_docs = counts.shape[0]
        self.n_docs = n_docs
        self.avgdl = float(np.sum(doc_len, dtype=np.float64) / n_docs) if avgdl is None else avgdl
        self.idf = lucene_idf(df, n_total or n_docs)
        self.keep = scored_terms(df, n_total or n_docs, params)
        self.params, self.doc_len = params, np.asarray(doc_len)
        weights = weight_matrix(counts, doc_len, self.idf, self.avgdl, self.keep, params.k1, params.b)  # [N, V]
        self.pruned = params.query_terms > 0
        self.doc_weights = weights if self.pruned else None                           # [N, V], rescoring
        max_dense = 0 if self.pruned else params.max_dense_terms  # pruned queries skip most frequent terms
        dense_candidates = np.flatnonzero(self.keep & (df >= params.dense_df_ratio * n_docs))
        # the most frequent ones first; ties by term id so every rank picks the same set
        order = np.lexsort((dense_candidates, -df[dense_candidates]))
        self.dense_terms = np.sort(dense_candidates[order[:max_dense]])
        is_dense = np.zeros(counts.shape[1], dtype=bool)
        is_dense[self.dense_terms] = True
        self.sparse_keep = self.keep & ~is_dense
        wt = weights.T.tocsr()                                                         # [V, N]
        self.dense_weights = np.ascontiguousarray(wt[self.dense_terms].toarray())      # [F, N] float32
        # unscored terms have empty rows already; only dense terms need removing
        self.sparse_weights = _zero_rows(wt, ~self.sparse_keep) if len(self.dense_terms) else wt  # [V, N]
        self.counts = counts

    def query_matrices(self, rows: np.ndarray) -> tuple[np.ndarray, sp.csr_matrix]:
        """Query-term counts of documents `rows`: dense [B, F] float32 and sparse [B, V] float32."""
        q = self.counts[rows].astype(np.float32)
        q_dense = q[:, self.dense_terms].toarray()
        q_sparse = _zero_cols(q, ~self.sparse_keep)
        return q_dense, q_sparse

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """BM25 scores of queries `rows` against all documents: dense [B, N] float32."""
        q_dense, q_sparse = self.query_matrices(rows)
        out = q_dense @ self.dense_weights                                             # [B, N] BLAS
        kernel = _compiled_kernel() if self.params.use_numba else None
        if kernel is None:
            out += (q_sparse @ self.sparse_weights).toarray()
        else:
            w = self.sparse_weights
            kernel(out, q_sparse.indptr, q_sparse.indices, q_sparse.data, w.indptr, w.indices, w.data)
        return out

    def pair_scores(self, members: np.ndarray) -> np.ndarray:
        """BM25 scores among a few documents: [G, G] float64, row = query (weights recomputed for the members)."""
        counts = self.counts[members]                                                  # [G, V]
        w = weight_matrix(counts, self.doc_len[members], self.idf, self.avgdl, self.keep, self.params.k1,
                          self.params.b)                                               # [G, V]
        q = counts.astype(np.float64).multiply(self.keep[None, :].astype(np.float64))
        return (q @ w.T.astype(np.float64)).toarray()

    def topk(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k other documents for each query row: (ids [B, k] int64, scores [B, k] float32), ordered by
        score desc then id asc; slots without a positive score hold id -1 and score 0. Exact, or pruned
        (approximate ids, exact scores) when params.query_terms > 0."""
        if self.pruned:
            return self.pruned_topk(rows, k)
        return self.exact_topk(rows, k)

    def exact_topk(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.scores(rows)                                                          # [B, N]
        s[np.arange(len(rows)), rows] = -np.inf  # a segment is not its own neighbour
        return topk_rows(s, k)

    def pruned_topk(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Query-term pruning (each query keeps its m terms of largest count x idf, an upper bound on a
        term's share of any score), then the best `candidates` rescored exactly; see bm25_numba."""
        candidates, rescore = pruned_kernels()
        rows = np.asarray(rows, dtype=np.int64)
        q, t, d = self.counts[rows], self.sparse_weights, self.doc_weights                 # q: [B, V]
        impact = np.where(self.keep, self.idf, 0.0)                                    # [V]
        ids = np.empty((len(rows), max(k, self.params.candidates)), dtype=np.int64)    # [B, C]
        partial = np.empty(ids.shape, dtype=np.float32)
        candidates(q.indptr, q.indices, q.data, rows, impact, self.params.query_terms, 0, self.n_docs,
                   t.indptr, t.indices, t.data, ids, partial)
        exact = np.zeros(ids.shape, dtype=np.float64)
        rescore(q.indptr, q.indices, q.data, impact, ids, 0, d.indptr, d.indices, d.data, exact)
        return best_rescored(ids, exact, k)


def merge_candidates(ids: np.ndarray, partial: np.ndarray, n_cand: int) -> np.ndarray:
    """The best n_cand of several partitions' candidate lists, concatenated along axis 1 (ids [B, P*C],
    partial scores [B, P*C]; -1 = none): [B, n_cand] ids ordered by partial score desc, id asc."""
    key = np.where(ids >= 0, -partial.astype(np.float64), np.inf)
    order = np.lexsort((ids, key), axis=1)[:, :n_cand]
    out = np.take_along_axis(ids, order, axis=1)
    out[np.take_along_axis(key, order, axis=1) == np.inf] = -1
    return out


def best_rescored(ids: np.ndarray, exact: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of candidates ids [B, C] (-1 = none) by their exact scores [B, C]: (ids [B, k] int64, scores
    [B, k] float32), score desc then id asc, -1 / 0 where fewer than k."""
    key = np.where(ids >= 0, -exact, np.inf)
    order = np.lexsort((ids, key), axis=1)[:, :k]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top = np.take_along_axis(exact, order, axis=1)
    none = np.take_along_axis(key, order, axis=1) == np.inf
    top_ids[none], top[none] = -1, 0.0
    return top_ids, top.astype(np.float32)


def _zero_rows(m: sp.csr_matrix, drop: np.ndarray) -> sp.csr_matrix:
    """Copy of CSR `m` with the rows in boolean mask `drop` emptied (shape kept)."""
    diag = sp.diags((~drop).astype(m.dtype))
    out = (diag @ m).tocsr()
    out.eliminate_zeros()
    return out


def _zero_cols(m: sp.csr_matrix, drop: np.ndarray) -> sp.csr_matrix:
    out = m.copy()
    out.data[drop[out.indices]] = 0
    out.eliminate_zeros()
    return out


def topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row top-k of a dense [B, N] matrix with deterministic ties (score desc, column asc);
    entries with score <= 0 are reported as id -1, score 0."""
    n_rows, n_cols = scores.shape
    kk = min(k, n_cols)
    ids = np.full((n_rows, k), -1, dtype=np.int64)
    vals = np.zeros((n_rows, k), dtype=np.float32)
    if kk == 0 or n_rows == 0:
        return ids, vals
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < n_cols else np.tile(np.arange(n_cols), (n_rows, 1))
    part_scores = np.take_along_axis(scores, part, axis=1)                             # [B, kk]
    kth = part_scores.min(axis=1)                                                      # [B]
    n_at_least = (scores >= kth[:, None]).sum(axis=1)
    for r in range(n_rows):
        if n_at_least[r] > kk:  # ties at the boundary: take them in column order
            cand = np.flatnonzero(scores[r] >= kth[r])
            part[r] = cand[np.lexsort((cand, -scores[r, cand]))][:kk]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    part = np.take_along_axis(part, order, axis=1)
    part_scores = np.take_along_axis(part_scores, order, axis=1)
    positive = part_scores > 0
    ids[:, :kk] = np.where(positive, part, -1)
    vals[:, :kk] = np.where(positive, part_scores, 0.0)
    return ids, vals


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / |exact| for neighbour id lists [N, k] (-1 = none); queries
    without exact neighbours count as 1."""
    recalls = []
    for got, ref in zip(found, exact):
        ref = set(ref[ref >= 0].tolist())
        recalls.append(len(ref & set(got[got >= 0].tolist())) / len(ref) if ref else 1.0)
    return float(np.mean(recalls)) if recalls else 1.0


def mean_pair_score(index: NeighbourIndex, groups: np.ndarray) -> float:
    """Mean BM25 score over ordered pairs (i != j) within each group: groups [n_groups, G] of doc ids."""
    if len(groups) == 0 or groups.shape[1] < 2:
        return 0.0
    g = groups.shape[1]
    total = 0.0
    for members in groups:
        s = index.pair_scores(members)                                                 # [G, G]
        total += s.sum() - np.trace(s)
    return total / (len(groups) * g * (g - 1))
