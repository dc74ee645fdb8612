"""`trime train model.pretrained=DIR`: a tiny local Hugging Face model trained with the TRIME objective on
2 DeepSpeed ranks under ZeRO 0-3. Step 1 (plain CE) must equal the HF model's own CE on the first batch,
which proves the pretrained weights were loaded (also partitioned, under ZeRO-3)."""
import json
import math
import os

import pytest
import torch

from trime_dist.cli import main as trime_main
from trime_dist.train.config import TrainConfig

from cli_runner import run_trime
from dist_helpers import run_distributed
from hf_fixtures import write_tiny_model
from shard_fixtures import all_segments, write_segment_dir

MODEL_VOCAB, DATA_VOCAB, SEQ_LEN, GROUP = 300, 50, 32, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    write_segment_dir(str(root / "train"), [700] * 6, seq_len=SEQ_LEN, vocab_size=DATA_VOCAB, per_shard=40,
                      noise=0.2)
    for family in ("gpt2", "gpt_neox", "llama"):
        write_tiny_model(root / family, family, MODEL_VOCAB)
    return root


def overrides(root, out, family="gpt2", steps=3, *extra):
    return [f"model.pretrained={root / family}", f"data.train={root}/train", "data.valid=", f"run.out_dir={out}",
            f"run.max_steps={steps}", "data.micro_batch_size=4", f"data.global_batch_size={GROUP}",
            "data.shuffle_shards=false", "objective.ce_warmup_steps=1", "optim.warmup_steps=1", "optim.lr=1e-3",
            "run.log_every=1", "run.threads=1", "data.allow_ungrouped=true", *extra]


def losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if "loss" in r]


def hf_first_batch_ce(root, family: str) -> float:
    """The HF model's own mean CE over the first group (the first GROUP segments, all full, no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / family, local_files_only=True).eval()
    rows = list(all_segments(str(root / "train")).values())[:GROUP]
    tokens = torch.tensor([list(r) for r in rows], dtype=torch.long)                 # [G, L + 1]
    assert tokens.shape == (GROUP, SEQ_LEN + 1)
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits                                        # [G, L, V]
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))


def check_run(root, out, family, objective, rel=1e-5):
    rows = losses(out)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["objective"] == "ce" and all(r["objective"] == objective for r in rows[1:])
    assert rows[0]["loss"] == pytest.approx(hf_first_batch_ce(root, family), rel=rel)
    info = json.load(open(out / "model" / "model.json"))
    assert info["architecture"] == "hf" and info["hf_config"]["model_type"] == family
    assert info["model"]["d_model"] == 32 and info["model"]["vocab_size"] == MODEL_VOCAB
    return [r["loss"] for r in rows]


@pytest.mark.slow
def test_two_ranks_zero0_and_zero3_train_the_same(setup, tmp_path):
    """trime_ext from a pretrained gpt2: ZeRO-0 and ZeRO-3 (weights loaded partitioned) give the same losses."""
    runs = {}
    for zero in (0, 3):
        out = tmp_path / f"zero{zero}"
        run_trime(["train", *overrides(setup, out, "gpt2", 3, "objective.name=trime_ext",
                                       f"deepspeed.zero_stage={zero}")], ranks=2)
        runs[zero] = check_run(setup, out, "gpt2", "trime_ext")
    assert runs[3] == pytest.approx(runs[0], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("zero,extra", [
    (2, []),
    (3, ["model.activation_checkpointing=true"]),
])
def test_two_ranks_trime_local(setup, tmp_path, zero, extra):
    out = tmp_path / "run"
    run_trime(["train", *overrides(setup, out, "gpt2", 3, "objective.name=trime_local",
                                   f"deepspeed.zero_stage={zero}", *extra)], ranks=2)
    check_run(setup, out, "gpt2", "trime_local")


@pytest.mark.slow
def test_bf16_zero3(setup, tmp_path):
    out = tmp_path / "run"
    run_trime(["train", *overrides(setup, out, "gpt2", 3, "objective.name=trime_ext", "deepspeed.zero_stage=3",
                                   "deepspeed.precision=bf16")], ranks=2)
    check_run(setup, out, "gpt2", "trime_ext", rel=2e-2)  # bf16 forward: about 3 significant digits


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_other_families_one_rank(setup, tmp_path, family):
    out = tmp_path / "run"
    run_trime(["train", *overrides(setup, out, family, 2, "objective.name=trime_ext", "deepspeed.zero_stage=0")])
    check_run(setup, out, family, "trime_ext")


def _zero3_load_worker(rank, world_size, model_dir):
    import deepspeed
    from transformers.integrations import is_deepspeed_zero3_enabled

    from trime_dist.model.hf import pretrained_model_config
    from trime_dist.train.engine import build_train_model

    os.environ["LOCAL_RANK"] = str(rank)  # as `trime train` exports it for every launcher
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = TrainConfig()
    cfg.data.micro_batch_size, cfg.data.global_batch_size, cfg.deepspeed.zero_stage = 1, 2, 3
    cfg.model.pretrained = model_dir
    cfg.model = pretrained_model_config(cfg.model)
    model = build_train_model(cfg, world_size)
    # right after loading: each parameter is an empty placeholder plus this rank's partition
    shapes = {n: (p.numel(), p.ds_numel, p.ds_tensor.numel()) for n, p in model.named_parameters()}
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        full = {n: p.detach().clone() for n, p in model.named_parameters()}
    return shapes, full, is_deepspeed_zero3_enabled()


@pytest.mark.slow
def test_zero3_loads_partitioned_weights(setup):
    """Under ZeRO-3 no rank holds the whole model after from_pretrained, and the partitions are the file's."""
    from safetensors.torch import load_file

    ranks = run_distributed(_zero3_load_worker, 2, args=(str(setup / "gpt2"),))
    saved = load_file(str(setup / "gpt2" / "model.safetensors"))
    total = sum(t.numel() for t in saved.values())
    for shapes, full, zero3_left_on in ranks:
        assert not zero3_left_on  # the integration is switched off again once the model is built
        assert all(local == 0 for local, _, _ in shapes.values())
        held = sum(part for _, _, part in shapes.values())
        assert held < 0.6 * total
        for name, tensor in saved.items():
            torch.testing.assert_close(full[f"hf_model.{name}"], tensor, rtol=0, atol=0)


def test_bad_pretrained_inputs_give_one_line_errors(setup, tmp_path, capsys):
    def error(*extra, family="gpt2"):
        capsys.readouterr()  # drop what writing the fixtures printed
        assert trime_main(["train", *overrides(setup, tmp_path / "out", family, 2, *extra)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert f"model.pretrained={tmp_path / 'nope'}: no such folder" in error(f"model.pretrained={tmp_path / 'nope'}")
    assert "model.d_model=64 disagrees" in error("model.d_model=64")
    write_tiny_model(setup / "small_vocab", "gpt2", 40)
    err = error(family="small_vocab")
    assert "model.vocab_size=40" in err and "smaller than the tokenizer's 50" in err and "small_vocab" in err
    write_segment_dir(str(tmp_path / "long"), [300], seq_len=80, vocab_size=DATA_VOCAB)
    err = error(f"data.train={tmp_path / 'long'}")
    assert "model.max_seq_len=64" in err and "config.json" in err and "80" in err
