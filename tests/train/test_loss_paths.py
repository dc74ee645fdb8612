"""micro_batch_loss's fast paths (segment-batched local, tiled long/ext) against the dense reference."""
import pytest
import torch

from trime_dist.train.batch import IGNORE_INDEX, Batch
from trime_dist.train.loss import micro_batch_loss


def _batch(B=4, T=9, V=11, seed=0, known_tokens=True):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 5, (B, T), generator=g)  # few labels: many positives in memory
    targets[1, 6:] = IGNORE_INDEX                         # a short segment (padding)
    targets[3, :] = IGNORE_INDEX                          # an all-padding row
    batch = Batch(input_ids=torch.zeros(B, T, dtype=torch.long), targets=targets,
                  stream=torch.tensor([0, 0, 1, 1]), order=torch.tensor([0, 1, 0, 1]), segment=torch.arange(B),
                  group_tokens=int((targets != IGNORE_INDEX).sum()) if known_tokens else None)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(B, T, 6, generator=g, dtype=torch.float64, requires_grad=True)
    return logits, keys, batch


@pytest.mark.parametrize("layout", [None, "local", "long", "ext"])
@pytest.mark.parametrize("use_local", [True, False])
def test_fast_paths_match_dense(layout, use_local):
    results = []
    for tiled in (False, True):
        logits, keys, batch = _batch()
        out = micro_batch_loss(logits, keys, batch, layout, use_local=use_local, tiled=tiled, tile_size=5,
                               temperature=1.3)
        out.loss.backward()
        results.append((out, logits.grad, keys.grad))
    (dense, dl, dk), (fast, fl, fk) = results
    torch.testing.assert_close(fast.loss, dense.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.ce_sum, dense.ce_sum, rtol=1e-10, atol=1e-12)
    assert fast.memory_size == pytest.approx(dense.memory_size)
    torch.testing.assert_close(fl, dl, rtol=1e-9, atol=1e-12)
    if layout is not None:
        torch.testing.assert_close(fk, dk, rtol=1e-9, atol=1e-12)


def test_group_tokens_equals_all_reduced_count():
    a = micro_batch_loss(*_batch(known_tokens=True), "local")
    b = micro_batch_loss(*_batch(known_tokens=False), "local")
    torch.testing.assert_close(a.loss, b.loss)
