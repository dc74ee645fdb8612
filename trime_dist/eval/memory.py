"""Eval-time memory as pure functions: the long-term key cache (FIFO), and the TRIME NLL of one window
with in-context memory + per-query retrieved neighbours in ONE softmax, optionally interpolated with
a kNN distribution (DESIGN.md §1, Evaluation). `trime_nll` in objective/trime_loss.py is the reference.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from trime_dist.core.constants import IGNORE_INDEX


class KeyCache:
    """FIFO of (key, label, stream position) of the tokens already scored in the current stream."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.reset()

    def reset(self) -> None:
        self.keys: Optional[torch.Tensor] = None   # [C, D], on the device of the pushed keys
        self.labels = torch.zeros(0, dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)

    def push(self, keys: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> None:
        """Append entries [n, D], [n], [n] (positions increasing); the oldest beyond capacity are dropped."""
        if self.capacity <= 0:
            return
        keep = labels != IGNORE_INDEX
        keys, labels, positions = keys[keep], labels[keep], positions[keep]
        if self.keys is None:  # the first push of a stream decides the device
            self.labels, self.positions = self.labels.to(keys.device), self.positions.to(keys.device)
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys])
        self.labels = torch.cat([self.labels, labels.long()])
        self.positions = torch.cat([self.positions, positions.long()])
        if len(self.labels) > self.capacity:
            self.keys, self.labels, self.positions = (t[-self.capacity:] for t in (self.keys, self.labels,
                                                                                    self.positions))

    def memory(self, before: int, size: int) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """The newest `size` entries at stream positions < before: (keys [m, D] or None, labels [m])."""
        if self.keys is None or size <= 0:
            return None, self.labels[:0]
        n = int(torch.searchsorted(self.positions, torch.tensor(before, device=self.positions.device)))
        lo = max(0, n - size)
        return self.keys[lo:n], self.labels[lo:n]


def _lse(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[N] log Σ_j exp(x_ij) over keep_ij; -inf for empty rows."""
    return torch.logsumexp(x.masked_fill(~keep, float("-inf")), dim=1)


def window_nll(vocab_logits: torch.Tensor, targets: torch.Tensor, queries: torch.Tensor,
               keys: Optional[torch.Tensor], key_labels: Optional[torch.Tensor], mask: Optional[torch.Tensor],
               ext_scores: Optional[torch.Tensor] = None, ext_labels: Optional[torch.Tensor] = None,
               temperatures: Sequence[float] = (1.0,), ext_in_softmax: bool = True,
               knn_lambda: float | Sequence[float] = 0.0,
               knn_temperature: float | Sequence[float] = 1.0) -> torch.Tensor:
    """[n_tau * n_lambda * n_knn_tau, N] -log P(target_i) in nats for each (τ, λ, τ_knn) of the grid (τ slowest);
    0 where target == IGNORE_INDEX. With one λ and one τ_knn (floats): [n_tau, N].

    vocab_logits [N, V]; queries [N, D]; keys [M, D] with key_labels [M] and mask [N, M] (in-context
    memory: earlier window tokens and cached keys; None = no memory); ext_scores [N, K] the datastore's scores
    s_ij of each query's retrieved neighbours (q·k, or -||q - k||^2 for an l2 store) with ext_labels [N, K]
    (IGNORE_INDEX = no neighbour). P_trime: one softmax over the vocabulary, the allowed memory (sim = q·k /
    (sqrt(D)·τ)) and, if ext_in_softmax, the neighbours (sim = s_ij / (sqrt(D)·τ), as TRIME scales them). With
    knn_lambda = λ > 0: P = (1-λ)·P_trime + λ·P_knn, P_knn(y) = Σ_{j: y_j = y} softmax_j(s_ij / τ_knn): τ_knn
    divides the raw score (TRIME's --interp-temp, e.g. 10.5 at d=1024; kNN-LM's L2 distribution is τ_knn = 1).
    """
    lambdas = [knn_lambda] if isinstance(knn_lambda, (int, float)) else list(knn_lambda)
    knn_taus = [knn_temperature] if isinstance(knn_temperature, (int, float)) else list(knn_temperature)
    dtype = torch.promote_types(queries.dtype, torch.float32)
    N, D = queries.shape
    valid = targets != IGNORE_INDEX                                                 # [N]
    tgt = torch.where(valid, targets, torch.zeros_like(targets))                    # [N]
    logits = vocab_logits.to(dtype)
    lse_vocab = torch.logsumexp(logits, 1)                                          # [N]
    tgt_logit = logits.gather(1, tgt[:, None])[:, 0]                                # [N]
    dots = pos_mem = allowed = None
    if keys is not None and keys.shape[0] > 0:
        dots = queries.to(dtype) @ keys.to(dtype).T                                 # [N, M]
        allowed = mask & (key_labels != IGNORE_INDEX)[None, :]                      # [N, M]
        pos_mem = allowed & (key_labels[None, :] == tgt[:, None])                   # [N, M]
    if ext_scores is not None:
        ext_scores = ext_scores.to(dtype)                                           # [N, K]
        ext_ok = ext_labels != IGNORE_INDEX                                         # [N, K]
        ext_pos = ext_ok & (ext_labels == tgt[:, None])                             # [N, K]
    interpolating = any(lam > 0 for lam in lambdas)
    if interpolating and ext_scores is None:
        raise ValueError("kNN interpolation (knn_lambda > 0) needs retrieved neighbours (a datastore)")
    log_p_knn = [knn_log_prob(ext_scores, ext_ok, ext_pos, t) for t in knn_taus] if interpolating else []
    out = []
    for tau in temperatures:
        scale = 1.0 / (math.sqrt(D) * tau)
        den, num = [lse_vocab], [tgt_logit]
        if dots is not None:
            den.append(_lse(dots * scale, allowed))
            num.append(_lse(dots * scale, pos_mem))
        if ext_scores is not None and ext_in_softmax:
            den.append(_lse(ext_scores * scale, ext_ok))
            num.append(_lse(ext_scores * scale, ext_pos))
        log_p = torch.logsumexp(torch.stack(num), 0) - torch.logsumexp(torch.stack(den), 0)  # [N]
        for lam in lambdas:
            for t in range(len(knn_taus)):
                mixed = interpolate(log_p, log_p_knn[t], lam) if lam > 0 else log_p
                out.append(torch.where(valid, -mixed, torch.zeros_like(mixed)))
    return torch.stack(out)


def knn_log_prob(ext_scores: torch.Tensor, ext_ok: torch.Tensor, ext_pos: torch.Tensor,
                 knn_temperature: float) -> torch.Tensor:
    """[N] log P_knn(target): softmax over the neighbours of score / τ_knn, summed over those labelled with the
    target; -inf for a query without neighbours or without its target among them."""
    s = ext_scores / knn_temperature                                                # [N, K]
    lse_all, lse_pos = _lse(s, ext_ok), _lse(s, ext_pos)                            # [N]
    return torch.where(torch.isfinite(lse_pos), lse_pos - lse_all, torch.full_like(lse_all, float("-inf")))


def interpolate(log_p_model: torch.Tensor, log_p_knn: torch.Tensor, knn_lambda: float) -> torch.Tensor:
    """[N] log((1-λ)·P_model + λ·P_knn)."""
    a = log_p_model + math.log1p(-knn_lambda) if knn_lambda < 1 else torch.full_like(log_p_model, float("-inf"))
    return torch.logaddexp(a, log_p_knn + math.log(knn_lambda))
