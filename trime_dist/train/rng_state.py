"""The random streams a resumed run must continue exactly: torch (CPU and CUDA: dropout), numpy and
Python's, one safetensors file per rank in the checkpoint's tag directory.

DeepSpeed's checkpoint holds weights, optimizer (step counters included) and LR scheduler, and the
loader position rides in its client state; the RNG streams are this module's. Without them a resumed
run draws dropout masks from the state right after model init instead of where the run stopped.

The file holds tensors and JSON only (safetensors: no pickle, so a checkpoint someone else wrote cannot
run code here): torch's byte states, numpy's MT19937 key and Python's 625 state words as tensors; the
scalars beside them (positions, cached Gaussians) as JSON in the file's metadata. Older checkpoints
pickled the states (rng_state-rankN.pt); those are refused, never unpickled.
"""
from __future__ import annotations

import json
import logging
import os
import random

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = "trime-rng-state-1"


def rng_state_path(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_state-rank{rank:05d}.safetensors")


def legacy_rng_state_path(ckpt_dir: str, tag: str, rank: int) -> str:
    """The pickled RNG state of checkpoints before the safetensors one."""
    return os.path.join(ckpt_dir, tag, f"rng_state-rank{rank:05d}.pt")


def is_legacy_rng_file(name: str) -> bool:
    return name.startswith("rng_state-rank") and name.endswith(".pt")


def legacy_message(path: str) -> str:
    """The one line for an old pickled RNG state: it names the file and says how to go on."""
    tag_dir = os.path.dirname(path)
    return (f"{path}: RNG state in the old pickle format, not loaded (unpickling a checkpoint can run code); "
            f"delete {tag_dir}/rng_state-rank*.pt to resume without them (the random streams, dropout, then "
            "restart from the seed: not bit-exact)")


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of this process's streams; restore_rng_state takes them back."""
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state(),
               "numpy_key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),  # uint32 words
               "python_words": torch.tensor(py_words, dtype=torch.int64)}        # 624 words + index
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    # JSON writes floats as their shortest exact repr: the cached Gaussians come back bit for bit
    metadata = {"format": FORMAT,
                "numpy": json.dumps({"name": np_name, "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                                     "cached_gaussian": float(np_gauss)}),
                "python": json.dumps({"version": py_version, "gauss": py_gauss})}
    return tensors, metadata


def restore_rng_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    np_meta, py_meta = json.loads(metadata["numpy"]), json.loads(metadata["python"])
    key = tensors["numpy_key"].numpy().astype(np.uint32)
    words = tuple(int(w) for w in tensors["python_words"].tolist())
    torch.set_rng_state(tensors["torch"])
    np.random.set_state((np_meta["name"], key, np_meta["pos"], np_meta["has_gauss"], np_meta["cached_gaussian"]))
    random.setstate((py_meta["version"], words, py_meta["gauss"]))
    cuda = [tensors[f"cuda{i}"] for i in range(sum(k.startswith("cuda") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_rng_state(ckpt_dir: str, tag: str, rank: int) -> None:
    """Written before DeepSpeed's files, so a tag that `latest` names has it (DeepSpeed writes `latest` last)."""
    from safetensors.torch import save_file

    from trime_dist.core.io import atomic_path

    tensors, metadata = capture_rng_state()
    with atomic_path(rng_state_path(ckpt_dir, tag, rank)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def read_rng_state(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_rng_state(ckpt_dir: str, tag: str, rank: int) -> bool:
    """Restore this rank's streams from tag; False (with a warning: the run continues, not bit-exactly) when
    the checkpoint has none for this rank (more ranks than when it was saved). An old pickled state is
    refused with one line (ValueError), never unpickled."""
    path = rng_state_path(ckpt_dir, tag, rank)
    if not os.path.isfile(path):
        legacy = legacy_rng_state_path(ckpt_dir, tag, rank)
        if os.path.isfile(legacy):
            raise ValueError(legacy_message(legacy))
        log.warning("%s: no RNG state for rank %d; random streams (dropout) restart from the seed, so this "
                    "resume is not bit-exact", path, rank)
        return False
    try:
        tensors, metadata = read_rng_state(path)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
        restore_rng_state(tensors, metadata)
    except Exception as e:  # safetensors' errors have no common base; none of them can run code
        raise ValueError(f"{path}: not a readable RNG state, truncated or corrupt ({type(e).__name__}: {e}); "
                         "delete that checkpoint tag to resume from the one before") from None
    return True
