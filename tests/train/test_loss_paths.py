"""The loss spec (built once from the config, the per-step layout draw), loss scaling, and
micro_batch_loss's fast paths (segment-batched local, tiled long/external) against the dense reference."""
import random

import pytest
import torch

from trime_dist.core.config import ConfigError
from trime_dist.core.constants import IGNORE_INDEX
from trime_dist.train.batch import Batch
from trime_dist.train.config import TrainConfig
from trime_dist.train.loss import (
    LossSpec,
    build_loss_spec,
    loss_to_backward,
    micro_batch_loss,
)

from dist_helpers import run_distributed

# ---------------------------------------------------------------- the spec


def _cfg(objective="trime_local", placement="contiguous", **objective_fields):
    cfg = TrainConfig()
    cfg.objective.name, cfg.data.placement = objective, placement
    for key, value in objective_fields.items():
        setattr(cfg.objective, key, value)
    return cfg


@pytest.mark.parametrize("objective,placement,layout,gather", [
    ("ce", "contiguous", "none", False), ("ce", "interleaved", "none", False),
    ("trime_local", "contiguous", "local", False), ("trime_local", "interleaved", "local", False),
    ("trime_long", "contiguous", "long", False), ("trime_long", "interleaved", "long", True),
    ("trime_ext", "contiguous", "external", True), ("trime_ext", "interleaved", "external", True),
])
def test_build_loss_spec_layout_and_gather(objective, placement, layout, gather):
    spec = build_loss_spec(_cfg(objective, placement))
    assert (spec.layout, spec.gather) == (layout, gather)


def test_build_loss_spec_copies_the_config():
    cfg = _cfg("trime_ext", temperature=0.5, cross_sent_ratio=0.3, ce_warmup_steps=4, ce_warmup_epochs=1)
    cfg.memory.gather_grad, cfg.memory.tiled, cfg.memory.tile_size, cfg.run.seed = False, False, 77, 9
    assert build_loss_spec(cfg) == LossSpec(layout="external", gather=True, gather_grad=False, temperature=0.5,
                                            tiled=False, tile_size=77, cross_sent_ratio=0.3, ce_warmup_steps=4,
                                            ce_warmup_epochs=1, seed=9, exclude_future=True)
    cfg.objective.ext_exclude_future = False
    assert not build_loss_spec(cfg).exclude_future
    assert not build_loss_spec(_cfg("trime_long")).exclude_future   # only external memory has a future to hide


def test_build_loss_spec_names_bad_values():
    with pytest.raises(ConfigError, match=r"objective.name: got 'trime_global', allowed: ce, trime_local"):
        build_loss_spec(_cfg("trime_global"))
    with pytest.raises(ConfigError, match=r"data.placement: got 'random'"):
        build_loss_spec(_cfg("trime_ext", "random"))
    with pytest.raises(ValueError, match="unknown memory layout 'ext'"):
        LossSpec(layout="ext")


def test_step_memory_warmup_and_ce():
    spec = LossSpec(layout="long", ce_warmup_steps=3, ce_warmup_epochs=1)
    assert [spec.step_memory(s, epoch=1) for s in range(5)] == [("none", True)] * 3 + [("long", True)] * 2
    assert spec.step_memory(10, epoch=0) == ("none", True)   # the epoch warm-up holds too
    assert LossSpec(layout="none").step_memory(10, epoch=5) == ("none", True)


def test_step_memory_cross_sent_draw():
    spec = LossSpec(layout="external", cross_sent_ratio=0.4, seed=11)
    got = [spec.step_memory(s, 0) for s in range(200)]
    # the draw of the original trime_dist.train step_objective: results of earlier runs stay reproducible
    assert got == [("external", random.Random(11 * 7_919 + s).random() >= 0.4) for s in range(200)]
    assert 0.5 < sum(use_local for _, use_local in got) / 200 < 0.7
    assert all(LossSpec(layout="external", cross_sent_ratio=1.0).step_memory(s, 0)[1] is False for s in range(20))
    assert all(LossSpec(layout="external", cross_sent_ratio=0.0).step_memory(s, 0)[1] is True for s in range(20))
    assert LossSpec(layout="external", ce_warmup_steps=5, cross_sent_ratio=1.0).step_memory(4, 0) == ("none", True)


def _draw_worker(rank, world_size, spec):
    random.seed(1000 + rank)  # the global RNG differs per rank: the draw must not use it
    torch.manual_seed(rank)
    return [[spec.step_memory(s, 1, rank, m) for m in range(3)] for s in range(50)]


def test_step_memory_drawn_per_rank_and_micro_batch_reproducibly():
    """As the original (a draw per forward pass on each GPU): ranks and micro-batches draw independently,
    from the run's seed alone; the warm-up is the same everywhere."""
    spec = LossSpec(layout="external", cross_sent_ratio=0.5, seed=3, ce_warmup_steps=2)
    ranks = run_distributed(_draw_worker, 2, args=(spec,))
    for rank, draws in enumerate(ranks):   # the same as drawing them in this process
        assert draws == [[spec.step_memory(s, 1, rank, m) for m in range(3)] for s in range(50)]
    assert ranks[0][:2] == ranks[1][:2] == [[("none", True)] * 3] * 2
    flat = [[u for step in r[2:] for _, u in step] for r in ranks]
    assert flat[0] != flat[1] and set(flat[0]) == set(flat[1]) == {True, False}
    assert any(len({u for _, u in step}) == 2 for step in ranks[0][2:])   # micro-batches of one step differ


def test_for_validation_stays_on_the_rank():
    assert LossSpec(layout="external", gather=True).for_validation() == LossSpec(layout="local", gather=False)
    assert LossSpec(layout="none").for_validation().layout == "local"
    assert LossSpec(layout="long", gather=True, temperature=2.0).for_validation() == \
        LossSpec(layout="long", gather=False, temperature=2.0)


# ---------------------------------------------------------------- scaling


def test_loss_to_backward_divides_by_the_group_count():
    nll_sum = torch.tensor(6.0, dtype=torch.float64)
    assert float(loss_to_backward(nll_sum, torch.tensor(3), group_tokens=12)) == 0.5  # W = 1 here
    assert float(loss_to_backward(nll_sum, torch.tensor(3), group_tokens=None)) == 2.0  # all-reduce of one rank
    assert float(loss_to_backward(torch.tensor(0.0), torch.tensor(0), group_tokens=0)) == 0.0  # no 0/0


# ---------------------------------------------------------------- fast paths


def _batch(B=4, T=9, V=11, seed=0, known_tokens=True):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 5, (B, T), generator=g)  # few labels: many positives in memory
    targets[1, 6:] = IGNORE_INDEX                         # a short segment (padding)
    targets[3, :] = IGNORE_INDEX                          # an all-padding row
    batch = Batch(input_ids=torch.zeros(B, T, dtype=torch.long), targets=targets,
                  stream=torch.tensor([0, 0, 1, 1]), stream_index=torch.tensor([0, 1, 0, 1]), row=torch.arange(B),
                  group_tokens=int((targets != IGNORE_INDEX).sum()) if known_tokens else None)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(B, T, 6, generator=g, dtype=torch.float64, requires_grad=True)
    return logits, keys, batch


@pytest.mark.parametrize("layout", ["none", "local", "long", "external"])
@pytest.mark.parametrize("use_local", [True, False])
def test_fast_paths_match_dense(layout, use_local):
    results = []
    for tiled in (False, True):
        logits, keys, batch = _batch()
        spec = LossSpec(layout, tiled=tiled, tile_size=5, temperature=1.3)
        out = micro_batch_loss(logits, keys, batch, spec, layout, use_local)
        out.loss.backward()
        results.append((out, logits.grad, keys.grad))
    (dense, dl, dk), (fast, fl, fk) = results
    torch.testing.assert_close(fast.loss, dense.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.ce_sum, dense.ce_sum, rtol=1e-10, atol=1e-12)
    assert fast.memory_size == pytest.approx(dense.memory_size)
    torch.testing.assert_close(fl, dl, rtol=1e-9, atol=1e-12)
    if layout != "none":
        torch.testing.assert_close(fk, dk, rtol=1e-9, atol=1e-12)


def test_group_tokens_equals_all_reduced_count():
    spec = LossSpec("local")
    a = micro_batch_loss(*_batch(known_tokens=True), spec, "local")
    b = micro_batch_loss(*_batch(known_tokens=False), spec, "local")
    torch.testing.assert_close(a.loss, b.loss)


# ---------------------------------------------------------------- the loop's per-step record


class _OneProcessEngine:
    """The parts of a DeepSpeed engine train_step uses, for one process and plain SGD."""

    def __init__(self, model):
        self.model, self.opt = model, torch.optim.SGD(model.parameters(), lr=0.1)
        self.module = model  # (clip_gradients: ZeRO-0 gradients are clipped by the loop)

    def __call__(self, input_ids):
        return self.model(input_ids)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()

    def get_global_grad_norm(self):
        return None

    def get_lr(self):
        return [0.1]


def test_train_step_records_objective_and_memory():
    from trime_dist.model.config import ModelConfig
    from trime_dist.model.transformer import build_model
    from trime_dist.train.loop import TrainState, train_step

    cfg = _cfg("trime_ext", cross_sent_ratio=0.0, ce_warmup_steps=1)
    cfg.data.micro_batch_size = cfg.data.global_batch_size = 4
    model = build_model(ModelConfig(vocab_size=11, n_layers=1, d_model=16, n_heads=2, d_ffn=32, max_seq_len=9), seed=0)
    engine, spec, state = _OneProcessEngine(model), build_loss_spec(cfg), TrainState()
    batches = iter([(_batch()[2], 0)] * 2)
    records = [train_step(engine, batches, cfg, spec, state, world_size=1, device=torch.device("cpu"))
               for _ in range(2)]
    assert [(r["objective"], r["memory"]) for r in records] == [("ce", "none"), ("trime_ext", "external")]
    assert records[0]["loss"] == pytest.approx(records[0]["ce_loss"]) and records[1]["memory_size"] > 0


def test_bf16_autocast_precision_runs_the_model_in_bf16():
    """deepspeed.precision=bf16_autocast: the forward runs under torch.autocast (bf16 matmuls, fp32 weights); the
    loss stays close to the fp32 step's, and the weights stay fp32."""
    from trime_dist.model.config import ModelConfig
    from trime_dist.model.transformer import build_model
    from trime_dist.train.loop import TrainState, train_step

    losses, dtypes = {}, {}
    for precision in ("fp32", "bf16_autocast"):
        cfg = _cfg("trime_long")
        cfg.data.micro_batch_size = cfg.data.global_batch_size = 4
        cfg.deepspeed.precision = precision
        model = build_model(ModelConfig(vocab_size=11, n_layers=1, d_model=16, n_heads=2, d_ffn=32, max_seq_len=9),
                            seed=0)
        seen = []
        model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        batch = _batch()[2]
        batch.input_ids = torch.randint(0, 11, batch.input_ids.shape, generator=torch.Generator().manual_seed(1))
        record = train_step(_OneProcessEngine(model), iter([(batch, 0)]), cfg, build_loss_spec(cfg), TrainState(),
                            world_size=1, device=torch.device("cpu"))
        losses[precision], dtypes[precision] = record["loss"], seen[0]
        assert next(model.parameters()).dtype == torch.float32
    assert dtypes == {"fp32": torch.float32, "bf16_autocast": torch.bfloat16}
    assert losses["bf16_autocast"] == pytest.approx(losses["fp32"], rel=3e-2) and losses["bf16_autocast"] != losses["fp32"]


def _autocast_worker(rank, world_size):
    import os

    from trime_dist.model.config import ModelConfig
    from trime_dist.model.transformer import build_model
    from trime_dist.train.engine import build_engine

    cfg = TrainConfig()
    cfg.model = ModelConfig(vocab_size=50, n_layers=1, d_model=32, n_heads=2, d_ffn=64, max_seq_len=16)
    cfg.deepspeed.precision, cfg.deepspeed.zero_stage = "bf16_autocast", 1
    cfg.data.micro_batch_size = cfg.data.global_batch_size = 2
    model = build_model(cfg.model, seed=0)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))   # what DeepSpeed reads
    engine = build_engine(model, cfg, world_size)
    engine(torch.randint(2, 50, (2, 16), device=engine.device))
    return seen, next(engine.module.parameters()).dtype, str(engine.device)


def run_autocast_engine():
    return run_distributed(_autocast_worker, 1)[0]


def test_bf16_autocast_runs_bf16_matmuls_inside_the_deepspeed_engine():
    """DeepSpeed switches off an autocast entered outside its engine: bf16_autocast must reach it through the
    engine's torch_autocast config (fp32 weights, bf16 Linear outputs)."""
    seen, param_dtype, _ = run_autocast_engine()
    assert seen == [torch.bfloat16] and param_dtype == torch.float32


def test_deepspeed_activation_checkpointing_passthrough_is_refused():
    """DeepSpeed's activation_checkpointing section does nothing without model code calling it: refused, naming
    the setting that works."""
    from trime_dist.train.config import validate_train_config

    cfg = _cfg()
    cfg.data.train = "data/train"
    cfg.deepspeed.extra = {"activation_checkpointing": {"partition_activations": True}}
    with pytest.raises(ConfigError, match=r"deepspeed.extra.activation_checkpointing.*model.activation_checkpointing=true"):
        validate_train_config(cfg, 1)
