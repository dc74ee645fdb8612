"""The windows `trime eval` scores: each segment as is, or a sliding context over each stream.

With context_window C, a stream is re-cut into windows of at most L inputs whose first C inputs are
context only (already scored by an earlier window) and whose remaining positions are scored, as in
the paper's evaluation; the first window of a stream scores all its positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass
class Window:
    stream: int
    start: int          # stream position of tokens[0]
    tokens: np.ndarray  # int [n + 1]: inputs tokens[:-1], targets tokens[1:]
    score_from: int     # positions < score_from are context only

    @property
    def length(self) -> int:
        return len(self.tokens) - 1


def iter_stream_segments(data_dir: str, manifest: dict, max_segments: int = 0, streams=None):
    """(tokens, meta) of every segment (the first max_segments, if > 0) in manifest (= stream) order; with
    `streams` (a set of stream ids), only the segments of those streams."""
    from trime_dist.core import shards

    if manifest["format"] != shards.SEGMENTS_FORMAT:
        raise ValueError(f"{data_dir}: evaluation reads prepared segment shards (format {shards.SEGMENTS_FORMAT}), "
                         f"got {manifest['format']!r}")
    end = max_segments or None
    return ((tokens, meta) for _, tokens, meta in shards.iter_range(data_dir, manifest, 0, end)
            if streams is None or int(meta["stream"]) in streams)


def iter_windows(data_dir: str, manifest: dict, seq_len: int, context_window: int = 0,
                 max_segments: int = 0, streams=None) -> Iterator[Window]:
    """The windows of every stream (only those in the set `streams`, when given), in manifest order."""
    segments = iter_stream_segments(data_dir, manifest, max_segments, streams)
    if context_window <= 0:
        for tokens, meta in segments:
            yield Window(int(meta["stream"]), int(meta["start"]), tokens.astype(np.int64), 0)
        return
    if context_window >= seq_len:
        raise ValueError(f"--context-window {context_window} must be smaller than the window length {seq_len}")
    stream, buf, buf_start, scored = None, np.zeros(0, np.int64), 0, 0
    for tokens, meta in segments:
        if meta["stream"] != stream:
            if stream is not None:
                yield from _drain(stream, buf, buf_start, scored, seq_len, context_window, final=True)
            stream, buf, buf_start, scored = meta["stream"], np.zeros(0, np.int64), int(meta["start"]), int(meta["start"])
        end = buf_start + len(buf)
        new = tokens[max(0, end - int(meta["start"])):].astype(np.int64)  # segments overlap by one token
        buf = np.concatenate([buf, new])
        for w in _drain(stream, buf, buf_start, scored, seq_len, context_window, final=False):
            scored = w.start + w.length
            yield w
        cut = max(0, scored - context_window - buf_start)  # keep only what later windows can still use
        buf, buf_start = buf[cut:], buf_start + cut
    if stream is not None:
        yield from _drain(stream, buf, buf_start, scored, seq_len, context_window, final=True)


def _drain(stream, buf, buf_start, scored, seq_len, context, final):
    """Windows whose scored part starts at `scored`, while the buffer holds enough tokens."""
    first = scored == buf_start  # nothing of the stream scored yet (buffer starts at the stream start)
    while True:
        ctx = 0 if first else context
        lo = scored - ctx                            # stream position of the window's first input
        hi = min(lo + seq_len, buf_start + len(buf) - 1)  # exclusive end of its inputs
        full = lo + seq_len <= buf_start + len(buf) - 1
        if hi <= scored or not (full or final):
            return
        yield Window(int(stream), lo, buf[lo - buf_start:hi + 1 - buf_start], ctx)
        scored, first = hi, False
        if not full:
            return


# ----------------------------------------------------------------------------- R ranks: whole streams dealt

@dataclass(frozen=True)
class StreamSize:
    stream: int
    windows: int   # windows iter_windows cuts from the stream
    tokens: int    # positions those windows score


def stream_sizes(data_dir: str, manifest: dict, seq_len: int, context_window: int = 0,
                 max_segments: int = 0) -> list[StreamSize]:
    """Every stream's window and scored-token counts, in manifest order (one read of the data)."""
    out: list[StreamSize] = []
    for w in iter_windows(data_dir, manifest, seq_len, context_window, max_segments):
        if out and out[-1].stream == w.stream:
            last = out[-1]
            out[-1] = StreamSize(w.stream, last.windows + 1, last.tokens + w.length - w.score_from)
        else:
            out.append(StreamSize(w.stream, 1, w.length - w.score_from))
    return out


def deal_streams(sizes: list[StreamSize], world_size: int) -> list[list[int]]:
    """The stream ids each of `world_size` ranks scores, each rank's in manifest order. Whole streams (a stream's
    long-memory chain stays on one rank), balanced by scored tokens: largest stream first to the rank with the
    fewest tokens so far (ties: the lower rank), so the deal depends only on the sizes. Ranks beyond the number of
    streams get none."""
    if world_size < 1:
        raise ValueError(f"world size {world_size}: expected at least 1")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i].tokens, i))
    loads = [0] * world_size
    owner = [0] * len(sizes)
    for i in order:
        r = min(range(world_size), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += sizes[i].tokens
    return [[s.stream for i, s in enumerate(sizes) if owner[i] == r] for r in range(world_size)]
