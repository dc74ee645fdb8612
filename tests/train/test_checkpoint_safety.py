"""Resuming from a checkpoint someone else wrote runs none of its code: a pickled object in the RNG state or
in any of DeepSpeed's files is refused with one line naming the file (on every rank), and is never unpickled.
Normal resumes (bit-exact, every ZeRO stage) are tests/train/test_resume_exact.py."""
import os
import random
import shutil

import numpy as np
import pytest
import torch
from cli_runner import REPO, run_trime
from pickle_payload import Payload
from shard_fixtures import write_pattern_splits

from trime_dist.train.rng_state import legacy_rng_state_path, load_rng_state, rng_state_path, save_rng_state
from trime_dist.train.safe_load import load_weights_only

TAG = "step00000002"
REFUSED = "holds a non-allowed object (io.open), not loaded (unpickling it could run code); resume only from a " \
          "checkpoint of a trusted run, or start the run afresh in a new run.out_dir"


def train_args(data, out, zero, steps):
    return ["train", "--config", os.path.join(REPO, "configs", "tiny.yaml"), f"data.train={data}/train",
            "data.valid=", f"run.out_dir={out}", f"run.max_steps={steps}", "model.max_seq_len=32",
            "model.dropout=0.1", f"deepspeed.zero_stage={zero}", "data.global_batch_size=8",
            "data.micro_batch_size=2", "run.save_every=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety_data")
    write_pattern_splits(root, valid=False)
    return root


@pytest.fixture(scope="module")
def zero2_run(data, tmp_path_factory):
    """A 2-step run on one rank (ZeRO-2) with its checkpoint at step 2; tests plant payloads in copies."""
    out = tmp_path_factory.mktemp("zero2") / "run"
    run_trime(train_args(data, out, 2, 2))
    return out


def copy_run(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def plant_payload(path, marker) -> None:
    """Re-save a DeepSpeed checkpoint file with a pickled object beside its real contents."""
    state = load_weights_only(str(path), map_location="cpu")
    state["payload"] = Payload(marker)
    torch.save(state, path)


def resume_refused(data, run, zero, ranks=1) -> list[str]:
    """Run --resume, expect exit 2 without a traceback; the error lines (one per rank)."""
    proc = run_trime(["train", "--resume", *train_args(data, run, zero, 4)[1:]], ranks=ranks, check=False)
    assert proc.returncode in (1, 2), proc.stderr[-3000:]  # (the DeepSpeed launcher exits 1)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "trime train: error:" in line]
    assert lines, proc.stderr[-3000:]
    return lines


def test_the_payload_runs_when_unpickled(tmp_path):
    """The control: the planted object does run code under a plain unpickling (torch.load(weights_only=False))."""
    marker = tmp_path / "payload-ran"
    torch.save({"x": Payload(marker)}, tmp_path / "f.pt")
    torch.load(tmp_path / "f.pt", weights_only=False)
    assert marker.exists()


def test_rng_state_is_tensors_and_json_and_restores_exactly(tmp_path):
    os.makedirs(tmp_path / TAG)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # both libraries now hold a cached Gaussian
    np.random.randn()
    save_rng_state(str(tmp_path), TAG, 0)
    ahead = (random.random(), random.gauss(0, 1), np.random.randn(4).tolist(), torch.rand(4).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert load_rng_state(str(tmp_path), TAG, 0)
    assert (random.random(), random.gauss(0, 1), np.random.randn(4).tolist(), torch.rand(4).tolist()) == ahead
    assert os.listdir(tmp_path / TAG) == ["rng_state-rank00000.safetensors"]


def test_old_pickled_rng_state_with_payload_is_refused(data, zero2_run, tmp_path):
    run, marker = copy_run(zero2_run, tmp_path), tmp_path / "payload-ran"
    ckpt = str(run / "checkpoints")
    os.remove(rng_state_path(ckpt, TAG, 0))
    legacy = legacy_rng_state_path(ckpt, TAG, 0)
    torch.save({"torch": torch.get_rng_state(), "numpy": Payload(marker)}, legacy)
    assert resume_refused(data, run, 2) == [
        f"trime train: error: {legacy}: RNG state in the old pickle format, not loaded (unpickling a checkpoint can "
        f"run code); delete {ckpt}/{TAG}/rng_state-rank*.pt to resume without them (the random streams, dropout, "
        "then restart from the seed: not bit-exact)"]
    assert not marker.exists()


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_payload_in_a_deepspeed_file_is_refused(data, zero2_run, tmp_path, name):
    run, marker = copy_run(zero2_run, tmp_path), tmp_path / "payload-ran"
    path = run / "checkpoints" / TAG / name
    plant_payload(path, marker)
    assert resume_refused(data, run, 2) == [f"trime train: error: {path}: {REFUSED}"]
    assert not marker.exists()


@pytest.mark.slow
def test_payload_in_one_ranks_zero3_file_is_refused_by_every_rank(data, tmp_path):
    """Only rank 1 reads its optimizer partition, yet both ranks refuse at once (no rank left waiting)."""
    run, marker = tmp_path / "run", tmp_path / "payload-ran"
    run_trime(train_args(data, run, 3, 2), ranks=2)
    path = run / "checkpoints" / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    plant_payload(path, marker)
    assert resume_refused(data, run, 3, ranks=2) == [f"trime train: error: {path}: {REFUSED}"] * 2
    assert not marker.exists()
