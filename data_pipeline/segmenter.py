"""Cutting a token stream into the overlapping segments of docs/FORMATS.md, fed piece by piece."""
from __future__ import annotations

from typing import Iterator

import numpy as np


class Segmenter:
    """Cuts one token stream, fed in pieces, into segments of docs/FORMATS.md.

    Segment k covers stream tokens [k*L, k*L + n + 1) with n <= L; consecutive segments share
    one token so no target is lost; only the last may be shorter.
    """

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.buf = np.zeros(0, dtype=np.int32)  # stream tokens [start, ...) not yet emitted as targets
        self.index = 0
        self.start = 0

    def push(self, ids: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (index, start, tokens [L + 1]) for every segment completed by `ids`."""
        buf = np.concatenate([self.buf, np.asarray(ids, dtype=np.int32)])
        L, off = self.seq_len, 0
        while len(buf) - off >= L + 1:
            yield self.index, self.start, buf[off:off + L + 1]
            off += L
            self.index += 1
            self.start += L
        self.buf = buf[off:]

    def finish(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield the last, shorter segment (if the stream has targets left)."""
        if len(self.buf) >= 2:
            yield self.index, self.start, self.buf
        self.buf = np.zeros(0, dtype=np.int32)


def stream_id(piece_index: int, stream_index: int) -> int:
    """Globally unique stream id: piece_index (position of the input piece, data_pipeline/input_pieces.py,
    in the sorted inputs) * 2**32 + stream in the piece."""
    return piece_index * 2**32 + stream_index
