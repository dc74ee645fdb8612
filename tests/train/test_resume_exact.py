"""Bit-exact resume through `trime train`: a run killed after a step (os._exit: no cleanup, like kill -9)
and resumed with --resume ends with the same weights (torch.equal), metrics and loader position as an
uninterrupted run. Dropout is on, so the per-rank RNG streams must be restored too."""
import json
import os

import pytest
import torch
from cli_runner import REPO, run_trime
from shard_fixtures import write_pattern_splits

from trime_dist.model.export import load_model
from trime_dist.train.kill_hook import EXIT_CODE, EXIT_ENV

pytestmark = pytest.mark.slow

TIMING = ("tokens_per_s", "step_time_s")  # the only fields allowed to differ between runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_exact")
    write_pattern_splits(root, valid=False)
    return root


def train_args(data, out, zero):
    # cosine schedule with a short warm-up, AdamW, dropout, shuffled shards: every piece of state matters
    return ["train", "--config", os.path.join(REPO, "configs", "tiny.yaml"), f"data.train={data}/train",
            "data.valid=", f"run.out_dir={out}", "run.max_steps=7", "model.max_seq_len=32", "model.dropout=0.1",
            f"deepspeed.zero_stage={zero}", "data.global_batch_size=8", "data.micro_batch_size=2",
            "optim.warmup_steps=2", "run.save_every=3"]


def loader_position(out) -> dict:
    """The loader state saved with the run's last checkpoint (DeepSpeed's client state, rank 0's file)."""
    tag = (out / "checkpoints" / "latest").read_text().strip()
    # mp_rank_00_model_states.pt, or zero_pp_rank_0_mp_rank_00_model_states.pt under ZeRO-3
    first = min((out / "checkpoints" / tag).glob("*mp_rank_00_model_states.pt"))
    return torch.load(first, weights_only=True)["loader"]  # (the model states file holds no object)


def step_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.parametrize("ranks,zero", [(1, 0), (1, 1), (1, 2), (2, 0), (2, 2), (2, 3)])
def test_killed_and_resumed_run_equals_uninterrupted_run(data, tmp_path, ranks, zero):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_trime(train_args(data, straight, zero), ranks=ranks)
    # killed after step 5: the checkpoint of step 3 is the latest, steps 4-5 are redone
    killed = run_trime(train_args(data, resumed, zero), ranks=ranks, env={EXIT_ENV: "5"}, check=False)
    assert killed.returncode == EXIT_CODE or killed.returncode == 1, killed.stderr[-2000:]  # (launcher: 1)
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step00000003"
    assert not os.path.isfile(resumed / "summary.json")
    run_trime(["train", "--resume", *train_args(data, resumed, zero)[1:]], ranks=ranks)

    assert step_rows(resumed) == step_rows(straight)  # losses, lr, grad norms, tokens, epochs
    assert (resumed / "summary.json").read_text() == (straight / "summary.json").read_text()
    assert loader_position(resumed) == loader_position(straight)
    a, b = load_model(str(straight))[0].state_dict(), load_model(str(resumed))[0].state_dict()
    assert a.keys() == b.keys()
    unequal = [name for name in a if not torch.equal(a[name], b[name])]
    assert unequal == [], f"weights differ after resume: {unequal}"
