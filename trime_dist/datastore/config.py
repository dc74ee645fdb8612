"""The datastore build stage's config."""
from __future__ import annotations

from dataclasses import dataclass

from trime_dist.core.config import opt
from trime_dist.core.constants import DEVICES, METRICS


@dataclass
class DatastoreConfig:
    model: str = opt("", "trained run directory (or its model/ directory)")
    data: str = opt("", "prepared segment shards to store (`trime prepare` output): a folder or its URL "
                       "(http(s), a manifest.json URL, pipe:)")
    out: str = opt("", "datastore directory (created; a rerun resumes it)")
    factory: str = opt("Flat", "faiss index: Flat | IVF{nlist},PQ{m} | IVF{nlist},Flat")
    metric: str = opt("ip", "how a query scores a key, larger = closer: ip = q·k (TRIME; the similarity training's "
                      "memory uses); l2 = -||q - k||^2 (kNN-LM's default); eval, exact search and --rescore follow "
                      "the store's metric", choices=METRICS)
    train_sample: int = opt(100_000, "keys sampled to train an IVF index")
    batch_size: int = opt(16, "segments (windows) per forward pass when encoding")
    context_window: int = opt(0, "encode each key in the sliding window `trime eval --context-window C` scores it in "
                              "(up to C tokens of earlier context of its stream, as the original stores: 2560 "
                              "for WikiText-103's 3072-token windows); 0 = each segment on its own")
    part_segments: int = opt(0, "segments per part (0 = split evenly over the ranks)")
    ondisk: bool = opt(False, "merge IVF lists into an on-disk index.ivfdata")
    seed: int = opt(0, "seed of the training sample and k-means")
    threads: int = opt(0, "torch / faiss threads per rank (0 = leave as is)")
    device: str = opt("auto", "where the model encodes: auto = this rank's GPU when CUDA is available (bf16 "
                      "autocast), else cpu", choices=DEVICES)
    dist_timeout_s: int = opt(3600, "seconds a rank waits for the others at start and at each barrier before it "
                              "stops with an error naming the ranks that did not answer; above the time rank 0 "
                              "takes to train the index")
    net_interface: str = opt("", "network interface gloo and NCCL use between the nodes (sets GLOO_SOCKET_IFNAME "
                             "and NCCL_SOCKET_IFNAME); empty = the environment's or the libraries' choice")
