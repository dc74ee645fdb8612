"""The sliding context windows over a token stream, one definition for `trime eval --context-window C` and
`trime datastore build --context-window C`, so that a stored key and an eval query at the same stream
position were computed from the same context (as the original TRIME / kNN-LM stores are built).

Inputs sit at stream positions [0, n). With window length L and context C < L, window 0 holds inputs
[0, L) and scores all of them; window j >= 1 scores the next L - C positions and starts C positions
before them (its context, already scored by the window before).
"""
from __future__ import annotations

from typing import Iterator


def window_span(j: int, seq_len: int, context: int) -> tuple[int, int, int]:
    """(lo, scored_from, hi) of window j: inputs [lo, hi), scored positions [scored_from, hi); hi may pass the
    stream's end (the last window is cut there)."""
    if not 0 <= context < seq_len:
        raise ValueError(f"context window {context} must be in [0, {seq_len}) (the window length)")
    if j == 0:
        return 0, 0, seq_len
    scored_from = seq_len + (j - 1) * (seq_len - context)
    return scored_from - context, scored_from, scored_from + seq_len - context


def window_scoring(position: int, seq_len: int, context: int) -> int:
    """The window that scores stream position `position`."""
    return 0 if position < seq_len else 1 + (position - seq_len) // (seq_len - context)


def windows_scoring(start: int, end: int, seq_len: int, context: int) -> Iterator[tuple[int, int, int]]:
    """(lo, scored_from, hi) of every window that scores a position in [start, end), in order."""
    if end <= start:
        return
    for j in range(window_scoring(start, seq_len, context), window_scoring(end - 1, seq_len, context) + 1):
        yield window_span(j, seq_len, context)
