"""trime_nll_tiled (blockwise, custom backward) against the dense trime_nll: values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from trime_dist.core.constants import IGNORE_INDEX
from trime_dist.objective.masks import TokenMeta, build_memory_mask
from trime_dist.objective.trime_loss import trime_nll, trime_nll_tiled


def random_tokens(g, n_segments, T, n_streams):
    """Metadata for n_segments segments of T tokens dealt to streams, in shuffled token order."""
    stream_of = torch.randint(0, n_streams, (n_segments,), generator=g)
    index_of = torch.zeros(n_segments, dtype=torch.long)
    for s in range(n_segments):  # consecutive indices within each stream
        index_of[s] = int((stream_of[:s] == stream_of[s]).sum())
    row = torch.arange(n_segments).repeat_interleave(T)
    meta = TokenMeta(row=row, position=torch.arange(T).repeat(n_segments), stream=stream_of[row],
                     stream_index=index_of[row])
    return meta.select(torch.randperm(n_segments * T, generator=g))


def random_case(seed, n_seg_q=5, n_seg_k=6, T=7, V=11, d=8, dtype=torch.float32):
    """Queries are the tokens of some segments, keys the tokens of those and more (rectangular)."""
    g = torch.Generator().manual_seed(seed)
    key_meta = random_tokens(g, n_seg_k, T, n_streams=2)
    query_meta = key_meta.select(torch.nonzero(key_meta.row < n_seg_q)[:, 0])
    N, M = len(query_meta), len(key_meta)
    vl = torch.randn(N, V, generator=g, dtype=dtype)
    q = torch.randn(N, d, generator=g, dtype=dtype) * 2
    k = torch.randn(M, d, generator=g, dtype=dtype) * 2
    targets = torch.randint(0, 5, (N,), generator=g)
    key_labels = torch.randint(0, 5, (M,), generator=g)
    targets[torch.rand(N, generator=g) < 0.15] = IGNORE_INDEX
    key_labels[torch.rand(M, generator=g) < 0.15] = IGNORE_INDEX
    return vl, targets, q, k, key_labels, query_meta, key_meta


def values_and_grads(fn, vl, q, k):
    leaves = [x.clone().requires_grad_(True) for x in (vl, q, k)]
    out = fn(*leaves)
    weights = torch.rand(out.shape[0], generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return out.detach(), torch.autograd.grad((out * weights).sum(), leaves)


def assert_tiled_equals_dense(case, layout, use_local, tile_size, temperature=1.0, tol=1e-5, exclude_future=False):
    vl, t, q, k, kl, qm, km = case
    mask = build_memory_mask(qm, km, layout, use_local, exclude_future)
    dense = values_and_grads(lambda a, b, c: trime_nll(a, t, b, c, kl, mask, temperature, IGNORE_INDEX), vl, q, k)
    tiled = values_and_grads(lambda a, b, c: trime_nll_tiled(a, t, b, c, kl, qm, km, layout, use_local,
                                                             temperature, IGNORE_INDEX, tile_size, exclude_future),
                             vl, q, k)
    torch.testing.assert_close(tiled[0], dense[0], rtol=tol, atol=tol)
    for g_tiled, g_dense in zip(tiled[1], dense[1]):
        torch.testing.assert_close(g_tiled, g_dense, rtol=tol, atol=tol)
    return dense, tiled


@pytest.mark.parametrize("layout,use_local", [("none", True), ("local", True), ("long", True), ("external", True),
                                              ("external", False)])
@pytest.mark.parametrize("tile_size", [1, 7, 16, 1024])  # 42 keys: 7 divides M, 16 does not
def test_tiled_matches_dense(layout, use_local, tile_size):
    assert_tiled_equals_dense(random_case(tile_size), layout, use_local, tile_size)


@pytest.mark.parametrize("use_local", [True, False])
@pytest.mark.parametrize("tile_size", [1, 7, 1024])
def test_tiled_matches_dense_without_the_streams_future(use_local, tile_size):
    assert_tiled_equals_dense(random_case(tile_size), "external", use_local, tile_size, exclude_future=True)


def test_tiled_matches_dense_temperature_and_fp64():
    assert_tiled_equals_dense(random_case(11), "external", True, 5, temperature=1.25)
    assert_tiled_equals_dense(random_case(12, dtype=torch.float64), "long", True, 9, tol=1e-12)


def test_tiled_shared_queries_and_keys():
    """Training uses one tensor as both queries and keys: both gradient paths must accumulate."""
    vl, t, q, _, _, qm, _ = random_case(13, n_seg_k=5)
    mask = build_memory_mask(qm, qm, "external")
    leaves = [x.clone().requires_grad_(True) for x in (vl, q)]
    dense = trime_nll(leaves[0], t, leaves[1], leaves[1], t, mask)
    g_dense = torch.autograd.grad(dense.sum(), leaves)
    leaves2 = [x.clone().requires_grad_(True) for x in (vl, q)]
    tiled = trime_nll_tiled(leaves2[0], t, leaves2[1], leaves2[1], t, qm, qm, "external", tile_size=6)
    g_tiled = torch.autograd.grad(tiled.sum(), leaves2)
    torch.testing.assert_close(tiled, dense, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_tiled, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tiled_ignored_rows_and_empty_memory():
    vl, t, q, k, kl, qm, km = random_case(14)
    (out, grads), _ = assert_tiled_equals_dense((vl, t, q, k, kl, qm, km), "local", True, 8)
    ignored = t == IGNORE_INDEX
    assert (out[ignored] == 0).all() and (grads[0][ignored] == 0).all() and (grads[1][ignored] == 0).all()
    first = (qm.position == 0) & ~ignored  # no local memory: plain cross-entropy
    torch.testing.assert_close(out[first], F.cross_entropy(vl[first], t[first], reduction="none"))
    # no keys at all, and only ignored keys
    for keys, labels, meta in [(k[:0], kl[:0], km.slice(0, 0)), (k, torch.full_like(kl, IGNORE_INDEX), km)]:
        tiled = trime_nll_tiled(vl, t, q, keys, labels, qm, meta, "external", tile_size=4)
        torch.testing.assert_close(tiled, F.cross_entropy(vl, t, ignore_index=IGNORE_INDEX, reduction="none"))


def test_tiled_bf16_close_to_fp32():
    vl, t, q, k, kl, qm, km = random_case(15)
    ref = trime_nll_tiled(vl, t, q, k, kl, qm, km, "external", tile_size=8)
    leaves = [x.bfloat16().requires_grad_(True) for x in (vl, q, k)]
    out = trime_nll_tiled(leaves[0], t, leaves[1], leaves[2], kl, qm, km, "external", tile_size=8)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.1)
    grads = torch.autograd.grad(out.sum(), leaves)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def test_tiled_bad_input_raises():
    vl, t, q, k, kl, qm, km = random_case(16)
    with pytest.raises(ValueError, match="key_meta"):
        trime_nll_tiled(vl, t, q, k, kl, qm, qm, "external")
    with pytest.raises(ValueError, match="layout"):
        trime_nll_tiled(vl, t, q, k, kl, qm, km, "nope")


def test_tiled_external_never_syncs_the_host():
    """trime_ext on a GPU must not wait on the host per tile: on the meta device any .item(), bool(),
    nonzero() or .cpu() of the kernel raises, so forward and backward over several tiles (some fully
    masked) run with no host sync at all."""
    vl, t, q, k, kl, qm, km = random_case(17)
    meta = lambda x: x.to("meta")
    qm_m, km_m = (TokenMeta(*(meta(f) for f in (m.row, m.position, m.stream, m.stream_index))) for m in (qm, km))
    leaves = [meta(x).requires_grad_(True) for x in (vl, q, k)]
    out = trime_nll_tiled(leaves[0], meta(t), leaves[1], leaves[2], meta(kl), qm_m, km_m, "external",
                          tile_size=4, exclude_future=True)
    grads = torch.autograd.grad(out.sum(), leaves)
    assert out.device.type == "meta" and [g.shape for g in grads] == [x.shape for x in leaves]
