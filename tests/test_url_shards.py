"""Training, datastore build and eval reading their shards from a real localhost HTTP server give what they give
from the same folder on disk; a missing data URL is one line naming it."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from trime_dist.cli import main as trime_main

from cli_runner import REPO, run_trime  # noqa: E402
from http_folder import serve_folder  # noqa: E402
from shard_fixtures import write_pattern_splits  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("url_data")
    write_pattern_splits(root, real_tokenizer=True, valid_real_tokenizer=True)
    with serve_folder(root) as url:
        yield root, url


def _train(train, valid, out):
    run_trime(["train", "--config", os.path.join(REPO, "configs", "tiny.yaml"), f"data.train={train}",
               f"data.valid={valid}", f"run.out_dir={out}", "run.max_steps=3", "model.max_seq_len=32",
               "run.log_every=1", "run.save_every=3"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_training_from_an_http_manifest_gives_the_local_losses(served, tmp_path):
    root, url = served
    local = _train(root / "train", root / "valid", tmp_path / "local")
    remote = _train(f"{url}/train/manifest.json", f"{url}/valid", tmp_path / "remote")
    losses = [(m["step"], m.get("loss"), m.get("valid_loss")) for m in local]
    assert len([s for s, loss, _ in losses if loss is not None]) == 3
    assert [(m["step"], m.get("loss"), m.get("valid_loss")) for m in remote] == losses
    info = json.load(open(tmp_path / "remote" / "model" / "model.json"))
    assert info["train_data"] == f"{url}/train/manifest.json"
    assert info["train_manifest_sha256"] == json.load(open(tmp_path / "local" / "model" / "model.json"))[
        "train_manifest_sha256"]
    # the data's tokenizer, fetched from the URL, sits beside the weights as it does for local data
    assert (tmp_path / "remote" / "model" / "tokenizer.json").read_bytes() == \
        (root / "train" / "tokenizer.json").read_bytes()


def test_datastore_build_and_eval_from_http(served, tmp_path, capsys):
    from trime_dist.datastore.build import build_datastore
    from trime_dist.datastore.config import DatastoreConfig
    from trime_dist.datastore.store import open_datastore
    from trime_dist.model.config import ModelConfig
    from trime_dist.model.export import export_model
    from trime_dist.model.transformer import build_model

    root, url = served
    cfg = ModelConfig(vocab_size=50, d_model=16, n_heads=2, d_ffn=32, max_seq_len=32)
    export_model(build_model(cfg, seed=0).state_dict(), cfg, str(tmp_path / "run"),
                 {"step": 0, "tokenizer_sha256": None, "train_manifest_sha256": "x", "seq_len": 32})
    run = str(tmp_path / "run")
    stores = {}
    for name, data in (("local", str(root / "train")), ("remote", f"{url}/train")):
        out = str(tmp_path / f"ds_{name}")
        build_datastore(DatastoreConfig(model=run, data=data, out=out, part_segments=40, batch_size=5))
        stores[name] = open_datastore(out)
    assert stores["remote"].meta["data"] == f"{url}/train" and stores["remote"].meta["count"] > 0
    assert stores["remote"].id == stores["local"].id  # same model, same manifest, same factory
    np.testing.assert_array_equal(stores["remote"].values, stores["local"].values)
    np.testing.assert_array_equal(stores["remote"].all_keys(), stores["local"].all_keys())

    rows = {}
    for name, data in (("local", str(root / "valid")), ("remote", f"{url}/valid/manifest.json")):
        out = tmp_path / f"{name}.json"
        assert trime_main(["eval", "--data", data, "--model", run, "--memory", "local", "external",
                           "--datastore", str(tmp_path / "ds_local"), "--k", "8", "--out", str(out)]) == 0
        rows[name] = json.load(open(out))
    assert [r["loss"] for r in rows["remote"]] == [r["loss"] for r in rows["local"]]
    assert all(r["tokens"] > 0 for r in rows["remote"])
    capsys.readouterr()

    # a missing URL: one line naming it, from the CLI
    assert trime_main(["eval", "--data", f"{url}/nowhere", "--model", run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"trime eval: error: shard manifest not found: {url}/nowhere/manifest.json: HTTP 404 " \
                      "File not found"
