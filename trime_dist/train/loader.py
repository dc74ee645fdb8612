"""Streaming loader: reads segment or grouped shards strictly in order and deals each group to ranks.

A *group* is the set of G = ranks x micro_batch segments that share one memory in one forward
pass. Grouped shards (from `trime group`) store groups as samples; plain segment shards (from
`trime prepare`) are cut into groups of G consecutive segments on the fly. Every rank reads every
group and keeps its own rows, so all ranks see the same number of steps (no rank can run dry)
and the position is one number per epoch: the index of the next group.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from trime_dist.core.constants import IGNORE_INDEX
from trime_dist.core.shards import GROUPS_FORMAT, iter_range, pad_rows
from trime_dist.train.batch import Batch

log = logging.getLogger(__name__)


@dataclass
class Group:
    """One global group: G segments, row r padded to L+1 tokens."""
    epoch: int
    index: int              # position of the group in its epoch
    tokens: np.ndarray      # [G, L+1] int32, padded with pad_id
    lengths: np.ndarray     # [G] number of targets per row (0 = empty filler row)
    stream: np.ndarray      # [G] int64
    stream_index: np.ndarray  # [G] int64: index of the segment within its stream (shard field `index`)


class ShardDataset:
    """The groups of one shard directory, in a deterministic (seeded, per-epoch) order."""

    def __init__(self, data_dir: str, group_size: int, *, shuffle_shards: bool = False, seed: int = 0,
                 drop_last: bool = True, verify: bool = False):
        from trime_dist.core import locations, shards

        self.data_dir = data_dir
        self.manifest = shards.read_manifest(data_dir)
        self.format = self.manifest["format"]
        self.seq_len = int(self.manifest["seq_len"])
        self.pad_id = int(self.manifest["tokenizer"]["pad_id"])
        self.group_size = group_size
        self.shuffle_shards, self.seed, self.drop_last = shuffle_shards, seed, drop_last
        if self.format == GROUPS_FORMAT and int(self.manifest["group_size"]) != group_size:
            raise ValueError(
                f"{data_dir}/manifest.json: shards hold groups of {self.manifest['group_size']} segments, but "
                f"training needs groups of ranks x data.micro_batch_size = {group_size}; regroup with "
                f"`trime group --group-size {group_size}` or change data.micro_batch_size / the number of ranks")
        if verify and not locations.is_url(data_dir):  # remote shards are checked as they are fetched, once
            for entry in self.manifest["shards"]:
                shards.verify_shard(entry, data_dir)
            if os.path.isfile(locations.resolve(data_dir, self.manifest["tokenizer"]["file"])):
                shards.read_tokenizer(data_dir, self.manifest)  # the model is exported with it

    @property
    def shard_entries(self) -> list[dict]:
        return self.manifest["shards"]

    def groups_per_epoch(self) -> int:
        if self.format == GROUPS_FORMAT:
            return int(self.manifest["groups"])
        n = int(self.manifest["segments"])
        return n // self.group_size if self.drop_last else -(-n // self.group_size)

    def shard_order(self, epoch: int) -> list[dict]:
        entries = list(self.shard_entries)
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(entries)
        return entries

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Group]:
        """Groups of `epoch` from index `start` on (whole shards before it are skipped unread)."""
        if self.format == GROUPS_FORMAT:
            yield from self._iter_grouped(epoch, start)
        else:
            yield from self._iter_segments(epoch, start)

    def _iter_grouped(self, epoch: int, start: int) -> Iterator[Group]:
        for index, tokens, meta in iter_range(self.data_dir, self.manifest, start, entries=self.shard_order(epoch)):
            segs = meta["segments"]
            yield Group(epoch, index, np.asarray(tokens, dtype=np.int32),
                        np.array([s["length"] for s in segs]), np.array([s["stream"] for s in segs]),
                        np.array([s["index"] for s in segs]))

    def _iter_segments(self, epoch: int, start: int) -> Iterator[Group]:
        G, rows, index = self.group_size, [], start
        for _, tokens, meta in iter_range(self.data_dir, self.manifest, start * G, entries=self.shard_order(epoch)):
            rows.append((tokens, meta))
            if len(rows) == G:
                yield self._make_group(epoch, index, rows)
                index, rows = index + 1, []
        if rows and not self.drop_last:
            yield self._make_group(epoch, index, rows)

    def _make_group(self, epoch: int, index: int, rows: list) -> Group:
        G = self.group_size
        tokens, lengths = pad_rows([tok for tok, _ in rows], self.seq_len + 1, self.pad_id, n_rows=G)  # [G, L+1]
        # filler rows (length 0) get their own stream id -1 - r: never memory for others
        stream = np.array([m["stream"] for _, m in rows] + [-1 - r for r in range(len(rows), G)], dtype=np.int64)
        stream_index = np.array([m["index"] for _, m in rows] + [0] * (G - len(rows)), dtype=np.int64)
        return Group(epoch, index, tokens, lengths, stream, stream_index)


def rows_for_rank(group_size: int, rank: int, world_size: int, placement: str) -> np.ndarray:
    """Which rows of a group a rank trains on: a contiguous block, or every world_size-th row."""
    per_rank = group_size // world_size
    if placement == "contiguous":
        return np.arange(rank * per_rank, (rank + 1) * per_rank)
    if placement == "interleaved":
        return np.arange(rank, group_size, world_size)
    raise ValueError(f"data.placement: got {placement!r}, allowed: contiguous, interleaved")


def group_to_batch(group: Group, rows: np.ndarray) -> Batch:
    tokens = torch.from_numpy(group.tokens[rows].astype(np.int64))   # [B, L+1]
    lengths = torch.from_numpy(group.lengths[rows])                   # [B]
    T = tokens.shape[1] - 1
    targets = tokens[:, 1:].clone()
    targets[torch.arange(T)[None, :] >= lengths[:, None]] = IGNORE_INDEX
    return Batch(
        input_ids=tokens[:, :-1].contiguous(), targets=targets,
        stream=torch.from_numpy(group.stream[rows]), stream_index=torch.from_numpy(group.stream_index[rows]),
        row=torch.from_numpy(rows.astype(np.int64)), group_tokens=int(group.lengths.sum()))


@dataclass
class LoaderState:
    epoch: int = 0
    next_index: int = 0   # index (within `epoch`) of the next group to train on

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_index": self.next_index}


class _WorkerGroups(torch.utils.data.IterableDataset):
    """One epoch's batches for DataLoader workers: worker w builds groups with index % workers == w.

    DataLoader takes items from its workers round-robin, so the merged order is the group order.
    """

    def __init__(self, dataset: ShardDataset, epoch: int, start: int, rows: np.ndarray):
        self.dataset, self.epoch, self.start, self.rows = dataset, epoch, start, rows

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for group in self.dataset.iter_epoch(self.epoch, self.start):
            if (group.index - self.start) % nw == wid:
                yield group.index, group_to_batch(group, self.rows)


class RankLoader:
    """Endless iterator of this rank's micro-batches over epochs, resumable from a LoaderState."""

    def __init__(self, dataset: ShardDataset, rank: int, world_size: int, placement: str,
                 state: Optional[LoaderState] = None, max_epochs: int = 1_000_000, num_workers: int = 0):
        if dataset.group_size % world_size:
            raise ValueError(f"group size {dataset.group_size} is not divisible by the world size {world_size}")
        self.dataset, self.max_epochs, self.num_workers = dataset, max_epochs, num_workers
        self.rows = rows_for_rank(dataset.group_size, rank, world_size, placement)
        self.state = state or LoaderState()
        if dataset.groups_per_epoch() == 0:
            raise ValueError(f"{dataset.data_dir}: {dataset.manifest['segments']} segments make no complete group "
                             f"of {dataset.group_size}; use more data or fewer segments per group")

    def __iter__(self) -> Iterator[tuple[Batch, int]]:
        """Yields (batch, epoch); the state always points at the next unseen group."""
        while self.state.epoch < self.max_epochs:
            epoch = self.state.epoch
            for index, batch in self._epoch_batches(epoch, self.state.next_index):
                self.state = LoaderState(epoch, index + 1)
                yield batch, epoch
            self.state = LoaderState(epoch + 1, 0)

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[tuple[int, Batch]]:
        if self.num_workers == 0:
            return ((g.index, group_to_batch(g, self.rows)) for g in self.dataset.iter_epoch(epoch, start))
        workers = _WorkerGroups(self.dataset, epoch, start, self.rows)
        # its own generator: the workers' base seed would otherwise be drawn from the global torch RNG,
        # shifting the dropout stream by one draw wherever a (resumed) run opens an epoch
        seeds = torch.Generator().manual_seed(self.dataset.seed * 1_000_003 + epoch)
        return iter(torch.utils.data.DataLoader(workers, batch_size=None, num_workers=self.num_workers,
                                                generator=seeds))

    def load_state_dict(self, state: dict) -> None:
        self.state = LoaderState(int(state["epoch"]), int(state["next_index"]))


def iter_eval_batches(data_dir: str, rank: int, world_size: int, micro_batch_size: int,
                      max_batches: int = 0) -> Iterator[Batch]:
    """One ordered pass over a split (no shuffling, last group padded so no token is lost)."""
    dataset = ShardDataset(data_dir, world_size * micro_batch_size, drop_last=False)
    rows = rows_for_rank(dataset.group_size, rank, world_size, "contiguous")
    for i, group in enumerate(dataset.iter_epoch(0)):
        if max_batches and i >= max_batches:
            return
        yield group_to_batch(group, rows)
