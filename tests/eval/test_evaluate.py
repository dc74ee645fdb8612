"""`trime eval`: the eval-time objective against trime_nll (float64, dense), kNN interpolation against an
explicit per-label sum, the long-term FIFO against a direct construction, sliding windows, and whole
passes against the training objective's masks."""
import math

import numpy as np
import pytest
import torch

from trime_dist.core.constants import IGNORE_INDEX
from trime_dist.eval.memory import KeyCache, window_nll
from trime_dist.eval.windows import iter_windows
from trime_dist.model.config import ModelConfig
from trime_dist.model.export import export_model
from trime_dist.model.transformer import build_model
from trime_dist.objective.masks import TokenMeta, build_memory_mask
from trime_dist.objective.trime_loss import trime_nll

from shard_fixtures import write_segment_dir


def _eval_case(seed, N=7, n=10, m=5, K=4, V=5, D=6):
    """Random float64 window: n window keys (queries = the last N), m cached keys, K neighbours per query."""
    g = torch.Generator().manual_seed(seed)
    s0 = n - N
    window_keys = torch.randn(n, D, generator=g, dtype=torch.float64)
    window_labels = torch.randint(0, V, (n,), generator=g)
    window_labels[2] = IGNORE_INDEX
    targets = window_labels[s0:].clone()
    targets[1] = IGNORE_INDEX
    cache_keys = torch.randn(m, D, generator=g, dtype=torch.float64)
    cache_labels = torch.randint(0, V, (m,), generator=g)
    ext_keys = torch.randn(N, K, D, generator=g, dtype=torch.float64)
    ext_labels = torch.randint(0, V, (N, K), generator=g)
    ext_labels[0, 1] = IGNORE_INDEX  # a missing neighbour
    logits = torch.randn(N, V, generator=g, dtype=torch.float64)
    return locals()


def _reference(c, tau, ext_in_softmax=True):
    """trime_nll over the concatenated key set [cache | window | N*K neighbours] with an explicit mask."""
    N, K, m, n, s0 = c["N"], c["K"], c["m"], c["n"], c["s0"]
    queries = c["window_keys"][s0:]
    keys = [c["cache_keys"], c["window_keys"]]
    labels = [c["cache_labels"], c["window_labels"]]
    mask = [torch.ones(N, m, dtype=torch.bool), torch.arange(n)[None, :] < torch.arange(s0, n)[:, None]]
    if ext_in_softmax:
        keys.append(c["ext_keys"].reshape(N * K, -1))
        labels.append(c["ext_labels"].reshape(-1))
        mask.append(torch.arange(N * K)[None, :] // K == torch.arange(N)[:, None])  # query i sees its own K
    return trime_nll(c["logits"], c["targets"], queries, torch.cat(keys), torch.cat(labels), torch.cat(mask, 1),
                     temperature=tau, ignore_index=IGNORE_INDEX)


def _ours(c, taus, ext_in_softmax=True, **kw):
    N, s0 = c["N"], c["s0"]
    queries = c["window_keys"][s0:]
    keys = torch.cat([c["cache_keys"], c["window_keys"]])
    labels = torch.cat([c["cache_labels"], c["window_labels"]])
    mask = torch.cat([torch.ones(N, c["m"], dtype=torch.bool),
                      torch.arange(c["n"])[None, :] < torch.arange(s0, c["n"])[:, None]], 1)
    scores = torch.einsum("nd,nkd->nk", queries, c["ext_keys"])                    # [N, K] raw q·k
    return window_nll(c["logits"], c["targets"], queries, keys, labels, mask, scores, c["ext_labels"], taus,
                      ext_in_softmax=ext_in_softmax, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_nll_matches_dense_reference(seed):
    c = _eval_case(seed)
    taus = [0.7, 1.0, 1.3]
    ours = _ours(c, taus)
    for t, tau in enumerate(taus):
        torch.testing.assert_close(ours[t], _reference(c, tau), rtol=1e-10, atol=1e-10)
    assert ours[0, 1] == 0  # ignored target


def test_knn_interpolation_matches_explicit_sum():
    """P_knn = softmax(q·k / τ_knn) over the neighbours: τ_knn is the raw scale (no sqrt(d)), as TRIME's
    --interp-temp and kNN-LM's temperature are."""
    c = _eval_case(5)
    lam, tau_knn = 0.3, 2.5
    ours = _ours(c, [1.1], ext_in_softmax=False, knn_lambda=lam, knn_temperature=tau_knn)[0]
    p_trime = torch.exp(-_reference(c, 1.1, ext_in_softmax=False))
    queries = c["window_keys"][c["s0"]:]
    for i in range(c["N"]):
        if c["targets"][i] == IGNORE_INDEX:
            assert ours[i] == 0
            continue
        weights = {}
        for j in range(c["K"]):
            y = int(c["ext_labels"][i, j])
            if y != IGNORE_INDEX:
                s = float(queries[i] @ c["ext_keys"][i, j]) / tau_knn
                weights[y] = weights.get(y, 0.0) + math.exp(s)
        p_knn = weights.get(int(c["targets"][i]), 0.0) / sum(weights.values())
        expected = -math.log((1 - lam) * float(p_trime[i]) + lam * p_knn)
        assert float(ours[i]) == pytest.approx(expected, rel=1e-10)


def test_grid_of_tau_lambda_and_knn_temperature_equals_each_point_alone():
    """One call over a (τ, λ, τ_knn) grid gives, row by row in τ-major order, what each point gives alone."""
    c = _eval_case(6)
    taus, lams, knn_taus = [0.8, 1.2], [0.0, 0.25, 0.6], [0.5, 3.0]
    for ext_in_softmax in (False, True):
        grid = _ours(c, taus, ext_in_softmax=ext_in_softmax, knn_lambda=lams, knn_temperature=knn_taus)
        assert grid.shape == (len(taus) * len(lams) * len(knn_taus), c["N"])
        row = 0
        for tau in taus:
            for lam in lams:
                for kt in knn_taus:
                    alone = _ours(c, [tau], ext_in_softmax=ext_in_softmax, knn_lambda=lam, knn_temperature=kt)[0]
                    torch.testing.assert_close(grid[row], alone, rtol=0, atol=0)
                    row += 1
        # λ = 0 rows do not depend on τ_knn; λ > 0 rows do
        assert torch.equal(grid[0], grid[1]) and not torch.equal(grid[2], grid[3])


def test_query_without_neighbours_is_plain_model():
    c = _eval_case(3)
    c["ext_labels"][:] = IGNORE_INDEX
    ours = _ours(c, [1.0], ext_in_softmax=True, knn_lambda=0.5)[0]
    ref = _reference(c, 1.0, ext_in_softmax=False) - math.log(0.5)  # P = 0.5 * P_trime
    valid = c["targets"] != IGNORE_INDEX
    torch.testing.assert_close(ours[valid], ref[valid], rtol=1e-10, atol=1e-10)


def test_key_cache_is_newest_entries_before_the_window():
    rng = np.random.default_rng(0)
    cache, pushed = KeyCache(capacity=13 + 4), []
    pos = 0
    for _ in range(12):
        start = max(0, pos - 4)                          # windows overlap by up to 4 context positions
        mem_keys, mem_labels = cache.memory(before=start, size=13)
        direct = [e for e in pushed if e[2] < start][-13:]
        got = [] if mem_keys is None else list(zip(mem_keys[:, 0].tolist(), mem_labels.tolist()))
        assert got == [(float(k), int(y)) for k, y, _ in direct]
        n = int(rng.integers(1, 7))
        keys = torch.arange(pos, pos + n, dtype=torch.float64)[:, None].repeat(1, 3)
        labels = torch.from_numpy(rng.integers(0, 5, n))
        labels[rng.random(n) < 0.2] = IGNORE_INDEX               # pads are never memory
        cache.push(keys, labels, torch.arange(pos, pos + n))
        pushed += [(float(pos + i), int(labels[i]), pos + i) for i in range(n) if labels[i] != IGNORE_INDEX]
        pos += n


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    manifest = write_segment_dir(str(root / "test"), [70, 45, 16, 90], seq_len=16, vocab_size=40, per_shard=3)
    model_cfg = ModelConfig(vocab_size=40, d_model=16, n_heads=2, d_ffn=32, max_seq_len=16)
    export_model(build_model(model_cfg, seed=3).state_dict(), model_cfg, str(root / "run"),
                 {"step": 0, "tokenizer_sha256": "0" * 64, "train_manifest_sha256": "x", "seq_len": 16})
    return root, manifest


@pytest.mark.parametrize("context", [0, 5, 12])
def test_windows_score_every_stream_position_once(small_split, context):
    from shard_fixtures import all_segments

    root, manifest = small_split
    streams = {}
    for key, tokens in sorted(all_segments(str(root / "test")).items()):
        s = int(key.split("-")[0])
        streams[s] = tokens if s not in streams else np.concatenate([streams[s], tokens[1:]])
    scored = {s: [] for s in streams}
    for w in iter_windows(str(root / "test"), manifest, 16, context):
        assert 1 <= w.length <= 16
        np.testing.assert_array_equal(w.tokens, streams[w.stream][w.start:w.start + w.length + 1])
        scored[w.stream] += list(range(w.start + w.score_from, w.start + w.length))
        assert w.score_from in (0, context)
    for s, tokens in streams.items():
        assert scored[s] == list(range(len(tokens) - 1))


@pytest.mark.parametrize("memory,layout", [("local", "local"), ("long", "long")])
def test_eval_pass_equals_training_objective(small_split, memory, layout):
    """Segments as windows, an unbounded cache: eval's local / long = trime_nll with the training masks."""
    from trime_dist.eval.evaluate import EvalSetting, eval_pass, forward_windows
    from trime_dist.model.export import load_model

    root, manifest = small_split
    model, _ = load_model(str(root / "run"))
    setting = EvalSetting(model="m", memory=memory, mem_size=10_000, temperature=1.2)
    got = eval_pass(model, str(root / "test"), manifest, [setting], {}, [[1.2]], batch_size=3)["settings"][0]
    windows = list(iter_windows(str(root / "test"), manifest, 16))
    logits, keys, targets = forward_windows(model.double(), windows, 0)            # [B, T, *]
    B, T = targets.shape
    meta = TokenMeta(row=torch.arange(B).repeat_interleave(T), position=torch.arange(T).repeat(B),
                     stream=torch.tensor([w.stream for w in windows]).repeat_interleave(T),
                     stream_index=torch.tensor([w.start // 16 for w in windows]).repeat_interleave(T))
    flat_t = targets.reshape(-1)
    q = keys.reshape(B * T, -1)
    ref = trime_nll(logits.reshape(B * T, -1), flat_t, q, q, flat_t, build_memory_mask(meta, meta, layout),
                    temperature=1.2)
    assert got["tokens"] == int((flat_t != IGNORE_INDEX).sum()) == manifest["tokens"]
    assert got["nll"][0] == pytest.approx(float(ref.sum()), rel=1e-5)


def test_setting_parsing_and_validation():
    from trime_dist.eval.cli import parse_setting
    from trime_dist.eval.evaluate import EvalSetting

    base = EvalSetting(model="runs/a", k=8)
    s = parse_setting("name=knn,memory=none,datastore=ds,knn_lambda=0.25,k=16", base)
    assert (s.name, s.memory, s.datastore, s.knn_lambda, s.k, s.model) == ("knn", "none", "ds", 0.25, 16, "runs/a")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_setting("colour=red", base)
    with pytest.raises(ValueError, match="needs a datastore"):
        EvalSetting(model="m", memory="external").validate()
