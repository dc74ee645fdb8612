"""Small helpers shared by every stage: atomic writes, content hashes, and chunking an iterator.

A stage never trusts a half-written output: everything is written to a temporary name in the
same directory and renamed into place when complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import tempfile
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")  # the item type of batched


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to `path`; rename it to `path` only if the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs are shared like any other file
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str, what: str = "file") -> Any:
    """Read JSON with an error that names the file and what it was supposed to be."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: {what} is not valid JSON ({e})") from None


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """Lists of n consecutive items, the last one shorter if they run out (itertools.batched, Python 3.12)."""
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch
