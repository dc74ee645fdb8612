"""The random streams a resumed run must continue exactly: torch (CPU and CUDA: dropout), numpy and
Python's, one file per rank in the checkpoint's tag directory.

DeepSpeed's checkpoint holds weights, optimizer (step counters included) and LR scheduler, and the
loader position rides in its client state; the RNG streams are this module's. Without them a resumed
run draws dropout masks from the state right after model init instead of where the run stopped.
"""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


def rng_state_path(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_state-rank{rank:05d}.pt")


def capture_rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_state(ckpt_dir: str, tag: str, rank: int) -> None:
    """Written before DeepSpeed's files, so a tag that `latest` names has it (DeepSpeed writes `latest` last)."""
    from trime_dist.core.io import atomic_path

    path = rng_state_path(ckpt_dir, tag, rank)
    with atomic_path(path) as tmp:
        torch.save(capture_rng_state(), tmp)


def load_rng_state(ckpt_dir: str, tag: str, rank: int) -> bool:
    """Restore this rank's streams from tag; False (with a warning: the run continues, not bit-exactly) when
    the checkpoint has none for this rank (an older checkpoint, or more ranks than when it was saved)."""
    path = rng_state_path(ckpt_dir, tag, rank)
    if not os.path.isfile(path):
        log.warning("%s: no RNG state for rank %d; random streams (dropout) restart from the seed, so this "
                    "resume is not bit-exact", path, rank)
        return False
    try:
        state = torch.load(path, weights_only=False)  # numpy's state is a tuple with an ndarray
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable RNG state, truncated or corrupt ({e}); delete that "
                         "checkpoint tag to resume from the one before") from None
    restore_rng_state(state)
    return True
