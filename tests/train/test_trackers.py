"""run.trackers: a short `trime train` with tensorboard and wandb logs the metrics.jsonl values to both
(tensorboard events read back with EventAccumulator; wandb offline, its files in the run dir)."""
import glob
import json
import os

import pytest

from trime_dist.cli import main as trime_main
from trime_dist.train.trackers import scalars

from cli_runner import REPO, run_trime
from shard_fixtures import write_segment_dir


def test_scalars_are_the_numeric_fields_without_step():
    record = {"step": 4, "epoch": 0, "objective": "trime_ext", "loss": 2.5, "grad_norm": None, "tokens": 64,
              "flag": True}
    assert scalars(record) == {"epoch": 0.0, "loss": 2.5, "tokens": 64.0}


def test_unknown_tracker_is_refused(capsys):
    assert trime_main(["train", "--config", os.path.join(REPO, "configs", "tiny.yaml"),
                       "run.trackers=[tensorboard,mlflow]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "run.trackers: got 'mlflow', allowed: tensorboard, wandb" in err


def _tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_and_wandb_log_the_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default: offline
    write_segment_dir(str(tmp_path / "train"), [300] * 4, seq_len=16, vocab_size=50, per_shard=10)
    write_segment_dir(str(tmp_path / "valid"), [100] * 2, seq_len=16, vocab_size=50, per_shard=10, seed=1)
    run = tmp_path / "run"
    run_trime(["train", "--config", os.path.join(REPO, "configs", "tiny.yaml"), f"data.train={tmp_path}/train",
               f"data.valid={tmp_path}/valid", f"run.out_dir={run}", "run.max_steps=3", "run.eval_every=2",
               "model.max_seq_len=16", "model.d_model=32", "model.d_ffn=64", "data.micro_batch_size=4",
               "data.global_batch_size=4", "deepspeed.zero_stage=0", "objective.name=trime_ext",
               "data.allow_ungrouped=true", "run.trackers=[tensorboard,wandb]"])
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    expected = {}
    for record in records:
        for key, value in scalars(record).items():
            expected.setdefault(key, []).append((record["step"], value))
    assert {"loss", "ce_loss", "lr", "valid_memory_ppl"} <= set(expected)
    got = _tensorboard_scalars(str(run / "tensorboard"))
    assert set(got) == set(expected)
    for key, rows in expected.items():  # every value at its step (tensorboard stores float32)
        assert [s for s, _ in got[key]] == [s for s, _ in rows], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in rows], rel=1e-6), key
    offline = glob.glob(str(run / "wandb" / "offline-run-*"))
    assert len(offline) == 1 and glob.glob(os.path.join(offline[0], "*.wandb"))
