"""trime_nll (dense TRIME objective) against the paper's formula evaluated row by row in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from trime_dist.core.constants import IGNORE_INDEX
from trime_dist.objective.trime_loss import trime_nll


def reference_nll(vocab_logits, targets, queries, keys, key_labels, mask, temperature, ignore_index):
    """Literally DESIGN.md §1: P(y|c_i) = (exp(E_y·f) + Σ_{j∈M_i, y_j=y} exp(s_ij)) / (Σ_w exp(E_w·f) + Σ_{j∈M_i} exp(s_ij))."""
    d = queries.shape[1]
    rows = []
    for i in range(queries.shape[0]):
        y = int(targets[i])
        if y == ignore_index:
            rows.append(torch.zeros((), dtype=vocab_logits.dtype))
            continue
        numerator = torch.exp(vocab_logits[i, y])
        denominator = torch.exp(vocab_logits[i]).sum()
        for j in range(keys.shape[0]):
            if not bool(mask[i, j]) or int(key_labels[j]) == ignore_index:
                continue
            e = torch.exp(torch.dot(queries[i], keys[j]) / (math.sqrt(d) * temperature))
            denominator = denominator + e
            if int(key_labels[j]) == y:
                numerator = numerator + e
        rows.append(-torch.log(numerator / denominator))
    return torch.stack(rows)


def random_case(seed, N=10, M=13, V=7, d=5, n_labels=4, dtype=torch.float64):
    """Fresh random inputs with ignored targets, ignored keys, empty mask rows and label collisions."""
    g = torch.Generator().manual_seed(seed)
    vocab_logits = torch.randn(N, V, generator=g, dtype=dtype)
    queries = torch.randn(N, d, generator=g, dtype=dtype)
    keys = torch.randn(M, d, generator=g, dtype=dtype)
    targets = torch.randint(0, n_labels, (N,), generator=g)
    key_labels = torch.randint(0, n_labels, (M,), generator=g)
    targets[torch.rand(N, generator=g) < 0.2] = IGNORE_INDEX
    targets[0] = IGNORE_INDEX
    key_labels[torch.rand(M, generator=g) < 0.2] = IGNORE_INDEX
    key_labels[1] = IGNORE_INDEX
    mask = torch.rand(N, M, generator=g) < 0.5
    mask[2] = False                       # a row without memory
    mask[3] = False
    mask[3, 1] = True                     # a row whose only memory entry is an ignored key
    targets[2:4] = 1
    return vocab_logits, targets, queries, keys, key_labels, mask


def _grads(fn, inputs):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    weights = torch.linspace(0.5, 1.5, out.shape[0], dtype=out.dtype)  # a generic upstream gradient
    return out.detach(), torch.autograd.grad((out * weights).sum(), leaves)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [1.0, 1.17])
def test_trime_nll_matches_row_formula(seed, temperature):
    vl, t, q, k, kl, mask = random_case(seed)
    dense = lambda vl_, q_, k_: trime_nll(vl_, t, q_, k_, kl, mask, temperature, IGNORE_INDEX)
    ref = lambda vl_, q_, k_: reference_nll(vl_, t, q_, k_, kl, mask, temperature, IGNORE_INDEX)
    out, grads = _grads(dense, (vl, q, k))
    out_ref, grads_ref = _grads(ref, (vl, q, k))
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_shared_queries_and_keys_gradient():
    """Queries and keys the same tensor (as in training): both gradient paths accumulate."""
    vl, t, q, _, _, mask = random_case(5, M=10)
    mask = mask & ~torch.eye(10, dtype=torch.bool)
    key_labels = t.clone()
    out, grads = _grads(lambda vl_, q_: trime_nll(vl_, t, q_, q_, key_labels, mask, 1.0, IGNORE_INDEX), (vl, q))
    out_ref, grads_ref = _grads(lambda vl_, q_: reference_nll(vl_, t, q_, q_, key_labels, mask, 1.0, IGNORE_INDEX),
                                (vl, q))
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_ignored_targets_zero_and_no_memory_is_cross_entropy():
    vl, t, q, k, kl, mask = random_case(3)
    out, (g_vl, g_q, _) = _grads(lambda a, b, c: trime_nll(a, t, b, c, kl, mask, 1.0, IGNORE_INDEX), (vl, q, k))
    ignored = t == IGNORE_INDEX
    assert ignored.any() and (out[ignored] == 0).all()
    assert (g_vl[ignored] == 0).all() and (g_q[ignored] == 0).all()
    ce = F.cross_entropy(vl[2:4], t[2:4], reduction="none")  # rows 2, 3: no usable memory
    torch.testing.assert_close(out[2:4], ce)
    empty = trime_nll(vl, t, q, k, kl, torch.zeros_like(mask), 1.0, IGNORE_INDEX)
    torch.testing.assert_close(empty, F.cross_entropy(vl, t, ignore_index=IGNORE_INDEX, reduction="none"))


def test_extreme_similarities_stay_finite():
    vl, t, q, k, kl, mask = random_case(4, dtype=torch.float32)
    out, grads = _grads(lambda a, b, c: trime_nll(a, t, b, c, kl, mask, 1.0, IGNORE_INDEX), (vl * 50, q * 100, k * 100))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def test_bf16_smoke():
    vl, t, q, k, kl, mask = random_case(6, dtype=torch.float32)
    out32 = trime_nll(vl, t, q, k, kl, mask, 1.0, IGNORE_INDEX)
    leaves = [x.bfloat16().requires_grad_(True) for x in (vl, q, k)]
    out16 = trime_nll(leaves[0], t, leaves[1], leaves[2], kl, mask, 1.0, IGNORE_INDEX)
    assert out16.dtype == torch.float32  # statistics in fp32
    torch.testing.assert_close(out16, out32, rtol=0.05, atol=0.05)
    grads = torch.autograd.grad(out16.sum(), leaves)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def test_bad_shapes_raise():
    vl, t, q, k, kl, mask = random_case(7)
    with pytest.raises(ValueError, match="mask"):
        trime_nll(vl, t, q, k, kl, mask[:, :-1])
    with pytest.raises(ValueError, match="keys"):
        trime_nll(vl, t, q, k[:, :-1], kl, mask)
