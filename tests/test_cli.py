"""The `trime` console script: every stage is reachable, documents its options, and is imported only when chosen."""
import subprocess
import sys

import pytest

from trime_dist.cli import _strip_local_rank, build_parser
from trime_dist.core.stages import STAGES

from cli_runner import REPO


def test_top_level_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "trime_dist.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for stage in STAGES:
        assert stage in out.stdout


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_help(stage, capsys):
    parser = build_parser(stage)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([stage, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: trime {stage}" in text and "--" in text


def test_train_help_documents_every_config_key(capsys):
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for key in ("model.n_layers", "objective.cross_sent_ratio", "memory.gather_grad", "deepspeed.zero_stage",
                "optim.schedule", "run.save_every", "data.placement", "--auto-resume"):
        assert key in text
    assert "objective.name (str, default 'trime_local', one of ce | trime_local" in text


def test_only_the_chosen_stage_is_imported():
    """Building the parser of any one stage imports that stage's module only, and none of them needs torch."""
    code = ("import sys\nfrom trime_dist.cli import build_parser\nfrom trime_dist.core.stages import STAGES\n"
            "build_parser('corpus')\n"
            "print('OTHERS', sorted(n for n, s in STAGES.items() if n != 'corpus' and s.module in sys.modules))\n"
            "for name in STAGES:\n    build_parser(name)\n"
            "print('HEAVY', sorted(m for m in ('torch', 'deepspeed', 'faiss', 'mpi4py') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OTHERS []" in out.stdout and "HEAVY []" in out.stdout, out.stdout


def test_unknown_stage_is_refused(capsys):
    from trime_dist.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err


def test_deepspeed_local_rank_argument_is_dropped():
    assert _strip_local_rank(["--local_rank=1", "train", "a=b"]) == ["train", "a=b"]
    assert _strip_local_rank(["--local_rank", "0", "train"]) == ["train"]
