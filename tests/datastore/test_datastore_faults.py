"""Faults a user can cause around `trime datastore`: plans checked before anything is written, reruns
after a failed or killed build, and one-line errors (exit 2, the file named) for damaged stores."""
import json
import os
import shutil

import numpy as np
import pytest

from trime_dist.model.config import ModelConfig
from trime_dist.model.export import export_model
from trime_dist.model.transformer import build_model

from shard_fixtures import write_segment_dir

from cli_runner import run_trime  # noqa: E402


def make_run(path, max_seq_len=16):
    cfg = ModelConfig(vocab_size=40, d_model=16, n_heads=2, d_ffn=32, max_seq_len=max_seq_len)
    export_model(build_model(cfg, seed=0).state_dict(), cfg, str(path),
                 {"step": 0, "tokenizer_sha256": "0" * 64, "train_manifest_sha256": "x", "seq_len": 16})
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """train: 7 streams, 215 target tokens (= keys); long: seq_len 32 segments; a run; a complete Flat store."""
    from trime_dist.datastore.build import build_datastore
    from trime_dist.datastore.config import DatastoreConfig

    root = tmp_path_factory.mktemp("faults")
    write_segment_dir(str(root / "train"), [40] * 5 + [21], seq_len=16, vocab_size=40, per_shard=7)
    write_segment_dir(str(root / "long"), [70, 40], seq_len=32, vocab_size=40, per_shard=7)
    make_run(root / "run")
    build_datastore(DatastoreConfig(model=str(root / "run"), data=str(root / "train"), out=str(root / "ds"),
                                    part_segments=4, threads=1))
    return root


def build_args(root, out, factory="Flat", data="train"):
    return ["datastore", "build", "--model", root / "run", "--data", root / data, "--out", out,
            "--factory", factory, "--part-segments", "4", "--threads", "1"]


def assert_one_line_error(proc, *names):
    """Exit 2, no traceback, and the error is one line (the last) naming every string in `names`."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    for name in names:
        assert str(name) in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------------- plans

def test_min_train_keys_and_check_factory_fits():
    from trime_dist.datastore import index as dsi

    assert dsi.min_train_keys("Flat")[0] == 0
    assert dsi.min_train_keys("IVF64,Flat") == (64, "nlist 64")
    assert dsi.min_train_keys("IVF4,PQ4x4")[0] == 16 and dsi.min_train_keys("IVF4,PQ8")[0] == 256
    assert dsi.min_train_keys("IVF512,PQ8x4fs")[0] == 512
    dsi.check_factory_fits("IVF64,Flat", 64, 100, "d")
    with pytest.raises(ValueError, match=r"nlist 65 needs >= 65 training keys, more than the 64 keys to store in d"):
        dsi.check_factory_fits("IVF65,Flat", 64, 100, "d")
    with pytest.raises(ValueError, match="more than --train-sample 50"):
        dsi.check_factory_fits("IVF64,Flat", 1000, 50, "d")


def test_oversized_index_is_refused_before_writing_then_corrected_rerun_works(setup, tmp_path):
    out = tmp_path / "ds"
    proc = run_trime(build_args(setup, out, factory="IVF1024,Flat"), check=False)
    assert_one_line_error(proc, "IVF1024,Flat", "nlist 1024", "215 keys", setup / "train")
    assert not os.path.exists(out)  # nothing written, not even the directory
    run_trime(build_args(setup, out, factory="IVF8,Flat"))
    assert json.load(open(out / "datastore.json"))["count"] == 215


def test_data_longer_than_the_model_is_refused(setup, tmp_path):
    from trime_dist.datastore.build import build_datastore
    from trime_dist.datastore.config import DatastoreConfig

    out = tmp_path / "ds"
    with pytest.raises(ValueError, match=r"seq_len 32 exceeds the model's max_seq_len 16"):
        build_datastore(DatastoreConfig(model=str(setup / "run"), data=str(setup / "long"), out=str(out)))
    assert not os.path.exists(out)


def test_plan_of_a_build_that_encoded_nothing_is_replaced(setup, tmp_path):
    """build.json of an attempt that failed before encoding (older versions wrote it first) does not block."""
    from trime_dist.datastore.build import build_datastore
    from trime_dist.datastore.config import DatastoreConfig

    out = tmp_path / "ds"
    os.makedirs(out)
    failed = {**json.load(open(setup / "ds" / "build.json")), "factory": "IVF65536,Flat"}
    with open(out / "build.json", "w") as f:
        json.dump(failed, f)
    build_datastore(DatastoreConfig(model=str(setup / "run"), data=str(setup / "train"), out=str(out),
                                    part_segments=4, threads=1))
    assert json.load(open(out / "build.json"))["factory"] == "Flat"
    assert json.load(open(out / "datastore.json"))["count"] == 215


def test_temp_files_of_a_killed_build_are_removed(setup, tmp_path):
    out = tmp_path / "ds"
    killed = run_trime(build_args(setup, out), env={"TRIME_DATASTORE_EXIT_AFTER": "encode:1"}, check=False)
    assert killed.returncode == 17 and not os.path.exists(out / "datastore.json")
    leftovers = [out / "parts" / ".keys-p00001.npy.abc123.tmp", out / ".index.faiss.xyz.tmp"]
    for path in leftovers:  # what a kill -9 in the middle of atomic_path leaves
        path.write_bytes(b"partial")
    run_trime(build_args(setup, out))
    assert not any(os.path.exists(p) for p in leftovers)
    assert json.load(open(out / "datastore.json"))["count"] == 215


def test_remove_temp_files_keeps_other_files(tmp_path):
    from trime_dist.datastore.parts import remove_temp_files

    (tmp_path / "parts").mkdir()
    for name in (".a.npy.1.tmp", "parts/.b.json.2.tmp", "keep.tmp", "parts/keys-p00000.npy", "parts/.hidden"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_temp_files(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in removed) == [".a.npy.1.tmp", "parts/.b.json.2.tmp"]
    assert sorted(os.listdir(tmp_path / "parts")) == [".hidden", "keys-p00000.npy"]
    assert remove_temp_files(str(tmp_path / "missing")) == []


# ----------------------------------------------------------------------------- damaged stores

def _copy_store(setup, tmp_path):
    shutil.copytree(setup / "ds", tmp_path / "ds")
    return tmp_path / "ds"


def _eval(setup, ds):
    return run_trime(["eval", "--model", setup / "run", "--data", setup / "train", "--memory", "external",
                      "--datastore", ds, "--k", "4", "--nprobe", "1", "--max-segments", "2"], check=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_npy_part_is_one_line_error(setup, tmp_path, damage):
    ds = _copy_store(setup, tmp_path)
    part = ds / "parts" / ("keys-p00001.npy" if damage != "garbage" else "values-p00000.npy")
    if damage == "truncate":
        with open(part, "r+b") as f:
            f.truncate(os.path.getsize(part) - 7)
    elif damage == "garbage":
        part.write_bytes(b"\x93NUMPY\x01\x00" + b"?" * 40)
    else:
        part.unlink()
    assert_one_line_error(run_trime(["datastore", "info", ds], check=False), part)
    assert_one_line_error(_eval(setup, ds), part)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_index_is_one_line_error(setup, tmp_path, damage):
    ds = _copy_store(setup, tmp_path)
    index = ds / "index.faiss"
    if damage == "truncate":
        with open(index, "r+b") as f:
            f.truncate(os.path.getsize(index) // 2)
    elif damage == "garbage":
        index.write_bytes(b"garbage" * 20)
    else:
        index.unlink()
    assert_one_line_error(_eval(setup, ds), index)


def test_output_that_is_a_file_is_one_line_error(setup, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("not a directory\n")
    assert_one_line_error(run_trime(build_args(setup, target), check=False), target, "is a file")
    proc = run_trime(["group", "--input", setup / "train", "--output", target, "--group-size", "2"], check=False)
    assert_one_line_error(proc, target, "is a file")
    assert target.read_text() == "not a directory\n"


def test_store_reader_checks_part_shapes(setup, tmp_path):
    from trime_dist.datastore.store import open_datastore

    ds = _copy_store(setup, tmp_path)
    np.save(ds / "parts" / "values-p00000.npy", np.zeros(3, np.int32))  # whole file, wrong length
    with pytest.raises(ValueError, match=r"values-p00000.npy: shape \(3,\), expected"):
        open_datastore(str(ds))
