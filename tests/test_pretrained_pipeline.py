"""The whole pipeline from a local Hugging Face model, through the CLI as a user runs it, for each family:
prepare with the model's tokenizer -> BM25 groups -> 2-rank `trime train` (trime_ext) -> `trime export
--format hf` (transformers reloads it with the same logits) -> `trime datastore build` -> `trime eval`."""
from __future__ import annotations

import json
import math

import pytest
import torch
from cli_runner import run_trime
from hf_fixtures import FAMILIES, write_tiny_model, write_tiny_tokenizer

SEQ_LEN, MICRO, RANKS = 32, 2, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Text -> shards tokenized with the tiny HF tokenizer folder (no pad token, EOS ends documents)."""
    root = tmp_path_factory.mktemp("hf_pipeline")
    tok = write_tiny_tokenizer(root / "tokenizer")
    run_trime(["corpus", "--out", root / "corpus", "--scale", "0.01", "--seed", "3"])
    for split in ("train", "test"):
        run_trime(["prepare", "--input", root / "corpus" / split, "--output", root / "data" / split,
                   "--tokenizer", tok, "--seq-len", SEQ_LEN, "--shard-segments", "64"], ranks=2, launcher="mpi")
    run_trime(["group", "--input", root / "data" / "train", "--output", root / "data" / "train_bm25",
               "--method", "bm25", "--group-size", RANKS * MICRO], ranks=2, launcher="mpi")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_model_through_every_stage(data, family, tmp_path):
    vocab = json.load(open(data / "data" / "train" / "manifest.json"))["tokenizer"]["vocab_size"]
    model_dir = write_tiny_model(tmp_path / "hf_in", family, vocab)
    run = tmp_path / "run"
    run_trime(["train", f"model.pretrained={model_dir}", "objective.name=trime_ext",
               f"data.train={data / 'data' / 'train_bm25'}", f"data.valid={data / 'data' / 'test'}",
               f"data.micro_batch_size={MICRO}", f"data.global_batch_size={RANKS * MICRO}", "run.max_steps=3",
               "run.eval_batches=2", f"run.out_dir={run}", "deepspeed.zero_stage=2", "optim.warmup_steps=1",
               "run.threads=1"], ranks=RANKS)
    summary = json.load(open(run / "summary.json"))
    assert summary["steps"] == 3 and math.isfinite(summary["final"]["valid_memory_loss"])

    # export hf: transformers loads it and gives trime_dist's logits
    out = tmp_path / "hf_out"
    run_trime(["export", run, "--format", "hf", "--out", out])
    from transformers import AutoModelForCausalLM

    from trime_dist.model.export import load_model

    ours, info = load_model(str(run))
    theirs = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.randint(0, vocab, (2, SEQ_LEN))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids)[0], atol=1e-5, rtol=1e-5)
    assert info["architecture"] == "hf"

    # the datastore and eval take the run as they take a built-in one
    store = tmp_path / "store"
    run_trime(["datastore", "build", "--model", run, "--data", data / "data" / "train", "--out", store,
               "--threads", "1"], ranks=2, launcher="mpi")
    meta = json.load(open(store / "datastore.json"))
    assert meta["model_id"] == info["model_id"] and meta["dim"] == info["model"]["d_model"]
    table = tmp_path / "eval.json"
    run_trime(["eval", "--model", run, "--data", data / "data" / "test", "--memory", "none", "local",
               "external", "--datastore", store, "--k", "16", "--max-segments", "8", "--out", table])
    rows = json.load(open(table))
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [r["memory"] for r in rows] == ["none", "local", "external"]
    assert all(math.isfinite(r["ppl"]) and r["tokens"] > 0 for r in rows)
    assert len({r["tokens"] for r in rows}) == 1
