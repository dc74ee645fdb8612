"""Config loading: defaults < YAML < overrides, strict keys and types, cross-field validation."""
import pytest

from trime_dist.core.config import ConfigError, load_config
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
