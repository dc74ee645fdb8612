"""The micro-batch a rank trains on: segments of one group, with the metadata memory masks need."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from trime_dist.core.constants import IGNORE_INDEX


@dataclass
class Batch:
    input_ids: torch.Tensor     # [B, T] long: tokens[:, :-1] of each segment, padded with pad id
    targets: torch.Tensor       # [B, T] long: tokens[:, 1:], IGNORE_INDEX at padding
    stream: torch.Tensor        # [B] long: id of the token stream the segment was cut from
    stream_index: torch.Tensor  # [B] long: index of the segment within its stream (shard field `index`)
    row: torch.Tensor           # [B] long: row of the segment in its group (unique in the global batch)
    group_tokens: Optional[int] = None  # non-pad targets of the whole group (all ranks), when known

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        tensors = (self.input_ids, self.targets, self.stream, self.stream_index, self.row)
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in tensors), group_tokens=self.group_tokens)

    @property
    def n_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())
