"""Config loading: defaults < YAML < overrides, strict keys and types, cross-field validation; `opt` fields,
their docs in help, choices, flags generated from a dataclass, and errors that name their source."""
import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

import pytest

from trime_dist.core.config import (
    ConfigError,
    config_help,
    field_default,
    load_config,
    opt,
    type_name,
)
from trime_dist.core.flags import add_dataclass_flags, dataclass_from_flags
from trime_dist.model.config import ModelConfig
from trime_dist.train.config import OptimConfig, TrainConfig, validate_train_config
from trime_dist.train.engine import build_ds_config, lr_factor


def test_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  n_layers: 5\n  d_model: 64\noptim:\n  lr: 0.01\n")
    cfg = load_config(TrainConfig, str(y), ["model.n_layers=7", "objective.name=trime_ext"])
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.optim.lr, cfg.objective.name) == (7, 64, 0.01, "trime_ext")
    assert cfg.model.n_heads == TrainConfig().model.n_heads


@pytest.mark.parametrize("override,needle", [
    ("model.n_layerz=3", "model.n_layerz"),
    ("model.n_layers=two", "model.n_layers"),
    ("optim=3", "OptimConfig"),
    ("nokey", "key.path=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(TrainConfig, None, [override])


def test_unknown_yaml_key_names_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("run:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match="run.max_stepz.*|bad.yaml"):
        load_config(TrainConfig, str(y))
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, str(tmp_path / "missing.yaml"))


def _valid(**over):
    cfg = load_config(TrainConfig, None, ["data.train=x"] + [f"{k}={v}" for k, v in over.items()])
    return cfg


def test_cross_field_checks():
    validate_train_config(_valid(), world_size=2)
    with pytest.raises(ConfigError, match="data.global_batch_size.*2 x 8"):
        validate_train_config(_valid(**{"data.global_batch_size": 24}), world_size=2)
    with pytest.raises(ConfigError, match="objective.name.*allowed"):
        validate_train_config(_valid(**{"objective.name": "trime"}), world_size=1)
    with pytest.raises(ConfigError, match="model.d_model"):
        validate_train_config(_valid(**{"model.n_heads": 3}), world_size=1)
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        validate_train_config(_valid(**{"deepspeed.zero_stage": 4}), world_size=1)


def test_deepspeed_json_follows_config():
    cfg = _valid(**{"data.global_batch_size": 64, "data.micro_batch_size": 4, "deepspeed.zero_stage": 3,
                    "deepspeed.precision": "bf16"})
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert "scheduler" not in ds  # the LR schedule is ours (lr_factor), see build_engine


def test_who_clips_and_the_zero_settings_per_stage():
    """ZeRO-0 in fp32 weights is clipped by the loop (DeepSpeed's clipping off), every other case by DeepSpeed;
    ZeRO-1/2/3 reduce without the contiguous gradient copies (issue 21), and deepspeed.extra still wins."""
    from trime_dist.train.engine import clips_in_loop

    for stage, precision, in_loop in ((0, "fp32", True), (0, "bf16_autocast", True), (0, "bf16", False),
                                      (2, "fp32", False), (3, "bf16_autocast", False)):
        cfg = _valid(**{"deepspeed.zero_stage": stage, "deepspeed.precision": precision, "optim.grad_clip": 0.5})
        ds = build_ds_config(cfg, world_size=1)
        assert clips_in_loop(cfg) == in_loop and ds["gradient_clipping"] == (0.0 if in_loop else 0.5)
        assert ds["zero_optimization"].get("contiguous_gradients", True) == (stage == 0)
    cfg = _valid(**{"deepspeed.zero_stage": 2})
    cfg.deepspeed.extra = {"zero_optimization": {"contiguous_gradients": True}}
    assert build_ds_config(cfg, world_size=1)["zero_optimization"] == {"stage": 2, "contiguous_gradients": True}
    cfg = _valid()
    cfg.deepspeed.extra = {"gradient_clipping": 2.0}
    assert not clips_in_loop(cfg) and build_ds_config(cfg, world_size=1)["gradient_clipping"] == 2.0


def test_loop_clipping_is_deepspeeds_rule():
    """clip_gradients scales by max_norm / (norm + 1e-6) when the norm is above max_norm, as DeepSpeed's ZeRO-0
    clip_grad_norm_ (deepspeed/runtime/utils.py), and returns the norm before clipping."""
    import torch

    from trime_dist.train.engine import clip_gradients

    torch.manual_seed(0)
    grads = [torch.randn(5, 3), torch.randn(7)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    engine = type("Engine", (), {"module": torch.nn.ParameterList(params)})()
    total = sum(float(g.norm()) ** 2 for g in grads) ** 0.5
    assert float(clip_gradients(engine, 0.5)) == pytest.approx(total, rel=1e-6)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * (0.5 / (total + 1e-6)), rtol=1e-6, atol=1e-7)


def test_lr_schedules():
    inv = OptimConfig(schedule="inverse_sqrt", warmup_steps=10)
    assert lr_factor(0, inv, 100) == pytest.approx(0.1)  # the first step already learns
    assert lr_factor(9, inv, 100) == pytest.approx(1.0)
    assert lr_factor(39, inv, 100) == pytest.approx(0.5)
    cos = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(10, cos, 110) == pytest.approx(1.0)
    assert lr_factor(60, cos, 110) == pytest.approx(0.55)
    assert lr_factor(110, cos, 110) == pytest.approx(0.1)
    assert lr_factor(0, OptimConfig(schedule="constant", warmup_steps=0), 5) == 1.0


# ----------------------------------------------------------------------------- opt, docs, choices, sources

@dataclass
class _Inner:
    mode: str = opt("a", "how", choices=("a", "b"))


@dataclass
class _Flat:
    name: str = opt("x", "a name")
    size: int = opt(3, "how many, 100% sure")
    kinds: list[str] = opt(doc="kinds to use", factory=lambda: ["a"], choices=("a", "b", "c"))
    tags: list[str] = opt(doc="repeatable", factory=list, repeat=True, metavar="TAG")
    path: Optional[str] = opt(None, "optional path")
    on: bool = opt(False, "a switch")


@dataclass
class _Nested:
    inner: _Inner = opt(doc="nested", factory=_Inner)
    n: int = opt(1, "a number")


def test_opt_puts_doc_choices_and_factory_in_the_field():
    f = {x.name: x for x in dataclasses.fields(_Flat)}
    assert f["name"].metadata["help"] == "a name" and f["name"].default == "x"
    assert f["kinds"].metadata["choices"] == ("a", "b", "c") and f["tags"].metadata["repeat"]
    a, b = _Flat(), _Flat()
    assert a.kinds == ["a"] and a.kinds is not b.kinds  # a fresh default per instance
    assert field_default(f["kinds"]) == ["a"] and field_default(f["path"]) is None


def test_config_help_reads_docs_from_the_fields():
    text = config_help(_Nested)
    assert "  inner.mode (str, default 'a', one of a | b): how" in text.splitlines()
    assert "  n (int, default 1): a number" in text.splitlines()
    assert "  path (Optional[str], default None): optional path" in config_help(_Flat).splitlines()
    assert "model.n_layers (int, default 2): transformer blocks" in config_help(TrainConfig)
    assert type_name(dict[str, _Inner]) == "dict[str, _Inner]"


def test_errors_name_the_source_of_the_bad_value(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  n_layers: 3\n")
    with pytest.raises(ConfigError, match=r"\(on the command line\).*model\.n_layerz"):
        load_config(TrainConfig, str(y), ["model.n_layerz=3"])
    with pytest.raises(ConfigError, match=r"\(on the command line\).*model\.n_layers"):
        load_config(TrainConfig, str(y), ["model.n_layers=two"])
    y.write_text("model:\n  n_layerz: 3\n")
    with pytest.raises(ConfigError, match=rf"\(in {y}\).*model\.n_layerz"):
        load_config(TrainConfig, str(y), ["model.n_layers=3"])
    with pytest.raises(ConfigError, match=r"\(in run/info\.json \[model\]\).*d_modle"):
        load_config(ModelConfig, values={"d_modle": 3}, where="run/info.json [model]")
    with pytest.raises(ConfigError, match=r"\(on the command line\).*size"):
        load_config(_Flat, flags={"size": "many"})
    with pytest.raises(ConfigError, match=r"\(on the command line\).*flow node"):  # not even YAML
        load_config(_Flat, None, ["kinds=[a,"])


def test_choices_are_enforced_per_source(tmp_path):
    with pytest.raises(ConfigError, match=r"\(on the command line\): objective\.name: got 'trime', allowed: ce"):
        load_config(TrainConfig, None, ["objective.name=trime"])
    y = tmp_path / "c.yaml"
    y.write_text("inner:\n  mode: z\n")
    with pytest.raises(ConfigError, match=rf"\(in {y}\): inner\.mode: got 'z', allowed: a, b"):
        load_config(_Nested, str(y))
    with pytest.raises(ConfigError, match=r"kinds: got 'd'"):  # every item of a list
        load_config(_Flat, flags={"kinds": ["a", "d"]})
    assert load_config(_Nested, None, ["inner.mode=b"]).inner.mode == "b"


def _parse_flags(cls, argv):
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, cls)
    return dataclass_from_flags(cls, parser.parse_args(argv))


def test_flags_from_a_dataclass(tmp_path, capsys):
    cfg = _parse_flags(_Flat, ["--size", "5", "--kinds", "b", "c", "--tags", "t1", "--tags", "t2", "--on",
                               "--path", "p"])
    assert cfg == _Flat(name="x", size=5, kinds=["b", "c"], tags=["t1", "t2"], path="p", on=True)
    assert _parse_flags(_Flat, []) == _Flat()
    y = tmp_path / "f.yaml"
    y.write_text("name: from_yaml\nsize: 7\n")
    cfg = _parse_flags(_Flat, ["--config", str(y), "--size", "8"])
    assert (cfg.name, cfg.size) == ("from_yaml", 8)  # defaults < YAML < flags
    y.write_text("nmae: typo\n")
    with pytest.raises(ConfigError, match=rf"\(in {y}\).*nmae"):
        _parse_flags(_Flat, ["--config", str(y)])
    with pytest.raises(SystemExit):  # argparse enforces choices too
        _parse_flags(_Flat, ["--kinds", "z"])
    assert "invalid choice: 'z'" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, _Flat, config_file=False)
    text = parser.format_help()
    assert "--config" not in text and "how many, 100% sure (default: 3)" in " ".join(text.split())
    assert "--tags TAG" in text and "--on, --no-on" in text
