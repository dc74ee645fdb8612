"""core.io: chunking an iterator."""
from __future__ import annotations

import pytest

from trime_dist.core.io import batched


def test_batched_chunks_any_iterable_lazily():
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched(iter([]), 2)) == [] and list(batched("ab", 5)) == [["a", "b"]]
    it = batched((i for i in range(10 ** 9)), 2)  # never materialised
    assert next(it) == [0, 1] and next(it) == [2, 3]
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        next(batched([1], 0))
