"""The datastore build stage's config."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DatastoreConfig:
    model: str = field(default="", metadata={"help": "trained run directory (or its model/ directory)"})
    data: str = field(default="", metadata={"help": "prepared segment shards to store (`trime prepare` output)"})
    out: str = field(default="", metadata={"help": "datastore directory (created; a rerun resumes it)"})
    factory: str = field(default="Flat", metadata={"help": "faiss index: Flat | IVF{nlist},PQ{m} | IVF{nlist},Flat"})
    train_sample: int = field(default=100_000, metadata={"help": "keys sampled to train an IVF index"})
    batch_size: int = field(default=16, metadata={"help": "segments per forward pass when encoding"})
    part_segments: int = field(default=0, metadata={"help": "segments per part (0 = split evenly over the ranks)"})
    ondisk: bool = field(default=False, metadata={"help": "merge IVF lists into an on-disk index.ivfdata"})
    seed: int = field(default=0, metadata={"help": "seed of the training sample and k-means"})
    threads: int = field(default=0, metadata={"help": "torch / faiss threads per rank (0 = leave as is)"})
