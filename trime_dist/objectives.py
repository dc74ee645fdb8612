"""The TRIME training objective: one softmax over the vocabulary and an in-batch memory.

Pure functions over tensors (no torch.distributed). `trime_nll` is the dense semantic reference;
`trime_nll_tiled` computes the same values and gradients without ever holding the N×M matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch.autograd.function import once_differentiable

LAYOUTS = ("local", "long", "ext")


# --------------------------------------------------------------------------------------------
# Token metadata and memory masks
# --------------------------------------------------------------------------------------------

@dataclass
class TokenMeta:
    """Where each token sits in the global batch; every field is a [N] long tensor."""
    segment: torch.Tensor   # unique id of the token's segment within the global batch
    position: torch.Tensor  # index of the token within its segment
    stream: torch.Tensor    # id of the token stream the segment was cut from
    order: torch.Tensor     # index of the segment within its stream

    def __post_init__(self):
        shapes = {f.name: tuple(getattr(self, f.name).shape) for f in fields(self)}
        if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
            raise ValueError(f"TokenMeta fields must all be [N] tensors of one length, got {shapes}")

    def __len__(self) -> int:
        return self.segment.shape[0]

    def slice(self, start: int, end: int) -> "TokenMeta":
        return TokenMeta(*(getattr(self, f.name)[start:end] for f in fields(self)))

    def select(self, index: torch.Tensor) -> "TokenMeta":
        return TokenMeta(*(getattr(self, f.name)[index] for f in fields(self)))

    def stack(self) -> torch.Tensor:
        """[N, 4] long tensor (segment, position, stream, order), e.g. to gather in one collective."""
        return torch.stack([getattr(self, f.name).long() for f in fields(self)], dim=1)

    @staticmethod
    def unstack(t: torch.Tensor) -> "TokenMeta":
        return TokenMeta(*t.unbind(dim=1))


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown memory layout {layout!r}; expected one of {LAYOUTS}")


def build_memory_mask(query_meta: TokenMeta, key_meta: TokenMeta, layout: str,
                      use_local: bool = True) -> torch.Tensor:
    """[N, M] bool: True where query i may use memory entry j (DESIGN.md §1, table of M_i).

    local: same segment, earlier position.  long: local, or any position of an earlier segment
    of the same stream.  ext: (local if use_local) or any position of any other segment.
    Key validity (ignored labels) is not applied here; the objectives apply it.
    """
    check_layout(layout)
    q, k = query_meta, key_meta
    same_segment = q.segment[:, None] == k.segment[None, :]                       # [N, M]
    local = same_segment & (k.position[None, :] < q.position[:, None])             # [N, M]
    if layout == "local":
        return local
    if layout == "long":
        earlier = (q.stream[:, None] == k.stream[None, :]) & (k.order[None, :] < q.order[:, None])
        return local | earlier
    other = ~same_segment                                                          # ext
    return (local | other) if use_local else other


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
              temperature: float = 1.0, ignore_index: int = -100) -> torch.Tensor:
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
                layout, use_local, scale, tile_size, ignore_index):
        dtype = _compute_dtype(queries)
        N = queries.shape[0]
        lse_all = torch.full((N,), float("-inf"), dtype=dtype, device=queries.device)  # [N]
        lse_pos = torch.full_like(lse_all, float("-inf"))                              # [N]
        n_allowed = torch.zeros(N, dtype=torch.long, device=queries.device)            # [N]
        for q0, k0, sim, allowed, positive in _blocks(queries, keys, targets, key_labels, query_meta_t,
                                                      key_meta_t, layout, use_local, scale, tile_size,
                                                      ignore_index, dtype):
            rows = slice(q0, q0 + sim.shape[0])
            lse_all[rows] = torch.logaddexp(lse_all[rows], _masked_lse(sim, allowed))
            lse_pos[rows] = torch.logaddexp(lse_pos[rows], _sparse_lse(sim, positive))
            n_allowed[rows] += allowed.sum(1)
        ctx.save_for_backward(queries, keys, targets, key_labels, query_meta_t, key_meta_t, lse_all, lse_pos)
        ctx.config = (layout, use_local, scale, tile_size, ignore_index)
        ctx.mark_non_differentiable(n_allowed)
        return lse_all, lse_pos, n_allowed

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_all, grad_pos, _grad_count):
        queries, keys, targets, key_labels, query_meta_t, key_meta_t, lse_all, lse_pos = ctx.saved_tensors
        layout, use_local, scale, tile_size, ignore_index = ctx.config
        dtype = lse_all.dtype
        # Rows with an empty sum get no gradient; a finite stand-in keeps exp() free of NaN.
        lse_all = torch.where(torch.isinf(lse_all), torch.zeros_like(lse_all), lse_all)
        lse_pos = torch.where(torch.isinf(lse_pos), torch.zeros_like(lse_pos), lse_pos)
        grad_all, grad_pos = grad_all.to(dtype), grad_pos.to(dtype)
        grad_q = torch.zeros(queries.shape, dtype=dtype, device=queries.device)      # [N, d]
        grad_k = torch.zeros(keys.shape, dtype=dtype, device=keys.device)            # [M, d]
        for q0, k0, sim, allowed, positive in _blocks(queries, keys, targets, key_labels, query_meta_t,
                                                      key_meta_t, layout, use_local, scale, tile_size,
                                                      ignore_index, dtype):
            n, m = sim.shape
            rows, cols = slice(q0, q0 + n), slice(k0, k0 + m)
            # d lse_i / d s_ij = softmax over the row's allowed (resp. positive) entries.
            p_all = torch.exp(sim.masked_fill(~allowed, float("-inf")) - lse_all[rows, None])   # [n, m]
            grad_sim = p_all.mul_(grad_all[rows, None])                                        # [n, m]
            # positives (same label as the target) are sparse: only touch those entries
            i, j = positive.nonzero(as_tuple=True)                                              # [P]
            grad_sim[i, j] += torch.exp(sim[i, j] - lse_pos[rows][i]) * grad_pos[rows][i]
            grad_sim.mul_(scale)
            grad_q[rows] += grad_sim @ keys[cols].to(dtype)                                     # [n, d]
            grad_k[cols] += grad_sim.T @ queries[rows].to(dtype)                                # [m, d]
        return (grad_q.to(queries.dtype), grad_k.to(keys.dtype)) + (None,) * 9


def _masked_lse(sim: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[n] log Σ_j exp(sim_ij) over keep_ij (-inf for empty rows); forward only."""
    return torch.logsumexp(sim.masked_fill(~keep, float("-inf")), dim=1)


def _sparse_lse(sim: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[n] same as _masked_lse, visiting only the kept entries (cheap when keep is sparse)."""
    i, j = keep.nonzero(as_tuple=True)                                               # [P]
    values = sim[i, j]                                                               # [P]
    row_max = torch.full((sim.shape[0],), float("-inf"), dtype=sim.dtype, device=sim.device)
    row_max = row_max.scatter_reduce(0, i, values, reduce="amax")                    # [n]
    sums = torch.zeros_like(row_max).index_add_(0, i, torch.exp(values - row_max[i]))  # [n]
    return row_max + torch.log(sums)  # empty rows: -inf + log(0) = -inf


def _blocks(queries, keys, targets, key_labels, query_meta_t, key_meta_t, layout, use_local,
            scale, tile_size, ignore_index, dtype):
    """Yield (q0, k0, sim [n, m], allowed [n, m], positive [n, m]) for every block with memory."""
    N, M = queries.shape[0], keys.shape[0]
    key_valid = key_labels != ignore_index                                           # [M]
    for q0 in range(0, N, tile_size):
        q_meta = TokenMeta.unstack(query_meta_t[q0:q0 + tile_size])
        q_block = queries[q0:q0 + tile_size].to(dtype)                               # [n, d]
        t_block = targets[q0:q0 + tile_size]                                         # [n]
        for k0 in range(0, M, tile_size):
            k_meta = TokenMeta.unstack(key_meta_t[k0:k0 + tile_size])
            allowed = build_memory_mask(q_meta, k_meta, layout, use_local)           # [n, m]
            allowed &= key_valid[None, k0:k0 + tile_size]
            if not bool(allowed.any()):
                continue  # no memory here (e.g. other segments in the local layout): skip the matmul
            positive = allowed & (key_labels[None, k0:k0 + tile_size] == t_block[:, None])  # [n, m]
            sim = (q_block @ keys[k0:k0 + tile_size].to(dtype).T) * scale            # [n, m]
            yield q0, k0, sim, allowed, positive


def trime_nll_tiled(vocab_logits: torch.Tensor, targets: torch.Tensor, queries: torch.Tensor,
                    keys: torch.Tensor, key_labels: torch.Tensor, query_meta: TokenMeta,
                    key_meta: TokenMeta, layout: str, use_local: bool = True,
                    temperature: float = 1.0, ignore_index: int = -100,
                    tile_size: int = 1024) -> torch.Tensor:
    """[N] TRIME NLL exactly as `trime_nll` with mask = build_memory_mask(query_meta, key_meta, ...),
    but in tile_size×tile_size blocks: peak memory O(N·d + tile²), never the N×M matrix."""
    return trime_nll_tiled_with_count(vocab_logits, targets, queries, keys, key_labels, query_meta,
                                      key_meta, layout, use_local, temperature, ignore_index, tile_size)[0]


def trime_nll_tiled_with_count(vocab_logits, targets, queries, keys, key_labels, query_meta, key_meta,
                               layout, use_local=True, temperature=1.0, ignore_index=-100,
                               tile_size=1024):
    """(nll [N], n_allowed [N] long): `trime_nll_tiled` plus each query's number of memory entries."""
    _check_shapes(vocab_logits, targets, queries, keys, key_labels)
    check_layout(layout)
    if len(query_meta) != queries.shape[0] or len(key_meta) != keys.shape[0]:
        raise ValueError(f"query_meta/key_meta lengths {len(query_meta)}/{len(key_meta)} do not match "
                         f"N={queries.shape[0]}, M={keys.shape[0]}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    scale = 1.0 / (math.sqrt(queries.shape[1]) * temperature)
    lse_mem_all, lse_mem_pos, n_allowed = _TiledMemoryLSE.apply(
        queries, keys, targets, key_labels, query_meta.stack(), key_meta.stack(),
        layout, use_local, scale, tile_size, ignore_index)                           # [N] each
    valid_query = targets != ignore_index                                            # [N]
    safe_targets = torch.where(valid_query, targets, torch.zeros_like(targets))
    logits = vocab_logits.to(lse_mem_all.dtype)                                      # [N, V]
    # log(vocab sum + memory sum); the vocabulary term is finite, so logaddexp's grads are too.
    log_denominator = torch.logaddexp(torch.logsumexp(logits, 1), lse_mem_all)       # [N]
    log_numerator = torch.logaddexp(logits.gather(1, safe_targets[:, None])[:, 0], lse_mem_pos)
    nll = log_denominator - log_numerator
    n_allowed = torch.where(valid_query, n_allowed, torch.zeros_like(n_allowed))
    return torch.where(valid_query, nll, torch.zeros_like(nll)), n_allowed
