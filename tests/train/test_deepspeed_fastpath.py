"""train/deepspeed_fastpath.py and deepspeed_flat_grads.py: their replacements of DeepSpeed's ZeRO methods (the
gradient norm in one foreach call, the re-pointing after the step, ZeRO-1/2 gradients as views of flat buffers,
the lean ZeRO-2 hooks and bucket bookkeeping where the buckets are smaller than the model, ZeRO-3's linear,
hooks and re-partitioning) on 2 real gloo ranks (real DeepSpeed engines), with gradient accumulation 1 and 2,
fp32 and bf16_autocast: DeepSpeed's own bits where the sums run in the same order, a float64 reference (fp32
under autocast) everywhere."""
import os

import pytest
import torch
import torch.nn.functional as F

from trime_dist.model.config import ModelConfig
from trime_dist.model.transformer import build_model
from trime_dist.train.config import TrainConfig

from dist_helpers import run_distributed

pytestmark = pytest.mark.slow

STEPS, CLIP, LR, B, T, V = 2, 0.1, 0.5, 2, 8, 40


def _cfg(stage: int, accum: int = 1, precision: str = "fp32", world_size: int = 2,
         partitioned: bool = False, extra=None) -> TrainConfig:
    """partitioned: ZeRO-3 keeps only the vectors persistent (as the real width does with DeepSpeed's default
    threshold; at d 16 every tensor would be under it), so the blocks' matrices are gathered and released
    by each module's hooks; FFN 33 gives tensors of odd size (the reduce-scatter pads them on 2 ranks).
    extra: more DeepSpeed config (deepspeed.extra)."""
    cfg = TrainConfig()
    cfg.model = ModelConfig(vocab_size=V, n_layers=2, d_model=16, n_heads=2, d_ffn=33 if partitioned else 32,
                            max_seq_len=T)
    cfg.deepspeed.extra = dict(extra or {})
    if partitioned:
        cfg.deepspeed.extra["zero_optimization"] = {"stage3_param_persistence_threshold": 100}
    cfg.deepspeed.zero_stage, cfg.deepspeed.precision = stage, precision
    cfg.data.micro_batch_size, cfg.data.global_batch_size = B, world_size * accum * B
    # plain SGD: the update is lr x clipped gradient, so the weights show the norm the step clipped by
    cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip = "sgd", LR, 0.0, CLIP
    cfg.optim.schedule, cfg.optim.warmup_steps = "constant", 1
    return cfg


def _tokens(rank: int, step: int, micro: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(1000 * step + 10 * micro + rank))


def _engine_worker(rank, world_size, stage, fast, accum=1, precision="fp32", info=None, partitioned=False,
                   extra=None):
    import deepspeed

    from trime_dist.core.device import bf16_autocast
    from trime_dist.train import deepspeed_fastpath
    from trime_dist.train.engine import build_engine

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = _cfg(stage, accum, precision, world_size, partitioned, extra)
    engine = build_engine(build_model(cfg.model, seed=0), cfg, world_size)
    # which fast path: ZeRO-1/2 with flat gradient buffers ("flat"), or with the lean hooks ("hooks", ZeRO-2)
    opt = vars(engine.optimizer)
    installed = "get_grad_norm_direct" in opt and (
        "flat" if "_flat_grads" in opt else "hooks" if opt.get("_fastpath_grad_hooks") else True)
    if not fast:
        deepspeed_fastpath.uninstall(engine.optimizer)
    if info is not None:
        info.update(_zero3_state(engine))
    norms, grads = [], []
    for step in range(STEPS):
        for micro in range(accum):
            tokens = _tokens(rank, step, micro).to(engine.device)
            with bf16_autocast(engine.device, precision == "bf16_autocast"):
                logits, _ = engine(tokens[:, :-1])
            engine.backward(F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()))
            if stage in (1, 2) and micro == accum - 1:
                # this rank's partition of the reduced (and accumulated) gradients, as the step will read them
                grads.append([g.detach().clone() for group in engine.optimizer.averaged_gradients.values()
                              for g in group])
            engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    if info is not None:
        info.update(_zero3_after(engine))
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
        weights = {n: p.detach().clone().cpu() for n, p in params}
    return (installed, norms, weights, grads, info) if info is not None else (installed, norms, weights, grads)


def _zero3_state(engine) -> dict:
    """Which ZeRO-3 paths this engine takes, and what a plain (non-ZeRO) linear does next to it."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    from trime_dist.train import deepspeed_fastpath_zero3 as z3

    torch.manual_seed(1)
    x, w, b = torch.randn(3, 5, 4), torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)
    out = torch.nn.functional.linear(x, w, b)
    return {"partition_all": "_partition_all_parameters" in vars(engine.optimizer),
            "linear_is_ours": torch.nn.functional.linear is z3.zero3_linear,
            "marked": all(getattr(p, z3.FAST_MARK, False) for p in engine.module.parameters()),
            "plain_linear_equal": torch.equal(out, InsertPostInitMethodToModuleSubClasses.linear_bk(x, w, b)),
            "plain_linear_node": type(out.grad_fn).__name__}


def _zero3_after(engine) -> dict:
    """After training: how many parameters were partitioned, whether the coordinator's fast fetch/release
    ran (it lists each module's parameters once), and that every gathered, non-persistent one was freed."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    params = list(engine.module.parameters())
    return {"partitioned": sum(not p.ds_persist for p in params),
            "coordinator_fast": "_fetch_sub_module_impl" in vars(coordinator),
            "fast_fetch_ran": any("_trime_z3_params" in m.__dict__ for m in engine.module.modules()),
            "released": all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in params if not p.ds_persist)}


def _reference(world_size: int, accum: int = 1, precision: str = "fp32", partitioned: bool = False):
    """float64 (fp32 under bf16_autocast, which runs its matmuls in bf16): the gradient averaged over ranks
    and micro-batches, clipped as DeepSpeed clips (x clip / (norm + 1e-6) when above clip), then SGD."""
    from trime_dist.core.device import bf16_autocast

    cfg = _cfg(0, partitioned=partitioned)
    autocast = precision == "bf16_autocast"
    model = build_model(cfg.model, seed=0).to(torch.float32 if autocast else torch.float64)
    norms = []
    for step in range(STEPS):
        model.zero_grad()
        for rank in range(world_size):
            for micro in range(accum):
                tokens = _tokens(rank, step, micro)
                with bf16_autocast(torch.device("cpu"), autocast):
                    logits, _ = model(tokens[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
                (loss / (world_size * accum)).backward()
        grads = [p.grad.double() for p in model.parameters()]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        scale = min(1.0, CLIP / (float(norm) + 1e-6))
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * scale * p.grad
        norms.append(float(norm))
    return norms, {n: p.detach().double() for n, p in model.named_parameters()}


def _assert_same_as_stock(fast, stock, path=True):
    assert all(r[0] == path for r in fast), \
        f"the fast path {path} was not installed (DeepSpeed version or class changed?): {[r[0] for r in fast]}"
    for rank in range(2):
        _, norms, weights, grads = fast[rank]
        _, stock_norms, stock_weights, stock_grads = stock[rank]
        # on the CPU every replacement runs the same kernels on the same values: the same bits
        assert norms == stock_norms
        assert len(grads) == len(stock_grads)
        for step_grads, step_stock in zip(grads, stock_grads):
            assert len(step_grads) == len(step_stock)
            assert all(torch.equal(g, s) and g.dtype == s.dtype for g, s in zip(step_grads, step_stock))
        for name, w in weights.items():
            assert torch.equal(w, stock_weights[name]), name
    # the two ranks agree
    assert fast[0][1] == fast[1][1]


def _assert_matches_reference(results, ref_norms, ref_weights, rtol_norm=1e-5, rtol=1e-5, atol=1e-6):
    assert all(n > CLIP for n in ref_norms)  # every step clips: the norm is in the update
    for rank in range(2):
        _, norms, weights, _ = results[rank]
        assert norms == pytest.approx(ref_norms, rel=rtol_norm)
        for name, w in weights.items():
            torch.testing.assert_close(w.double(), ref_weights[name], rtol=rtol, atol=atol,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("stage,accum", [(1, 1), (1, 2), (2, 1), (3, 1)])
def test_fast_path_matches_deepspeed_and_float64(stage, accum):
    """Bitwise DeepSpeed's own where the sums are taken in the same order: ZeRO-1 (both sum the micro-batches
    locally, then reduce once), ZeRO-2 at accumulation 1, ZeRO-3."""
    fast = run_distributed(_engine_worker, 2, args=(stage, True, accum))
    stock = run_distributed(_engine_worker, 2, args=(stage, False, accum))
    _assert_same_as_stock(fast, stock, "flat" if stage < 3 else True)
    _assert_matches_reference(fast, *_reference(2, accum))


def test_zero2_flat_gradients_accumulate_then_reduce():
    """ZeRO-2 with accumulation: the flat buffers sum the micro-batches and reduce once per step, where
    DeepSpeed reduces after each micro-batch and then sums: the same to fp32 rounding, and the float64 reference."""
    fast = run_distributed(_engine_worker, 2, args=(2, True, 2))
    stock = run_distributed(_engine_worker, 2, args=(2, False, 2))
    assert all(r[0] == "flat" for r in fast)
    _assert_matches_reference(fast, *_reference(2, 2))
    for rank in range(2):
        assert fast[rank][1] == pytest.approx(stock[rank][1], rel=1e-6)
        for name, w in fast[rank][2].items():
            torch.testing.assert_close(w, stock[rank][2][name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("stage", [1, 2])
def test_fast_path_bf16_autocast_reduces_in_fp32(stage):
    """bf16_autocast: the flat buffers reduce the fp32 gradients in fp32 (DeepSpeed would send the Linear
    weights' gradients in bf16): the norm and weights match a plain single-process autocast loop to fp32
    rounding, closer than DeepSpeed's own bf16-communicated path does."""
    fast = run_distributed(_engine_worker, 2, args=(stage, True, 2, "bf16_autocast"))
    stock = run_distributed(_engine_worker, 2, args=(stage, False, 2, "bf16_autocast"))
    assert all(r[0] == "flat" for r in fast)
    ref_norms, ref_weights = _reference(2, 2, "bf16_autocast")
    _assert_matches_reference(fast, ref_norms, ref_weights, rtol_norm=1e-5, rtol=1e-4, atol=1e-5)
    fast_err = max(abs(a / b - 1) for a, b in zip(fast[0][1], ref_norms))
    stock_err = max(abs(a / b - 1) for a, b in zip(stock[0][1], ref_norms))
    assert fast_err < stock_err, (fast_err, stock_err)


@pytest.mark.parametrize("precision", ["fp32", "bf16_autocast"])
def test_zero2_buckets_smaller_than_the_model_keep_deepspeeds_reduction(precision):
    """A model with more elements than reduce_bucket_size: DeepSpeed's bucketing (full buckets reduced from
    the gradient hooks, during backward) with the lean hooks (install_grad_hooks): DeepSpeed's own bits."""
    extra = {"zero_optimization": {"reduce_bucket_size": 600}}
    fast = run_distributed(_engine_worker, 2, args=(2, True, 2, precision, None, False, extra))
    stock = run_distributed(_engine_worker, 2, args=(2, False, 2, precision, None, False, extra))
    _assert_same_as_stock(fast, stock, "hooks")
    if precision == "fp32":
        _assert_matches_reference(fast, *_reference(2, 2))


def test_other_deepspeed_versions_keep_the_stock_norm(monkeypatch):
    import deepspeed

    from trime_dist.train import deepspeed_fastpath

    class NotZero:
        pass

    opt = NotZero()
    assert deepspeed_fastpath.install(opt) is False and "get_grad_norm_direct" not in vars(opt)
    monkeypatch.setattr(deepspeed, "__version__", "0.20.0")
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer)  # (not initialised: only its type is read)
    assert deepspeed_fastpath.install(zero) is False and "get_grad_norm_direct" not in vars(zero)


@pytest.mark.parametrize("precision,accum,partitioned", [("bf16_autocast", 2, False), ("bf16_autocast", 2, True),
                                                         ("fp32", 2, True), ("fp32", 1, True)])
def test_zero3_fast_path_matches_deepspeed(precision, accum, partitioned):
    """deepspeed_fastpath_zero3: the linear Function (under autocast: its backward's autocast rule), the
    one-walk re-partitioning at each step, the coordinator's per-module fetch/release, the reduce-scatter
    and the gradient partitions (copied, then accumulated) give DeepSpeed's own bits on 2 ranks, with the
    block matrices persistent (every tensor under the threshold) or partitioned (gathered by each module's
    hooks, freed after); fp32 also against the float64 reference; a linear over plain tensors next to a
    ZeRO-3 engine is torch's own. (Persistent fp32: test_fast_path_matches_deepspeed_and_float64[3-1].)"""
    fast = run_distributed(_engine_worker, 2, args=(3, True, accum, precision, {}, partitioned))
    stock = run_distributed(_engine_worker, 2, args=(3, False, accum, precision, {}, partitioned))
    for rank in range(2):
        _, norms, weights, _, info = fast[rank]
        _, stock_norms, stock_weights, _, stock_info = stock[rank]
        assert info["partition_all"] and info["linear_is_ours"] and info["marked"], info
        assert info["coordinator_fast"] and info["fast_fetch_ran"], info
        assert not stock_info["partition_all"] and not stock_info["marked"], stock_info
        assert not stock_info["coordinator_fast"] and not stock_info["fast_fetch_ran"], stock_info
        for i in (info, stock_info):
            assert i["plain_linear_equal"] and "ZeroStage3" not in i["plain_linear_node"] \
                and "ZeroLinear" not in i["plain_linear_node"], i
            assert i["released"], i
            # (2 blocks x qkv, proj, up, down weights + the two embeddings; the vectors stay persistent)
            assert i["partitioned"] == (10 if partitioned else 0), i
        assert norms == stock_norms and all(n > CLIP for n in norms)
        for name, w in weights.items():
            assert torch.equal(w, stock_weights[name]), name
    assert fast[0][1] == fast[1][1]
    if precision == "fp32":
        ref_norms, ref_weights = _reference(2, accum, partitioned=partitioned)
        for rank in range(2):
            _, norms, weights, _, _ = fast[rank]
            assert norms == pytest.approx(ref_norms, rel=1e-5)
            for name, w in weights.items():
                torch.testing.assert_close(w.double(), ref_weights[name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{name}: {m}")
