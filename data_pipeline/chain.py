"""Segment orders for `trime group`: the greedy BM25 neighbour chain of TRIME's code, random, consecutive.

Every order is a permutation of segment ids [0, N); cutting it into groups of G makes the groups.
"""
from __future__ import annotations

import numpy as np


def greedy_chain(neighbours: np.ndarray, seed: int) -> np.ndarray:
    """Start at a random segment, move to its most similar unused neighbour, else to a random unused
    segment (TRIME's batching). neighbours: [N, k] int64 ids, best first, -1 = none. Returns [N] int64."""
    n = neighbours.shape[0]
    rng = np.random.default_rng(seed)
    fallback = rng.permutation(n)  # the random restarts, in a seeded order
    nbrs = neighbours.tolist()     # python lists: the loop below is pure python
    used = bytearray(n)
    order = np.empty(n, dtype=np.int64)
    ptr = 0
    cur = int(fallback[0]) if n else -1
    for i in range(n):
        order[i] = cur
        used[cur] = 1
        nxt = -1
        for nb in nbrs[cur]:
            if nb >= 0 and not used[nb]:
                nxt = nb
                break
        if nxt < 0:
            while ptr < n and used[fallback[ptr]]:
                ptr += 1
            if ptr == n:
                break
            nxt = int(fallback[ptr])
        cur = nxt
    return order


def random_order(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n).astype(np.int64)


def consecutive_order(n: int) -> np.ndarray:
    """Segments in manifest order, which is stream order (each stream's segments consecutive)."""
    return np.arange(n, dtype=np.int64)


def cut_groups(order: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(groups [N // G, G], dropped remainder [N % G]) of a segment order."""
    n_groups = len(order) // group_size
    return order[: n_groups * group_size].reshape(n_groups, group_size), order[n_groups * group_size:]
