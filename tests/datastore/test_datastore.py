"""`trime datastore build` with 2 real ranks (mpiexec): merged index = one-process index, resume after a
kill, key encoding = the model's memory keys, external eval = brute force on Flat, mismatches refused."""
import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch

from trime_dist.model.config import ModelConfig
from trime_dist.model.export import export_model, load_model
from trime_dist.model.transformer import build_model

from shard_fixtures import write_segment_dir

from cli_runner import run_trime  # noqa: E402

IVF = "IVF4,PQ4x4"  # 16-centroid PQ: trains in well under a second


def make_run(path, seed=0, tokenizer="0" * 64):
    model_cfg = ModelConfig(vocab_size=40, d_model=16, n_heads=2, d_ffn=32, max_seq_len=16)
    export_model(build_model(model_cfg, seed=seed).state_dict(), model_cfg, str(path),
                 {"step": 0, "tokenizer_sha256": tokenizer, "train_manifest_sha256": "x", "seq_len": 16})
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    write_segment_dir(str(root / "train"), [130] * 6 + [41], seq_len=16, vocab_size=40, per_shard=7, noise=0.3)
    write_segment_dir(str(root / "test"), [60, 33], seq_len=16, vocab_size=40, per_shard=7, noise=0.3, seed=9)
    make_run(root / "run")
    return root


def build(root, out, ranks=2, factory="Flat", extra=(), env_extra=None, check=True):
    args = ["datastore", "build", "--model", str(root / "run"), "--data", str(root / "train"), "--out", str(out),
            "--factory", factory, "--part-segments", "12", "--batch-size", "5", "--threads", "1", *extra]
    return run_trime(args, ranks, launcher="mpi", env=env_extra, check=check, timeout=300)


def one_process_index(ds, factory):
    """The reference: one faiss index, keys added in id order in one process (same trained quantizer)."""
    from trime_dist.datastore import index as dsi

    keys = ds.all_keys()
    index = dsi.read_index(os.path.join(ds.path, "trained.index")) if factory != "Flat" else \
        dsi.build_empty_index("Flat", keys.shape[1])
    if factory != "Flat":
        index.add_with_ids(keys, np.arange(len(keys), dtype=np.int64))
    else:
        index.add(keys)
    dsi.set_nprobe(index, 2)
    return index


@pytest.mark.parametrize("factory", ["Flat", IVF])
def test_two_rank_build_equals_one_process(setup, tmp_path, factory):
    from trime_dist.core import shards
    from trime_dist.datastore.store import open_datastore

    build(setup, tmp_path / "ds", ranks=2, factory=factory)
    ds = open_datastore(str(tmp_path / "ds"))
    meta = ds.meta
    manifest = shards.read_manifest(str(setup / "train"))
    assert meta["count"] == manifest["tokens"] and meta["world_size"] == 2 and len(meta["parts"]) == 5
    assert meta["factory"] == factory and meta["metric"] == "ip" and meta["key_type"] == "last_ffn_input"
    assert meta["dim"] == 16 and meta["dtype"] == "float16"
    assert meta["model_id"] == load_model(str(setup / "run"))[1]["model_id"]
    keys = np.load(os.path.join(ds.path, meta["parts"][1]["keys"]), mmap_mode="r")
    assert isinstance(keys, np.memmap) and keys.dtype == np.float16

    # stored keys/values = the model's memory keys and next tokens, in manifest order, pads dropped
    model, _ = load_model(str(setup / "run"))
    from shard_fixtures import all_segments

    exp_keys, exp_vals = [], []
    for key, tokens in sorted(all_segments(str(setup / "train")).items()):
        ids = torch.from_numpy(tokens[None, :-1].astype(np.int64))
        exp_keys.append(model(ids)[1][0].detach().numpy())
        exp_vals.append(tokens[1:])
    np.testing.assert_array_equal(ds.values, np.concatenate(exp_vals))
    np.testing.assert_allclose(ds.all_keys(), np.concatenate(exp_keys), atol=2e-3, rtol=2e-3)  # fp16 storage
    assert torch.equal(model.encode(ids), model(ids)[1].detach())  # what the datastore stores (fp16)

    # the merged index answers exactly like one index built in one process
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((50, 16)).astype(np.float32) * 3
    ref_scores, ref_ids = one_process_index(ds, factory).search(queries, 20)
    scores, ids, labels = ds.search(queries, 20, nprobe=2)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)
    np.testing.assert_array_equal(labels[ids >= 0], ds.values[ids[ids >= 0]])


def _mtimes(ds_dir):
    parts = os.path.join(ds_dir, "parts")
    return {f: os.stat(os.path.join(parts, f)).st_mtime_ns for f in os.listdir(parts) if not f.startswith(".")}


def test_resume_after_kills_skips_finished_work(setup, tmp_path):
    from trime_dist.datastore.store import open_datastore

    out = tmp_path / "ds"
    killed = build(setup, out, factory=IVF, env_extra={"TRIME_DATASTORE_EXIT_AFTER": "encode:1"}, check=False)
    assert killed.returncode != 0 and not os.path.exists(out / "datastore.json")
    done = _mtimes(out)
    encoded = sorted(f for f in done if f.startswith("part-"))
    assert 1 <= len(encoded) < 5  # each rank stopped after its first part

    killed = build(setup, out, factory=IVF, env_extra={"TRIME_DATASTORE_EXIT_AFTER": "add:1"}, check=False)
    assert killed.returncode != 0 and os.path.isfile(out / "trained.index")
    log = killed.stderr
    for f in encoded:
        assert f"part {f[5:11]}: encoded already, skipping" in log
        assert _mtimes(out)[f] == done[f] and _mtimes(out)[f.replace("part-", "keys-").replace(".json", ".npy")] \
            == done[f.replace("part-", "keys-").replace(".json", ".npy")]

    # a corrupt keys file (e.g. a disk error after the rename) is detected and that part alone redone
    keys4 = out / "parts" / "keys-p00004.npy"  # not added yet by either rank
    with open(keys4, "r+b") as f:
        f.truncate(os.path.getsize(keys4) - 10)
    before = _mtimes(out)
    trained = os.stat(out / "trained.index").st_mtime_ns
    final = build(setup, out, factory=IVF)
    assert "part p00004 is incomplete or corrupt" in final.stderr or "p00004 does not match" in final.stderr
    assert "index: trained already, skipping" in final.stderr
    assert os.stat(out / "trained.index").st_mtime_ns == trained
    added = [f[6:12] for f in before if f.startswith("index-") and f.endswith(".json") and f[6:12] != "p00004"]
    assert added  # the killed run finished at least one add: it is not redone
    for stem in added:
        assert f"part {stem}: added already, skipping" in final.stderr
    after = _mtimes(out)
    for stem in ("p00000", "p00001", "p00002", "p00003"):
        assert after[f"keys-{stem}.npy"] == before[f"keys-{stem}.npy"]
    assert after["keys-p00004.npy"] != before["keys-p00004.npy"]

    # the result equals a build that was never interrupted
    build(setup, tmp_path / "clean", factory=IVF)
    a, b = open_datastore(str(out)), open_datastore(str(tmp_path / "clean"))
    np.testing.assert_array_equal(a.all_keys(), b.all_keys())
    q = a.all_keys()[::37]
    for x, y in zip(a.search(q, 10, 2), b.search(q, 10, 2)):
        np.testing.assert_array_equal(x, y)


def test_two_mpi_ranks_ignore_a_world_inherited_from_the_environment(setup, tmp_path):
    """RANK=0 WORLD_SIZE=1 left in the environment (a shell or test runner that was itself a rank) made
    both mpiexec ranks plan, delete each other's temporary files and write the same parts."""
    from trime_dist.datastore.store import open_datastore

    proc = build(setup, tmp_path / "ds", env_extra={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert open_datastore(str(tmp_path / "ds")).meta["world_size"] == 2
    assert proc.stderr.count("ignoring deepspeed/torchrun rank 0 of 1 inherited from an enclosing job") == 2


def test_one_rank_ondisk_equals_in_memory_merge(setup, tmp_path):
    from trime_dist.datastore.store import open_datastore

    build(setup, tmp_path / "mem", ranks=1, factory=IVF)
    build(setup, tmp_path / "disk", ranks=1, factory=IVF, extra=["--ondisk"])
    assert os.path.isfile(tmp_path / "disk" / "index.ivfdata")
    a, b = open_datastore(str(tmp_path / "mem")), open_datastore(str(tmp_path / "disk"))
    q = a.all_keys()[::11]
    for x, y in zip(a.search(q, 16, 3), b.search(q, 16, 3)):
        np.testing.assert_array_equal(x, y)


def test_external_eval_equals_brute_force(setup, tmp_path):
    """External memory on a Flat store: same neighbours as exact search over the stored keys, same loss."""
    from trime_dist.core import shards
    from trime_dist.core.constants import IGNORE_INDEX
    from trime_dist.datastore.build import build_datastore
    from trime_dist.datastore.config import DatastoreConfig
    from trime_dist.datastore.store import open_datastore
    from trime_dist.eval.evaluate import EvalSetting, eval_pass, forward_windows
    from trime_dist.eval.windows import iter_windows
    from trime_dist.objective.trime_loss import trime_nll

    build_datastore(DatastoreConfig(model=str(setup / "run"), data=str(setup / "train"), out=str(tmp_path / "ds"),
                                    part_segments=20, batch_size=4))
    ds = open_datastore(str(tmp_path / "ds"))
    model, _ = load_model(str(setup / "run"))
    manifest = shards.read_manifest(str(setup / "test"))
    k, tau = 7, 1.3
    setting = EvalSetting(model="m", memory="external", datastore=ds.path, k=k, mem_size=0)
    got = eval_pass(model, str(setup / "test"), manifest, [setting], {ds.path: ds}, [[tau]], batch_size=4)
    stored = ds.all_keys().astype(np.float64)                                          # [M, D]
    total, n_tok = 0.0, 0
    for w in iter_windows(str(setup / "test"), manifest, 16):
        logits, keys, targets = forward_windows(model, [w], 0)
        q, t = keys[0, :w.length], targets[0, :w.length]                               # [n, D], [n]
        sims = q.double().numpy() @ stored.T                                           # [n, M]
        nn = np.argsort(-sims, axis=1, kind="stable")[:, :k]                           # brute-force top-k
        found = ds.search(q.numpy(), k, 1)[1]
        # same neighbours: identical sets wherever the k-th best is not tied (untrained model: duplicate keys
        # are common), and always the same top-k similarities
        top = np.take_along_axis(sims, nn, 1)                                          # [n, k] descending
        np.testing.assert_allclose(np.sort(np.take_along_axis(sims, found, 1), 1), np.sort(top, 1), rtol=1e-4,
                                   atol=1e-4)
        kth_next = -np.sort(-sims, axis=1)[:, k]
        clear = top[:, -1] - kth_next > 1e-3
        assert clear.mean() > 0.5
        np.testing.assert_array_equal(np.sort(found[clear], 1), np.sort(nn[clear], 1))
        nn = found
        n = w.length
        ext_keys = torch.from_numpy(stored[nn.reshape(-1)])                            # [n*k, D]
        all_keys = torch.cat([q.double(), ext_keys])
        labels = torch.cat([t, torch.from_numpy(ds.values[nn.reshape(-1)].astype(np.int64))])
        mask = torch.cat([torch.arange(n)[None, :] < torch.arange(n)[:, None],
                          torch.arange(n * k)[None, :] // k == torch.arange(n)[:, None]], 1)
        ref = trime_nll(logits[0, :n].double(), t, q.double(), all_keys, labels, mask, temperature=tau)
        total += float(ref.sum())
        n_tok += int((t != IGNORE_INDEX).sum())
    assert got["settings"][0]["tokens"] == n_tok
    assert got["settings"][0]["nll"][0] == pytest.approx(total, rel=1e-5)


def test_mismatched_datastore_is_refused(setup, tmp_path):
    from trime_dist.cli import main
    from trime_dist.datastore.build import build_datastore
    from trime_dist.datastore.config import DatastoreConfig
    from trime_dist.datastore.store import open_datastore

    ds_dir = str(tmp_path / "ds")
    build_datastore(DatastoreConfig(model=str(setup / "run"), data=str(setup / "train"), out=ds_dir))
    other = make_run(tmp_path / "other", seed=1)
    assert main(["eval", "--model", other, "--data", str(setup / "test"), "--memory", "external",
                 "--datastore", ds_dir, "--k", "4"]) == 2
    with pytest.raises(ValueError, match="was built with model .* but the model evaluated is"):
        open_datastore(ds_dir).check_compatible(load_model(other)[1], "0" * 64)
    with pytest.raises(ValueError, match="uses tokenizer 000000000000.*token ids do not match"):
        open_datastore(ds_dir).check_compatible(load_model(str(setup / "run"))[1], "f" * 64)
    # and a model trained with another tokenizer cannot build a store over this data
    foreign = make_run(tmp_path / "foreign", tokenizer="a" * 64)
    with pytest.raises(ValueError, match="tokenizer"):
        build_datastore(DatastoreConfig(model=foreign, data=str(setup / "train"), out=str(tmp_path / "ds2")))
    # a finished store is not silently reused for another model
    with pytest.raises(ValueError, match="different model_id"):
        build_datastore(DatastoreConfig(model=other, data=str(setup / "train"), out=ds_dir))
    # an unfinished build with other settings (a part encoded already) is not silently mixed in
    os.makedirs(tmp_path / "ds3" / "parts")
    shutil.copy(os.path.join(ds_dir, "parts", "part-p00000.json"), tmp_path / "ds3" / "parts")
    with open(tmp_path / "ds3" / "build.json", "w") as f:
        json.dump({**json.load(open(os.path.join(ds_dir, "build.json"))), "factory": IVF}, f)
    with pytest.raises(ValueError, match="different factory"):
        build_datastore(DatastoreConfig(model=str(setup / "run"), data=str(setup / "train"), out=str(tmp_path / "ds3")))
    shutil.rmtree(tmp_path / "ds3")


def test_eval_cli_table_json_and_tau_search(setup, tmp_path, capsys):
    """One invocation, several settings (two models): the JSON rows agree with eval_pass, τ = the valid argmin."""
    import math

    from trime_dist.cli import main
    from trime_dist.core import shards
    from trime_dist.datastore.build import build_datastore
    from trime_dist.datastore.config import DatastoreConfig
    from trime_dist.datastore.store import open_datastore
    from trime_dist.eval.evaluate import EvalSetting, eval_pass

    ds_dir = str(tmp_path / "ds")
    build_datastore(DatastoreConfig(model=str(setup / "run"), data=str(setup / "train"), out=ds_dir))
    other = make_run(tmp_path / "other", seed=4)
    run, test = str(setup / "run"), str(setup / "test")
    out = tmp_path / "rows.json"
    assert main(["eval", "--data", test, "--valid", str(setup / "train"), "--tau-search", "0.8,1.0,1.6", "--k", "8",
                 "--mem-size", "20", "--batch-size", "3", "--out", str(out),
                 "--setting", f"name=base,model={other},memory=none",
                 "--setting", f"name=knn,model={run},memory=none,datastore={ds_dir},knn_lambda=0.3",
                 "--setting", f"name=long,model={run},memory=long",
                 "--setting", f"name=ext,model={run},memory=external,datastore={ds_dir},knn_lambda=0.2"]) == 0
    printed = capsys.readouterr().out
    rows = json.load(open(out))
    assert [r["name"] for r in rows] == ["base", "knn", "long", "ext"] and all(r["name"] in printed for r in rows)
    ds = open_datastore(ds_dir)
    assert rows[0]["datastore_id"] is None and rows[0]["tau_search"] is None and rows[1]["tau_search"] is None
    assert rows[1]["datastore_id"] == rows[3]["datastore_id"] == ds.id and rows[3]["k"] == 8
    model, _ = load_model(run)
    manifest = shards.read_manifest(test)
    for r in rows[2:]:
        grid = r["tau_search"]
        assert set(grid) == {"0.8", "1", "1.6"} and r["temperature"] == float(min(grid, key=grid.get))
        s = EvalSetting(model=run, memory=r["memory"], datastore=ds_dir, k=8, mem_size=20,
                        knn_lambda=r["knn_lambda"])
        ref = eval_pass(model, test, manifest, [s], {ds_dir: ds}, [[r["temperature"]]])["settings"][0]
        assert r["tokens"] == ref["tokens"] == manifest["tokens"]
        assert r["loss"] == pytest.approx(ref["nll"][0] / ref["tokens"], rel=1e-6)
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))


def test_eval_exact_search_equals_faiss_flat(setup, tmp_path):
    """`trime eval --search exact` (keys on the device, torch top-k) gives the rows of the faiss Flat index:
    with k above the store's size both see every key, so ties cannot pick different neighbours."""
    from trime_dist.cli import main

    ds_dir = str(tmp_path / "ds")
    build(setup, ds_dir, ranks=1)
    rows = {}
    for search in ("faiss", "exact"):
        out = tmp_path / f"{search}.json"
        assert main(["eval", "--model", str(setup / "run"), "--data", str(setup / "test"), "--memory", "external",
                     "--datastore", ds_dir, "--k", "1024", "--knn-lambda", "0.25", "--search", search,
                     "--device", "cpu", "--out", str(out)]) == 0
        rows[search] = json.load(open(out))[0]
    assert rows["exact"]["tokens"] == rows["faiss"]["tokens"] > 0
    assert rows["exact"]["loss"] == pytest.approx(rows["faiss"]["loss"], rel=1e-6)


def test_device_flag_errors_name_the_value(setup, tmp_path, capsys):
    from trime_dist.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    assert main(["eval", "--model", str(setup / "run"), "--data", str(setup / "test"), "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert main(["datastore", "build", "--model", str(setup / "run"), "--data", str(setup / "train"),
                 "--out", str(tmp_path / "ds"), "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "ds" / "build.json")   # refused before anything is written


def test_context_window_grid_is_the_one_eval_scores():
    """core/context_windows.py's grid = the windows `trime eval --context-window` cuts (one definition)."""
    from trime_dist.core.context_windows import windows_scoring
    from trime_dist.eval.windows import iter_windows

    with tempfile.TemporaryDirectory() as d:
        manifest = write_segment_dir(d, [130, 41, 16, 17], seq_len=16, vocab_size=40, per_shard=7)
        for context in (0, 5, 15):   # 0: eval scores each segment, which is the grid's cut with C = 0
            got = [(w.stream, w.start, w.start + w.score_from, w.start + w.length)
                   for w in iter_windows(d, manifest, 16, context)]
            want = []
            for stream, n in enumerate([129, 40, 15, 16]):   # inputs per stream (tokens - 1)
                want += [(stream, lo, sf, min(hi, n)) for lo, sf, hi in windows_scoring(0, n, 16, context)]
            assert got == want and len(got) > 10


@pytest.mark.parametrize("context", [5, 12])
def test_context_window_keys_equal_the_eval_queries(setup, tmp_path, context):
    """A store built with --context-window C (2 ranks, parts cut in the middle of streams) holds, for every
    target, the key `trime eval --context-window C` computes as the query at that position."""
    from trime_dist.core import shards
    from trime_dist.datastore.store import open_datastore
    from trime_dist.eval.evaluate import forward_windows
    from trime_dist.eval.windows import iter_windows

    build(setup, tmp_path / "ds", ranks=2, extra=["--context-window", str(context)])
    ds = open_datastore(str(tmp_path / "ds"))
    assert ds.meta["context_window"] == context
    model, _ = load_model(str(setup / "run"))
    manifest = shards.read_manifest(str(setup / "train"))
    want_keys, want_values = [], []
    for w in iter_windows(str(setup / "train"), manifest, 16, context):
        _, keys, targets = forward_windows(model, [w], 0)
        want_keys.append(keys[0, w.score_from:w.length].numpy())
        want_values.append(targets[0, w.score_from:w.length].numpy())
    want_keys = np.concatenate(want_keys)
    np.testing.assert_array_equal(ds.values, np.concatenate(want_values))
    np.testing.assert_allclose(ds.all_keys(), want_keys.astype(np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)
    # and they differ from the keys of segments encoded on their own (the context changed them)
    build(setup, tmp_path / "plain", ranks=1)
    plain = open_datastore(str(tmp_path / "plain")).all_keys()
    assert np.abs(plain - ds.all_keys()).max() > 0.1


def test_eval_warns_when_its_context_window_differs_from_the_store(setup, tmp_path, caplog):
    from trime_dist.cli import main

    build(setup, tmp_path / "ds", ranks=1, extra=["--context-window", "6"])
    with caplog.at_level("WARNING"):
        assert main(["eval", "--model", str(setup / "run"), "--data", str(setup / "test"), "--memory", "external",
                     "--datastore", str(tmp_path / "ds"), "--k", "4", "--device", "cpu"]) == 0
    assert "was encoded with --context-window 6" in caplog.text
    assert main(["datastore", "build", "--model", str(setup / "run"), "--data", str(setup / "train"),
                 "--out", str(tmp_path / "bad"), "--context-window", "16"]) == 2


def test_rescore_recomputes_neighbour_scores_from_the_stored_keys(setup, tmp_path):
    """--rescore: the IVF-PQ neighbours' scores become q·k of their stored keys (float64 reference), as kNN-LM
    recomputes distances; the neighbours themselves do not change; rows record it."""
    from trime_dist.cli import main
    from trime_dist.datastore.store import open_datastore
    from trime_dist.eval.evaluate import rescore_neighbours

    build(setup, tmp_path / "ds", ranks=1, factory=IVF)
    ds = open_datastore(str(tmp_path / "ds"))
    queries = torch.from_numpy(ds.all_keys()[::11][:40]) + 0.05 * torch.randn(40, ds.meta["dim"])
    approx, ids, labels = ds.search_tensor(queries, 8, 2)
    exact = rescore_neighbours(ds, queries, ids)
    stored = ds.keys(np.maximum(ids.numpy(), 0)).astype(np.float64)                         # [Q, k, D]
    ref = np.einsum("qd,qkd->qk", queries.double().numpy(), stored)
    found = ids.numpy() >= 0
    np.testing.assert_allclose(exact.numpy()[found], ref[found], rtol=1e-5, atol=1e-5)
    assert np.isinf(exact.numpy()[~found]).all()
    assert np.abs(exact.numpy()[found] - approx.numpy()[found]).max() > 1e-3   # PQ's scores were approximate
    rows = {}
    for flag in ("--no-rescore", "--rescore"):
        out = tmp_path / f"{flag}.json"
        assert main(["eval", "--model", str(setup / "run"), "--data", str(setup / "test"), "--memory", "external",
                     "--datastore", str(tmp_path / "ds"), "--k", "8", "--nprobe", "2", "--device", "cpu", flag,
                     "--out", str(out)]) == 0
        rows[flag] = json.load(open(out))[0]
    assert rows["--rescore"]["rescore"] is True and rows["--no-rescore"]["rescore"] is False
    assert rows["--rescore"]["loss"] != rows["--no-rescore"]["loss"]
    assert main(["eval", "--model", str(setup / "run"), "--data", str(setup / "test"), "--datastore",
                 str(tmp_path / "ds"), "--setting", "memory=external,rescore=maybe"]) == 2
