"""Resuming must not run code from the checkpoint: DeepSpeed's files (torch pickles) are read with
torch.load(weights_only=True), which builds tensors, plain containers and numbers only, plus the few
DeepSpeed types listed in DEEPSPEED_GLOBALS. Anything else (a pickled object whose __reduce__ would
call a function) is refused with one line naming the file.

Three pieces, all used by engine.load_checkpoint (and full_state_dict):
- check_checkpoint_files: every rank reads every .pt of the tag (pickle only: mmap leaves the tensor
  data unread) before DeepSpeed's load, so all ranks refuse together instead of one hanging in a collective;
- WeightsOnlyCheckpointEngine: DeepSpeed's hook for reading checkpoint files (engine.checkpoint_engine),
  the default TorchCheckpointEngine with a weights-only load;
- weights_only_loads: torch's documented TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, set only for the
  duration of the call, for the torch.load calls DeepSpeed makes itself (zero_to_fp32, MoE experts,
  universal checkpoints) with weights_only=False.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
from typing import Iterator

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from trime_dist.train.rng_state import is_legacy_rng_file, legacy_message

# The non-tensor types in DeepSpeed 0.19's checkpoints at ZeRO 0-3 (fp32, bf16, bf16_autocast), read from
# the files' pickle GLOBAL opcodes. Each is a plain data holder without __setstate__ or __reduce__:
DEEPSPEED_GLOBALS = [
    LossScaler,        # ZeRO optimizer states: the static loss scaler, attributes cur_scale and dynamic
    ZeroStageEnum,     # ZeRO optimizer states: an int Enum, rebuilt as ZeroStageEnum(n)
    fragment_address,  # ZeRO-1/2 optimizer states: a dataclass of two ints (numel, start)
]
FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def refusal(path: str, error: Exception) -> str:
    """The one line for a file torch's weights-only unpickler refused."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    what = f" ({found.group(1)})" if found else ""
    return (f"{path}: holds a non-allowed object{what}, not loaded (unpickling it could run code); resume only "
            "from a checkpoint of a trusted run, or start the run afresh in a new run.out_dir")


def load_weights_only(path: str, map_location=None, mmap: bool = False):
    """torch.load of a DeepSpeed checkpoint file, refusing (ValueError, one line) anything but tensors,
    containers, numbers and DEEPSPEED_GLOBALS."""
    try:
        with torch.serialization.safe_globals(DEEPSPEED_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise ValueError(refusal(path, e)) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable checkpoint file, truncated or corrupt ({e}); delete that "
                         "checkpoint tag to resume from the one before") from None


def check_checkpoint_files(tag_dir: str) -> None:
    """Refuse the tag (ValueError) when any of its .pt files holds a non-allowed object, or is an old
    pickled RNG state. Every rank checks every file, so all reach the same verdict."""
    for name in sorted(os.listdir(tag_dir)):
        path = os.path.join(tag_dir, name)
        if is_legacy_rng_file(name):
            raise ValueError(legacy_message(path))
        if name.endswith(".pt") and os.path.isfile(path):
            load_weights_only(path, map_location="cpu", mmap=True)


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine (saves unchanged) whose load refuses pickled objects."""

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location=map_location)


@contextlib.contextmanager
def weights_only_loads(engine=None, where: str = "") -> Iterator[None]:
    """Inside: every torch.load is weights-only with DEEPSPEED_GLOBALS allowed, and engine (a DeepSpeed
    engine using the default checkpoint engine) reads its files through WeightsOnlyCheckpointEngine.
    A refusal that does not name its file is reported for `where` (the checkpoint tag)."""
    previous_env = os.environ.get(FORCE_ENV)
    previous_engine = getattr(engine, "checkpoint_engine", None)
    if type(previous_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(DEEPSPEED_GLOBALS):
            yield
    except pickle.UnpicklingError as e:
        raise ValueError(refusal(where, e)) from None
    finally:
        if previous_env is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = previous_env
        if previous_engine is not None:
            engine.checkpoint_engine = previous_engine
