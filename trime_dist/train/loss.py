"""The loss of one micro-batch: what it is (LossSpec, built once from the config) and how it is computed.

One batch's walk: the loop asks the spec for this step's memory layout; `micro_batch_loss` builds the
memory (this rank's keys, or every rank's through trime_dist.core.distributed), runs the objective
functions (trime_dist.objective) over it, and `loss_to_backward` scales the NLL sum so that W ranks ×
B segments train exactly like one process with W·B.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from trime_dist.core import distributed as tdist
from trime_dist.core.config import require
from trime_dist.core.constants import (
    IGNORE_INDEX,
    OBJECTIVE_LAYOUTS,
    OBJECTIVES,
    PLACEMENTS,
)
from trime_dist.objective.masks import TokenMeta, build_memory_mask, check_layout
from trime_dist.objective.trime_loss import (
    combine_vocab_and_memory,
    memory_lse_local,
    memory_lse_tiled,
    trime_nll,
)
from trime_dist.train.batch import Batch

if TYPE_CHECKING:
    from trime_dist.train.config import TrainConfig


# ----------------------------------------------------------------------------- the spec

@dataclass(frozen=True)
class LossSpec:
    """The run's loss, fixed for the whole run; `build_loss_spec(cfg)` makes it from the config."""
    layout: str = "local"          # memory layout of objective.name: none | local | long | external
    gather: bool = False           # memory spans ranks: external always, long when data.placement=interleaved
    gather_grad: bool = True       # gathered keys send gradients back (False: detached, as the original code)
    temperature: float = 1.0       # tau in s = q.k / (sqrt(d) * tau)
    tiled: bool = True             # the tiled objective (False: the dense reference, for tests)
    tile_size: int = 4096          # queries and keys per tile of the tiled objective
    cross_sent_ratio: float = 0.0  # external: probability that a step switches off local memory
    exclude_future: bool = False   # external: not the later segments of the query's own stream
    ce_warmup_steps: int = 0       # plain cross-entropy for the first N optimizer steps
    ce_warmup_epochs: int = 0      # ... or for the first N epochs
    seed: int = 0                  # run.seed: seeds the per-step cross_sent_ratio draw

    def __post_init__(self):
        check_layout(self.layout)

    def step_memory(self, step: int, epoch: int, rank: int = 0, micro_step: int = 0) -> tuple[str, bool]:
        """(layout, use_local) of micro-batch `micro_step` of optimizer step `step` in `epoch` on `rank`:
        "none" during the CE warm-up (the same on every rank). For external memory, use_local is drawn
        per rank and micro-batch, as the original draws per forward pass on each GPU, from a seed of
        (run.seed, step, rank, micro_step): reproducible without communicating (rank 0's first
        micro-batch draws what one draw per step did before)."""
        if self.layout == "none" or step < self.ce_warmup_steps or epoch < self.ce_warmup_epochs:
            return "none", True
        use_local = True
        if self.layout == "external":
            seed = self.seed * 7_919 + step + 104_729 * (rank * 65_536 + micro_step)
            use_local = random.Random(seed).random() >= self.cross_sent_ratio
        return self.layout, use_local

    def for_validation(self) -> "LossSpec":
        """Validation memory stays within this rank's segments, never gathered (cheap, and the same for
        any number of ranks): local for ce and external runs, else the run's layout."""
        return replace(self, layout="local" if self.layout in ("none", "external") else self.layout, gather=False)


def build_loss_spec(cfg: "TrainConfig") -> LossSpec:
    """The LossSpec of a training config; raises ConfigError naming a bad objective.name / data.placement."""
    o, m = cfg.objective, cfg.memory
    require(o.name in OBJECTIVE_LAYOUTS, "objective.name", f"got {o.name!r}, allowed: {', '.join(OBJECTIVES)}")
    require(cfg.data.placement in PLACEMENTS, "data.placement",
            f"got {cfg.data.placement!r}, allowed: {', '.join(PLACEMENTS)}")
    layout = OBJECTIVE_LAYOUTS[o.name]
    # Memory spans ranks for external always; for long only when a stream's consecutive segments are
    # dealt to different ranks (interleaved); local and none stay on the rank.
    gather = layout == "external" or (layout == "long" and cfg.data.placement == "interleaved")
    return LossSpec(layout=layout, gather=gather, gather_grad=m.gather_grad, temperature=o.temperature,
                    tiled=m.tiled, tile_size=m.tile_size, cross_sent_ratio=o.cross_sent_ratio,
                    exclude_future=o.ext_exclude_future and layout == "external",
                    ce_warmup_steps=o.ce_warmup_steps, ce_warmup_epochs=o.ce_warmup_epochs, seed=cfg.run.seed)


# ----------------------------------------------------------------------------- one micro-batch

@dataclass
class LossOutput:
    loss: torch.Tensor      # scalar to backward (see loss_to_backward)
    nll_sum: torch.Tensor   # detached, this rank's sum of TRIME NLL (nats)
    ce_sum: torch.Tensor    # detached, this rank's sum of plain CE from the same logits
    n_tokens: torch.Tensor  # this rank's non-pad target count
    memory_size: float      # mean number of allowed memory entries per (non-pad) query on this rank


def micro_batch_loss(logits: torch.Tensor, memory_keys: torch.Tensor, batch: Batch, spec: LossSpec,
                     layout: str, use_local: bool = True) -> LossOutput:
    """TRIME loss of this rank's micro-batch under this step's layout and use_local (spec.step_memory).
    logits [B, T, V], memory_keys [B, T, D] (the queries and keys g(c)). With spec.gather every rank's
    non-pad keys form the memory of every rank's queries (gradients sent back to the producing rank
    unless spec.gather_grad=False, the original TRIME code's detached remote keys)."""
    B, T, V = logits.shape
    if memory_keys.shape[:2] != (B, T) or batch.targets.shape != (B, T):
        raise ValueError(f"logits {tuple(logits.shape)}, memory_keys {tuple(memory_keys.shape)} and "
                         f"batch.targets {tuple(batch.targets.shape)} must share [B, T]")
    check_layout(layout)
    vocab_logits = logits.reshape(B * T, V)                                          # [N, V]
    targets = batch.targets.reshape(B * T).to(logits.device)                         # [N]
    nll, ce, n_allowed = _token_nll(vocab_logits, targets, memory_keys, batch, spec, layout, use_local)
    n_tokens = (targets != IGNORE_INDEX).sum()
    nll_sum = nll.sum()
    memory_size = float(n_allowed.sum()) / max(int(n_tokens), 1)
    return LossOutput(loss=loss_to_backward(nll_sum, n_tokens, batch.group_tokens), nll_sum=nll_sum.detach(),
                      ce_sum=ce.detach().sum(), n_tokens=n_tokens, memory_size=memory_size)


def loss_to_backward(nll_sum: torch.Tensor, n_tokens: torch.Tensor, group_tokens: Optional[int]) -> torch.Tensor:
    """The scalar this rank backwards: nll_sum / N_group × W. The one place loss scaling happens.

    - N_group is the non-pad target count of the whole group (every rank's micro-batch), not this
      rank's: the objective is the group's per-token mean, so a rank with more padding weighs less,
      as in one process holding the group. The loader knows it (batch.group_tokens: every rank reads
      the whole group); without it, one all-reduce of the ranks' n_tokens.
    - ×W: DeepSpeed averages gradients over the W data-parallel ranks. The ranks' gradients of
      nll_sum_r / N_group sum to the gradient of the group's mean, so ×W undoes the average.
    - DeepSpeed also divides by gradient_accumulation_steps: an optimizer step follows the mean over
      its micro-batches of each group's per-token mean NLL.
    """
    global_tokens = group_tokens if group_tokens is not None else int(tdist.all_reduce_sum(n_tokens.detach()))
    return nll_sum / max(global_tokens, 1) * tdist.get_world_size()


def _token_nll(vocab_logits, targets, memory_keys, batch: Batch, spec: LossSpec, layout: str, use_local: bool):
    """(nll [N], ce [N], n_allowed [N]) of every token under `layout`: 0 at padding."""
    if layout == "none":  # plain CE: the fused kernel
        nll = F.cross_entropy(vocab_logits.to(torch.promote_types(vocab_logits.dtype, torch.float32)), targets,
                              ignore_index=IGNORE_INDEX, reduction="none")
        return nll, nll, torch.zeros_like(targets)
    B, T, _ = memory_keys.shape
    queries = memory_keys.reshape(B * T, -1)                                         # [N, D]
    if not spec.tiled:  # the dense reference, for tests and comparisons
        return _dense_nll(vocab_logits, targets, queries, batch, spec, layout, use_local)
    if layout == "local" and not spec.gather:
        # Memory stays inside each segment: segment-batched [B, T, T] blocks, no metadata needed.
        lse_all, lse_pos, n_allowed = memory_lse_local(memory_keys, batch.targets.to(targets.device),
                                                       spec.temperature, IGNORE_INDEX)
    else:
        meta = token_meta(batch)
        keys, key_labels, key_meta = build_memory(queries, targets, meta, spec.gather, spec.gather_grad)
        lse_all, lse_pos, n_allowed = memory_lse_tiled(queries, keys, targets, key_labels, meta, key_meta, layout,
                                                       use_local, spec.temperature, IGNORE_INDEX, spec.tile_size,
                                                       spec.exclude_future)
    nll, ce = combine_vocab_and_memory(vocab_logits, targets, lse_all, lse_pos, IGNORE_INDEX)
    return nll, ce, torch.where(targets != IGNORE_INDEX, n_allowed, torch.zeros_like(n_allowed))


def _dense_nll(vocab_logits, targets, queries, batch: Batch, spec: LossSpec, layout: str, use_local: bool):
    """(nll [N], ce [N], n_allowed [N]) with the dense reference `trime_nll` and an explicit mask."""
    meta = token_meta(batch)
    keys, key_labels, key_meta = build_memory(queries, targets, meta, spec.gather, spec.gather_grad)
    mask = build_memory_mask(meta, key_meta, layout, use_local, spec.exclude_future)   # [N, M]
    nll = trime_nll(vocab_logits, targets, queries, keys, key_labels, mask, spec.temperature, IGNORE_INDEX)
    ce = combine_vocab_and_memory(vocab_logits, targets, None, None, IGNORE_INDEX)[1]
    n_allowed = (mask & (key_labels != IGNORE_INDEX)[None, :]).sum(1)
    return nll, ce, torch.where(targets != IGNORE_INDEX, n_allowed, torch.zeros_like(n_allowed))


# ----------------------------------------------------------------------------- the memory

def token_meta(batch: Batch) -> TokenMeta:
    """[B*T] metadata of every token of the batch (row-major, like targets.reshape(-1))."""
    B, T = batch.targets.shape
    device = batch.targets.device
    per_token = lambda x: x.long().to(device).repeat_interleave(T)  # [B] -> [B*T]
    return TokenMeta(row=per_token(batch.row), position=torch.arange(T, device=device).repeat(B),
                     stream=per_token(batch.stream), stream_index=per_token(batch.stream_index))


def build_memory(queries, targets, meta: TokenMeta, gather: bool, gather_grad: bool):
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
