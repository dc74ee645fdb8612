"""The pruned BM25 search of `trime group` over a document-partitioned index: each rank indexes only the
segments it read (index memory and build ~N / R), every query block is shared with all ranks, and the
block's writer merges the partitions' candidates before they are rescored, so the neighbours found do not
depend on the number of ranks (see bm25_numba.pruned_candidates).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import scipy.sparse as sp

from data_pipeline.bm25 import (
    BM25Params,
    NeighbourIndex,
    best_rescored,
    count_matrix,
    document_frequencies,
    lucene_idf,
    merge_candidates,
    pruned_kernels,
    recall_at_k,
    scored_terms,
    topk_rows,
    weight_matrix,
)
from data_pipeline.group_search import STOP_ENV, block_path, prepare_work_dir, wait_for_all_ranks
from trime_dist.core import mpi
from trime_dist.core.io import atomic_path
from trime_dist.core.progress import track

log = logging.getLogger(__name__)


class LocalIndex:
    """BM25 weights of this rank's segments [first, first + n) with the corpus-wide idf and average length:
    document-major [n, V] (rescoring) and term-major [V, n] (the pruned term-at-a-time pass). Collective."""

    def __init__(self, docs: list, first: int, vocab_size: int, n_total: int, params: BM25Params):
        self.counts = count_matrix(docs, vocab_size)                                   # [n, V]
        self.doc_len = np.array([len(d) for d in docs], dtype=np.int64)
        self.df = mpi.allreduce_sum(document_frequencies(self.counts))                 # [V]
        totals = mpi.allreduce_sum(np.array([len(docs), self.doc_len.sum()], dtype=np.int64))
        if totals[0] != n_total:
            raise ValueError(f"ranks read {totals[0]} segments but the manifest says {n_total}")
        if totals[1] == 0:
            raise ValueError("every segment is empty after removing --stopwords")
        self.first, self.n_local, self.n_docs, self.params = first, len(docs), n_total, params
        self.avgdl = float(totals[1]) / n_total
        self.idf = lucene_idf(self.df, n_total)
        self.keep = scored_terms(self.df, n_total, params)
        self.impact = np.where(self.keep, self.idf, 0.0)                               # [V]
        self.doc_weights = weight_matrix(self.counts, self.doc_len, self.idf, self.avgdl, self.keep, params.k1,
                                         params.b)                                     # [n, V]
        self.term_weights = self.doc_weights.T.tocsr()                                 # [V, n]


def fetch_rows(local: LocalIndex, ids: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """Counts [len(ids), V] and lengths of the segments `ids` (sorted, the same on every rank), on every rank:
    each rank contributes the rows it holds (Allgatherv; ranks hold increasing id ranges). Collective."""
    mine = ids[(ids >= local.first) & (ids < local.first + local.n_local)] - local.first
    part = local.counts[mine]
    row_nnz = mpi.allgatherv(np.diff(part.indptr).astype(np.int64))
    indptr = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(row_nnz, out=indptr[1:])
    indices = mpi.allgatherv(part.indices.astype(np.int32, copy=False))
    data = mpi.allgatherv(part.data.astype(np.int32, copy=False))
    lengths = mpi.allgatherv(local.doc_len[mine])
    return sp.csr_matrix((data, indices, indptr), shape=(len(ids), local.counts.shape[1])), lengths


def search_round(local: LocalIndex, blocks: list[int], block: int, k: int) -> tuple | None:
    """Pruned top-k of up to R query blocks at once (few collectives per round; the merge is spread over the
    ranks): every rank scores every query against its partition and keeps its best C candidates; rank j
    merges those of blocks[j] over the partitions; the ranks holding the merged candidates rescore them;
    rank j adds the exact scores up and keeps the top-k. (block, ids [B, k], scores [B, k]) on rank j for
    blocks[j], None on ranks without a block. Collective."""
    candidates, rescore = pruned_kernels()
    world, me = mpi.size(), mpi.rank()
    spans = [np.arange(b * block, min((b + 1) * block, local.n_docs)) for b in blocks]
    bounds = np.cumsum([0] + [len(s) for s in spans])
    rows = np.concatenate(spans)                                                       # sorted: blocks ascend
    q, _ = fetch_rows(local, rows)                                                     # [B_round, V]
    t, d = local.term_weights, local.doc_weights
    n_cand = max(k, local.params.candidates)
    ids = np.empty((len(rows), n_cand), dtype=np.int64)                                # [B_round, C] global ids
    partial = np.empty(ids.shape, dtype=np.float32)
    candidates(q.indptr, q.indices, q.data, rows, local.impact, local.params.query_terms, local.first,
               local.n_local, t.indptr, t.indices, t.data, ids, partial)
    def of_block(a: np.ndarray, j: int):
        return a[bounds[j]:bounds[j + 1]] if j < len(blocks) else None
    # the partitions' work differs: wait for the slowest sleeping, not spinning in the collective (a spinning
    # rank steals the core of the one it waits for when ranks share cores)
    wait_for_all_ranks(poll_s=0.001)
    parts = mpi.alltoall([(of_block(ids, j), of_block(partial, j)) for j in range(world)])
    merged = np.zeros((0, n_cand), dtype=np.int64)
    if me < len(blocks):
        merged = merge_candidates(np.concatenate([p[0] for p in parts], axis=1),
                                  np.concatenate([p[1] for p in parts], axis=1), n_cand)  # [B, C]
    all_merged = np.concatenate(mpi.allgather(merged))                                 # [B_round, C]
    exact = np.zeros(all_merged.shape, dtype=np.float64)
    rescore(q.indptr, q.indices, q.data, local.impact, all_merged, local.first, d.indptr, d.indices, d.data,
            exact)  # only the candidates this rank holds; 0 elsewhere, so the sum over ranks is exact
    wait_for_all_ranks(poll_s=0.001)
    scored = mpi.alltoall([of_block(exact, j) for j in range(world)])
    if me >= len(blocks):
        return None
    return (blocks[me], *best_rescored(merged, np.sum(scored, axis=0), k))


def search_neighbours_pruned(local: LocalIndex, work: str, k: int, block: int, fingerprint: dict, rank: int,
                             world: int) -> None:
    """Block files as search_neighbours writes them; all ranks take part in every round of R blocks, the
    j-th block of a round is written by rank j; blocks already on disk are skipped (resume). Collective."""
    if rank == 0:
        prepare_work_dir(work, fingerprint)
    wait_for_all_ranks()
    n_blocks = -(-local.n_docs // block)
    todo = mpi.bcast([b for b in range(n_blocks) if not os.path.isfile(block_path(work, b))] if rank == 0 else None)
    stop_after = int(os.environ.get(STOP_ENV, "-1"))
    log.info("rank %d: %d of %d query blocks to score (pruned search, %d segments indexed here)", rank,
             len(todo), n_blocks, local.n_local)
    for start in track(range(0, len(todo), world), "bm25 search", "round", rank=rank):  # every rank, every round
        if 0 <= stop_after <= start:
            raise SystemExit(f"{STOP_ENV}={stop_after}: stopping after {start} blocks (test hook)")
        found = search_round(local, todo[start:start + world], block, k)
        if found is not None:
            b, ids, scores = found
            with atomic_path(block_path(work, b)) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, ids=ids, scores=scores)


def exact_topk(local: LocalIndex, rows: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids [B, k] of queries `rows` (sorted) over every partition, on every rank. Collective."""
    from data_pipeline.bm25_numba import add_sparse_scores

    q, _ = fetch_rows(local, rows)
    scores = np.zeros((len(rows), local.n_local), dtype=np.float32)                    # [B, n]
    t = local.term_weights
    q = q.astype(np.float32)
    add_sparse_scores(scores, q.indptr, q.indices, q.data, t.indptr, t.indices, t.data)
    own = (rows >= local.first) & (rows < local.first + local.n_local)
    scores[np.flatnonzero(own), rows[own] - local.first] = -np.inf  # a segment is not its own neighbour
    ids, vals = topk_rows(scores, k)
    ids[ids >= 0] += local.first
    parts = mpi.allgather((ids, vals))
    return merge_candidates(np.concatenate([p[0] for p in parts], axis=1),
                            np.concatenate([p[1] for p in parts], axis=1), k)


def sampled_recall_pruned(local: LocalIndex, found: np.ndarray | None, n_sample: int, k: int, seed: int,
                          rank: int) -> dict | None:
    """recall@k of the neighbours `found` ([N, k], on rank 0) against the exact search on `n_sample` random
    segments (the same sample as group_search.sampled_recall); on rank 0, None elsewhere. Collective."""
    rows = np.sort(np.random.default_rng(seed).choice(local.n_docs, min(n_sample, local.n_docs), replace=False))
    exact = np.concatenate([exact_topk(local, rows[s:s + 256], k) for s in range(0, len(rows), 256)])
    if rank != 0:
        return None
    return {"segments_sampled": int(len(rows)), f"recall_at_{k}": recall_at_k(found[rows], exact)}


class FetchedSegments:
    """Pair scores among segments fetched from every rank, addressed by global id (for mean_pair_score)."""

    def __init__(self, local: LocalIndex, ids: np.ndarray):
        self.ids = np.unique(ids)
        counts, lengths = fetch_rows(local, self.ids)
        self.index = NeighbourIndex(counts, lengths, local.df, local.params, n_total=local.n_docs,
                                    avgdl=local.avgdl)

    def pair_scores(self, members: np.ndarray) -> np.ndarray:
        return self.index.pair_scores(np.searchsorted(self.ids, members))
