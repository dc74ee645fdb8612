"""The distributed parts of `trime group`: each rank reads its share of the segment shards, the count
matrix and document frequencies are combined over ranks (raw-buffer Allgatherv of the CSR arrays), the
top-k neighbour search is split by query block into resumable block files, and the segments travel
from the rank that read them to the rank that writes their group (one all-to-all exchange).
"""
from __future__ import annotations

import logging
import os
import time


import numpy as np
import scipy.sparse as sp

from data_pipeline.bm25 import NeighbourIndex, count_matrix, document_frequencies
from trime_dist.core import mpi, shards
from trime_dist.core.io import atomic_path, atomic_write_json, read_json
from trime_dist.core.progress import track

log = logging.getLogger(__name__)
STOP_ENV = "TRIME_GROUP_STOP_AFTER_BLOCKS"  # test hook: a rank exits after writing this many blocks


def wait_for_all_ranks(poll_s: float = 0.05) -> None:
    """A barrier that sleeps while it waits: MPICH's blocking collectives spin a core, which steals it from
    the ranks still working (or from the chaining on rank 0) when ranks share cores."""
    comm = mpi.get_comm()
    if mpi.size() == 1:
        return
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(poll_s)


def rank_shards(manifest: dict, rank: int, world: int) -> range:
    """The contiguous shards read by `rank`, balanced by segment count."""
    offsets = shards.shard_offsets(manifest)
    n = offsets[-1]
    starts = offsets[:-1]
    lo = int(np.searchsorted(starts, rank * n / world, side="left"))
    hi = int(np.searchsorted(starts, (rank + 1) * n / world, side="left"))
    return range(lo, hi if rank < world - 1 else len(starts))


class LocalSegments:
    """The segments one rank read: global ids [first, first + len(tokens)), their token rows (L + 1 or
    fewer tokens) and meta dicts, kept until they are sent to the ranks that write their groups."""

    def __init__(self, first: int, tokens: list, metas: list):
        self.first, self.tokens, self.metas = first, tokens, metas

    def docs(self, stopwords: set[int]) -> list:
        """BM25 documents: each segment's input tokens (consecutive segments of a stream then cover it
        exactly once), stop words removed."""
        stop = np.array(sorted(stopwords), dtype=np.int32)
        return [t[:-1][~np.isin(t[:-1], stop)] if stop.size else t[:-1] for t in self.tokens]


def read_local_segments(src_dir: str, manifest: dict, rank: int, world: int) -> LocalSegments:
    """This rank's contiguous share of the segments, in global id order (checked against each shard's
    checksum, the manifest's L and vocabulary)."""
    mine = rank_shards(manifest, rank, world)
    offsets = shards.shard_offsets(manifest)
    tokens, metas = [], []
    for _, t, meta in shards.iter_range(src_dir, manifest, offsets[mine.start], offsets[mine.stop], check=True):
        tokens.append(t)
        metas.append(meta)
    return LocalSegments(int(offsets[mine.start]), tokens, metas)


def gather_counts(docs: list, vocab_size: int, n_total: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Global (counts [N, V] CSR, doc lengths [N], document frequencies [V]) from every rank's documents,
    ranks in order. df and the totals are reduced with allreduce; the CSR arrays of the counts
    (O(tokens)) are concatenated with Allgatherv of raw buffers (no pickling of the matrix)."""
    local = count_matrix(docs, vocab_size)                                            # [n_local, V]
    local_len = np.array([len(d) for d in docs], dtype=np.int64)
    df = mpi.allreduce_sum(document_frequencies(local))                               # [V]
    n_docs = int(mpi.allreduce_sum(np.array([len(docs)], dtype=np.int64))[0])
    if n_docs != n_total:
        raise ValueError(f"ranks read {n_docs} segments but the manifest says {n_total}")
    row_nnz = mpi.allgatherv(np.diff(local.indptr))                                   # [N]
    indptr = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(row_nnz, out=indptr[1:])
    indices = mpi.allgatherv(local.indices.astype(np.int32, copy=False))              # [nnz]
    data = mpi.allgatherv(local.data.astype(np.int32, copy=False))                    # [nnz] term counts
    del local
    counts = sp.csr_matrix((data, indices, indptr), shape=(n_docs, vocab_size))
    doc_len = mpi.allgatherv(local_len)                                               # [N]
    if (doc_len == 0).all():
        raise ValueError("every segment is empty after removing --stopwords")
    return counts, doc_len, df


def exchange_segments(local: LocalSegments, dest_of: np.ndarray, world: int) -> dict[int, tuple]:
    """Send each segment this rank read to rank dest_of[id] (the writer of its group; -1 = nobody) and
    return {global id: (tokens, meta)} of the segments sent to this rank. No rank reads other ranks'
    shards; a message carries what one rank sends one other rank (~ its share / R)."""
    outbox = [([], [], []) for _ in range(world)]
    for i, (tokens, meta) in enumerate(zip(local.tokens, local.metas)):
        d = int(dest_of[local.first + i])
        if d >= 0:
            ids, toks, metas = outbox[d]
            ids.append(local.first + i)
            toks.append(tokens)
            metas.append(meta)
    received = mpi.alltoall(outbox)
    return {sid: (t, m) for ids, toks, metas in received for sid, t, m in zip(ids, toks, metas)}


def block_path(work: str, b: int) -> str:
    return os.path.join(work, f"block-{b:06d}.npz")


def prepare_work_dir(work: str, fingerprint: dict) -> None:
    """Rank 0 keeps finished blocks only if they were made with the same settings."""
    params = os.path.join(work, "params.json")
    os.makedirs(work, exist_ok=True)
    if os.path.isfile(params) and read_json(params, "neighbour search settings") == fingerprint:
        return
    for name in os.listdir(work):
        if name.startswith("block-"):
            os.remove(os.path.join(work, name))
    atomic_write_json(params, fingerprint)


def search_neighbours(index: NeighbourIndex, work: str, k: int, block: int, fingerprint: dict,
                      rank: int, world: int) -> None:
    """Write block files with the top-k neighbours of queries [b * block, (b + 1) * block); rank r takes
    blocks b = r, r + R, ...; blocks already on disk are skipped (resume)."""
    if rank == 0:
        prepare_work_dir(work, fingerprint)
    wait_for_all_ranks()
    n_blocks = -(-index.n_docs // block)
    mine = [b for b in range(rank, n_blocks, world) if not os.path.isfile(block_path(work, b))]
    stop_after = int(os.environ.get(STOP_ENV, "-1"))
    log.info("rank %d: %d of its %d query blocks to score", rank, len(mine), len(range(rank, n_blocks, world)))
    # one bar for the job on rank 0: its blocks, times all blocks / its blocks
    share = len(range(rank, n_blocks, world))
    for done, b in enumerate(track(mine, "bm25 search", "block", rank=rank,
                                   scale=n_blocks / share if share else 1.0)):
        if done == stop_after:
            raise SystemExit(f"{STOP_ENV}={stop_after}: stopping after {done} blocks (test hook)")
        rows = np.arange(b * block, min((b + 1) * block, index.n_docs))
        ids, scores = index.topk(rows, k)                                             # [B, k] each
        with atomic_path(block_path(work, b)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, ids=ids, scores=scores)


def load_neighbours(work: str, n: int, k: int, block: int) -> np.ndarray:
    """All block files as one [N, k] int64 array of neighbour ids (-1 = none)."""
    out = np.empty((n, k), dtype=np.int64)
    for b in range(-(-n // block)):
        path = block_path(work, b)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"neighbour block missing: {path} (a rank did not finish)")
        with np.load(path) as z:
            out[b * block: min((b + 1) * block, n)] = z["ids"]
    return out
