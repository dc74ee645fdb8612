"""ZeRO-1/2 gradients as views of one flat buffer per parameter group (DeepSpeed 0.19.8, issue 21).

DeepSpeed's ZeRO-1/2 reduce (without contiguous gradients) flattens each bucket of gradients into a new
tensor, all-reduces it, copies it back into every gradient, slices each parameter's partition out and (ZeRO-2,
after every micro-batch) adds it to the accumulated partition, which the step flattens once more: hundreds of
small tensor ops and Python calls per micro-batch for the 247M layout's 196 tensors, plus a Python hook per
parameter. Here, as torch DDP's `gradient_as_bucket_view`: every parameter's .grad is a view of a flat fp32
buffer laid out exactly as DeepSpeed's flat weight buffer of its group (bit16_groups_flat), so autograd adds
each micro-batch's gradient into it in place; at the accumulation boundary each buffer is divided by the
world size and all-reduced in place, and this rank's partition of it (a narrow view at the offsets of its
weight partition) is what DeepSpeed's step reads (averaged_gradients as a pre-flattened partition, the
per-parameter views of DeepSpeed's own compact-partition builder: no flatten in the step).

Different from DeepSpeed's own path, on purpose:
  - one all-reduce per optimizer step, not one per micro-batch (ZeRO-2): the micro-batches are summed before
    the reduction, not after (the same up to fp32 rounding; bitwise the same at accumulation 1);
  - gradients are reduced in fp32 (torchtitan's default reduce dtype): under bf16_autocast DeepSpeed would
    send the Linear weights' gradients in bf16;
  - memory: the buffer holds the whole model's gradients through the step, which is what DeepSpeed's default
    contiguous-gradients bucket (reduce_bucket_size elements) holds too; a model with more elements than
    reduce_bucket_size keeps DeepSpeed's path, whose bucketing then frees gradients during backward;
  - no per-parameter hooks: the reduction runs from engine.backward's epilogue (train_step's path).
Only the plain case (blockers() lists what is not); anything else keeps DeepSpeed's path.
tests/train/test_deepspeed_fastpath.py checks it on 2 gloo ranks against DeepSpeed's own path (bitwise at
accumulation 1) and a float64 reference.
"""
from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)

OVERRIDES = ("backward_prologue", "independent_gradient_partition_epilogue", "reduce_gradients")


def blockers(opt) -> list[str]:
    """Why this ZeRO-1/2 optimizer cannot take flat gradient buffers (empty: it can)."""
    checks = {
        "cpu_offload": opt.cpu_offload, "overlap_comm": opt.overlap_comm,
        "contiguous_gradients": opt.contiguous_gradients, "zenflow": opt.zenflow,
        "fp32 gradient accumulation attribute": opt.use_grad_accum_attribute,
        "weights not fp32": opt.dtype != torch.float32 or opt.gradient_accumulation_dtype != torch.float32,
        "MoE layers": opt.has_moe_layers, "sequence parallel": opt.sequence_parallel_size > 1,
        "no gradient averaging": not opt.gradient_average,
        "offload gradient safety": opt._offload_gradient_safety_enabled,
        "AutoEP folding": getattr(opt, "autoep_folding_tp_group", None) is not None,
        "muon": any(opt._is_muon_group(g) for g in opt.bit16_groups if g),
        "more elements than reduce_bucket_size": sum(f.numel() for f in opt.bit16_groups_flat) > opt.reduce_bucket_size,
    }
    return [name for name, blocked in checks.items() if blocked]


class FlatGrads:
    """Per group: the flat gradient buffer, each parameter's view of it, and this rank's partition of it
    (DeepSpeed's GradPartitionBufferGroup: the flat partition and its per-parameter views)."""

    def __init__(self, opt):
        from deepspeed import comm as dist

        self.buffers, self.views, self.partitions = [], [], []
        for i, flat in enumerate(opt.bit16_groups_flat):
            buffer = torch.zeros_like(flat)
            for p, meta, offset in zip(opt.round_robin_bit16_groups[i], opt.round_robin_bit16_meta[i],
                                       opt.round_robin_bit16_offsets[i]):
                self.views.append((p, buffer.narrow(0, offset, meta.numel()).view(meta.shape)))
            weights = opt.parallel_partitioned_bit16_groups[i][dist.get_rank(group=opt.real_dp_process_group[i])]
            offset = (weights.data_ptr() - flat.data_ptr()) // flat.element_size()
            assert weights.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() and \
                0 <= offset <= flat.numel() - weights.numel(), f"group {i}: the weight partition is not in its flat buffer"
            # DeepSpeed's own per-parameter views of a partition (padding marked), moved onto our buffer's slice
            partition = opt._build_compact_grad_partition_buffer(i)
            assert partition.flat_partition.numel() == weights.numel() == opt.partition_size[i]
            partition.flat_partition = buffer.narrow(0, offset, weights.numel())
            partition.move_flat_partition(buffer.device)
            self.buffers.append(buffer)
            self.partitions.append(partition)
        self.open = False  # .grad points at the buffers for the current accumulation window


def install(opt) -> bool:
    """Flat gradient buffers on this ZeRO-1/2 optimizer (deepspeed_fastpath.install calls it after its own
    overrides); False, and nothing changed, outside the plain case."""
    why = blockers(opt)
    if why:
        log.info("ZeRO-%d keeps DeepSpeed's gradient reduction (%s)", 2 if opt.partition_gradients else 1,
                 ", ".join(why))
        return False
    opt._flat_grads = FlatGrads(opt)
    if opt._grad_acc_hooks:  # ZeRO-2's per-parameter bucketing: nothing left for it to do
        for handle in opt._grad_acc_hooks:
            handle.remove()
        opt._grad_acc_hooks = []
        opt._fastpath_grad_hooks = True  # (deepspeed_fastpath.uninstall puts DeepSpeed's hooks back)
    for name in OVERRIDES:
        setattr(opt, name, types.MethodType(globals()[name], opt))
    return True


def uninstall(opt) -> None:
    for name in OVERRIDES:
        vars(opt).pop(name, None)
    vars(opt).pop("_flat_grads", None)


def backward_prologue(self):
    """At the first backward of an accumulation window: zero the buffers, point every .grad at its view
    (DeepSpeed's step and zero_grad set them to None)."""
    flat = self._flat_grads
    if not flat.open:
        torch._foreach_zero_(flat.buffers)
        for p, view in flat.views:
            p.grad = view
        flat.open = True


def independent_gradient_partition_epilogue(self):
    """After every backward (ZeRO-2) or at the boundary (ZeRO-1, from reduce_gradients): nothing until the
    accumulation boundary; there, each buffer averaged over the data-parallel ranks in place (divided first,
    as DeepSpeed's allreduce_bucket) and this rank's partition handed to the step."""
    from deepspeed import comm as dist

    self._epilogue_ran_this_backward = True
    if not self.is_gradient_accumulation_boundary():
        return
    flat = self._flat_grads
    world_size = dist.get_world_size(group=self.dp_process_group)
    for i, buffer in enumerate(flat.buffers):
        if world_size > 1:  # (x / 1 is x)
            buffer.div_(world_size)
        dist.all_reduce(buffer, group=self.dp_process_group)
        self.averaged_gradients[i] = flat.partitions[i]
        self.all_grad_tensors[i] = None
    flat.open = False


def reduce_gradients(self, pipeline_parallel=False):
    """ZeRO-1's reduction at the boundary: the gradients are in the buffers already (no per-parameter loop)."""
    self.independent_gradient_partition_epilogue()
