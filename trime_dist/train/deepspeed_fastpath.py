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
  3. DeepSpeedZeroOptimizer.reduce_independent_p_g_buckets_and_remove_grads (ZeRO-1/2, once per parameter
     per reducing backward, without contiguous_gradients): the same bucket bookkeeping without the per-parameter
     memory reports that print nothing.
  4. DeepSpeedZeroOptimizer.allreduce_and_copy (ZeRO-1/2 without overlap_comm): the all-reduced bucket copied
     back into its gradients in one `torch._foreach_copy_` instead of one copy_ per tensor.
  5. DeepSpeedZeroOptimizer.independent_gradient_partition_epilogue (ZeRO-1/2, after every backward): the
     reduced gradients accumulated over micro-batches in one `torch._foreach_add_` instead of one add_ each.
  6. ZeRO-2's gradient hooks (create_gradient_handling_hooks): the same steps with the per-parameter lookups
     bound once and no count of the backward's parameters while the engine's post-backward callback is queued
     (install_grad_hooks).
  The ZeRO-1/2 norm also casts inside `_foreach_norm` (no float64 copy of each gradient) and keeps which
  parameters count per params list.

Gradient norm: DeepSpeed takes `vector_norm` of each gradient in
a Python loop (one cast, one norm and one device move per tensor: ~6 ms per step for the 247M layout's 196
tensors on a CPU, the time a GPU waits); here the same per-tensor norms come from one
`torch._foreach_norm`, then the same stack, pow, sum, all-reduces and root in the same order. On the CPU
`_foreach_norm` runs the very `linalg_vector_norm` kernel per tensor (bitwise the same norm); on a GPU
it is the fused multi-tensor kernel (the same norm up to summation order). Which tensors count (padding,
pipeline-replicated, model-parallel rank) is decided as DeepSpeed decides it.

Anything else (another norm type, ZeRO-3's AutoEP expert groups, a DeepSpeed whose method is not the one
this was written against) takes DeepSpeed's own method. tests/train/test_deepspeed_fastpath.py checks
the reduced gradients, the norm and the updated weights against DeepSpeed's own path (bitwise) and a float64
reference, on 2 ranks, with gradient accumulation 1 and 2, fp32 and bf16_autocast.
uninstall() puts DeepSpeed's own methods back (the tests and benchmarks/bench_host_overhead.py --stock).
"""
from __future__ import annotations

import logging
import types

import torch

from trime_dist.train import deepspeed_fastpath_zero3, deepspeed_flat_grads

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("0.19.8",)


def _norms(grads: list[torch.Tensor], norm_dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Each tensor's L2 norm, as DeepSpeed's `vector_norm(g.to(norm_dtype)).to(device)` of each."""
    grads = [g.detach().to(device=device, dtype=norm_dtype) for g in grads]
    return list(torch._foreach_norm(grads, 2))


def _norms_cast_in_kernel(grads: list[torch.Tensor], norm_dtype: torch.dtype, device) -> list[torch.Tensor]:
    """_norms without a norm_dtype (float64) copy of every gradient: the cast is `_foreach_norm`'s dtype
    argument (the same bits on the CPU, tested), and a tensor is moved only when it is not on `device`
    already (a `.to(device_name)` per tensor parses the name each time)."""
    device = torch.device(device)
    grads = [g.detach() if g.device == device else g.detach().to(device) for g in grads]
    return list(torch._foreach_norm(grads, 2, dtype=norm_dtype))


def _counts_in_norm(self, params) -> list[bool]:
    """Which of `params` DeepSpeed's ZeRO-1/2 norm counts (not pipeline-replicated; model-parallel or on
    model-parallel rank 0), decided as DeepSpeed decides it. Fixed once the optimizer is built, so kept per
    params list (ZeRO's params_in_partition lists live as long as the optimizer): two attribute probes and a
    call per tensor per step otherwise."""
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter

    cache = vars(self).setdefault("_fastpath_counts_in_norm", {})
    hit = cache.get(id(params))
    if hit is not None and hit[0] is params and len(hit[1]) == len(params):
        return hit[1]
    counts = [not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)
              and (is_model_parallel_parameter(p) or self.model_parallel_rank == 0) for p in params]
    cache[id(params)] = (params, counts)
    return counts


def stage_1_and_2_grad_norm(self, gradients, params, norm_type=2):
    """DeepSpeedZeroOptimizer.get_grad_norm_direct (0.19.8), L2 branch, one `_foreach_norm` for the loop."""
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if float(norm_type) != 2.0:
        return self._stock_get_grad_norm_direct(gradients, params, norm_type)
    param_gradients = (g for g in gradients if not getattr(g, "_zero_padding", False))
    counted = [g.data for g, counts in zip(param_gradients, _counts_in_norm(self, params)) if counts]
    if counted:
        norms = _norms_cast_in_kernel(counted, get_norm_dtype(), get_accelerator().current_device_name())
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


def reduce_independent_p_g_buckets_and_remove_grads(self, param, i):
    """DeepSpeedZeroOptimizer.reduce_independent_p_g_buckets_and_remove_grads (0.19.8), the bookkeeping that
    puts one gradient into its bucket (every parameter, every reducing backward: ZeRO-2's gradient hook, ZeRO-1's
    loop after the last backward), without contiguous_gradients. The same steps in the same order, minus what
    is a no-op there: two `report_ipg_memory_usage` calls per parameter (each formats a message for
    `see_memory_usage`, which prints nothing unless forced), the stream/event records of offload and the
    contiguous-buffer branch. Contiguous gradients, ZeRO-Offload's gradient safety, ZenFlow and AutoEP's
    folded tensor-parallel reduction take DeepSpeed's own method."""
    from deepspeed.moe.utils import is_moe_param

    if (self.contiguous_gradients or self.zenflow or self._offload_gradient_safety_enabled
            or getattr(self, "autoep_folding_tp_group", None) is not None):
        return self._stock_reduce_independent_p_g_buckets_and_remove_grads(param, i)
    numel = param.numel()
    if numel == 0:
        return
    grad_reduc = self.get_gradient_for_reduction(param)
    comm_dtype = self.get_param_comm_dtype(param)
    bucket = self.ipg_buckets[comm_dtype]
    if bucket.elements + numel > self.reduce_bucket_size:
        self.reduce_ipg_grads(comm_dtype=comm_dtype)
    if not getattr(param, "ds_grad_is_ready", True):
        return
    param_id = self.get_param_id(param)
    assert not self.params_already_reduced[param_id], \
        "Gradient computed twice for this partition. Multiple gradient reductions are currently not supported"
    bucket.elements += numel
    assert grad_reduc is not None, f"Invalid to reduce Param {param_id} with None gradient"
    bucket.grads.append(grad_reduc)
    bucket.params.append((i, param.param_idx_in_group, param_id))
    if is_moe_param(param):
        bucket.has_moe_params = True


def install_grad_hooks(self) -> bool:
    """ZeRO-2's gradient hooks (DeepSpeedZeroOptimizer.create_gradient_handling_hooks, 0.19.8) replaced by
    leaner ones: the same steps per gradient (hook state, micro-step count, the bucket bookkeeping of
    reduce_independent_p_g_buckets_and_remove_grads above, a full bucket reduced from the hook), with what
    DeepSpeed looks up per call (parameter id, size, MoE flag) bound once, and without
    `count_used_parameters_in_backward` (196 autograd-node lookups in the first hook of every backward)
    when the engine has queued its post-backward callback: the epilogue then runs from that callback and the
    count only sets the hook state's remaining-hooks figure, which nothing reads while the backward is active.
    Only the plain case (ZeRO-2 without overlap_comm, contiguous_gradients, fp32 gradient accumulation
    attribute, ZenFlow, offload gradient safety, AutoEP folding): False and DeepSpeed's hooks otherwise."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.zero.stage_1_and_2 import count_used_parameters_in_backward

    if (not self.partition_gradients or self.overlap_comm or self.contiguous_gradients
            or self.use_grad_accum_attribute or self.zenflow or self._offload_gradient_safety_enabled
            or getattr(self, "autoep_folding_tp_group", None) is not None):
        return False
    params = [(p, i) for i, group in enumerate(self.bit16_groups) for p in group if p.requires_grad]
    if len(params) != len(self._grad_acc_hooks):
        return False
    all_params = [p for p, _ in params]
    state = self._backward_hook_state

    def make_hook(param, i):
        param_id, numel, moe = self.get_param_id(param), param.numel(), is_moe_param(param)

        def hook(*_):
            refresh = state.should_refresh_expected_hook_count()  # (before re-entering, as DeepSpeed)
            state.reenter_backward_if_needed()
            if not self._coalesce_grad_reduction:
                if not self.ready_for_gradients:  # setup_buckets without contiguous gradients
                    self.micro_step_id += 1
                    self.ready_for_gradients = True
                if numel > 0:
                    _bucket_gradient(self, param, i, param_id, numel, moe)
            if not refresh:
                expected = state.max_expected_hooks_seen
            elif state.post_backward_callback_queued:
                expected = len(all_params)
            else:
                expected = count_used_parameters_in_backward(all_params)
            state.update_hook_state_and_maybe_run_epilogue(expected)

        return hook

    for handle in self._grad_acc_hooks:
        handle.remove()
    self._grad_acc_hooks = [p.register_post_accumulate_grad_hook(make_hook(p, i)) for p, i in params]
    self._fastpath_grad_hooks = True
    return True


def _bucket_gradient(self, param, i, param_id, numel, moe):
    """reduce_independent_p_g_buckets_and_remove_grads's plain case (above) for a parameter whose id, size and
    MoE flag the hook already holds."""
    grad_reduc = param.grad
    comm_dtype = self.get_param_comm_dtype(param)
    bucket = self.ipg_buckets[comm_dtype]
    if bucket.elements + numel > self.reduce_bucket_size:
        self.reduce_ipg_grads(comm_dtype=comm_dtype)
    if not getattr(param, "ds_grad_is_ready", True):
        return
    assert not self.params_already_reduced[param_id], \
        "Gradient computed twice for this partition. Multiple gradient reductions are currently not supported"
    bucket.elements += numel
    assert grad_reduc is not None, f"Invalid to reduce Param {param_id} with None gradient"
    bucket.grads.append(grad_reduc)
    bucket.params.append((i, param.param_idx_in_group, param_id))
    if moe:
        bucket.has_moe_params = True


def allreduce_and_copy(self, small_bucket, communication_data_type, rank=None, log=None, divide=True,
                       process_group=None, output_bucket=None):
    """DeepSpeedZeroOptimizer.allreduce_and_copy (0.19.8) without overlap_comm: flatten, all-reduce (DeepSpeed's
    own allreduce_bucket), then the reduced values back into the bucket's gradients in one `torch._foreach_copy_`
    instead of a Python loop of one copy_ (and one empty partition-buffer add) per tensor. overlap_comm and the
    compact fp32 partition buffer (bf16 weights) take DeepSpeed's own method."""
    from deepspeed import comm as dist

    if self.overlap_comm or (output_bucket is not None and any(o is not None for o in output_bucket)):
        return self._stock_allreduce_and_copy(small_bucket, communication_data_type, rank=rank, log=log,
                                              divide=divide, process_group=process_group,
                                              output_bucket=output_bucket)
    process_group = self.dp_process_group if process_group is None else process_group
    allreduced = self.allreduce_bucket(small_bucket, communication_data_type, rank=rank, log=log, divide=divide,
                                       process_group=process_group)
    if rank is None or rank == dist.get_rank(group=process_group):
        torch._foreach_copy_(small_bucket, self.unflatten(allreduced, small_bucket))


def independent_gradient_partition_epilogue(self):
    """DeepSpeedZeroOptimizer.independent_gradient_partition_epilogue (0.19.8), run after every backward: this
    rank's reduced gradients are added to the earlier micro-batches' in one `torch._foreach_add_` per group
    instead of one add_ per tensor (gradient accumulation > 1), the reduced flags reset in one slice assignment.
    The same steps in the same order otherwise; CPU offload, overlap_comm and the compact fp32 partition buffer
    (bf16 weights) take DeepSpeed's own method."""
    if self.cpu_offload or self.overlap_comm or any(self._use_compact_grad_partition_buffer(i)
                                                    for i in range(len(self.bit16_groups))):
        return self._stock_independent_gradient_partition_epilogue()
    from deepspeed.accelerator import get_accelerator

    self.reduce_ipg_grads()
    self.params_already_reduced[:] = [False] * len(self.params_already_reduced)
    boundary = self.is_gradient_accumulation_boundary()
    for i in range(len(self.bit16_groups)):
        new = self.get_all_grad_tensors(self.params_in_partition[i], dtype=self.gradient_accumulation_dtype)
        if self.all_grad_tensors.get(i) is None:
            self.all_grad_tensors[i] = new
        else:
            torch._foreach_add_(self.all_grad_tensors[i], new)
        if boundary:
            self.averaged_gradients[i] = self.get_flat_partition(
                self.params_in_partition[i], self.first_offset[i], self.partition_size[i],
                dtype=self.gradient_accumulation_dtype, device=get_accelerator().current_device_name(),
                param_group_idx=i, return_tensor_list=True)
            # (DeepSpeed: cleared after use, the epilogue may run once per reentrant checkpointing phase)
            self.all_grad_tensors[i] = None
    self._release_ipg_buffers()
    self._clear_param_grad_only()
    self._epilogue_ran_this_backward = True


def _overrides() -> dict:
    """{DeepSpeed's ZeRO optimizer class: {method name: our replacement}}."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return {DeepSpeedZeroOptimizer: {"get_grad_norm_direct": stage_1_and_2_grad_norm,
                                     "_update_model_bit16_weights": update_model_bit16_weights,
                                     "reduce_independent_p_g_buckets_and_remove_grads":
                                         reduce_independent_p_g_buckets_and_remove_grads,
                                     "allreduce_and_copy": allreduce_and_copy,
                                     "independent_gradient_partition_epilogue":
                                         independent_gradient_partition_epilogue},
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
    if cls.__name__ == "DeepSpeedZeroOptimizer" and not deepspeed_flat_grads.install(optimizer):
        install_grad_hooks(optimizer)
    return True


def uninstall(optimizer) -> None:
    """DeepSpeed's own methods again (tests and the benchmark compare the two paths)."""
    for name in [*_overrides().get(type(optimizer), {}), *deepspeed_fastpath_zero3.OVERRIDES]:
        for attr in (name, "_stock_" + name.lstrip("_")):
            vars(optimizer).pop(attr, None)
    deepspeed_flat_grads.uninstall(optimizer)
    if vars(optimizer).pop("_fastpath_grad_hooks", False):
        for handle in optimizer._grad_acc_hooks:
            handle.remove()
        optimizer._grad_acc_hooks = []
        optimizer.create_gradient_handling_hooks()
    deepspeed_fastpath_zero3.uninstall(optimizer)
