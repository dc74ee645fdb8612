"""The distributed parts of `trime group`: each rank reads its share of the segment shards, the count
matrix and document frequencies are combined over ranks, and the top-k neighbour search is split by
query block into resumable block files.
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


def read_local_segments(src_dir: str, manifest: dict, rank: int, world: int, stopwords: set[int]) -> list:
    """This rank's documents (a segment's input tokens, stop words removed), in global id order."""
    stop = np.array(sorted(stopwords), dtype=np.int32)
    mine = rank_shards(manifest, rank, world)
    offsets = shards.shard_offsets(manifest)
    docs = []
    # check: each shard against its checksum, the manifest's L and vocabulary
    for _, tokens, _ in shards.iter_range(src_dir, manifest, offsets[mine.start], offsets[mine.stop], check=True):
        doc = tokens[:-1]  # the inputs: consecutive segments of a stream then cover it exactly once
        docs.append(doc[~np.isin(doc, stop)] if stop.size else doc)
    return docs


def gather_counts(docs: list, vocab_size: int, n_total: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Global (counts [N, V] CSR, doc lengths [N], document frequencies [V]) from every rank's documents.
    df and the totals are reduced with allreduce; the sparse counts (O(tokens)) are replicated."""
    local = count_matrix(docs, vocab_size)                                            # [n_local, V]
    local_len = np.array([len(d) for d in docs], dtype=np.int64)
    df = mpi.allreduce_sum(document_frequencies(local))                               # [V]
    n_docs = int(mpi.allreduce_sum(np.array([len(docs)], dtype=np.int64))[0])
    if n_docs != n_total:
        raise ValueError(f"ranks read {n_docs} segments but the manifest says {n_total}")
    parts = mpi.allgather((local.indptr, local.indices, local.data, local_len))
    counts = sp.vstack([sp.csr_matrix((d, ix, p), shape=(len(p) - 1, vocab_size)) for p, ix, d, _ in parts],
                       format="csr")
    doc_len = np.concatenate([part[3] for part in parts])
    if (doc_len == 0).all():
        raise ValueError("every segment is empty after removing --stopwords")
    return counts, doc_len, df


def _block_path(work: str, b: int) -> str:
    return os.path.join(work, f"block-{b:06d}.npz")


def _prepare_work_dir(work: str, fingerprint: dict) -> None:
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
    from tqdm import tqdm

    if rank == 0:
        _prepare_work_dir(work, fingerprint)
    wait_for_all_ranks()
    n_blocks = -(-index.n_docs // block)
    mine = [b for b in range(rank, n_blocks, world) if not os.path.isfile(_block_path(work, b))]
    stop_after = int(os.environ.get(STOP_ENV, "-1"))
    log.info("rank %d: %d of its %d query blocks to score", rank, len(mine), len(range(rank, n_blocks, world)))
    for done, b in enumerate(tqdm(mine, desc=f"bm25 rank {rank}", unit="block", position=rank,
                                  mininterval=5.0, dynamic_ncols=True)):
        if done == stop_after:
            raise SystemExit(f"{STOP_ENV}={stop_after}: stopping after {done} blocks (test hook)")
        rows = np.arange(b * block, min((b + 1) * block, index.n_docs))
        ids, scores = index.topk(rows, k)                                             # [B, k] each
        with atomic_path(_block_path(work, b)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, ids=ids, scores=scores)


def load_neighbours(work: str, n: int, k: int, block: int) -> np.ndarray:
    """All block files as one [N, k] int64 array of neighbour ids (-1 = none)."""
    out = np.empty((n, k), dtype=np.int64)
    for b in range(-(-n // block)):
        path = _block_path(work, b)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"neighbour block missing: {path} (a rank did not finish)")
        with np.load(path) as z:
            out[b * block: min((b + 1) * block, n)] = z["ids"]
    return out


def read_segments_by_id(src_dir: str, manifest: dict, ids: np.ndarray) -> dict[int, tuple[np.ndarray, dict]]:
    """{global id: (tokens, meta)} for the segments `ids`, reading only the shards that hold them."""
    offsets = shards.shard_offsets(manifest)
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    out = {}
    for i in np.unique(np.searchsorted(offsets, ids, side="right") - 1):
        wanted = set(ids[(ids >= offsets[i]) & (ids < offsets[i + 1])].tolist())
        for index, tokens, meta in shards.iter_range(src_dir, manifest, offsets[i], offsets[i + 1], check=True):
            if index in wanted:
                out[index] = (tokens, meta)
    return out
