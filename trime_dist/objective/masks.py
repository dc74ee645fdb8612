"""Which memory entries each query may use: per-token metadata and the masks of DESIGN.md §1.

Pure functions over tensors; the tiled objective uses the same rules block by block.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from trime_dist.core.constants import LAYOUTS

# --------------------------------------------------------------------------------------------
# Token metadata and memory masks
# --------------------------------------------------------------------------------------------

@dataclass
class TokenMeta:
    """Where each token sits in the global batch; every field is a [N] long tensor."""
    row: torch.Tensor           # row of the token's segment in its group (unique within the global batch)
    position: torch.Tensor      # index of the token within its segment
    stream: torch.Tensor        # id of the token stream the segment was cut from
    stream_index: torch.Tensor  # index of the segment within its stream (consecutive segments: +1)

    def __post_init__(self):
        shapes = {f.name: tuple(getattr(self, f.name).shape) for f in fields(self)}
        if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
            raise ValueError(f"TokenMeta fields must all be [N] tensors of one length, got {shapes}")

    def __len__(self) -> int:
        return self.row.shape[0]

    def slice(self, start: int, end: int) -> "TokenMeta":
        return TokenMeta(*(getattr(self, f.name)[start:end] for f in fields(self)))

    def select(self, index: torch.Tensor) -> "TokenMeta":
        return TokenMeta(*(getattr(self, f.name)[index] for f in fields(self)))

    def stack(self) -> torch.Tensor:
        """[N, 4] long tensor (row, position, stream, stream_index), e.g. to gather in one collective."""
        return torch.stack([getattr(self, f.name).long() for f in fields(self)], dim=1)

    @staticmethod
    def unstack(t: torch.Tensor) -> "TokenMeta":
        return TokenMeta(*t.unbind(dim=1))


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown memory layout {layout!r}; expected one of {LAYOUTS}")


def build_memory_mask(query_meta: TokenMeta, key_meta: TokenMeta, layout: str,
                      use_local: bool = True, exclude_future: bool = False) -> torch.Tensor:
    """[N, M] bool: True where query i may use memory entry j (DESIGN.md §1, table of M_i).

    none: nothing.  local: same segment, earlier position.  long: local, or any position of an
    earlier segment of the same stream.  external: (local if use_local) or any position of any other
    segment; with exclude_future not the later segments of the query's own stream (its continuation,
    which a datastore never holds at test time). Key validity (ignored labels) is not applied here;
    the objectives apply it.
    """
    check_layout(layout)
    q, k = query_meta, key_meta
    if layout == "none":
        return torch.zeros(len(q), len(k), dtype=torch.bool, device=q.row.device)
    same_segment = q.row[:, None] == k.row[None, :]                                # [N, M]
    local = same_segment & (k.position[None, :] < q.position[:, None])             # [N, M]
    if layout == "local":
        return local
    if layout == "long":
        earlier_in_stream = (q.stream[:, None] == k.stream[None, :]) & \
            (k.stream_index[None, :] < q.stream_index[:, None])                    # [N, M]
        return local | earlier_in_stream
    other = ~same_segment                                                          # external
    if exclude_future:
        other &= ~((q.stream[:, None] == k.stream[None, :]) & (k.stream_index[None, :] > q.stream_index[:, None]))
    return (local | other) if use_local else other
