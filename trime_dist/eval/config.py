"""`trime eval`'s config: the data, the flags every row starts from, and the rows (`--memory` / `--setting`)."""
from __future__ import annotations

from dataclasses import dataclass

from trime_dist.core.config import opt
from trime_dist.core.constants import LAYOUTS
from trime_dist.core.constants import DEVICES

SEARCHES = ("faiss", "faiss-shard", "exact")


@dataclass
class EvalConfig:
    model: str = opt("", "trained run directory (or its model/ directory)")
    data: str = opt("", "prepared segment shards to evaluate (e.g. the test split): a folder or its URL "
                       "(http(s), a manifest.json URL, pipe:); required")
    memory: list[str] = opt(doc="one row per memory setting", factory=lambda: ["local"], choices=LAYOUTS)
    datastore: str = opt("", "datastore directory (external memory, kNN interpolation)")
    k: int = opt(1024, "neighbours per query")
    nprobe: int = opt(32, "IVF lists probed per search")
    temperature: float = opt(1.0, "τ of the memory similarities")
    mem_size: int = opt(1024, "long-term cache size (keys) for long / external")
    knn_lambda: float = opt(0.0, "kNN-LM interpolation weight λ (0 = off)")
    knn_temperature: float = opt(1.0, "τ_knn of the kNN distribution P_knn = softmax(score / τ_knn), a raw scale: "
                                 "score = q·k (ip store) or -||q - k||^2 (l2 store), not divided by sqrt(d). TRIME's "
                                 "--interp-temp is this value (10.5 for its WikiText-103 model); kNN-LM's L2 "
                                 "distribution is 1. (--temperature τ instead scales q·k / (sqrt(d)·τ), TRIME's "
                                 "--softmax-temp)")
    rescore: bool = opt(False, "recompute the neighbours' inner products from the stored keys, as kNN-LM recomputes "
                        "its distances (an IVF-PQ index returns those of compressed keys)")
    tau_search: str = opt("", "comma-separated τ values tried on --valid (rows with memory); the best is used")
    lambda_search: str = opt("", "comma-separated λ values tried on --valid for rows that interpolate (knn_lambda > 0), "
                             "in the same pass as --tau-search / --knn-temperature-search (every combination); "
                             "the best is used")
    knn_temperature_search: str = opt("", "comma-separated τ_knn values tried on --valid for rows that interpolate; "
                                      "the best is used")
    valid: str = opt("", "validation split for --tau-search, --lambda-search and --knn-temperature-search")
    context_window: int = opt(0, "sliding context: inputs per window that are context only")
    batch_size: int = opt(8, "windows per forward pass (and per batched search)")
    max_segments: int = opt(0, "evaluate only the first N segments (0 = all)")
    setting: list[str] = opt(doc="a row with its own fields (name, model, memory, datastore, k, nprobe, temperature, "
                                 "mem_size, knn_lambda, knn_temperature, rescore) over the flags' values; repeatable; "
                                 "replaces --memory", factory=list, repeat=True, metavar="KEY=VAL,...")
    sweep: list[str] = opt(doc="KEY=V1,V2,...: every row once per value of KEY (mem_size, k, temperature, "
                               "knn_lambda, knn_temperature, nprobe), named ROW@KEY=V, in the same pass over the data; "
                               "repeatable (all combinations)", factory=list, repeat=True, metavar="KEY=V1,V2,...")
    out: str = opt("", "write the rows as JSON here")
    threads: int = opt(0, "torch / faiss threads (0 = leave as is)")
    device: str = opt("auto", "where the model runs: auto = the GPU when CUDA is available (bf16 autocast), "
                      "else cpu", choices=DEVICES)
    search: str = opt("faiss", "datastore search: faiss = the store's index (CPU), a replica per rank; "
                      "faiss-shard = each of R ranks holds 1/R of the index's entries (an index too big to "
                      "replicate), the shards' top-k merged; exact = every key in the "
                      "device's memory, exact top-k with torch (fp16 keys: 2 x count x dim bytes)",
                      choices=SEARCHES)

    def taus(self) -> list[float]:
        """The τ grid of --tau-search (empty: no search)."""
        return _grid("--tau-search", self.tau_search, lambda t: t > 0, "a positive number")

    def lambdas(self) -> list[float]:
        """The λ grid of --lambda-search (empty: no search)."""
        return _grid("--lambda-search", self.lambda_search, lambda x: 0 <= x <= 1, "a number in [0, 1]")

    def knn_temperatures(self) -> list[float]:
        """The τ_knn grid of --knn-temperature-search (empty: no search)."""
        return _grid("--knn-temperature-search", self.knn_temperature_search, lambda t: t > 0, "a positive number")


def _grid(flag: str, text: str, ok, expected: str) -> list[float]:
    out = []
    for item in filter(None, (v.strip() for v in text.split(","))):
        try:
            value = float(item)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise ValueError(f"{flag} {text!r}: {item!r} is not {expected}")
        out.append(value)
    return out
