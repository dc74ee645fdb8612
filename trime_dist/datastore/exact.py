"""Exact top-k search (inner product, or L2 distance) with torch, keys held on the device (a GPU, or the CPU).

For stores that fit in the GPU memory of a job (WikiText-103: 103M fp16 keys of d=1024 are about
26 GB per GPU on 8 GPUs), exact search has none of IVF-PQ's recall loss and runs at matmul speed.
Each rank holds a contiguous slice of the key ids (1/R of the store); in each search round every rank's
queries are gathered, each rank searches its slice for all of them, and the per-slice top-k go back to the
rank that asked (one all-gather of the queries, one all-to-all of the results), where they are merged.
On a GPU the scan is an fp16 matmul; its candidates are rescored in fp32 from the same fp16 keys, so
scores equal faiss Flat's on the stored keys. Scores are similarities, larger = closer: q·k, or -||q - k||^2 for an l2 store.
"""
from __future__ import annotations

import os

import numpy as np
import torch


def shard_range(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi): the contiguous ids rank `rank` of `world_size` holds (sizes differ by at most one)."""
    base, extra = divmod(count, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def topk_chunked(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 1 << 18,
                 compute_dtype: torch.dtype = torch.float32, metric: str = "ip",
                 key_sq: torch.Tensor | None = None, select: str = "blocks") -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [Q, k'] , rows [Q, k']) of the k' = min(k, M) largest q.k (ip) or -||q - k||^2 (l2) over keys
    [M, D], scanning `chunk` keys at a time: the matmul in compute_dtype (ip scores in its precision; l2 scores are
    combined with the norms in fp32; key_sq [M] = ||k||^2, computed here when not given), sorted descending.
    select="blocks": each chunk's selection looks only at the scores that can enter (entering_candidates);
    "topk": a full torch.topk of every chunk (the reference the benchmark compares against). Same scores either
    way; among tied scores either may keep a different one of the tied ids."""
    Q, M = queries.shape[0], keys.shape[0]
    k = min(k, M)
    q = queries.to(compute_dtype)
    best_s = torch.full((Q, 0), float("-inf"), dtype=torch.float32 if metric == "l2" else compute_dtype,
                        device=queries.device)
    best_i = torch.zeros((Q, 0), dtype=torch.long, device=queries.device)
    if metric == "l2" and key_sq is None:
        key_sq = squared_norms(keys)
    for c0 in range(0, M, chunk):
        block = keys[c0:c0 + chunk].to(compute_dtype)                                          # [c, D]
        scores = q @ block.T                                                                  # [Q, c]
        if metric == "l2":  # -||q - k||^2 = 2 q·k - ||k||^2 - ||q||^2; ||q||^2 is added after the selection
            # in fp32: squared norms of real keys overflow fp16 (65504) for hidden states of norm > 256
            scores = 2 * scores.float() - key_sq[c0:c0 + chunk][None, :]
        # the current k-th best is a floor: a score at or below it cannot enter (a tie keeps the earlier key)
        floor = best_s.amin(1) if best_s.shape[1] == k else None
        if select == "blocks":
            s, i = entering_candidates(scores, k, floor)                                      # [Q, m >= k]
        else:  # unsorted selection is the cheaper radix select; one sort at the end
            s, i = scores.topk(min(k, scores.shape[1]), dim=1, sorted=False)                  # [Q, <=k]
        if best_s.shape[1]:
            s, pick = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1, sorted=False)
            i = torch.cat([best_i, i + c0], 1).gather(1, pick)
        elif s.shape[1] > k:
            s, pick = s.topk(k, dim=1, sorted=False)
            i = i.gather(1, pick) + c0
        else:
            i = i + c0
        best_s, best_i = s, i
    best_s, order = best_s.sort(dim=1, descending=True)
    if metric == "l2":
        best_s = best_s - q.float().pow(2).sum(1, keepdim=True)
    return best_s, best_i.gather(1, order)


def entering_candidates(scores: torch.Tensor, k: int, floor: torch.Tensor | None = None,
                        block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [Q, m], columns [Q, m]) of scores [Q, c]: per row a set of m >= min(k, c) entries that holds a
    top-k of the row (or of the row together with k entries all >= floor [Q]), padded with (-inf, -1).
    Cheaper than topk over all c: the row is cut into blocks; the k-th largest block maximum t is <= the row's
    k-th best score, so only blocks with max >= t can hold a top-k entry (about k of c / block), and only their
    entries >= t (about k to 2k) are kept. Entries <= floor are dropped (they cannot displace k entries >= floor)."""
    Q, c = scores.shape
    if block is None:   # measured on CPU (benchmarks/bench_exact_search.py): 64 for small k, 32 from k = 128
        block = 64 if k < 128 else 32
    nb = c // block
    if nb < 2 * k:      # few blocks per top-k entry: a plain selection is as cheap
        s, i = scores.topk(min(k, c), dim=1, sorted=False)
        return s, i
    blocks = scores.as_strided((Q, nb, block), (scores.stride(0), block * scores.stride(1), scores.stride(1)))
    bmax = blocks.amax(2)                                                                   # [Q, nb]
    t = bmax.topk(k, dim=1, sorted=False).values.amin(1)                                    # [Q] <= k-th best
    if floor is not None:   # >= t and > floor; t = floor + (strict) is expressed as a second mask below
        t = torch.maximum(t, floor.to(t.dtype))
    can = bmax >= t[:, None]
    if floor is not None:
        can &= bmax > floor[:, None]
    brow, bcol = can.nonzero(as_tuple=True)                                                 # [h] blocks to open
    if nb * block == c and scores.is_contiguous():  # whole rows of blocks: a row gather (2x the indexing's speed)
        vals = scores.view(Q * nb, block).index_select(0, brow * nb + bcol)                 # [h, block]
    else:
        vals = blocks[brow, bcol]                                                           # [h, block]
    hit = vals >= t[brow, None]
    if floor is not None:
        hit &= vals > floor[brow, None]
    hb, off = hit.nonzero(as_tuple=True)                                                    # [n] kept entries
    rows, cols, kept = brow[hb], bcol[hb] * block + off, vals[hb, off]
    if nb * block < c:  # the last partial block: all its entries above the floor are candidates
        tail = scores[:, nb * block:]                                                       # [Q, < block]
        tail_cols = torch.arange(nb * block, c, device=scores.device).expand_as(tail)
        if floor is not None:   # the others become padding
            above = tail > floor[:, None]
            tail, tail_cols = tail.masked_fill(~above, float("-inf")), tail_cols.masked_fill(~above, -1)
        rows = torch.cat([rows, torch.arange(Q, device=scores.device).repeat_interleave(c - nb * block)])
        cols = torch.cat([cols, tail_cols.reshape(-1)])
        kept = torch.cat([kept, tail.reshape(-1)])
        order = torch.argsort(rows, stable=True)
        rows, cols, kept = rows[order], cols[order], kept[order]
    counts = torch.bincount(rows, minlength=Q)                                              # [Q] kept per row
    m = int(counts.max()) if rows.numel() else 0
    pos = torch.arange(rows.numel(), device=scores.device) - (counts.cumsum(0) - counts)[rows]
    out_s = scores.new_full((Q, m), float("-inf"))
    out_i = torch.full((Q, m), -1, dtype=torch.long, device=scores.device)
    out_s[rows, pos] = kept
    out_i[rows, pos] = cols
    return out_s, out_i


def squared_norms(keys: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """[M] fp32 ||k||^2 of keys [M, D], a chunk at a time (no fp32 copy of all keys)."""
    return torch.cat([keys[c0:c0 + chunk].float().pow(2).sum(1) for c0 in range(0, keys.shape[0], chunk)]) \
        if keys.shape[0] else keys.new_zeros(0, dtype=torch.float32)


def similarity(queries: torch.Tensor, keys: torch.Tensor, metric: str = "ip") -> torch.Tensor:
    """[*, k] scores of queries [*, D] against their neighbours' keys [*, k, D], as the search scores them: q·k
    (ip) or -||q - k||^2 (l2), in fp32 (or wider)."""
    dtype = torch.promote_types(queries.dtype, torch.float32)
    q, k = queries.to(dtype), keys.to(dtype)
    if metric == "l2":
        return -((k - q[..., None, :]) ** 2).sum(-1)
    return torch.einsum("...d,...kd->...k", q, k)


def rescore(queries: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, k: int,
            query_chunk: int = 256, metric: str = "ip") -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates rows [Q, c] rescored in fp32 from keys [M, D]; the k best, sorted: ([Q, k] fp32, rows)."""
    out_s, out_i = [], []
    for q0 in range(0, queries.shape[0], query_chunk):
        r = rows[q0:q0 + query_chunk]                                                         # [q, c]
        s = similarity(queries[q0:q0 + query_chunk], keys[r], metric)                        # [q, c]
        s, pick = s.topk(min(k, s.shape[1]), dim=1)
        out_s.append(s)
        out_i.append(r.gather(1, pick))
    return torch.cat(out_s), torch.cat(out_i)


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores/ids [Q, R*k] of R ranks' top-k (side by side) -> the k best, sorted descending; equal scores in
    id order (the lower id first and kept: faiss keeps the first-added of equal keys, so a faiss index searched
    in shards keeps the neighbours one process finds)."""
    by_id = ids.argsort(dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    pick = scores.argsort(dim=1, descending=True, stable=True)[:, :min(k, scores.shape[1])]
    return scores.gather(1, pick), ids.gather(1, pick)


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device`: the GPU's free memory, or the machine's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def shard_bytes(count: int, dim: int, rank: int, world_size: int, metric: str = "ip") -> int:
    """Bytes rank `rank` of `world_size` holds for exact search: its fp16 keys (+ fp32 norms for l2) and every
    key's label (int32)."""
    lo, hi = shard_range(count, rank, world_size)
    return (hi - lo) * (2 * dim + (4 if metric == "l2" else 0)) + 4 * count


def check_shard_fits(path: str, count: int, dim: int, device: torch.device, rank: int, world_size: int,
                     metric: str = "ip", ranks_here: int = 1, available: int | None = None) -> None:
    """ValueError (one line) when this rank's shard of the store does not fit in what `device` has free
    (`ranks_here` ranks of this machine share its CPU memory; `available`: the free bytes, measured when None)."""
    need = shard_bytes(count, dim, rank, world_size, metric)
    free = free_bytes(device) if available is None else available
    if device.type != "cuda":
        free //= max(ranks_here, 1)
    if need > 0.9 * free:
        raise ValueError(f"datastore {path}: --search exact on {world_size} rank(s) holds {need / 2**30:.2f} GiB "
                         f"per rank ({count:,} keys x {dim} in fp16 / {world_size}, plus labels), more than the "
                         f"{free / 2**30:.2f} GiB free per rank on {device}; run on more ranks (each holds 1/R of "
                         "the keys) or search the faiss index (--search faiss)")


def search_over_shards(queries: torch.Tensor, k: int, search_shard, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [Q, k], ids [Q, k]) of this rank's queries [Q, D] over every rank's shard, merged: a collective
    (every rank calls it once per round, Q may differ, 0 included, the same k). search_shard(queries [n, D], k)
    -> (scores [n, k] fp32, global ids [n, k]) searches this rank's shard, on the queries' device. One all-gather
    of the queries, each shard searched for all of them, one all-to-all of the results back to the askers."""
    from trime_dist.core.distributed import all_gather_no_grad, all_to_all_rows, gather_sizes

    sizes = gather_sizes(queries.shape[0], queries.device)                                  # [R] queries per rank
    Q = queries.shape[0]
    if sum(sizes) == 0:
        return search_shard(queries, k)
    every = all_gather_no_grad(queries.float())                                             # [sum Q_r, D]
    s, ids = search_shard(every, k)                                                         # this shard's top-k
    # rank r gets this shard's rows for its queries; this rank gets every shard's rows for its own
    s = all_to_all_rows(s, sizes, [Q] * world_size)                                         # [R*Q, k]
    ids = all_to_all_rows(ids, sizes, [Q] * world_size)
    # [R*Q, k] -> [Q, R*k]: every shard's candidates for each query side by side
    s = s.view(world_size, Q, k).permute(1, 0, 2).reshape(Q, world_size * k)
    ids = ids.view(world_size, Q, k).permute(1, 0, 2).reshape(Q, world_size * k)
    return merge_topk(s, ids, k)


class ExactIndex:
    """A store's keys [lo, hi) on `device` (fp16) and their exact top-k search, merged over the ranks."""

    def __init__(self, store, device: torch.device, rank: int = 0, world_size: int = 1, metric: str = "ip"):
        self.device = device
        self.metric = metric
        self.count = int(store.meta["count"])
        self.lo, self.hi = shard_range(self.count, rank, world_size)
        self.keys = load_key_range(store, self.lo, self.hi).to(device)                       # [n, D] fp16
        self.world_size = world_size
        self.key_sq = squared_norms(self.keys) if metric == "l2" else None                  # [n] fp32, once
        # fp16 tensor-core matmul on a GPU (candidates rescored in fp32); fp32 on the CPU (fp16 matmul is slow there)
        self.compute_dtype = torch.float16 if device.type == "cuda" else torch.float32

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [Q, k] fp32 similarities, ids [Q, k] int64 global; -1 / -inf where the store has < k keys) of
        this rank's queries [Q, D] over the whole store. Sharded (world_size > 1) it is a collective: every rank
        calls it once per round, with its own queries (Q may differ, 0 included) and the same k; each shard is
        searched for every rank's queries, and each rank gets its queries' top-k merged over the shards."""
        queries = queries.to(self.device)
        if self.world_size == 1:
            return self.search_shard(queries, k)
        return search_over_shards(queries, k, self.search_shard, self.world_size)

    def search_shard(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """search() over this rank's keys only: ([Q, k] fp32, [Q, k] global ids), padded with (-inf, -1)."""
        Q = queries.shape[0]
        if self.keys.shape[0] and Q:
            if self.compute_dtype == torch.float32:
                s, rows = topk_chunked(queries, self.keys, k, metric=self.metric, key_sq=self.key_sq)
            else:  # a margin of candidates, so fp16 rounding does not drop a true k-th neighbour
                _, cand = topk_chunked(queries, self.keys, k + max(8, k // 8), compute_dtype=self.compute_dtype,
                                       metric=self.metric, key_sq=self.key_sq)
                s, rows = rescore(queries, self.keys, cand, k, metric=self.metric)
            s, ids = s.float(), rows + self.lo
        else:
            s = torch.zeros((Q, 0), dtype=torch.float32, device=self.device)
            ids = torch.zeros((Q, 0), dtype=torch.long, device=self.device)
        return _pad_to_k(s, ids, k)


def _pad_to_k(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [Q, k'] to [Q, k] with (-inf, -1), faiss's convention for missing neighbours."""
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores, ids
    Q = scores.shape[0]
    return (torch.cat([scores, scores.new_full((Q, missing), float("-inf"))], 1),
            torch.cat([ids, ids.new_full((Q, missing), -1)], 1))


def load_key_range(store, lo: int, hi: int) -> torch.Tensor:
    """[hi - lo, D] fp16 keys of global ids lo..hi-1, read part by part from the memmapped .npy files."""
    out = np.empty((hi - lo, int(store.meta["dim"])), dtype=np.float16)
    for part, first in zip(store.meta["parts"], store.first_ids):
        keys = np.load(os.path.join(store.path, part["keys"]), mmap_mode="r")
        a, b = max(lo, int(first)), min(hi, int(first) + len(keys))
        if a < b:
            out[a - lo:b - lo] = keys[a - first:b - first]
    return torch.from_numpy(out)
