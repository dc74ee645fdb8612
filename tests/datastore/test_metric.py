"""`trime datastore build --metric l2` (kNN-LM's default): an L2 faiss index, recorded in datastore.json, and eval /
exact search / --rescore scoring neighbours with -||q - k||^2, against float64 dense references on Flat stores."""
import json
import math

import numpy as np
import pytest
import torch

from trime_dist.core.constants import IGNORE_INDEX
from trime_dist.model.config import ModelConfig
from trime_dist.model.export import export_model, load_model
from trime_dist.model.transformer import build_model

from cli_runner import run_trime
from shard_fixtures import write_segment_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("l2")
    write_segment_dir(str(root / "train"), [130] * 4 + [41], seq_len=16, vocab_size=40, per_shard=7, noise=0.3)
    write_segment_dir(str(root / "test"), [60, 33], seq_len=16, vocab_size=40, per_shard=7, noise=0.3, seed=9)
    cfg = ModelConfig(vocab_size=40, d_model=16, n_heads=2, d_ffn=32, max_seq_len=16)
    export_model(build_model(cfg, seed=0).state_dict(), cfg, str(root / "run"),
                 {"step": 0, "tokenizer_sha256": "0" * 64, "train_manifest_sha256": "x", "seq_len": 16})
    return root


def _build(root, out, metric, factory="Flat", ranks=1, check=True):
    args = ["datastore", "build", "--model", str(root / "run"), "--data", str(root / "train"), "--out", str(out),
            "--factory", factory, "--metric", metric, "--part-segments", "9", "--threads", "1"]
    return run_trime(args, ranks, launcher="mpi", check=check, timeout=300)


def _reference_nll(model, root, store_keys, store_values, k, tau, lam, knn_tau, external):
    """float64, dense, one window at a time: exact L2 neighbours of each query among all stored keys; P_trime over
    vocabulary + earlier window tokens (q·k / (sqrt(D)·τ)) + (if external) the neighbours (-d² / (sqrt(D)·τ));
    P = (1-λ)·P_trime + λ·softmax(-d² / τ_knn) summed over the neighbours labelled with the target."""
    from trime_dist.core import shards
    from trime_dist.eval.evaluate import forward_windows
    from trime_dist.eval.windows import iter_windows

    manifest = shards.read_manifest(str(root / "test"))
    keys64 = store_keys.astype(np.float64)
    total, count = 0.0, 0
    for w in iter_windows(str(root / "test"), manifest, 16):
        logits, q, t = (x[0, :w.length].double().numpy() for x in forward_windows(model, [w], 0))
        t = t.astype(np.int64)
        D = q.shape[1]
        for i in range(w.length):
            if t[i] == IGNORE_INDEX:
                continue
            d2 = ((keys64 - q[i]) ** 2).sum(1)                                          # [M]
            nn = np.argsort(d2, kind="stable")[:k]
            terms = [(logits[i, y], y) for y in range(logits.shape[1])]
            terms += [(q[i] @ q[j] / (math.sqrt(D) * tau), t[j]) for j in range(i) if t[j] != IGNORE_INDEX]
            if external:
                terms += [(-d2[j] / (math.sqrt(D) * tau), store_values[j]) for j in nn]
            z = max(s for s, _ in terms)
            den = sum(math.exp(s - z) for s, _ in terms)
            p_trime = sum(math.exp(s - z) for s, y in terms if y == t[i]) / den
            kz = max(-d2[nn]) / knn_tau
            w_knn = np.exp(-d2[nn] / knn_tau - kz)
            p_knn = w_knn[store_values[nn] == t[i]].sum() / w_knn.sum()
            total -= math.log((1 - lam) * p_trime + lam * p_knn)
            count += 1
    return total, count


@pytest.mark.parametrize("external", [False, True])
def test_l2_store_eval_equals_float64_dense_reference(setup, tmp_path, external):
    """kNN-LM with an L2 Flat store (memory none + λ) and TrimeLM_ext's in-softmax path on it, through the
    faiss index and through --search exact: the float64 reference's loss."""
    from trime_dist.core import shards
    from trime_dist.datastore.store import open_datastore
    from trime_dist.eval.evaluate import EvalSetting, eval_pass

    _build(setup, tmp_path / "ds", "l2")
    ds = open_datastore(str(tmp_path / "ds"))
    assert ds.meta["metric"] == "l2" and ds.metric == "l2"
    model, _ = load_model(str(setup / "run"))
    manifest = shards.read_manifest(str(setup / "test"))
    k, tau, lam, knn_tau = 9, 1.3, 0.4, 2.0
    setting = EvalSetting(model="m", memory="local" if not external else "external", datastore=ds.path, k=k,
                          mem_size=0, knn_lambda=lam, knn_temperature=knn_tau)
    want, n = _reference_nll(model, setup, ds.all_keys(), ds.values.astype(np.int64), k, tau, lam, knn_tau,
                             external)
    got = eval_pass(model, str(setup / "test"), manifest, [setting], {ds.path: ds}, [[tau]], batch_size=4)
    assert got["settings"][0]["tokens"] == n
    assert got["settings"][0]["nll"][0] == pytest.approx(want, rel=1e-5)
    ds.use_exact_search(torch.device("cpu"))
    exact = eval_pass(model, str(setup / "test"), manifest, [setting], {ds.path: ds}, [[tau]], batch_size=4)
    assert exact["settings"][0]["nll"][0] == pytest.approx(want, rel=1e-5)


def test_l2_ivf_store_rescore_and_cli(setup, tmp_path, capsys):
    """An IVF-PQ L2 store: --rescore recomputes -||q - k||^2 from the stored keys (float64 reference); the rows
    say metric l2; an inner-product store of the same keys ranks other neighbours first."""
    from trime_dist.cli import main
    from trime_dist.datastore.store import open_datastore
    from trime_dist.eval.evaluate import rescore_neighbours

    _build(setup, tmp_path / "l2", "l2", factory="IVF4,PQ4x4")
    _build(setup, tmp_path / "ip", "ip", factory="Flat")
    l2, ip = open_datastore(str(tmp_path / "l2")), open_datastore(str(tmp_path / "ip"))
    assert ip.metric == "ip" and l2.id != ip.id
    queries = torch.from_numpy(l2.all_keys()[::7][:40]) + 0.3 * torch.randn(40, l2.meta["dim"])
    approx, ids, _ = l2.search_tensor(queries, 8, 4)
    exact = rescore_neighbours(l2, queries, ids)
    stored = l2.keys(np.maximum(ids.numpy(), 0)).astype(np.float64)                         # [Q, k, D]
    ref = -((stored - queries.double().numpy()[:, None, :]) ** 2).sum(2)
    found = ids.numpy() >= 0
    np.testing.assert_allclose(exact.numpy()[found], ref[found], rtol=1e-5, atol=1e-4)
    assert (approx.numpy()[found] <= 0).all()          # negated squared distances
    _, ip_ids, _ = ip.search_tensor(queries, 8, 1)
    assert (ip_ids[:, 0] != ids[:, 0]).any()
    out = tmp_path / "rows.json"
    assert main(["eval", "--model", str(setup / "run"), "--data", str(setup / "test"), "--memory", "none",
                 "--datastore", str(tmp_path / "l2"), "--knn-lambda", "0.3", "--k", "8", "--nprobe", "4", "--rescore",
                 "--device", "cpu", "--out", str(out)]) == 0
    row = json.load(open(out))[0]
    assert row["metric"] == "l2" and row["rescore"] is True and row["knn_temperature"] == 1.0


def test_bad_metric_and_a_rerun_with_another_metric_are_refused(setup, tmp_path, capsys):
    from trime_dist.cli import main

    with pytest.raises(SystemExit) as e:   # argparse: the flag's choices
        main(["datastore", "build", "--model", str(setup / "run"), "--data", str(setup / "train"),
              "--out", str(tmp_path / "ds"), "--metric", "cosine"])
    assert e.value.code == 2 and "--metric: invalid choice: 'cosine'" in capsys.readouterr().err
    _build(setup, tmp_path / "ds", "l2")
    (tmp_path / "ds" / "datastore.json").unlink()          # as if killed before the merge: a rerun resumes ...
    res = _build(setup, tmp_path / "ds", "ip", check=False)   # ... but not with another metric
    assert res.returncode != 0 and "different metric" in res.stderr
    meta = json.load(open(tmp_path / "ds" / "build.json"))
    assert meta["metric"] == "l2"
    _build(setup, tmp_path / "ds", "l2")
    path = tmp_path / "ds" / "datastore.json"
    meta = json.load(open(path))
    meta["metric"] = "cosine"
    path.write_text(json.dumps(meta))
    assert main(["eval", "--model", str(setup / "run"), "--data", str(setup / "test"), "--memory", "external",
                 "--datastore", str(tmp_path / "ds"), "--device", "cpu"]) == 2
    assert "datastore.json: metric 'cosine', expected one of ip, l2" in capsys.readouterr().err


def test_lambda_and_knn_temperature_search_pick_the_valid_argmin(setup, tmp_path, capsys):
    """--lambda-search / --knn-temperature-search / --tau-search: one valid pass scores every combination; the row
    is the test loss at the grid point of least valid loss (checked against eval_pass at every point)."""
    from trime_dist.cli import main
    from trime_dist.core import shards
    from trime_dist.datastore.store import open_datastore
    from trime_dist.eval.evaluate import EvalSetting, eval_pass

    _build(setup, tmp_path / "ds", "l2")
    ds = open_datastore(str(tmp_path / "ds"))
    run, valid, test = str(setup / "run"), str(setup / "train"), str(setup / "test")
    out = tmp_path / "rows.json"
    assert main(["eval", "--data", test, "--valid", valid, "--datastore", str(tmp_path / "ds"), "--k", "8",
                 "--tau-search", "0.9,1.4", "--lambda-search", "0.1,0.5,0.9", "--knn-temperature-search", "1,30",
                 "--device", "cpu", "--out", str(out),
                 "--setting", f"name=knn,model={run},memory=none,knn_lambda=0.25",
                 "--setting", f"name=ext,model={run},memory=external,knn_lambda=0.25",
                 "--setting", f"name=long,model={run},memory=long"]) == 0
    knn, ext, long = json.load(open(out))
    assert knn["tau_search"] is None and long["lambda_search"] is None and long["knn_temperature_search"] is None
    model, _ = load_model(run)
    valid_manifest, manifest = shards.read_manifest(valid), shards.read_manifest(test)
    for row in (knn, ext):
        assert set(row["lambda_search"]) == {"0.1", "0.5", "0.9"} and set(row["knn_temperature_search"]) == {"1", "30"}
        points = [(t, lam, kt) for t in ((0.9, 1.4) if row is ext else (1.0,)) for lam in (0.1, 0.5, 0.9)
                  for kt in (1.0, 30.0)]
        losses = {}
        for t, lam, kt in points:
            s = EvalSetting(model=run, memory=row["memory"], datastore=ds.path, k=8, knn_lambda=lam,
                            knn_temperature=kt)
            r = eval_pass(model, valid, valid_manifest, [s], {ds.path: ds}, [[t]])["settings"][0]
            losses[(t, lam, kt)] = r["nll"][0] / r["tokens"]
        best = min(losses, key=losses.get)
        assert (row["temperature"], row["knn_lambda"], row["knn_temperature"]) == best
        assert row["lambda_search"][f"{best[1]:g}"] == pytest.approx(losses[best], rel=1e-6)
        s = EvalSetting(model=run, memory=row["memory"], datastore=ds.path, k=8, knn_lambda=best[1],
                        knn_temperature=best[2])
        r = eval_pass(model, test, manifest, [s], {ds.path: ds}, [[best[0]]])["settings"][0]
        assert row["loss"] == pytest.approx(r["nll"][0] / r["tokens"], rel=1e-6)
    assert len(set(knn["lambda_search"].values())) == 3        # the grid points differ
    assert main(["eval", "--model", run, "--data", test, "--datastore", str(tmp_path / "ds"), "--valid", valid,
                 "--knn-lambda", "0.2", "--lambda-search", "0.1,1.5"]) == 2
    assert "--lambda-search '0.1,1.5': '1.5' is not a number in [0, 1]" in capsys.readouterr().err
    assert main(["eval", "--model", run, "--data", test, "--knn-temperature-search", "2"]) == 2
    assert "--knn-temperature-search needs --valid DIR" in capsys.readouterr().err
