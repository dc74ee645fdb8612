"""The exported model (safetensors + model.json) and `trime export --format hf|safetensors`: round trips,
model_id = hash of the tensors, the built-in model as GPT-2 and a pretrained GPT-2 run give
transformers.AutoModelForCausalLM the same logits, bad inputs end with one line, writes are atomic."""
import dataclasses
import json
import os

import pytest
import torch

from trime_dist.cli import main as trime_main
from trime_dist.model.config import ModelConfig
from trime_dist.model.export import export_model, load_model, tensors_sha256
from trime_dist.model.gpt2_map import check_maps_onto_gpt2
from trime_dist.model.transformer import build_model

from cli_runner import REPO, run_trime
from pickle_payload import Payload
from shard_fixtures import write_segment_dir

INFO = {"step": 3, "tokenizer_sha256": "0" * 64}


def _cfg(**kw):
    return ModelConfig(**{"vocab_size": 37, "n_layers": 2, "d_model": 32, "n_heads": 4, "d_ffn": 64,
                          "max_seq_len": 16, **kw})


def _perturbed(cfg, seed=0):
    """A built-in model with weights far from the init (biases and norms non-trivial too)."""
    model = build_model(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _run(tmp_path, cfg, name="run", seed=0, **kw):
    model = _perturbed(cfg, seed)
    export_model(model.state_dict(), cfg, str(tmp_path / name), dict(INFO), **kw)
    return str(tmp_path / name), model


def _ids(vocab=37, T=16):
    return torch.randint(0, vocab, (3, T), generator=torch.Generator().manual_seed(5))


def _export(args):
    return trime_main(["export", *map(str, args)])


@pytest.mark.parametrize("tie", [True, False])
def test_safetensors_round_trip(tmp_path, tie):
    run, model = _run(tmp_path, _cfg(tie_embeddings=tie))
    files = sorted(os.listdir(os.path.join(run, "model")))
    assert files == ["model.json", "model.safetensors"]
    loaded, info = load_model(run)
    assert info["architecture"] == "builtin" and info["step"] == 3
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tie  # the tie is rebuilt, not two copies
    x = _ids()
    assert torch.equal(loaded(x)[0], model(x)[0]) and torch.equal(loaded.encode(x), model.encode(x))


def test_model_id_is_the_tensor_contents(tmp_path):
    cfg = _cfg()
    model = _perturbed(cfg)
    state = model.state_dict()
    copied = {k: v.clone() for k, v in state.items()}  # a tied lm_head as its own copy (bf16 runs, ZeRO-3)
    export_model(state, cfg, str(tmp_path / "a"), dict(INFO))
    export_model(copied, cfg, str(tmp_path / "b"), {**INFO, "step": 9})
    ids = [load_model(str(tmp_path / n))[1]["model_id"] for n in "ab"]
    assert ids[0] == ids[1] == tensors_sha256({k: v for k, v in state.items() if k != "lm_head.weight"})[:16]
    export_model(_perturbed(cfg, seed=1).state_dict(), cfg, str(tmp_path / "c"), dict(INFO))
    assert load_model(str(tmp_path / "c"))[1]["model_id"] != ids[0]


def test_old_weights_pt_runs_still_load(tmp_path):
    """Runs exported before safetensors (weights.pt, model_id = the file's hash) load with the same id."""
    from trime_dist.core.io import atomic_write_json, sha256_file

    cfg = _cfg()
    model = _perturbed(cfg)
    out = tmp_path / "old" / "model"
    out.mkdir(parents=True)
    torch.save(model.state_dict(), out / "weights.pt")
    digest = sha256_file(str(out / "weights.pt"))
    atomic_write_json(str(out / "model.json"), {"weights_sha256": digest, **INFO, "model": dataclasses.asdict(cfg)})
    loaded, info = load_model(str(tmp_path / "old"))
    assert info["model_id"] == digest[:16]
    x = _ids()
    assert torch.equal(loaded(x)[0], model(x)[0])


def test_old_weights_pt_holding_an_object_is_refused_in_one_line(tmp_path, capsys):
    """A weights.pt with a pickled object (not only tensors) is never unpickled: one line naming the file,
    from load_model and from the command line (trime export)."""
    from trime_dist.core.io import atomic_write_json, sha256_file

    cfg, marker = _cfg(), tmp_path / "payload-ran"
    out = tmp_path / "old" / "model"
    out.mkdir(parents=True)
    torch.save({**_perturbed(cfg).state_dict(), "x": Payload(marker)}, out / "weights.pt")
    atomic_write_json(str(out / "model.json"), {"weights_sha256": sha256_file(str(out / "weights.pt")), **INFO,
                                                "model": dataclasses.asdict(cfg)})
    with pytest.raises(ValueError, match=r"weights.pt: holds a non-allowed object \(io.open\), not loaded"):
        load_model(str(tmp_path / "old"))
    assert trime_main(["export", str(tmp_path / "old"), "--format", "safetensors", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert lines == [f"trime export: error: {out / 'weights.pt'}: holds a non-allowed object (io.open), not loaded "
                     "(unpickling it could run code); use a model exported as model.safetensors, or one from a "
                     "trusted run"], err
    assert "Traceback" not in err
    assert not marker.exists()


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    run, _ = _run(tmp_path, _cfg())
    info_path = os.path.join(run, "model", "model.json")
    info = json.load(open(info_path))
    info["model"]["n_layers"] = 3
    json.dump(info, open(info_path, "w"))
    with pytest.raises(ValueError, match=r"do not match model.json: missing \['blocks.2"):
        load_model(run)
    os.remove(os.path.join(run, "model", "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no weights matching model.json"):
        load_model(run)


# ----------------------------------------------------------------------------- trime export

def _assert_hf_logits(out, model, vocab=37, T=16, atol=1e-5):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == torch.float32
    x = _ids(vocab, T)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=atol, rtol=0)
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_builtin_exports_as_gpt2_with_the_same_logits(tmp_path, tie):
    run, model = _run(tmp_path, _cfg(tie_embeddings=tie, dropout=0.1))
    assert _export([run, "--format", "hf", "--out", tmp_path / "hf"]) == 0
    hf = _assert_hf_logits(str(tmp_path / "hf"), model)
    assert hf.config.model_type == "gpt2" and hf.config.resid_pdrop == 0.1
    assert (hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()) == tie
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_gpt2_mapping_matches_in_float64(tmp_path):
    """The mapping itself, without fp32 rounding: GPT-2's forward == the built-in forward to 1e-12."""
    from trime_dist.model.gpt2_map import build_gpt2

    cfg = _cfg(tie_embeddings=False)
    model = _perturbed(cfg).double()
    hf = build_gpt2(model.state_dict(), cfg).double()
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-12, rtol=0)


def test_safetensors_export_reloads_with_the_same_model_id(tmp_path):
    run, model = _run(tmp_path, _cfg())
    assert _export([run, "--format", "safetensors", "--out", tmp_path / "st"]) == 0
    loaded, info = load_model(str(tmp_path / "st"))
    assert info["model_id"] == load_model(run)[1]["model_id"] and info["step"] == 3
    x = _ids()
    assert torch.equal(loaded(x)[0], model(x)[0])


def test_an_unmappable_architecture_is_named():
    @dataclasses.dataclass
    class Rotary(ModelConfig):
        rotary: bool = True

    with pytest.raises(ValueError, match="model.rotary has no GPT-2 counterpart"):
        check_maps_onto_gpt2(Rotary(vocab_size=10))


@pytest.mark.parametrize("case", ["bad_run", "bad_format", "nonempty_out"])
def test_bad_inputs_end_with_one_line(tmp_path, capsys, case):
    run, _ = _run(tmp_path, _cfg())
    out = tmp_path / "out"
    args = {"bad_run": [tmp_path / "nowhere", "--format", "hf", "--out", out],
            "bad_format": [run, "--format", "onnx", "--out", out],
            "nonempty_out": [run, "--format", "hf", "--out", tmp_path]}[case]
    assert _export(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("trime export: error:")
    assert {"bad_run": "no trained model in", "bad_format": "--format 'onnx': expected one of hf, safetensors",
            "nonempty_out": "exists and is not an empty folder"}[case] in err
    assert not out.exists()


def test_a_failed_export_leaves_nothing(tmp_path, capsys):
    """The weights do not fill GPT-2 (a block is missing): the error names it, no DIR, no temp folder."""
    from safetensors.torch import load_file, save_file

    run, _ = _run(tmp_path, _cfg())
    path = os.path.join(run, "model", "model.safetensors")
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("blocks.1.")}, path)
    (tmp_path / "empty").mkdir()
    assert _export([run, "--format", "hf", "--out", tmp_path / "empty"]) == 2
    assert "do not fill GPT-2: missing ['transformer.h.1." in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["empty", "run"] and not os.listdir(tmp_path / "empty")


# ----------------------------------------------------------------------------- from a real run

def test_trained_run_exports_with_its_tokenizer(tmp_path):
    """`trime train` (1 rank, 2 steps) -> RUN/model has safetensors + tokenizer -> `trime export --format hf`
    -> AutoTokenizer and AutoModelForCausalLM load DIR on their own and give trime_dist's logits."""
    from transformers import AutoTokenizer

    write_segment_dir(str(tmp_path / "train"), [300] * 4, seq_len=16, vocab_size=50, per_shard=10,
                      real_tokenizer=True)
    run = tmp_path / "run"
    run_trime(["train", "--config", os.path.join(REPO, "configs", "tiny.yaml"), f"data.train={tmp_path}/train",
               "data.valid=", f"run.out_dir={run}", "run.max_steps=2", "model.max_seq_len=16",
               "model.d_model=32", "model.d_ffn=64", "data.micro_batch_size=4", "data.global_batch_size=4",
               "deepspeed.zero_stage=0"])
    assert sorted(os.listdir(run / "model")) == ["config.yaml", "model.json", "model.safetensors", "tokenizer.json"]
    run_trime(["export", run, "--format", "hf", "--out", tmp_path / "hf"])
    model, info = load_model(str(run))
    _assert_hf_logits(str(tmp_path / "hf"), model, vocab=model.cfg.vocab_size)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.eos_token_id == info["tokenizer"]["eod_id"] and tok.decode(tok("a b")["input_ids"]) == "a b"


# ----------------------------------------------------------------------------- runs from model.pretrained

@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_pretrained_run_round_trips_and_exports_as_itself(tmp_path, family):
    """A run from model.pretrained: model.json says "hf" + its config; load_model rebuilds it; `--format hf`
    writes a folder AutoModelForCausalLM loads with trime_dist's logits (atol 1e-5, fp32)."""
    from hf_fixtures import write_tiny_model

    from trime_dist.model.hf import load_pretrained

    src = write_tiny_model(tmp_path / "src", family, vocab_size=37)
    model = load_pretrained(ModelConfig(pretrained=str(src))).eval()
    export_model(model.state_dict(), model.cfg, str(tmp_path / "run"), dict(INFO), hf_config=model.hf_config_dict())
    info = json.load(open(tmp_path / "run" / "model" / "model.json"))
    assert info["architecture"] == "hf" and info["hf_config"]["model_type"] == family
    loaded, info = load_model(str(tmp_path / "run"))
    x = _ids(T=20)
    assert torch.equal(loaded(x)[0], model(x)[0]) and torch.equal(loaded.encode(x), model.encode(x))
    assert _export([tmp_path / "run", "--format", "hf", "--out", tmp_path / "hf"]) == 0
    _assert_hf_logits(str(tmp_path / "hf"), model, T=20)
    assert _export([tmp_path / "run", "--format", "safetensors", "--out", tmp_path / "st"]) == 0
    assert load_model(str(tmp_path / "st"))[1]["model_id"] == info["model_id"]
