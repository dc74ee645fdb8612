"""Cross-rank memory: the gather collectives and micro_batch_loss on 2 real gloo ranks against one
process holding the whole global batch (values and gradients)."""
import pytest
import torch
import torch.nn.functional as F

from trime_dist.core import distributed as tdist
from trime_dist.core.constants import IGNORE_INDEX
from trime_dist.train.batch import Batch
from trime_dist.train.loss import LossSpec, micro_batch_loss, token_meta

from dist_helpers import run_distributed

W = 2


# ---------------------------------------------------------------- gather primitives

def _gather_worker(rank, world_size, weights):
    """Rank r holds r*2+1 rows (uneven) plus an empty tensor; returns gathered values and grads."""
    out = {}
    for name, fn in [("with_grad", tdist.all_gather_with_grad), ("keep_local", tdist.all_gather_keep_local_grad)]:
        x = (torch.arange((rank * 2 + 1) * 3, dtype=torch.float64).reshape(-1, 3) + 100 * rank).requires_grad_(True)
        gathered = fn(x)
        (grad,) = torch.autograd.grad((gathered * weights[rank]).sum(), [x])
        out[name] = (gathered.detach(), grad)
    out["no_grad"] = tdist.all_gather_no_grad(torch.full((rank, 2), rank))
    out["empty"] = tdist.all_gather_with_grad(torch.zeros(0, 4, requires_grad=True)).shape
    return out


def test_gather_collectives_two_ranks():
    sizes = [1, 3]
    weights = [torch.randn(sum(sizes), 3, dtype=torch.float64) for _ in range(W)]
    results = run_distributed(_gather_worker, W, args=(weights,))
    full = torch.cat([torch.arange(n * 3, dtype=torch.float64).reshape(-1, 3) + 100 * r for r, n in enumerate(sizes)])
    offsets = [0, 1, 4]
    for r, res in enumerate(results):
        mine = slice(offsets[r], offsets[r + 1])
        gathered, grad = res["with_grad"]
        torch.testing.assert_close(gathered, full)
        torch.testing.assert_close(grad, (weights[0] + weights[1])[mine])  # summed over ranks
        gathered, grad = res["keep_local"]
        torch.testing.assert_close(gathered, full)
        torch.testing.assert_close(grad, weights[r][mine])  # only this rank's own loss
        assert torch.equal(res["no_grad"], torch.full((1, 2), 1))
        assert tuple(res["empty"]) == (0, 4)


def test_gather_collectives_single_process_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert tdist.all_gather_with_grad(x) is x and tdist.all_gather_keep_local_grad(x) is x
    assert torch.equal(tdist.all_gather_no_grad(x), x)


# ---------------------------------------------------------------- micro_batch_loss, 2 ranks

S, T, V, D = 4, 6, 11, 8   # global batch: 4 segments; streams (0, 0, 1, 1), stream indices (0, 1, 0, 1)
INTERLEAVED = [[0, 2], [1, 3]]  # rank -> segments: consecutive segments of a stream on different ranks
CONTIGUOUS = [[0, 1], [2, 3]]   # rank -> segments: each rank holds whole streams


def global_batch(seed, pad_lengths):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(S, T, V, generator=g, dtype=torch.float64)
    keys = torch.randn(S, T, D, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, 4, (S, T), generator=g)  # few labels: many memory hits
    for s, n_pad in enumerate(pad_lengths):
        if n_pad:
            targets[s, T - n_pad:] = IGNORE_INDEX
    segs = torch.arange(S)
    batch = Batch(input_ids=targets.clamp(min=0), targets=targets, stream=segs // 2, stream_index=segs % 2, row=segs)
    return logits, keys, batch


def select(logits, keys, batch, idx):
    idx = torch.tensor(idx, dtype=torch.long)
    b = Batch(*(t[idx] for t in (batch.input_ids, batch.targets, batch.stream, batch.stream_index, batch.row)))
    return logits[idx], keys[idx], b


def loss(logits, keys, batch, layout, use_local=True, **spec_fields):
    """micro_batch_loss under a LossSpec of `layout` with the given fields."""
    return micro_batch_loss(logits, keys, batch, LossSpec(layout, **spec_fields), layout, use_local)


def loss_and_grads(logits, keys, batch, layout, **kwargs):
    logits = logits.clone().requires_grad_(True)
    keys = keys.clone().requires_grad_(True)
    out = loss(logits, keys, batch, layout, **kwargs)
    g_logits, g_keys = torch.autograd.grad(out.loss, [logits, keys], allow_unused=True)
    g_keys = torch.zeros_like(keys) if g_keys is None else g_keys
    return dict(loss=out.loss.detach(), nll_sum=out.nll_sum, ce_sum=out.ce_sum, n_tokens=out.n_tokens,
                memory_size=out.memory_size, g_logits=g_logits, g_keys=g_keys)


def _loss_worker(rank, world_size, cases):
    return [loss_and_grads(*case["per_rank"][rank], case["layout"], **case["kwargs"]) for case in cases]


CASES = [  # (name, layout, kwargs, pad lengths per segment[, placement of segments on ranks])
    ("local", "local", dict(gather=True), (0, 2, 5, 1)),
    ("long_contiguous_no_gather", "long", dict(gather=False), (1, 0, 3, 2), CONTIGUOUS),
    ("long", "long", dict(gather=True), (1, 0, 3, 0)),
    ("ext", "external", dict(gather=True), (0, 4, 0, 2)),
    ("ext_no_local", "external", dict(gather=True, use_local=False, tile_size=5), (2, 0, 0, 1)),
    ("ext_dense", "external", dict(gather=True, tiled=False, temperature=1.3), (0, 1, 2, 3)),
    ("ext_rank1_all_pad", "external", dict(gather=True), (0, T, 1, T)),
    ("long_rank1_all_pad", "long", dict(gather=True, tile_size=4), (2, T, 0, T)),
    ("ce", "none", dict(gather=True), (0, 3, 1, 0)),
    ("ext_detached", "external", dict(gather=True, gather_grad=False), (0, 4, 0, 2)),
]


@pytest.fixture(scope="module")
def two_rank_results():
    cases, references = [], []
    for i, (name, layout, kwargs, pads, *placement) in enumerate(CASES):
        logits, keys, batch = global_batch(i, pads)
        per_rank = [select(logits, keys, batch, idx) for idx in (placement or [INTERLEAVED])[0]]
        cases.append(dict(per_rank=per_rank, layout=layout, kwargs=kwargs))
        ref_kwargs = dict(kwargs, gather=False, tiled=False, gather_grad=True)  # one process, dense
        references.append(loss_and_grads(logits, keys, batch, layout, **ref_kwargs))
    return references, run_distributed(_loss_worker, W, args=(cases,))


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_two_ranks_match_one_process(two_rank_results, case):
    references, ranks = two_rank_results
    ref, res = references[case], [ranks[r][case] for r in range(W)]
    detached = CASES[case][2].get("gather_grad") is False
    placement = (CASES[case][4:] or [INTERLEAVED])[0]
    torch.testing.assert_close(sum(r["loss"] for r in res) / W, ref["loss"])
    torch.testing.assert_close(sum(r["nll_sum"] for r in res), ref["nll_sum"])
    torch.testing.assert_close(sum(r["ce_sum"] for r in res), ref["ce_sum"])
    assert sum(int(r["n_tokens"]) for r in res) == int(ref["n_tokens"])
    assert sum(r["memory_size"] * int(r["n_tokens"]) for r in res) == pytest.approx(
        ref["memory_size"] * int(ref["n_tokens"]))
    for r, idx in enumerate(placement):
        # each rank backwards its own loss; DeepSpeed then averages the W ranks' gradients
        torch.testing.assert_close(res[r]["g_logits"] / W, ref["g_logits"][idx])
        if not detached:
            torch.testing.assert_close(res[r]["g_keys"] / W, ref["g_keys"][idx])
    if detached:  # original TRIME code: remote keys get no gradient from other ranks' queries
        assert not torch.allclose(torch.cat([res[r]["g_keys"] / W for r in range(W)]),
                                  ref["g_keys"][sum(INTERLEAVED, [])])


def test_all_pad_rank_contributes_nothing(two_rank_results):
    _, ranks = two_rank_results
    case = [c[0] for c in CASES].index("ext_rank1_all_pad")
    res = ranks[1][case]
    assert int(res["n_tokens"]) == 0 and float(res["loss"]) == 0.0 and res["memory_size"] == 0.0
    assert (res["g_logits"] == 0).all()
    assert (res["g_keys"] == 0).all()  # its keys are all pads: never memory


# ---------------------------------------------------------------- single process

def test_ce_layout_is_mean_cross_entropy():
    logits, keys, batch = global_batch(0, (0, 2, 6, 1))
    out = loss(logits, keys, batch, "none")
    ref = F.cross_entropy(logits.reshape(-1, V), batch.targets.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(out.nll_sum, out.ce_sum)
    assert int(out.n_tokens) == batch.n_tokens and out.memory_size == 0.0


def test_local_memory_size_and_tiled_equals_dense():
    logits, keys, batch = global_batch(1, (0, 0, 0, 0))
    tiled = loss(logits, keys, batch, "local", tile_size=5)
    dense = loss(logits, keys, batch, "local", tiled=False)
    torch.testing.assert_close(tiled.loss, dense.loss)
    assert tiled.memory_size == dense.memory_size == pytest.approx(sum(range(T)) / T)  # j < i in each segment


def test_token_meta_rows_follow_targets():
    _, _, batch = global_batch(2, (0, 0, 0, 0))
    meta = token_meta(batch)
    assert torch.equal(meta.row.reshape(S, T)[:, 0], batch.row)
    assert torch.equal(meta.position.reshape(S, T)[1], torch.arange(T))
    assert torch.equal(meta.stream_index.reshape(S, T)[:, -1], batch.stream_index)


def test_gather_is_identity_in_one_process_and_bf16_smoke():
    logits, keys, batch = global_batch(3, (0, 1, 2, 3))
    plain = loss(logits, keys, batch, "external")
    gathered = loss(logits, keys, batch, "external", gather=True)
    torch.testing.assert_close(gathered.loss, plain.loss)
    lo, ke = logits.bfloat16().requires_grad_(True), keys.bfloat16().requires_grad_(True)
    out = loss(lo, ke, batch, "external", tile_size=7)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), plain.loss, rtol=0.03, atol=0.03)
    out.loss.backward()
    assert torch.isfinite(lo.grad).all() and torch.isfinite(ke.grad).all()
