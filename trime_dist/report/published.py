"""The TRIME paper's published test numbers (Zhong, Lei & Chen, EMNLP 2022; princeton-nlp/TRIME), shown in
the report beside a row whose model has the architecture of one of the paper's configs (configs/*.yaml;
docs/PAPER_RECIPES.md gives each config's evaluation settings). Plain Python: no torch."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from trime_dist.report.collect import read_json_or_none


@dataclass(frozen=True)
class PaperSetup:
    config: str              # the shipped config whose architecture this is
    model: dict              # model.json "model" fields a run must match
    metric: str              # the eval-row field the published numbers are in
    test: dict               # paper row -> published test number


PAPER_SETUPS = (
    PaperSetup("wt103_247m", {"n_layers": 16, "d_model": 1024, "n_heads": 8, "d_ffn": 4096}, "word_ppl",
               # the CE Transformer as reported by TRIME; kNN-LM on that model (kNN-LM paper, test)
               {"CE": 18.70, "kNN-LM": 16.12, "TrimeLM": 17.76, "TrimeLM_long": 17.64, "TrimeLM_ext": 15.46}),
    PaperSetup("wt103_150m", {"n_layers": 16, "d_model": 410, "n_heads": 10, "d_ffn": 2100}, "word_ppl",
               {"TrimeLM": 25.61, "TrimeLM_long": 22.62}),
    PaperSetup("enwik8_38m", {"n_layers": 12, "d_model": 512, "n_heads": 8, "d_ffn": 2048}, "bits_per_byte",
               {"TrimeLM": 1.12, "TrimeLM_long": 1.05}),
)


def paper_row(objective: str, memory: str, knn_lambda: float) -> Optional[str]:
    """Which of the paper's rows an eval row reproduces: the model's training objective with the memory it
    was trained for (kNN-LM: the CE model interpolated with a datastore)."""
    if objective == "ce":
        return "kNN-LM" if knn_lambda else ("CE" if memory in ("none", "local") else None)
    return {("trime_local", "local"): "TrimeLM", ("trime_long", "long"): "TrimeLM_long",
            ("trime_ext", "external"): "TrimeLM_ext"}.get((objective, memory))


def match_setup(model: dict) -> Optional[PaperSetup]:
    return next((s for s in PAPER_SETUPS if all(model.get(k) == v for k, v in s.model.items())), None)


def published(row: dict) -> Optional[tuple[float, str, str]]:
    """(published test number, its metric, the config) for an eval row, or None when its model is not one of
    the paper's architectures or the row is none of the paper's rows."""
    info = _model_json(row)
    if info is None:
        return None
    setup = match_setup(info.get("model") or {})
    name = paper_row(info.get("objective", "?"), row.get("memory", "?"), row.get("knn_lambda") or 0.0)
    if setup is None or name not in setup.test:
        return None
    return setup.test[name], setup.metric, setup.config


def _model_json(row: dict) -> Optional[dict]:
    """The row's model.json (`model` is as eval was given it: relative to where eval ran, tried also relative
    to the eval file)."""
    model = row.get("model")
    if not model:
        return None
    for base in ("", os.path.dirname(row.get("source", ""))):
        path = next((p for p in (os.path.join(base, model, "model", "model.json"),  # a run directory
                                 os.path.join(base, model, "model.json")) if os.path.isfile(p)), None)
        if path:
            return read_json_or_none(path)
    return None
