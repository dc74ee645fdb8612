"""The `trime` console script: every stage is reachable and documents its options."""
import subprocess
import sys

import pytest

from trime_dist.cli import STAGES, _strip_local_rank, build_parser


def test_top_level_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "trime_dist.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for stage in STAGES:
        assert stage in out.stdout


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_help(stage, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([stage, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: trime {stage}" in text and "--" in text


def test_train_help_documents_every_config_key(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for key in ("model.n_layers", "objective.cross_sent_ratio", "memory.gather_grad", "deepspeed.zero_stage",
                "optim.schedule", "run.save_every", "data.placement"):
        assert key in text


def test_deepspeed_local_rank_argument_is_dropped():
    assert _strip_local_rank(["--local_rank=1", "train", "a=b"]) == ["train", "a=b"]
    assert _strip_local_rank(["--local_rank", "0", "train"]) == ["train"]
