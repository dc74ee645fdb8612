"""Cutting big inputs into byte ranges that end at document boundaries, so that `trime prepare` spreads one
large file over every rank. The cuts depend only on the file and --split-mb, never on the number of ranks,
so the prepared segments are the same for 1, 2 or N ranks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO, Optional

import numpy as np

from data_pipeline.text_input import COMPRESSIONS, SPLITTABLE, detect_format, input_size, is_top_heading


@dataclass(frozen=True)
class Piece:
    """One unit of prepare work: an input, or the byte range [start, end) of an uncompressed text file."""
    path: str
    fmt: str                   # the input's format; resolved once for a split file (a later piece is not sniffed)
    start: int = 0
    end: Optional[int] = None  # None: to the end of the input

    @property
    def size(self) -> int:
        return (input_size(self.path) if self.end is None else self.end) - self.start


def is_boundary(line: bytes, fmt: str) -> bool:
    """Whether a document may start at this (\\n-terminated) line: any line of JSONL, a blank line of text
    (blank lines separate documents), a ` = Title = ` heading of WikiText."""
    if fmt == "jsonl":
        return True
    if b"\r" in line.rstrip(b"\r\n"):  # the text reader also ends lines at a lone \r: not one line there
        return False
    text = line.decode("utf-8", errors="replace")
    return is_top_heading(text) if fmt == "wikitext" else not text.strip()


def find_cut(f: BinaryIO, target: int, fmt: str) -> Optional[int]:
    """Offset of the first line start >= target where a document may start; None if none before the end."""
    f.seek(target - 1)
    f.readline()  # the rest of the line holding byte target - 1: now at a line start >= target
    while True:
        pos = f.tell()
        line = f.readline()
        if not line:
            return None
        if is_boundary(line, fmt):
            return pos


def file_pieces(path: str, fmt: str, split_bytes: int) -> list[Piece]:
    """The pieces of one input: byte ranges of about split_bytes each for an uncompressed text, WikiText or
    JSONL file larger than that (cut where a document starts, so no document spans two pieces), else the
    whole input. split_bytes <= 0: never split."""
    size = input_size(path)
    if split_bytes <= 0 or size <= split_bytes or os.path.isdir(path) or path.endswith(COMPRESSIONS):
        return [Piece(path, fmt)]
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind not in SPLITTABLE:
        return [Piece(path, kind)]
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + split_bytes < size and (cut := find_cut(f, cuts[-1] + split_bytes, kind)) is not None:
            cuts.append(cut)
    if len(cuts) == 1:  # no document starts late enough: whole
        return [Piece(path, kind)]
    return [Piece(path, kind, s, e) for s, e in zip(cuts, cuts[1:] + [size])]


def plan_pieces(files: list[str], fmt: str, split_mb: float) -> list[Piece]:
    """Every input's pieces, in input order then byte order (the order of the prepared streams)."""
    return [p for f in files for p in file_pieces(f, fmt, int(split_mb * 2**20))]


def rank_block(sizes: list[int], rank: int, world: int) -> list[int]:
    """Indices of the contiguous block of work items owned by `rank`, balanced by size (bytes)."""
    sizes_ = np.maximum(np.asarray(sizes, dtype=np.float64), 1.0)  # [P]
    ends = np.cumsum(sizes_)
    # item i goes to the rank whose share of the bytes holds the item's midpoint
    owner = np.minimum(((ends - sizes_ / 2) / ends[-1] * world).astype(int), world - 1)
    return [i for i in range(len(sizes)) if owner[i] == rank]
