"""Compiled inner loop of the BM25 all-pairs search (numba): adds sparse-term scores straight into a dense
block, which avoids scipy's sparse product output (~10x faster). bm25.py falls back to scipy without numba."""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def add_sparse_scores(out: np.ndarray, q_indptr: np.ndarray, q_indices: np.ndarray, q_data: np.ndarray,
                      w_indptr: np.ndarray, w_indices: np.ndarray, w_data: np.ndarray) -> None:
    """out[r, d] += sum_t q[r, t] * w[t, d] for CSR q [B, V] and CSR w [V, N]; out: dense [B, N].
    The order of the additions per entry (terms ascending) does not depend on the block's other rows."""
    for r in range(out.shape[0]):
        row = out[r]
        for p in range(q_indptr[r], q_indptr[r + 1]):
            t = q_indices[p]
            qv = q_data[p]
            for j in range(w_indptr[t], w_indptr[t + 1]):
                row[w_indices[j]] += qv * w_data[j]



@numba.njit(cache=True, nogil=True)
def pruned_candidates(q_indptr: np.ndarray, q_indices: np.ndarray, q_data: np.ndarray, q_ids: np.ndarray,
                      impact: np.ndarray, query_terms: int, first: int, n_docs: int,
                      t_indptr: np.ndarray, t_indices: np.ndarray, t_data: np.ndarray,
                      out_ids: np.ndarray, out_scores: np.ndarray) -> None:
    """Step 1 of the pruned search, over documents [first, first + n_docs) (term-major weights t [V, n]): each
    query (counts CSR q [B, V], global ids q_ids) is scored with its `query_terms` highest-impact terms only
    (impact = count x idf, ties by term id; unscored terms have impact 0), term-at-a-time; its best
    documents (score desc, id asc) go to out_ids [B, C] (global ids, -1 = none) with their partial scores.
    A document's partial score is summed in the same order whatever the partition, so the best C of all
    partitions' lists are the best C of one whole index."""
    n_cand = out_ids.shape[1]
    acc = np.zeros(max(n_docs, 1), np.float32)     # partial scores, 0 = not touched (weights are > 0)
    touched = np.empty(max(n_docs, 1), np.int64)
    for r in range(q_ids.shape[0]):
        terms = q_indices[q_indptr[r]:q_indptr[r + 1]]                       # ascending term ids
        counts = q_data[q_indptr[r]:q_indptr[r + 1]]
        imp = impact[terms] * counts
        order = np.argsort(-imp, kind="mergesort")                           # stable: ties by term id
        n_touched = 0
        for o in order[:query_terms]:
            if imp[o] <= 0:
                break                                                        # unscored terms come last
            t, qv = terms[o], np.float32(counts[o])
            for j in range(t_indptr[t], t_indptr[t + 1]):
                d = t_indices[j]
                if acc[d] == 0:
                    touched[n_touched] = d
                    n_touched += 1
                acc[d] += qv * t_data[j]
        self_local = q_ids[r] - first
        if 0 <= self_local < n_docs:
            acc[self_local] = 0                                              # not its own neighbour
        cand = touched[:n_touched]
        cand = cand[acc[cand] > 0]
        if cand.shape[0] > n_cand:                                           # keep >= C, then cut exactly
            kth = -np.partition(-acc[cand], n_cand - 1)[n_cand - 1]
            cand = cand[acc[cand] >= kth]
        cand = np.sort(cand)
        cand = cand[np.argsort(-acc[cand], kind="mergesort")[:n_cand]]       # score desc, id asc
        out_ids[r, :] = -1
        out_scores[r, :] = 0
        for i in range(cand.shape[0]):
            out_ids[r, i] = cand[i] + first
            out_scores[r, i] = acc[cand[i]]
        for i in range(n_touched):
            acc[touched[i]] = 0


@numba.njit(cache=True, nogil=True)
def rescore(q_indptr: np.ndarray, q_indices: np.ndarray, q_data: np.ndarray, impact: np.ndarray,
            cand_ids: np.ndarray, first: int, d_indptr: np.ndarray, d_indices: np.ndarray, d_data: np.ndarray,
            out: np.ndarray) -> None:
    """Step 2: exact float64 BM25 scores out [B, C] of each query (counts CSR q [B, V]) against its
    candidates cand_ids [B, C] (global ids) that lie in [first, first + n) (document-major weights d [n, V]);
    other entries are left as they are (0: a sum over the partitions then gives every score once)."""
    n_docs = d_indptr.shape[0] - 1
    qfull = np.zeros(impact.shape[0], np.float64)
    for r in range(cand_ids.shape[0]):
        lo, hi = q_indptr[r], q_indptr[r + 1]
        for i in range(lo, hi):
            if impact[q_indices[i]] > 0:
                qfull[q_indices[i]] = q_data[i]
        for c in range(cand_ids.shape[1]):
            d = cand_ids[r, c] - first
            if cand_ids[r, c] < 0 or d < 0 or d >= n_docs:
                continue
            s = 0.0
            for j in range(d_indptr[d], d_indptr[d + 1]):
                s += qfull[d_indices[j]] * d_data[j]
            out[r, c] = s
        for i in range(lo, hi):
            qfull[q_indices[i]] = 0
