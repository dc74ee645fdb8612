"""Targeted overrides of DeepSpeed internals: per-tensor Python work in ZeRO's step, done once.

Replaces, on the ZeRO optimizer instance of an engine (never on the class), as they are in DeepSpeed 0.19.8
(SUPPORTED_VERSIONS):
  1. the L2 branch of the gradient norm,
       deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.get_grad_norm_direct     (ZeRO-1/2)
       deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3.get_grad_norm_direct     (ZeRO-3)
  2. DeepSpeedZeroOptimizer._update_model_bit16_weights (ZeRO-1/2, after every step's all-gather): it
     points every parameter's .data at its slice of the flat weight buffer again ("TODO: we probably don't
     need this? just to be safe"), ~1.6 ms per step for 196 tensors; here a parameter that already is exactly
     that slice (same storage, address, shape, dtype, contiguous) is left as it is, the rest are re-pointed.

Gradient norm: DeepSpeed takes `vector_norm` of each gradient in
a Python loop (one cast, one norm and one device move per tensor: ~6 ms per step for the 247M layout's 196
tensors on a CPU, the time a GPU waits); here the same per-tensor norms come from one
`torch._foreach_norm`, then the same stack, pow, sum, all-reduces and root in the same order. On the CPU
`_foreach_norm` runs the very `linalg_vector_norm` kernel per tensor (bitwise the same norm); on a GPU
it is the fused multi-tensor kernel (the same norm up to summation order). Which tensors count (padding,
pipeline-replicated, model-parallel rank) is decided as DeepSpeed decides it.

Anything else (another norm type, ZeRO-3's AutoEP expert groups, a DeepSpeed whose method is not the one
this was written against) takes DeepSpeed's own method. tests/train/test_deepspeed_fastpath.py checks
the norm and the updated weights against DeepSpeed's own path and a float64 reference, on 2 ranks.
uninstall() puts DeepSpeed's own methods back (the tests and benchmarks/bench_host_overhead.py --stock).
"""
from __future__ import annotations

import logging
import types

import torch

from trime_dist.train import deepspeed_fastpath_zero3

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("0.19.8",)


def _norms(grads: list[torch.Tensor], norm_dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Each tensor's L2 norm, as DeepSpeed's `vector_norm(g.to(norm_dtype)).to(device)` of each."""
    grads = [g.detach().to(device=device, dtype=norm_dtype) for g in grads]
    return list(torch._foreach_norm(grads, 2))


def stage_1_and_2_grad_norm(self, gradients, params, norm_type=2):
    """DeepSpeedZeroOptimizer.get_grad_norm_direct (0.19.8), L2 branch, one `_foreach_norm` for the loop."""
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if float(norm_type) != 2.0:
        return self._stock_get_grad_norm_direct(gradients, params, norm_type)
    param_gradients = (g for g in gradients if not getattr(g, "_zero_padding", False))
    counted = [g.data for g, p in zip(param_gradients, params)
               if not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)
               and (is_model_parallel_parameter(p) or self.model_parallel_rank == 0)]
    if counted:
        norms = _norms(counted, get_norm_dtype(), get_accelerator().current_device_name())
        total_norm = torch.stack(norms).pow(2.0).sum().float()
    else:
        total_norm = torch.tensor(0.0, dtype=torch.float32).to(self.device)
    dist.all_reduce(total_norm, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total_norm, op=dist.ReduceOp.SUM)
    total_norm = total_norm.pow(1. / 2.0)
    mask_nan_or_inf_with_val_inplace(total_norm, device=self.device)
    return total_norm


def stage3_grad_norm(self, gradients, params, norm_type=2):
    """DeepSpeedZeroOptimizer_Stage3.get_grad_norm_direct (0.19.8), L2 branch, one `_foreach_norm` for the loop."""
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if float(norm_type) != 2.0 or self._autoep_expert_parallel_group(params) is not None:
        return self._stock_get_grad_norm_direct(gradients, params, norm_type)
    self._assert_same_partition_group(params)
    process_group = self._get_param_partition_group(params[0])
    counts_every_rank = self._grad_norm_counts_every_rank(params, process_group)
    counted = [g for g, p in zip(gradients, params)
               if counts_every_rank or is_model_parallel_parameter(p) or self.model_parallel_rank == 0]
    if counted:
        norms = _norms(counted, get_norm_dtype(), get_accelerator().device_name())
        total_norm = torch.sum(torch.pow(torch.stack(norms), 2.0))
    else:
        total_norm = torch.tensor(0, dtype=gradients[0].dtype).to(get_accelerator().device_name()).to(
            get_norm_dtype())
    dist.all_reduce(total_norm, op=dist.ReduceOp.SUM, group=process_group)
    if not counts_every_rank:
        self._model_parallel_all_reduce(tensor=total_norm, op=dist.ReduceOp.SUM)
    total_norm = total_norm**(1. / 2.0)
    inf_or_nan = total_norm.isnan().logical_or(total_norm.isinf())
    return torch.where(inf_or_nan, torch.tensor(-1.0, device=self.device, dtype=torch.float), total_norm)


def _is_slice_of(p: torch.Tensor, flat: torch.Tensor, offset: int, shape: torch.Size) -> bool:
    """Whether p's data is exactly flat.narrow(0, offset, numel).view(shape): nothing to re-point."""
    return (p.data_ptr() == flat.data_ptr() + offset * flat.element_size() and p.shape == shape
            and p.dtype == flat.dtype and p.is_contiguous()
            and p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr())


def update_model_bit16_weights(self, group_index):
    """DeepSpeedZeroOptimizer._update_model_bit16_weights (0.19.8), skipping the assignments that change nothing."""
    flat_group = self.bit16_groups_flat[group_index]
    for p, meta, offset in zip(self.round_robin_bit16_groups[group_index], self.round_robin_bit16_meta[group_index],
                               self.round_robin_bit16_offsets[group_index]):
        if not _is_slice_of(p, flat_group, offset, meta.shape):
            p.data = flat_group.narrow(0, offset, meta.numel()).view(meta.shape).data
    # set model fp16 weight to slices of reordered flattened buffer (the same tensors, reordered: param.data =
    # param.data where they are the same object)
    round_robin, indices = self.round_robin_bit16_groups[group_index], self.round_robin_bit16_indices[group_index]
    for param_index, param in enumerate(self.bit16_groups[group_index]):
        source = round_robin[indices[param_index]]
        if source is not param:
            param.data = source.data


def _overrides() -> dict:
    """{DeepSpeed's ZeRO optimizer class: {method name: our replacement}}."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return {DeepSpeedZeroOptimizer: {"get_grad_norm_direct": stage_1_and_2_grad_norm,
                                     "_update_model_bit16_weights": update_model_bit16_weights},
            DeepSpeedZeroOptimizer_Stage3: {"get_grad_norm_direct": stage3_grad_norm}}


def install(optimizer) -> bool:
    """Give this ZeRO optimizer the overrides; False (stock DeepSpeed, nothing changed) when the installed
    DeepSpeed is not a SUPPORTED_VERSIONS one, the optimizer is not exactly ZeRO's, or a method of its class
    is not DeepSpeed's own (patched by someone else)."""
    import deepspeed

    if deepspeed.__version__ not in SUPPORTED_VERSIONS:
        log.info("deepspeed %s: stock ZeRO step (the fast path is written for %s)",
                 deepspeed.__version__, ", ".join(SUPPORTED_VERSIONS))
        return False
    cls = type(optimizer)
    overrides = _overrides().get(cls)
    if overrides is None:
        return False
    stock = {name: vars(cls).get(name) for name in overrides}
    # DeepSpeed's own: defined in the class's module, or its nvtx wrapper (ZeRO-3's norm is decorated)
    if any(getattr(f, "__module__", None) not in (cls.__module__, "deepspeed.utils.nvtx") for f in stock.values()):
        return False
    if cls.__name__ == "DeepSpeedZeroOptimizer_Stage3" and deepspeed_fastpath_zero3.install(optimizer):
        overrides = {**overrides, **deepspeed_fastpath_zero3.OVERRIDES}  # (ZeRO-3 block: deepspeed_fastpath_zero3.py)
        stock.update((name, vars(cls)[name]) for name in deepspeed_fastpath_zero3.OVERRIDES)
    for name, fast in overrides.items():
        setattr(optimizer, "_stock_" + name.lstrip("_"), types.MethodType(stock[name], optimizer))
        setattr(optimizer, name, types.MethodType(fast, optimizer))
    return True


def uninstall(optimizer) -> None:
    """DeepSpeed's own methods again (tests and the benchmark compare the two paths)."""
    for name in [*_overrides().get(type(optimizer), {}), *deepspeed_fastpath_zero3.OVERRIDES]:
        for attr in (name, "_stock_" + name.lstrip("_")):
            vars(optimizer).pop(attr, None)
    deepspeed_fastpath_zero3.uninstall(optimizer)
