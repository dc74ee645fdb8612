"""The TRIME training objective: one softmax over the vocabulary and an in-batch memory.

Pure functions over tensors (no torch.distributed). `trime_nll` is the dense semantic reference;
`trime_nll_tiled` computes the same values and gradients without ever holding the N×M matrix.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from trime_dist.core.constants import IGNORE_INDEX
from trime_dist.objective.masks import TokenMeta, build_memory_mask, check_layout

# --------------------------------------------------------------------------------------------
# Dense reference
# --------------------------------------------------------------------------------------------

def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64: softmax statistics never in half precision."""
    return torch.promote_types(t.dtype, torch.float32)


def _check_shapes(vocab_logits, targets, queries, keys, key_labels) -> None:
    N, d = queries.shape
    if vocab_logits.dim() != 2 or vocab_logits.shape[0] != N or targets.shape != (N,):
        raise ValueError(f"expected vocab_logits [N, V] and targets [N] with N={N}, got "
                         f"{tuple(vocab_logits.shape)} and {tuple(targets.shape)}")
    if keys.dim() != 2 or keys.shape[1] != d or key_labels.shape != (keys.shape[0],):
        raise ValueError(f"expected keys [M, {d}] and key_labels [M], got {tuple(keys.shape)} "
                         f"and {tuple(key_labels.shape)}")


def trime_nll(vocab_logits: torch.Tensor, targets: torch.Tensor, queries: torch.Tensor,
              keys: torch.Tensor, key_labels: torch.Tensor, mask: torch.Tensor,
              temperature: float = 1.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[N] -log P(target_i | c_i) in nats, the TRIME objective (DESIGN.md §1; paper Eq. 2-3):

        P(y | c_i) = (exp(E_y·f_i) + Σ_{j∈M_i, y_j=y} exp(s_ij)) / (Σ_w exp(E_w·f_i) + Σ_{j∈M_i} exp(s_ij))
        s_ij = q_i·k_j / (sqrt(d)·temperature)

    vocab_logits [N, V] (E·f), targets [N], queries [N, d], keys [M, d], key_labels [M],
    mask [N, M] bool (True = query i may use entry j). Entries with key_labels == ignore_index
    are never memory; rows with target == ignore_index return 0 with zero gradient. Masked
    entries are excluded exactly; a row without memory is plain cross-entropy.
    """
    _check_shapes(vocab_logits, targets, queries, keys, key_labels)
    if mask.shape != (queries.shape[0], keys.shape[0]):
        raise ValueError(f"mask must be [N, M] = {(queries.shape[0], keys.shape[0])}, got {tuple(mask.shape)}")
    dtype = _compute_dtype(queries)
    scale = 1.0 / (math.sqrt(queries.shape[1]) * temperature)
    valid_query = targets != ignore_index                                           # [N]
    safe_targets = torch.where(valid_query, targets, torch.zeros_like(targets))     # [N]
    allowed = mask & (key_labels != ignore_index)[None, :]                          # [N, M]
    positive = allowed & (key_labels[None, :] == targets[:, None])                  # [N, M]

    logits = vocab_logits.to(dtype)                                                 # [N, V]
    sim = (queries.to(dtype) @ keys.to(dtype).T) * scale                            # [N, M]
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=sim.device)
    # The vocabulary term is always finite, so neither log-sum-exp row is all -inf (no NaN grads).
    log_denominator = torch.logsumexp(torch.cat([logits, torch.where(allowed, sim, neg_inf)], 1), 1)
    target_logit = logits.gather(1, safe_targets[:, None])                          # [N, 1]
    log_numerator = torch.logsumexp(torch.cat([target_logit, torch.where(positive, sim, neg_inf)], 1), 1)
    nll = log_denominator - log_numerator                                           # [N]
    return torch.where(valid_query, nll, torch.zeros_like(nll))


# --------------------------------------------------------------------------------------------
# Tiled fast path
# --------------------------------------------------------------------------------------------

class _TiledMemoryLSE(torch.autograd.Function):
    """Per-row log-sum-exp of allowed memory similarities, computed block by block.

    Returns lse_all [N] = log Σ_{j allowed} exp(s_ij) and lse_pos [N] = log Σ_{j allowed, y_j=t_i}
    exp(s_ij) (-inf where the sum is empty), plus n_allowed [N] (not differentiable). Only O(N)
    statistics are saved; backward recomputes each block's similarities and mask.
    """

    @staticmethod
    def forward(ctx, queries, keys, targets, key_labels, query_meta_t, key_meta_t,
                layout, use_local, scale, tile_size, ignore_index, exclude_future=False):
        dtype = _compute_dtype(queries)
        N = queries.shape[0]
        lse_all = torch.full((N,), float("-inf"), dtype=dtype, device=queries.device)  # [N]
        lse_pos = torch.full_like(lse_all, float("-inf"))                              # [N]
        n_allowed = torch.zeros(N, dtype=torch.long, device=queries.device)            # [N]
        for q0, k0, sim, allowed, positive in _blocks(queries, keys, targets, key_labels, query_meta_t,
                                                      key_meta_t, layout, use_local, scale, tile_size,
                                                      ignore_index, dtype, exclude_future):
            rows = slice(q0, q0 + sim.shape[0])
            # dense masked log-sum-exp, not nonzero(): nonzero syncs the host once per tile on a GPU.
            # positives are a subset of the allowed entries, so masking sim in place after is safe
            lse_pos[rows] = torch.logaddexp(lse_pos[rows], torch.logsumexp(sim.masked_fill(~positive, float("-inf")), 1))
            lse_all[rows] = torch.logaddexp(lse_all[rows], torch.logsumexp(sim.masked_fill_(~allowed, float("-inf")), 1))
            n_allowed[rows] += allowed.sum(1)
        ctx.save_for_backward(queries, keys, targets, key_labels, query_meta_t, key_meta_t, lse_all, lse_pos)
        ctx.config = (layout, use_local, scale, tile_size, ignore_index, exclude_future)
        ctx.mark_non_differentiable(n_allowed)
        return lse_all, lse_pos, n_allowed

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_all, grad_pos, _grad_count):
        queries, keys, targets, key_labels, query_meta_t, key_meta_t, lse_all, lse_pos = ctx.saved_tensors
        layout, use_local, scale, tile_size, ignore_index, exclude_future = ctx.config
        dtype = lse_all.dtype
        # Rows with an empty sum get no gradient; a finite stand-in keeps exp() free of NaN.
        lse_all = torch.where(torch.isinf(lse_all), torch.zeros_like(lse_all), lse_all)
        lse_pos = torch.where(torch.isinf(lse_pos), torch.zeros_like(lse_pos), lse_pos)
        grad_all, grad_pos = grad_all.to(dtype), grad_pos.to(dtype)
        grad_q = torch.zeros(queries.shape, dtype=dtype, device=queries.device)      # [N, d]
        grad_k = torch.zeros(keys.shape, dtype=dtype, device=keys.device)            # [M, d]
        for q0, k0, sim, allowed, positive in _blocks(queries, keys, targets, key_labels, query_meta_t,
                                                      key_meta_t, layout, use_local, scale, tile_size,
                                                      ignore_index, dtype, exclude_future):
            n, m = sim.shape
            rows, cols = slice(q0, q0 + n), slice(k0, k0 + m)
            # d lse_i / d s_ij = softmax over the row's allowed (resp. positive) entries. Dense masks,
            # no nonzero(): no host sync per tile on a GPU.
            grad_pos_sim = sim.masked_fill(~positive, float("-inf")).sub_(lse_pos[rows, None]).exp_()
            grad_pos_sim.mul_(grad_pos[rows, None])                                             # [n, m]
            grad_sim = sim.masked_fill_(~allowed, float("-inf")).sub_(lse_all[rows, None]).exp_()
            grad_sim.mul_(grad_all[rows, None]).add_(grad_pos_sim).mul_(scale)                  # [n, m]
            del grad_pos_sim
            grad_q[rows] += grad_sim @ keys[cols].to(dtype)                                     # [n, d]
            grad_k[cols] += grad_sim.T @ queries[rows].to(dtype)                                # [m, d]
        return (grad_q.to(queries.dtype), grad_k.to(keys.dtype)) + (None,) * 10


def _block_ranges(meta_t: torch.Tensor, tile_size: int) -> torch.Tensor:
    """[n_blocks, 2, 4] per-block min and max of (row, position, stream, stream_index), one host sync."""
    n = meta_t.shape[0]
    pad = (-n) % tile_size
    if pad:  # repeat the last row: it does not widen the range
        meta_t = torch.cat([meta_t, meta_t[-1:].expand(pad, -1)])
    blocks = meta_t.view(-1, tile_size, 4)                                           # [n_blocks, tile, 4]
    return torch.stack([blocks.amin(1), blocks.amax(1)], 1).cpu()


def _may_share_memory(q_range: torch.Tensor, k_range: torch.Tensor, layout: str, use_local: bool) -> bool:
    """Conservative test from metadata ranges: False only if no (query, key) pair of the two blocks
    can be allowed, so the block's mask and matmul can be skipped (most blocks in local/long)."""
    (q_lo, q_hi), (k_lo, k_hi) = q_range, k_range
    if layout == "none":
        return False
    if layout == "external":
        return True
    segments_overlap = bool(q_lo[0] <= k_hi[0]) and bool(k_lo[0] <= q_hi[0])
    local_possible = segments_overlap and bool(k_lo[1] < q_hi[1])
    if layout == "local":
        return local_possible
    streams_overlap = bool(q_lo[2] <= k_hi[2]) and bool(k_lo[2] <= q_hi[2])
    return local_possible or (streams_overlap and bool(k_lo[3] < q_hi[3]))


def _blocks(queries, keys, targets, key_labels, query_meta_t, key_meta_t, layout, use_local,
            scale, tile_size, ignore_index, dtype, exclude_future=False):
    """Yield (q0, k0, sim [n, m], allowed [n, m], positive [n, m]) for every block with memory."""
    N, M = queries.shape[0], keys.shape[0]
    if N == 0 or M == 0:
        return
    key_valid = key_labels != ignore_index                                           # [M]
    # external: every block may share memory, so no ranges (their .cpu() would sync the host)
    skip_blocks = layout != "external"
    if skip_blocks:
        q_ranges, k_ranges = _block_ranges(query_meta_t, tile_size), _block_ranges(key_meta_t, tile_size)
    for q0 in range(0, N, tile_size):
        q_meta = TokenMeta.unstack(query_meta_t[q0:q0 + tile_size])
        q_block = queries[q0:q0 + tile_size].to(dtype)                               # [n, d]
        t_block = targets[q0:q0 + tile_size]                                         # [n]
        for k0 in range(0, M, tile_size):
            if skip_blocks and not _may_share_memory(q_ranges[q0 // tile_size], k_ranges[k0 // tile_size],
                                                     layout, use_local):
                continue
            k_meta = TokenMeta.unstack(key_meta_t[k0:k0 + tile_size])
            allowed = build_memory_mask(q_meta, k_meta, layout, use_local, exclude_future)   # [n, m]
            allowed &= key_valid[None, k0:k0 + tile_size]
            if layout != "external" and not bool(allowed.any()):
                continue  # no memory here (e.g. other segments in the local layout): skip the matmul
            positive = allowed & (key_labels[None, k0:k0 + tile_size] == t_block[:, None])  # [n, m]
            sim = (q_block @ keys[k0:k0 + tile_size].to(dtype).T) * scale            # [n, m]
            yield q0, k0, sim, allowed, positive


def memory_lse_tiled(queries, keys, targets, key_labels, query_meta: TokenMeta, key_meta: TokenMeta,
                     layout: str, use_local: bool = True, temperature: float = 1.0,
                     ignore_index: int = IGNORE_INDEX, tile_size: int = 1024, exclude_future: bool = False):
    """(lse_all [N], lse_pos [N], n_allowed [N]): log Σ exp(s_ij) over each query's allowed memory
    entries, and over those whose label is the query's target (-inf when empty), in tiles."""
    check_layout(layout)
    if len(query_meta) != queries.shape[0] or len(key_meta) != keys.shape[0]:
        raise ValueError(f"query_meta/key_meta lengths {len(query_meta)}/{len(key_meta)} do not match "
                         f"N={queries.shape[0]}, M={keys.shape[0]}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    scale = 1.0 / (math.sqrt(queries.shape[1]) * temperature)
    return _TiledMemoryLSE.apply(queries, keys, targets, key_labels, query_meta.stack(), key_meta.stack(),
                                 layout, use_local, scale, tile_size, ignore_index, exclude_future)


def memory_lse_local(queries: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                     ignore_index: int = IGNORE_INDEX):
    """The local layout's (lse_all, lse_pos, n_allowed), each [B*T], with segment-batched matmuls.

    queries [B, T, d] are also the keys, targets [B, T] also the key labels. Memory of (b, i) is
    (b, j < i): a strictly lower-triangular [B, T, T] block per segment, so nothing outside the
    segments' own blocks is computed (the paper's local memory, like causal attention).
    """
    B, T, d = queries.shape
    dtype = _compute_dtype(queries)
    q = queries.to(dtype)
    sim = torch.bmm(q, q.transpose(1, 2)) / (math.sqrt(d) * temperature)           # [B, T, T]
    earlier = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-1)         # [T, T]: j < i
    allowed = earlier[None] & (targets != ignore_index)[:, None, :]                 # [B, T, T]
    positive = allowed & (targets[:, None, :] == targets[:, :, None])               # [B, T, T]
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=q.device)
    lse_all = _rowwise_lse(torch.where(allowed, sim, neg_inf))
    lse_pos = _rowwise_lse(torch.where(positive, sim, neg_inf))
    n_allowed = allowed.sum(-1)
    return lse_all.reshape(B * T), lse_pos.reshape(B * T), n_allowed.reshape(B * T)


def _rowwise_lse(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim that is -inf (with zero, not NaN, gradient) for all -inf rows."""
    empty = x.amax(-1, keepdim=True) == float("-inf")                                # [..., 1]
    safe = torch.where(empty, torch.zeros_like(x), x)
    lse = torch.logsumexp(safe, -1)
    return torch.where(empty[..., 0], torch.full_like(lse, float("-inf")), lse)


def combine_vocab_and_memory(vocab_logits: torch.Tensor, targets: torch.Tensor, lse_all: torch.Tensor,
                             lse_pos: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """(nll [N], ce [N]): TRIME NLL from the vocabulary logits and the memory log-sum-exps, and the
    plain cross-entropy of the same logits (it shares the vocabulary log-sum-exp)."""
    valid_query = targets != ignore_index                                            # [N]
    safe_targets = torch.where(valid_query, targets, torch.zeros_like(targets))
    logits = vocab_logits.to(_compute_dtype(vocab_logits))                           # [N, V]
    target_logit = logits.gather(1, safe_targets[:, None])[:, 0]                     # [N]
    # log Σ_w exp(logit_w) = CE + target logit: the fused cross-entropy kernel does the heavy part.
    ce = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")  # [N], 0 if ignored
    vocab_lse = ce + target_logit                                                    # [N]
    zero = torch.zeros_like(vocab_lse)
    if lse_all is None:
        return ce, ce
    # log(vocab sum + memory sum); the vocabulary term is finite, so logaddexp's grads are too.
    nll = torch.logaddexp(vocab_lse, lse_all.to(vocab_lse.dtype)) - \
        torch.logaddexp(target_logit, lse_pos.to(vocab_lse.dtype))
    return torch.where(valid_query, nll, zero), ce


def trime_nll_tiled(vocab_logits: torch.Tensor, targets: torch.Tensor, queries: torch.Tensor,
                    keys: torch.Tensor, key_labels: torch.Tensor, query_meta: TokenMeta,
                    key_meta: TokenMeta, layout: str, use_local: bool = True,
                    temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                    tile_size: int = 1024, exclude_future: bool = False) -> torch.Tensor:
    """[N] TRIME NLL exactly as `trime_nll` with mask = build_memory_mask(query_meta, key_meta, ...),
    but in tile_size×tile_size blocks: peak memory O(N·d + tile²), never the N×M matrix."""
    _check_shapes(vocab_logits, targets, queries, keys, key_labels)
    lse_all, lse_pos, _ = memory_lse_tiled(queries, keys, targets, key_labels, query_meta, key_meta, layout,
                                           use_local, temperature, ignore_index, tile_size, exclude_future)
    return combine_vocab_and_memory(vocab_logits, targets, lse_all, lse_pos, ignore_index)[0]
