"""`trime report`: tables and figures from run directories and eval files; `trime eval --sweep` rows."""
import json
import math
import os

import pytest

from trime_dist.cli import main


def _run_dir(path, objective, losses):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "valid_ce_ppl": 50.0, "valid_memory_ppl": 48.0}) + "\n")
        for i, loss in enumerate(losses, start=1):
            f.write(json.dumps({"step": i, "objective": objective, "loss": loss, "ce_loss": loss + 0.1,
                                "tokens_seen": 1000 * i}) + "\n")
        f.write(json.dumps({"step": len(losses), "valid_ce_ppl": 20.0, "valid_memory_ppl": 17.5}) + "\n")
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump({"steps": len(losses), "objective": objective}, f)


def _row(name, memory, ppl, **extra):
    return {"name": name, "memory": memory, "ppl": ppl, "loss": math.log(ppl), "tokens": 999, "data": "data/test",
            "model": "runs/m", "temperature": 1.0, "k": None, "mem_size": None, "knn_lambda": 0.0, **extra}


@pytest.fixture
def results(tmp_path):
    _run_dir(tmp_path / "runs" / "ce", "ce", [5.0, 4.0, 3.5])
    _run_dir(tmp_path / "runs" / "long", "trime_long", [5.1, 3.9, 3.2])
    rows = [_row("CE", "none", 33.3), _row("TrimeLM_long@mem_size=64", "long", 30.25, mem_size=64),
            _row("TrimeLM_long@mem_size=256", "long", 28.5, mem_size=256,
                 tau_search={"0.8": math.log(31.0), "1.0": math.log(29.0)})]
    with open(tmp_path / "eval.json", "w") as f:
        json.dump(rows, f)
    with open(tmp_path / "other.json", "w") as f:   # a JSON file that is not eval rows: ignored in a folder
        json.dump({"format": "something"}, f)
    return tmp_path


def test_report_tables_figures_and_sweeps(results, capsys):
    out = results / "report"
    assert main(["report", str(results), "--out", str(out)]) == 0
    page = open(out / "report.md").read()
    for text in ("| CE | none |", "**33.30**", "**30.25**", "**28.50**", "| runs/ce | ce | 3 | 3000 | 3.5000 | 20.00 | 17.50 |",
                 "| runs/long | trime_long |", "training_curves.png", "sweeps.png"):
        assert text in page, text
    for png in ("training_curves.png", "sweeps.png"):
        assert open(out / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    data = json.load(open(out / "report.json"))
    assert data["sweeps"]["mem_size"] == {"TrimeLM_long (long)": [[64, 30.25], [256, 28.5]]}
    assert data["sweeps"]["tau (valid)"]["TrimeLM_long@mem_size=256"] == [[0.8, pytest.approx(31.0)],
                                                                         [1.0, pytest.approx(29.0)]]
    assert "2 runs, 3 eval rows, 2 figures" in capsys.readouterr().out


def test_report_bad_inputs_name_the_path(results, tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err
    assert main(["report", str(results / "other.json"), "--out", str(tmp_path / "r")]) == 2
    assert "other.json: not a `trime eval --out` file" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "nothing to report" in capsys.readouterr().err
    bad = results / "runs" / "ce" / "metrics.jsonl"
    with open(bad, "a") as f:
        f.write("{not json\n")
    assert main(["report", str(results / "runs"), "--out", str(tmp_path / "r")]) == 2
    assert "metrics.jsonl:6: not JSON" in capsys.readouterr().err


def test_eval_sweep_rows_equal_separate_settings(tmp_path):
    from trime_dist.model.config import ModelConfig
    from trime_dist.model.export import export_model
    from trime_dist.model.transformer import build_model

    from shard_fixtures import write_segment_dir

    write_segment_dir(str(tmp_path / "test"), [100, 70], seq_len=16, vocab_size=40, per_shard=7, noise=0.3)
    cfg = ModelConfig(vocab_size=40, d_model=16, n_heads=2, d_ffn=32, max_seq_len=16)
    export_model(build_model(cfg, seed=0).state_dict(), cfg, str(tmp_path / "run"),
                 {"step": 0, "tokenizer_sha256": "0" * 64, "train_manifest_sha256": "x", "seq_len": 16})
    common = ["eval", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "test"), "--memory", "long",
              "--device", "cpu"]
    assert main([*common, "--sweep", "mem_size=4,32", "--sweep", "temperature=0.5,2", "--out",
                 str(tmp_path / "sweep.json")]) == 0
    rows = {r["name"]: r for r in json.load(open(tmp_path / "sweep.json"))}
    assert sorted(rows) == ["long@mem_size=32@temperature=0.5", "long@mem_size=32@temperature=2",
                            "long@mem_size=4@temperature=0.5", "long@mem_size=4@temperature=2"]
    assert main([*common, "--mem-size", "4", "--temperature", "2", "--out", str(tmp_path / "one.json")]) == 0
    one = json.load(open(tmp_path / "one.json"))[0]
    assert rows["long@mem_size=4@temperature=2"]["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert len({round(r["loss"], 6) for r in rows.values()}) == 4
    assert main([*common, "--sweep", "layers=1,2"]) == 2


def _model(root, name, objective, **arch):
    os.makedirs(root / name / "model")
    model = {"vocab_size": 100, "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ffn": 256, **arch}
    with open(root / name / "model" / "model.json", "w") as f:
        json.dump({"objective": objective, "model": model}, f)
    return str(root / name)


@pytest.mark.parametrize("objective,memory,knn_lambda,arch,expected", [
    ("trime_long", "long", 0.0, dict(n_layers=16, d_model=1024, n_heads=8, d_ffn=4096), "17.64 (word ppl, wt103_247m)"),
    ("trime_ext", "external", 0.3, dict(n_layers=16, d_model=1024, n_heads=8, d_ffn=4096), "15.46 (word ppl, wt103_247m)"),
    ("ce", "none", 0.25, dict(n_layers=16, d_model=1024, n_heads=8, d_ffn=4096), "16.12 (word ppl, wt103_247m)"),
    ("trime_long", "long", 0.0, dict(n_layers=12, d_model=512, n_heads=8, d_ffn=2048), "1.05 (bits/byte, enwik8_38m)"),
    ("trime_long", "local", 0.0, dict(n_layers=16, d_model=1024, n_heads=8, d_ffn=4096), "–"),  # not a paper row
    ("trime_long", "long", 0.0, {}, "–"),                                                        # not a paper model
])
def test_report_shows_the_papers_number_for_a_paper_config(tmp_path, objective, memory, knn_lambda, arch, expected):
    model = _model(tmp_path, "m", objective, **arch)
    with open(tmp_path / "eval.json", "w") as f:
        json.dump([_row("row", memory, 20.0, model=model, knn_lambda=knn_lambda)], f)
    assert main(["report", str(tmp_path / "eval.json"), "--out", str(tmp_path / "r")]) == 0
    line = next(line for line in open(tmp_path / "r" / "report.md") if line.startswith("| row |"))
    assert line.rstrip().endswith(f"| {expected} |"), line
