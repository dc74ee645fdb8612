"""ZeRO-3's per-parameter host work in DeepSpeed 0.19.8, done with fewer Python calls (issue 21).

Installed by deepspeed_fastpath.install on a DeepSpeedZeroOptimizer_Stage3 instance (same version gate):
  1. F.linear. ZeRO-3's engine replaces torch.nn.functional.linear for the whole process with
     deepspeed.runtime.zero.linear.zero3_linear_wrap ("memory efficient linear": the autograd Function
     saves the weight Parameter itself, not a view of its gathered data, so a released weight's full
     storage is not kept alive until backward; that is ZeRO-3's parameter-memory saving at real width and
     is kept). Its cost is the Function's new-style `setup_context`, whose `apply` binds the arguments with
     `inspect.signature` on every call: ~100 us per linear on top of torch's ~20 us, 65 linears a step,
     forward and backward ~10 ms a step, and it is paid by every other module in the process too (a bare
     torch loop next to a ZeRO-3 engine ran ~9 ms a step slower). Here: a weight that is not a ZeRO-3
     parameter takes torch's own linear; a ZeRO-3 weight of an engine with this fast path takes
     `ZeroLinear`, the same forward and backward (same ops, same autocast rule, same gather of a
     partitioned weight in backward) written as an old-style Function (ctx in forward: no signature
     binding); a ZeRO-3 weight of any other engine (uninstalled, `--stock`) takes DeepSpeed's Function.
  2. DeepSpeedZeroOptimizer_Stage3._partition_all_parameters, at the start of every step: DeepSpeed's
     release_and_reset_all walks every parameter through ~8 nested calls (partition -> _partition ->
     _partition_param -> free_param, each nvtx-wrapped, with debug f-strings built even when not printed),
     then walks them twice more to check; ~0.1 ms a parameter under the profiler. Here one walk does the
     same for a parameter whose partition is already in place (not offloaded to NVMe, no hpZ secondary
     partition): wait for an in-flight gather, clear its active submodules, free its gathered data
     (record_stream on a GPU first, as free_param does), mark it NOT_AVAILABLE, count it off the
     coordinator's available numel; any other parameter goes through DeepSpeed's own __release_param.
  3. DeepSpeedZeroOptimizer_Stage3.reduce_ready_partitions_and_remove_grads, each gradient's hook (see there).
  4. The autograd Functions that ZeRO-3 puts on each hooked module's outputs and inputs (module.pre_bwd_fn
     gathers its parameters before its backward, module.post_bwd_fn releases them after): new-style too
     (setup_context: `inspect.signature` in each apply, ~60 applies a step); here the same bookkeeping as
     old-style Functions, per module.

  5. The parameter coordinator's per-module fetch and release (PartitionedParameterCoordinator.
     _fetch_sub_module_impl / release_sub_module: each hooked module, forward and backward, ~60 calls a
     step with a block per leaf module): DeepSpeed walks the module's named_parameters generator (through
     named_modules, recursively for a leaf block) two or three times per call, and releases each parameter
     through the same ~8 nested calls as (2). Here each module's parameters are listed once (a module's
     parameters do not change while it trains; a module with external parameters, which ZeRO-3 registers
     as it meets them, or recompute parameters takes DeepSpeed's own), the same gathers, waits, trace
     checks, prefetches and step counting are done, and a parameter whose partition is in place is freed
     as in (2). Gathered parameters are freed exactly when DeepSpeed frees them (its own
     __params_to_release decides, reuse distance and persistence included). DeepSpeed's own for debug
     logging, the profiler, NVMe prefetch and fast_sharding_for_leaf_module.

Not installed (DeepSpeed's own path) with hpZ (zero_hpz_partition_size > 1) or parameter offload.
tests/train/test_deepspeed_fastpath.py checks both against DeepSpeed's own path, bitwise, on 2 ranks.
"""
from __future__ import annotations

import torch

# set on a ZeRO-3 parameter of an engine with the fast path (uninstall removes it)
FAST_MARK = "_trime_fast_linear"


def _is_zero_param(t) -> bool:
    return hasattr(t, "ds_id")


class ZeroLinear(torch.autograd.Function):
    """deepspeed.runtime.zero.linear.LinearFunctionForZeroStage3 (0.19.8) as an old-style Function."""

    @staticmethod
    def forward(ctx, input, weight, bias=None):
        from deepspeed.runtime.zero.linear import _get_autocast_dtype, _is_autocast_enabled

        device_type = _device_type()
        ctx._dtype = _get_autocast_dtype(device_type)
        ctx._fwd_used_autocast = _is_autocast_enabled(device_type)
        ctx.save_for_backward(input, weight, bias)
        if input.dim() == 2 and bias is not None:
            return torch.addmm(bias, input, weight.t())
        output = input.matmul(weight.t())
        if bias is not None:
            output += bias
        return output

    @staticmethod
    def backward(ctx, grad_output):
        # (the body of LinearFunctionForZeroStage3.backward)
        with torch.autocast(device_type=_device_type(), enabled=ctx._fwd_used_autocast, dtype=ctx._dtype):
            input, weight, bias = ctx.saved_tensors
            grad_input = grad_weight = grad_bias = None
            weight_was_partitioned = (_is_zero_param(weight)
                                      and getattr(weight.ds_status, "name", None) == "NOT_AVAILABLE")
            if weight_was_partitioned:
                weight.all_gather()
            try:
                dim = grad_output.dim()
                if ctx.needs_input_grad[0]:
                    grad_input = grad_output.matmul(weight)
                if ctx.needs_input_grad[1]:
                    if dim > 2:
                        grad_weight = grad_output.reshape(-1, grad_output.shape[-1]).t().matmul(
                            input.reshape(-1, input.shape[-1]))
                    elif dim == 1:
                        grad_weight = grad_output.unsqueeze(-1) * input.unsqueeze(0)
                    else:
                        grad_weight = grad_output.t().matmul(input)
                if bias is not None and ctx.needs_input_grad[2]:
                    if dim > 2:
                        grad_bias = grad_output.sum([i for i in range(dim - 1)])
                    elif dim == 1:
                        grad_bias = grad_output
                    else:
                        grad_bias = grad_output.sum(0)
                return grad_input, grad_weight, grad_bias
            finally:
                if weight_was_partitioned:
                    weight.partition()


_DEVICE_TYPE = []


def _device_type() -> str:
    if not _DEVICE_TYPE:
        from deepspeed.accelerator import get_accelerator

        _DEVICE_TYPE.append(get_accelerator().device_name())
    return _DEVICE_TYPE[0]


def _torch_linear():
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    return InsertPostInitMethodToModuleSubClasses.linear_bk  # torch's, kept by DeepSpeed when it patched


def zero3_linear(input, weight, bias=None):
    """What torch.nn.functional.linear is while a ZeRO-3 engine exists (instead of DeepSpeed's zero3_linear_wrap)."""
    if not _is_zero_param(weight):
        return _TORCH_LINEAR[0](input, weight, bias)
    if getattr(weight, FAST_MARK, False) and not torch._C._are_functorch_transforms_active():
        return ZeroLinear.apply(input, weight, bias)
    from deepspeed.runtime.zero.linear import LinearFunctionForZeroStage3

    return LinearFunctionForZeroStage3.apply(input, weight, bias)


_TORCH_LINEAR = []


def _install_linear(module: torch.nn.Module) -> None:
    """Mark this engine's parameters; put zero3_linear in place of DeepSpeed's wrap (only if it is DeepSpeed's)."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    for p in module.parameters():
        if _is_zero_param(p):
            setattr(p, FAST_MARK, True)
    if torch.nn.functional.linear is zero3_linear_wrap:
        _TORCH_LINEAR[:] = [_torch_linear()]
        torch.nn.functional.linear = zero3_linear


def _partition_in_place(param, nvme) -> bool:
    """Whether releasing this gathered parameter is only freeing its data (partition() of 0.19.8: the
    partition exists, is not on NVMe, no hpZ secondary partition)."""
    partition = param.ds_tensor
    return partition is not None and param.ds_secondary_tensor is None and partition.final_location != nvme


def _free(param, accelerator, record_stream: bool, not_available) -> None:
    """free_param + ds_status: the gathered data means nothing once partitioned."""
    if record_stream and accelerator.on_accelerator(param.data):
        param.data.record_stream(accelerator.current_stream())
    param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    param.ds_status = not_available


def partition_all_parameters(self):
    """DeepSpeedZeroOptimizer_Stage3._partition_all_parameters (0.19.8): the coordinator's
    release_and_reset_all and partition_all_parameters' check, in one walk (see the module docstring)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    offload = self.parameter_offload
    coordinator = offload.get_param_coordinator()
    inflight = coordinator._PartitionedParameterCoordinator__inflight_param_registry
    accelerator = get_accelerator()
    record_stream = not accelerator.is_synchronized_device()
    available, not_available = ZeroParamStatus.AVAILABLE, ZeroParamStatus.NOT_AVAILABLE
    cached = _module_params(offload.module, True)  # (the model's parameters, listed once)
    params, freed = list(cached[1] if cached else iter_params(offload.module, recurse=True)), 0
    with torch.no_grad():
        for param in params:
            if inflight and param in inflight:
                inflight.pop(param).wait()
            param.ds_active_sub_modules.clear()
            if param.ds_status is not available:
                continue
            if not _partition_in_place(param, OffloadDeviceEnum.nvme):
                coordinator._PartitionedParameterCoordinator__release_param(param)
                continue
            _free(param, accelerator, record_stream, not_available)
            freed += param.ds_numel
    coordinator._PartitionedParameterCoordinator__n_available_params -= freed
    for param in params:
        if param.ds_status is not not_available:
            raise RuntimeError(f"{param.ds_summary()} expected to be released")


def _backward_functions(offload, module):
    """The autograd Functions DeepSpeedZeRoOffload._register_deepspeed_module (0.19.8) gives each module
    (module.pre_bwd_fn: gather its parameters before its backward; module.post_bwd_fn: release them after),
    the same bookkeeping written as old-style Functions (no signature binding in every apply)."""

    class PreBackwardFunctionForModule(torch.autograd.Function):
        @staticmethod
        def forward(ctx, outputs):
            ctx.module = module
            if "applied_pre_backward_ref_cnt" not in module.__dict__:
                module.applied_pre_backward_ref_cnt = 0
            module.applied_pre_backward_ref_cnt += 1
            return outputs.detach()

        @staticmethod
        def backward(ctx, *args):
            # (DeepSpeed's _run_before_backward_function)
            if module.applied_pre_backward_ref_cnt > 0:
                offload.pre_sub_module_backward_function(module)
                module.applied_pre_backward_ref_cnt -= 1
            return args

    class PostBackwardFunctionModule(torch.autograd.Function):
        @staticmethod
        def forward(ctx, output):
            ctx.module = module
            if output.requires_grad:
                module.ds_grads_remaining += 1
            return output.detach()

        @staticmethod
        def backward(ctx, *args):
            module.ds_grads_remaining = module.ds_grads_remaining - 1
            if module.ds_grads_remaining == 0:  # (and DeepSpeed's _run_after_backward_function)
                offload.post_sub_module_backward_function(module)
            return args

    return PreBackwardFunctionForModule, PostBackwardFunctionModule


def _install_backward_functions(offload) -> None:
    for module in offload.module.modules():
        fns = module.__dict__.get("pre_bwd_fn"), module.__dict__.get("post_bwd_fn")
        if all(getattr(f, "__module__", None) == "deepspeed.runtime.zero.parameter_offload" for f in fns):
            module._stock_pre_bwd_fn, module._stock_post_bwd_fn = fns
            module.pre_bwd_fn, module.post_bwd_fn = _backward_functions(offload, module)


_C = "_PartitionedParameterCoordinator__"  # the coordinator's private attributes


def _module_params(module, is_leaf: bool):
    """iter_params(module, recurse=is_leaf) as a tuple and the set DeepSpeed builds from it (same insertion
    order: the same iteration order), listed once per module; None where DeepSpeed's own must walk
    (external parameters: registered as ZeRO-3 meets them)."""
    if getattr(module, "_external_params", None):
        return None
    cache = module.__dict__.setdefault("_trime_z3_params", {})
    cached = cache.get(is_leaf)
    if cached is None:
        params = tuple(p for _, p in module.named_parameters(recurse=is_leaf))
        cached = cache[is_leaf] = (is_leaf, params, frozenset(params))
    return cached


def _coordinator_plain(self) -> bool:
    import logging

    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    return (not self.fast_sharding_for_leaf_module and not getattr(self, _C + "prefetch_nvme")
            and getattr(self, _C + "profiler").timers is None and not ppc.logger.isEnabledFor(logging.DEBUG))


def fetch_sub_module_impl(self, module, forward: bool, is_leaf: bool) -> None:
    """PartitionedParameterCoordinator._fetch_sub_module_impl (0.19.8) with the module's parameters listed
    once (see the module docstring, 5): the same gathers, waits, trace check and prefetches."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import update_recompute_parameters

    cached = _module_params(module, is_leaf) if _coordinator_plain(self) else None
    if cached is None:
        return self._stock_fetch_sub_module_impl(module, forward, is_leaf)
    _, params, params_set = cached
    not_available = ZeroParamStatus.NOT_AVAILABLE
    if sum(p.partition_numel() for p in params if p.ds_status is not_available) > 0:
        getattr(self, _C + "all_gather_params")(set(params), forward)

    accelerator = get_accelerator()
    inflight = getattr(self, _C + "inflight_param_registry")
    active_backward = getattr(self, _C + "active_backward_submodules")
    in_checkpoint_recompute = forward and torch._C._current_graph_task_id() != -1
    available, ds_id = ZeroParamStatus.AVAILABLE, module.ds_id
    for param in params_set:  # (DeepSpeed's order: its set of the same parameters)
        param.ds_active_sub_modules.add(ds_id)
        if in_checkpoint_recompute and active_backward and not param.requires_grad:
            update_recompute_parameters(next(reversed(active_backward.values())), param)
        if param in inflight:
            events = getattr(self, _C + "ongoing_fetch_events")
            with accelerator.stream(getattr(self, _C + "allgather_stream")):
                while events and events[0].query():
                    events.popleft()
                if len(events) > getattr(self, _C + "max_ongoing_fetch_events"):
                    events.popleft().synchronize()
                inflight.pop(param).wait(handle_dependency=True)
                if not accelerator.handles_memory_backpressure():
                    event = accelerator.Event()
                    event.record()
                    events.append(event)
        assert param.ds_status is available, param.ds_summary()
    if not _RESOLVES_DATA_DEPENDENCY[0]:
        accelerator.current_stream().wait_stream(getattr(self, _C + "allgather_stream"))

    step_id = getattr(self, _C + "step_id")
    if self.is_complete_trace():
        # (DeepSpeed's: pop this module's parameters off the trace's fetch queue, check the trace, prefetch)
        queue = getattr(self, _C + "param_queue")
        last_fetched = getattr(self, _C + "most_recent_step_id_param_fetched_for")
        discarded = set()
        not_yet = {p for p in params_set if last_fetched[p] < step_id}
        while queue and len(discarded) < len(not_yet):
            in_trace = queue.popleft()
            last_fetched[in_trace.param] = in_trace.step_id_last_used_at
            discarded.add(in_trace.param)
        if discarded != not_yet:
            _trace_error(module, not_yet, discarded, step_id)
        bucket = getattr(self, _C + "prefetch_bucket_sz")
        if bucket > 0:
            limit = min(getattr(self, _C + "max_n_available_params") - getattr(self, _C + "n_available_params"),
                        bucket)
            prefetch, numel = set(), 0
            while queue and numel < limit:
                in_trace = queue.popleft()
                param = in_trace.param
                # (_is_currently_on_nvme is False: no NVMe swapper without parameter offload)
                do_prefetch = param.ds_status is not_available and param not in prefetch
                last_fetched[param] = max(last_fetched[param], in_trace.step_id_last_used_at)
                if do_prefetch:
                    prefetch.add(param)
                    numel += param.ds_numel
            if numel > 0:
                getattr(self, _C + "all_gather_params")(prefetch, forward)
    setattr(self, _C + "step_id", step_id + 1)


def _trace_error(module, expected, got, step_id):
    raise RuntimeError(
        f"tracing error at step {step_id}: \n"
        f"module id: {module.ds_id}, training: {module.training}\n"
        f"expected the next {len(expected)} parameters in the "
        f"parameter fetch queue to be {tuple(p.ds_summary(use_debug_name=True) for p in expected)} \n"
        f"but got \n {tuple(p.ds_summary(use_debug_name=True) for p in got)}.")


def release_sub_module(self, submodule, forward: bool = False) -> None:
    """PartitionedParameterCoordinator.release_sub_module (0.19.8) with the module's parameters listed once
    and a parameter whose partition is in place freed in one step (see the module docstring, 5)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import z3_leaf_module

    is_leaf = z3_leaf_module(submodule)
    cached = (_module_params(submodule, is_leaf)
              if _coordinator_plain(self) and not submodule.ds_recompute_parameters else None)
    if cached is None:
        return self._stock_release_sub_module(submodule, forward)
    _, params, params_set = cached
    step_id = getattr(self, _C + "step_id")
    if self.is_complete_trace():
        to_release = getattr(self, _C + "params_to_release")(submodule, step_id)
    else:
        to_release = {p.ds_id for p in params}
    if not forward:
        active_backward = getattr(self, _C + "active_backward_submodules")
        assert active_backward, "active_backward_submodules is empty during backward pass"
        # (recompute parameters: none, else DeepSpeed's own above)
        active_backward.pop(submodule.ds_id, None)
    accelerator = get_accelerator()
    record_stream = not accelerator.is_synchronized_device()
    available, not_available = ZeroParamStatus.AVAILABLE, ZeroParamStatus.NOT_AVAILABLE
    nvme, ds_id, freed = OffloadDeviceEnum.nvme, submodule.ds_id, 0
    release_param = getattr(self, _C + "release_param")
    with torch.no_grad():
        for param in params_set:  # (DeepSpeed's order: its set of the same parameters)
            active = param.ds_active_sub_modules
            active.discard(ds_id)
            if param.ds_id not in to_release or param.is_external_param:
                continue
            # (__release_param)
            if param.ds_status is not available or active:
                continue
            if not _partition_in_place(param, nvme):
                release_param(param, True)
                continue
            _free(param, accelerator, record_stream, not_available)
            freed += param.ds_numel
    setattr(self, _C + "n_available_params", getattr(self, _C + "n_available_params") - freed)


COORDINATOR_OVERRIDES = {"_fetch_sub_module_impl": fetch_sub_module_impl, "release_sub_module": release_sub_module}


def _install_coordinator(coordinator) -> None:
    import types

    cls = type(coordinator)
    if not all(getattr(vars(cls).get(n), "__module__", None) in (cls.__module__, "deepspeed.utils.nvtx",
                                                                "torch.utils._contextlib", None)
               for n in COORDINATOR_OVERRIDES):
        return  # (patched by someone else)
    for name, fast in COORDINATOR_OVERRIDES.items():
        setattr(coordinator, "_stock_" + name.lstrip("_"), types.MethodType(getattr(cls, name), coordinator))
        setattr(coordinator, name, types.MethodType(fast, coordinator))


def _uninstall_coordinator(coordinator) -> None:
    for name in COORDINATOR_OVERRIDES:
        for attr in (name, "_stock_" + name.lstrip("_")):
            vars(coordinator).pop(attr, None)


def reduce_ready_partitions_and_remove_grads(self, param):
    """DeepSpeedZeroOptimizer_Stage3.reduce_ready_partitions_and_remove_grads (0.19.8), each gradient's hook:
    without contiguous_gradients (engine.zero_settings) and with room in the bucket, what it does is append
    the parameter to the reduce bucket, here without its four nested calls and a no_grad context per
    parameter. Anything else (a full bucket or another process group: a reduce now; contiguous gradients,
    ZenFlow, AutoEP folding) takes DeepSpeed's own."""
    if self._coalesce_grad_reduction:
        return
    bucket = self.ipg_buckets[self.get_param_comm_dtype(param)]
    group = getattr(param, "ds_process_group", self.dp_process_group)  # _get_param_partition_group
    if ((bucket.params and bucket.process_group != group) or self.contiguous_gradients or self.zenflow
            or (bucket.elements > 0 and bucket.elements + param.ds_numel > self.reduce_bucket_size)
            or self.autoep_folding_tp_group is not None or not getattr(param, "ds_grad_is_ready", True)):
        return self._stock_reduce_ready_partitions_and_remove_grads(param)
    # (__add_grad_to_ipg_bucket)
    if not _RESOLVES_DATA_DEPENDENCY[0]:
        from deepspeed.accelerator import get_accelerator

        self.reduce_and_partition_stream.wait_stream(get_accelerator().current_stream())
    bucket.params.append(param)
    bucket.process_group = group
    bucket.elements += param.grad.numel()


_RESOLVES_DATA_DEPENDENCY = []


def reduce_scatter_coalesced(tensors, group):
    """deepspeed.runtime.comm.coalesced_collectives.reduce_scatter_coalesced (0.19.8), the interleave in one
    cat: each tensor flattened, padded to world x ceil(numel / world) and viewed as (world, chunk), the rows
    concatenated along dim 1 = DeepSpeed's rank-major list of chunks (its padding is uninitialised memory
    here zeros: padded positions are reduced but never read). Same buffer, same pre-division, same call."""
    from deepspeed import comm as dist
    from deepspeed.runtime.comm.coalesced_collectives import _torch_reduce_scatter_fn

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    numels = [t.numel() for t in tensors]
    chunks = [-(-n // world) for n in numels]
    if len(tensors) == 1 and numels[0] % world == 0:
        flat = tensors[0].view(-1)
    else:
        rows = []
        for t, n, c in zip(tensors, numels, chunks):
            f = t.view(-1)
            if n != c * world:
                f = torch.nn.functional.pad(f, (0, c * world - n))
            rows.append(f.view(world, c))
        flat = torch.cat(rows, dim=1).view(-1)
    flat.div_(world)  # pre-divide
    total = sum(chunks)
    mine = flat.narrow(0, rank * total, total)  # (torch.chunk(flat, world)[rank])
    _torch_reduce_scatter_fn(flat, mine, group=group)
    out, offset = [], 0
    for n, c in zip(numels, chunks):
        out.append(mine.narrow(0, offset, max(0, min(c, n - rank * c))))
        offset += c
    return out


def avg_scatter_grads(self, params, communication_data_type):
    """DeepSpeedZeroOptimizer_Stage3.__avg_scatter_grads (0.19.8) with reduce_scatter_coalesced above, in the
    plain case (no gradient pre-division, no quantized all-to-all, no expert-parallel averaging); else
    DeepSpeed's own."""
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator

    group = self._get_param_partition_group(params[0])
    if ((self.postscale_gradients and self.gradient_predivide_factor != 1.0)
            or (self.all2all_process_group is not None
                and dist.get_world_size() // get_accelerator().device_count() > 1)
            or self._gradient_averaging_world_size(params, dist.get_world_size(group=group))
            != dist.get_world_size(group=group)):
        return self._stock_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads(params, communication_data_type)
    self._assert_same_partition_group(params)
    grads = [p.grad for p in params]
    if communication_data_type != self.dtype:
        grads = [g.to(communication_data_type) for g in grads]
    partitions = reduce_scatter_coalesced(grads, group)
    if communication_data_type != self.gradient_accumulation_dtype:
        partitions = [g.to(self.gradient_accumulation_dtype) for g in partitions]
    return partitions


def partition_grads(self, params, grad_partitions):
    """DeepSpeedZeroOptimizer_Stage3.partition_grads (0.19.8) without optimizer offload: each reduced
    partition copied into (first micro-batch) or added to its gradient buffer, in one foreach call for the
    bucket instead of one copy_/add_ per tensor; the full gradients freed. Offload: DeepSpeed's own."""
    if self.offload_optimizer or not params:
        return self._stock_partition_grads(params, grad_partitions)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    record_stream = not accelerator.is_synchronized_device()
    rank = self._get_param_partition_rank(params[0])  # (one partition group per bucket: asserted by the caller)
    to_grad = getattr(self, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition")
    boundary_ids = self._offload_boundary_param_ids
    buffers, partitions = [], []
    for param, partition in zip(params, grad_partitions):
        if param.partition_numel() * rank >= param.ds_numel:
            param.grad = None  # (an empty partition)
            continue
        boundary_ids.add(param.ds_id)
        buffers.append(to_grad[param.ds_id].narrow(0, 0, partition.numel()))
        partitions.append(partition)
        if record_stream and param.grad is not None:
            param.grad.record_stream(accelerator.current_stream())
        param.grad = None
    if not buffers:
        return buffers
    if self.micro_step_id == 0:  # don't accumulate
        torch._foreach_copy_(buffers, partitions, non_blocking=True)
    else:
        dtype = self.gradient_accumulation_dtype
        torch._foreach_add_(buffers, [g.to(dtype).view(b.shape) for g, b in zip(partitions, buffers)])
    return buffers


def supported(optimizer) -> bool:
    """DeepSpeed's own path for what this was not written for: hpZ, parameter offload, no coordinator."""
    offload, cls = getattr(optimizer, "parameter_offload", None), type(optimizer)
    own = all(getattr(vars(cls).get(name), "__module__", None) in (cls.__module__, "deepspeed.utils.nvtx")
              for name in OVERRIDES)  # not patched by someone else
    return (own and getattr(optimizer, "zero_hpz_partition_size", None) == 1
            and not getattr(optimizer, "offload_param", True)
            and offload is not None and hasattr(offload, "param_coordinator"))


OVERRIDES = {"_partition_all_parameters": partition_all_parameters,
             "reduce_ready_partitions_and_remove_grads": reduce_ready_partitions_and_remove_grads,
             "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads": avg_scatter_grads,
             "partition_grads": partition_grads}


def install(optimizer) -> bool:
    if not supported(optimizer):
        return False
    from deepspeed.accelerator import get_accelerator

    _RESOLVES_DATA_DEPENDENCY[:] = [get_accelerator().resolves_data_dependency()]
    _install_linear(optimizer.parameter_offload.module)
    _install_backward_functions(optimizer.parameter_offload)
    _install_coordinator(optimizer.parameter_offload.get_param_coordinator())
    return True


def uninstall(optimizer) -> None:
    """This engine's ZeRO-3 weights take DeepSpeed's linear Function again (F.linear stays zero3_linear: it
    is process-wide, and sends them to DeepSpeed's Function)."""
    offload = getattr(optimizer, "parameter_offload", None)
    if offload is not None:
        _uninstall_coordinator(offload.get_param_coordinator())
        for p in offload.module.parameters():
            if hasattr(p, FAST_MARK):
                delattr(p, FAST_MARK)
        for module in offload.module.modules():
            if "_stock_pre_bwd_fn" in module.__dict__:
                module.pre_bwd_fn, module.post_bwd_fn = module._stock_pre_bwd_fn, module._stock_post_bwd_fn
                del module._stock_pre_bwd_fn, module._stock_post_bwd_fn
