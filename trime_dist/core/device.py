"""The one place that decides which device a process computes on, and how it computes there.

Every stage asks `pick_device`: the launcher's local rank picks `cuda:N` when CUDA is available,
else the CPU. `trime datastore build` and `trime eval` expose the choice as `--device auto|cpu|cuda`.
"""
from __future__ import annotations

import contextlib

import torch

from trime_dist.core.constants import DEVICES


def pick_device(requested: str = "auto", local_rank: int | None = None) -> torch.device:
    """auto: cuda:<local rank mod GPUs> when CUDA is available, else cpu; cuda without CUDA is an error."""
    if requested not in DEVICES:
        raise ValueError(f"--device {requested!r}: expected one of {', '.join(DEVICES)}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available in this process (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu or auto")
    if local_rank is None:
        from trime_dist.core.launch_env import discover_env

        local_rank = discover_env().local_rank
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    # TF32 for the fp32 matmuls that remain under bf16 (the memory objective's tiles), as nanoGPT does.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return device


def inference_autocast(device: torch.device):
    """bf16 autocast for encoding and evaluation on a GPU; nothing on the CPU (fp32 there)."""
    return bf16_autocast(device, device.type == "cuda")


def bf16_autocast(device: torch.device, enabled: bool = True):
    """Matmuls in bf16 under torch.autocast on `device` (weights stay fp32), or nothing when not enabled."""
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (before reading a wall clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_stream(device: torch.device):
    """A second CUDA stream of `device` for work queued from another thread (eval's datastore search), so that its
    kernels run beside the default stream's instead of queueing behind them; None on a CPU."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def mark_ready(stream, device: torch.device):
    """An event on the calling thread's current stream of `device` once a side `stream` exists (the point the side
    work must wait for: its inputs are written), else None."""
    return torch.cuda.current_stream(device).record_event() if stream is not None else None


def run_on_side_stream(stream, ready, fn, *args):
    """(fn(*args), done event): fn's kernels queued on `stream` after event `ready`. Without a stream (CPU):
    (fn(*args), None). Call from the worker thread (the current stream is per thread)."""
    if stream is None:
        return fn(*args), None
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        out = fn(*args)
        return out, stream.record_event()


def use_side_results(done, tensors, device: torch.device) -> None:
    """Order the current stream of `device` after the side work's `done` event and tell the caching allocator that
    the side stream's output `tensors` are used on this stream (else it could hand their memory to the next
    side-stream allocation while this stream still reads them). Nothing when done is None."""
    if done is None:
        return
    current = torch.cuda.current_stream(device)
    current.wait_event(done)
    for t in tensors:
        if t.is_cuda:
            t.record_stream(current)
