"""`trime train` end to end: DeepSpeed on 2 CPU ranks, resume, NaN stop, bad inputs."""
import json
import os

import pytest

from trime_dist.cli import main as trime_main

from cli_runner import REPO, run_trime
from shard_fixtures import write_pattern_splits


@pytest.fixture(scope="module")
def pattern_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    write_pattern_splits(root, real_tokenizer=True)
    return root


def overrides(data, out, steps, *extra):
    return ["--config", os.path.join(REPO, "configs", "tiny.yaml"), f"data.train={data}/train",
            f"data.valid={data}/valid", f"run.out_dir={out}", f"run.max_steps={steps}", "model.max_seq_len=32",
            "run.log_every=1", *extra]


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_two_ranks_zero2_loss_falls(pattern_data, tmp_path):
    out = tmp_path / "run"
    run_trime(["train", *overrides(pattern_data, out, 40, "deepspeed.zero_stage=2", "optim.warmup_steps=5")],
              ranks=2)
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert all(set(r) >= {"step", "epoch", "loss", "ce_loss", "ppl", "tokens", "tokens_per_s", "lr",
                          "grad_norm", "memory_size"} for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    summary = json.load(open(out / "summary.json"))
    assert summary["world_size"] == 2
    assert summary["final"]["valid_ce_ppl"] < summary["start"]["valid_ce_ppl"] / 2
    assert os.path.isfile(out / "model" / "model.safetensors") and os.path.isfile(out / "loss.png")


def test_resume_continues_exactly(pattern_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["run.save_every=3", "data.shuffle_shards=true", "data.global_batch_size=8"]
    run_trime(["train", *overrides(pattern_data, straight, 6, *common)])
    run_trime(["train", *overrides(pattern_data, resumed, 3, *common)])
    # the resumed run keeps the schedule of the 6-step run: only max_steps differs
    cfg = resumed / "config.yaml"
    assert "max_steps: 3" in cfg.read_text()
    run_trime(["train", "--resume", *overrides(pattern_data, resumed, 6, *common)])
    a = [r for r in metrics(straight) if "loss" in r]
    b = [r for r in metrics(resumed) if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a[3:], b[3:]):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-7)


def test_auto_resume_starts_fresh_then_resumes(pattern_data, tmp_path):
    """What a requeued SLURM job runs: no checkpoint -> a fresh run; a checkpoint -> continue from it."""
    out = tmp_path / "run"
    first = run_trime(["train", "--auto-resume", *overrides(pattern_data, out, 2, "run.save_every=2")])
    assert f"no checkpoint in {out}/checkpoints: starting fresh" in first.stdout
    second = run_trime(["train", "--auto-resume", *overrides(pattern_data, out, 4, "run.save_every=2")])
    assert f"resuming from {out}/checkpoints/step00000002" in second.stdout
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4]  # steps 1-2 were not redone
    assert json.load(open(out / "summary.json"))["steps"] == 4


def test_nan_loss_stops_and_keeps_checkpoint(pattern_data, tmp_path):
    out = tmp_path / "run"
    run_trime(["train", *overrides(pattern_data, out, 3, "run.save_every=3")])
    latest = (out / "checkpoints" / "latest").read_text()
    # A temperature this small overflows the memory similarities to inf: the loss becomes NaN.
    proc = run_trime(["train", "--resume", *overrides(pattern_data, out, 6, "objective.temperature=1e-40")],
                     check=False)
    assert proc.returncode != 0
    assert "non-finite loss at step 4" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == latest
    assert os.path.isdir(out / "checkpoints" / latest)


def test_bad_inputs_give_clear_errors(pattern_data, tmp_path, capsys):
    assert trime_main(["train", *overrides(pattern_data, tmp_path / "a", 2, "model.n_layerz=3")]) == 2
    assert "model.n_layerz" in capsys.readouterr().err
    assert trime_main(["train", *overrides(tmp_path / "missing", tmp_path / "b", 2)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "missing" in err
    assert trime_main(["train", *overrides(pattern_data, tmp_path / "c", 2, "data.global_batch_size=12")]) == 2
    assert "data.global_batch_size" in capsys.readouterr().err
    assert trime_main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_layouts_the_data_cannot_satisfy_are_refused(pattern_data, tmp_path, capsys):
    # one segment per rank with contiguous placement: long-term memory would have nothing to remember
    args = overrides(pattern_data, tmp_path / "a", 2, "objective.name=trime_long", "data.micro_batch_size=1",
                     "data.global_batch_size=1")
    assert trime_main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "data.placement=interleaved" in err and "data.micro_batch_size" in err
    # trime_long on groups that are not consecutive segments
    from data_pipeline.group import GroupConfig, group_segments

    grouped = tmp_path / "random_groups"
    group_segments(GroupConfig(input=str(pattern_data / "train"), output=str(grouped), method="random",
                               group_size=8))  # 1 rank x data.micro_batch_size
    args = overrides(pattern_data, tmp_path / "b", 2, "objective.name=trime_long", f"data.train={grouped}")
    assert trime_main(["train", *args]) == 2
    assert "consecutive" in capsys.readouterr().err


def test_resume_without_checkpoint_and_bad_valid_fail_fast(pattern_data, tmp_path, capsys):
    out = tmp_path / "empty_run"
    assert trime_main(["train", "--resume", *overrides(pattern_data, out, 2)]) == 2
    err = capsys.readouterr().err
    assert f"no checkpoint in {out}/checkpoints" in err and "--auto-resume" in err
    # data.valid missing, or without its manifest (an interrupted `trime prepare`): refused before any engine
    incomplete = tmp_path / "valid_incomplete"
    incomplete.mkdir()
    for valid in (tmp_path / "no_such_valid", incomplete):
        args = overrides(pattern_data, tmp_path / "b", 2, f"data.valid={valid}")
        assert trime_main(["train", *args]) == 2
        err = capsys.readouterr().err
        assert f"data.valid={valid}" in err and "manifest.json" in err and "Traceback" not in err
        assert not os.path.isdir(tmp_path / "b" / "checkpoints")


def test_nan_stop_without_checkpoint_says_none_was_saved(pattern_data, tmp_path):
    out = tmp_path / "run"
    proc = run_trime(["train", *overrides(pattern_data, out, 3, "objective.temperature=1e-40")], check=False)
    assert proc.returncode != 0
    assert "non-finite loss at step 1" in proc.stderr and "no checkpoint was saved yet" in proc.stderr
    assert "is intact" not in proc.stderr


def test_trime_ext_needs_bm25_groups_unless_allowed(pattern_data, tmp_path, capsys):
    """In stream order the next segment of the same text is always in memory: refused, naming the fix."""
    args = overrides(pattern_data, tmp_path / "a", 1, "objective.name=trime_ext")
    assert trime_main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert f"{pattern_data}/train holds segments in stream order" in err
    assert "trime group" in err and "--method bm25" in err and "data.allow_ungrouped=true" in err
    from data_pipeline.group import GroupConfig, group_segments

    grouped = tmp_path / "random_groups"
    group_segments(GroupConfig(input=str(pattern_data / "train"), output=str(grouped), method="random",
                               group_size=8))
    assert trime_main(["train", *overrides(pattern_data, tmp_path / "b", 1, "objective.name=trime_ext",
                                           f"data.train={grouped}", "data.micro_batch_size=8",
                                           "data.global_batch_size=8")]) == 2
    assert "'random' groups" in capsys.readouterr().err
    # the explicit override trains on them anyway
    run_trime(["train", *overrides(pattern_data, tmp_path / "c", 1, "objective.name=trime_ext",
                                   "data.allow_ungrouped=true")])
