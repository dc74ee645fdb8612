"""Everything that touches torch.distributed: process-group set-up and collectives.

Every collective here has a world-size-1 path, so the rest of the code is plain tensor code
that runs the same in one process.
"""
from __future__ import annotations

import datetime
import socket
from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.distributed as dist

from trime_dist.core.device import pick_device
from trime_dist.core.launch_env import (DistEnv, apply_net_interface, discover_env, export_env, free_port,
                                        rank_on_host)


def backend_for_device() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_s: int = 1800, *, group_of_one: bool = False,
                     init_group: Optional[Callable[[str], None]] = None, backend: Optional[str] = None,
                     net_interface: str = "", net_interface_key: str = "run.net_interface") -> DistEnv:
    """Bring up the default process group from the launcher's environment (any launcher: DeepSpeed,
    torchrun, srun, mpiexec); returns that environment.

    One process gets no group unless group_of_one (DeepSpeed wants one; it then rendezvous on a free
    port). The environment is exported as RANK/WORLD_SIZE/... and the GPU picked by local rank, then
    init_group(backend) makes the group: torch's init_process_group unless the caller brings its own
    (DeepSpeed's). backend: gloo for a stage that keeps its tensors on the CPU on a GPU machine (default:
    nccl when CUDA is available, else gloo). net_interface: the network interface gloo and NCCL use
    (the config key net_interface_key; see launch_env.apply_net_interface), checked before any rendezvous. Every rank then
    publishes its host name in the store (lost_ranks.publish_host). Nothing is done when a group exists already.
    """
    env = discover_env()
    apply_net_interface(net_interface, net_interface_key)  # (with one process too: a bad value fails on one rank as on many)
    if dist.is_initialized() or (env.world_size == 1 and not group_of_one):
        return env
    if env.launcher == "single":
        env = replace(env, master_port=free_port())
    export_env(env)
    pick_device("auto", env.local_rank)  # binds this rank's GPU before the group (NCCL) is made
    backend = backend or backend_for_device()
    if init_group is None:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    else:
        init_group(backend)
    if env.world_size > 1:
        from trime_dist.core.lost_ranks import publish_host

        publish_host(env)
    return env


def shutdown_distributed() -> None:
    """Tear the process group down at the end of a stage (a clean exit under every launcher) and unlink
    this rank's DeepSpeed all-reduce buffer, which DeepSpeed leaves in /dev/shm."""
    from trime_dist.core.shm_buffers import remove_own_buffer

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    remove_own_buffer()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank (identity with one process)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (no autograd); returns a new tensor."""
    out = t.clone()
    if is_dist():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    if is_dist():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def raise_first_error(error: Optional[BaseException]) -> None:
    """Collective: when any rank passes an error, every rank raises ValueError with the first one's message (in
    rank order, "rank R on HOST: " before it), so no rank goes on to wait at a collective the failed one never reaches;
    otherwise returns on every rank. With one process: raises `error` itself."""
    if not is_dist():
        if error is not None:
            raise error
        return
    messages = [None] * get_world_size()
    dist.all_gather_object(messages, None if error is None else (socket.gethostname(), str(error)))
    first = next(((r, m) for r, m in enumerate(messages) if m is not None), None)
    if first is not None:
        rank, (host, message) = first
        raise ValueError(message if rank == get_rank() else f"{rank_on_host(rank, host)}: {message}") from error


def all_to_all_rows(t: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
    """Rows send_sizes[0] of `t` go to rank 0, the next send_sizes[1] to rank 1, ...; returns the rows every rank
    sent here, in rank order ([sum(recv_sizes), ...]; recv_sizes[r] = what rank r sends here). Identity with one
    process."""
    if not is_dist():
        return t
    out = t.new_empty((sum(recv_sizes),) + tuple(t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), output_split_sizes=list(recv_sizes),
                           input_split_sizes=list(send_sizes))
    return out


# --------------------------------------------------------------------------------------------
# All-gather along dim 0 (sizes may differ per rank), with and without autograd.
# Used by trime_dist.train.loss to make every rank's keys the memory of every rank's queries.
# --------------------------------------------------------------------------------------------

def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's `n`, in rank order ([n] with one process)."""
    return _gather_sizes(n, device) if is_dist() else [n]


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's dim-0 size, in rank order."""
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s) for s in sizes]


def _all_gather_padded(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """[sum(sizes), ...]: pad each rank's tensor to max(sizes), all_gather, strip the padding."""
    max_n = max(sizes)
    if max_n == 0:  # every rank is empty (all padding): nothing to exchange
        return t.new_zeros((0,) + tuple(t.shape[1:]))
    padded = t.new_zeros((max_n,) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def all_gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0 in rank order (no autograd; sizes may differ)."""
    if not is_dist():
        return t.detach()
    with torch.no_grad():
        return _all_gather_padded(t.detach(), _gather_sizes(t.shape[0], t.device))


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenation of all ranks' tensors. Backward: each rank receives the SUM over ranks
    of the gradients of its own slice, so W ranks compute what one process with all rows would."""

    @staticmethod
    def forward(ctx, t):
        sizes = _gather_sizes(t.shape[0], t.device)
        ctx.sizes, ctx.rank = sizes, get_rank()
        return _all_gather_padded(t, sizes)

    @staticmethod
    def backward(ctx, grad):
        sizes, rank = ctx.sizes, ctx.rank
        max_n = max(sizes)
        if max_n == 0:
            return grad.new_zeros((0,) + tuple(grad.shape[1:]))
        # [R, max_n, ...]: every rank's slice of this rank's gradient, padded to one shape
        per_rank = grad.new_zeros((len(sizes), max_n) + tuple(grad.shape[1:]))
        for r, part in enumerate(grad.split(sizes, dim=0)):
            per_rank[r, : sizes[r]] = part
        if dist.get_backend() == "nccl":
            mine = grad.new_empty((max_n,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, per_rank.reshape((-1,) + tuple(grad.shape[1:])))
        else:  # gloo has no reduce_scatter: all_reduce and keep our own slice
            dist.all_reduce(per_rank)
            mine = per_rank[rank]
        return mine[: sizes[rank]]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0 in rank order; gradients flow back to the rank that
    produced each row, summed over ranks (sizes may differ). Identity with one process."""
    if not is_dist():
        return t
    return _AllGatherWithGrad.apply(t)


def all_gather_keep_local_grad(t: torch.Tensor) -> torch.Tensor:
    """Like all_gather_no_grad, but this rank's own slice stays differentiable (OpenCLIP's trick);
    remote rows are detached, as in the original TRIME code."""
    if not is_dist():
        return t
    sizes = _gather_sizes(t.shape[0], t.device)
    with torch.no_grad():
        gathered = _all_gather_padded(t.detach(), sizes)
    parts = list(gathered.split(sizes, dim=0))
    parts[get_rank()] = t
    return torch.cat(parts, dim=0)
