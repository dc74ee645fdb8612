"""The loss of one micro-batch: TRIME NLL with the in-batch memory, gathered across ranks if needed.

The only place that combines the objective (trime_dist.objective) with collectives
(trime_dist.core.distributed); normalisation makes W ranks × B segments equal one rank with W·B.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from trime_dist.core import distributed as tdist
from trime_dist.objective.masks import TokenMeta, build_memory_mask, check_layout
from trime_dist.objective.trime_loss import (
    combine_vocab_and_memory,
    memory_lse_local,
    memory_lse_tiled,
    trime_nll,
)
from trime_dist.train.batch import IGNORE_INDEX, Batch

PLACEMENTS = ("contiguous", "interleaved")


@dataclass
class LossOutput:
    loss: torch.Tensor      # scalar to backward; DeepSpeed's gradient average over ranks = grad of global mean NLL
    nll_sum: torch.Tensor   # detached, this rank's sum of TRIME NLL (nats)
    ce_sum: torch.Tensor    # detached, this rank's sum of plain CE from the same logits
    n_tokens: torch.Tensor  # this rank's non-pad target count
    memory_size: float      # mean number of allowed memory entries per (non-pad) query on this rank


def needs_gather(layout: Optional[str], placement: str) -> bool:
    """Whether the layout's memory spans ranks: ext always; long only when a stream's consecutive
    segments are dealt to different ranks ('interleaved'); local and plain CE never."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; expected one of {PLACEMENTS}")
    if layout is None:
        return False
    check_layout(layout)
    return layout == "ext" or (layout == "long" and placement == "interleaved")


def token_meta(batch: Batch) -> TokenMeta:
    """[B*T] metadata of every token of the batch (row-major, like targets.reshape(-1))."""
    B, T = batch.targets.shape
    device = batch.targets.device
    per_token = lambda x: x.long().to(device).repeat_interleave(T)  # [B] -> [B*T]
    return TokenMeta(segment=per_token(batch.segment),
                     position=torch.arange(T, device=device).repeat(B),
                     stream=per_token(batch.stream), order=per_token(batch.order))


def _memory(queries, targets, meta: TokenMeta, gather: bool, gather_grad: bool):
    """(keys [M, D], key_labels [M], key_meta) of the memory: this rank's non-pad tokens, or every
    rank's when gathering. Pads are dropped before the gather, so M = global non-pad count."""
    keep = (targets != IGNORE_INDEX).nonzero()[:, 0]                                 # [M_local]
    keys, labels, meta_t = queries[keep], targets[keep], meta.select(keep).stack()   # [M_local, ...]
    if gather:  # every rank runs these collectives every step, even with M_local == 0
        gather_keys = tdist.all_gather_with_grad if gather_grad else tdist.all_gather_keep_local_grad
        labels_meta = tdist.all_gather_no_grad(torch.cat([labels[:, None], meta_t], 1))  # [M, 5]
        keys = gather_keys(keys)                                                      # [M, D]
        labels, meta_t = labels_meta[:, 0], labels_meta[:, 1:]
    return keys, labels, TokenMeta.unstack(meta_t)


def micro_batch_loss(logits: torch.Tensor, memory_keys: torch.Tensor, batch: Batch,
                     layout: Optional[str], *, use_local: bool = True, gather: bool = False,
                     gather_grad: bool = True, temperature: float = 1.0, tiled: bool = True,
                     tile_size: int = 1024) -> LossOutput:
    """TRIME loss of this rank's micro-batch. logits [B, T, V], memory_keys [B, T, D] (the queries
    and keys g(c)); layout None = plain CE, else 'local' | 'long' | 'ext'. With gather=True every
    rank's non-pad keys form the memory of every rank's queries (gradients sent back to the
    producing rank unless gather_grad=False, the original TRIME code's detached remote keys)."""
    B, T, V = logits.shape
    if memory_keys.shape[:2] != (B, T) or batch.targets.shape != (B, T):
        raise ValueError(f"logits {tuple(logits.shape)}, memory_keys {tuple(memory_keys.shape)} and "
                         f"batch.targets {tuple(batch.targets.shape)} must share [B, T]")
    vocab_logits = logits.reshape(B * T, V)                                          # [N, V]
    targets = batch.targets.reshape(B * T).to(logits.device)                         # [N]
    valid = targets != IGNORE_INDEX                                                  # [N]
    if layout is None:  # plain CE: the fused kernel
        nll = F.cross_entropy(vocab_logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                              ignore_index=IGNORE_INDEX, reduction="none")
        ce, n_allowed = nll, torch.zeros_like(targets)
    elif not tiled:  # the dense reference, for tests and comparisons
        nll, ce, n_allowed = _dense_nll(vocab_logits, targets, memory_keys.reshape(B * T, -1), batch, layout,
                                        use_local, gather, gather_grad, temperature)
    else:
        check_layout(layout)
        if layout == "local" and not gather:
            # Memory stays inside each segment: segment-batched [B, T, T] blocks, no metadata needed.
            lse_all, lse_pos, n_allowed = memory_lse_local(memory_keys, batch.targets.to(logits.device),
                                                           temperature, IGNORE_INDEX)
        else:
            queries = memory_keys.reshape(B * T, -1)                                 # [N, D]
            meta = token_meta(batch)
            keys, key_labels, key_meta = _memory(queries, targets, meta, gather, gather_grad)
            lse_all, lse_pos, n_allowed = memory_lse_tiled(queries, keys, targets, key_labels, meta, key_meta,
                                                           layout, use_local, temperature, IGNORE_INDEX,
                                                           tile_size)
        nll, ce = combine_vocab_and_memory(vocab_logits, targets, lse_all, lse_pos, IGNORE_INDEX)
        n_allowed = torch.where(valid, n_allowed, torch.zeros_like(n_allowed))
    n_tokens = valid.sum()
    # Every rank reads the whole group, so the loader usually knows the global count: no collective.
    global_tokens = batch.group_tokens if batch.group_tokens is not None else \
        int(tdist.all_reduce_sum(n_tokens.detach()))
    global_tokens = max(global_tokens, 1)
    nll_sum = nll.sum()
    # DeepSpeed averages gradients over W ranks, so scale by W to get the global per-token mean.
    loss = nll_sum / global_tokens * tdist.get_world_size()
    memory_size = float(n_allowed.sum()) / max(int(n_tokens), 1)
    return LossOutput(loss=loss, nll_sum=nll_sum.detach(), ce_sum=ce.detach().sum(), n_tokens=n_tokens,
                      memory_size=memory_size)


def _dense_nll(vocab_logits, targets, queries, batch, layout, use_local, gather, gather_grad, temperature):
    """(nll [N], ce [N], n_allowed [N]) with the dense reference `trime_nll` and an explicit mask."""
    check_layout(layout)
    meta = token_meta(batch)
    keys, key_labels, key_meta = _memory(queries, targets, meta, gather, gather_grad)
    mask = build_memory_mask(meta, key_meta, layout, use_local)                     # [N, M]
    nll = trime_nll(vocab_logits, targets, queries, keys, key_labels, mask, temperature, IGNORE_INDEX)
    ce = combine_vocab_and_memory(vocab_logits, targets, None, None, IGNORE_INDEX)[1]
    n_allowed = (mask & (key_labels != IGNORE_INDEX)[None, :]).sum(1)
    return nll, ce, torch.where(targets != IGNORE_INDEX, n_allowed, torch.zeros_like(n_allowed))
