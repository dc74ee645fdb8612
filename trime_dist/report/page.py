"""The report's page: Markdown tables of the eval rows and the runs, with the figures."""
from __future__ import annotations

import os

from trime_dist.report.collect import Inputs
from trime_dist.report.published import published


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "–"
    return format(value, spec) if spec else str(value)


def _paper_cell(row: dict) -> str:
    found = published(row)
    if found is None:
        return "–"
    value, metric, config = found
    return f"{value:g} ({'word ppl' if metric == 'word_ppl' else 'bits/byte'}, {config})"


def results_table(rows: list[dict]) -> list[str]:
    lines = []
    for data in dict.fromkeys(r.get("data", "?") for r in rows):
        lines += [f"### Perplexity on `{data}`", "",
                  "| setting | memory | τ | λ | k | long-memory size | tokens | loss | ppl (token) | ppl (word) | "
                  "bits/byte | paper (test) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r.get("data", "?") == data):
            lines.append(f"| {r['name']} | {r['memory']} | {_fmt(r.get('temperature'), '.3g')} | "
                         f"{_fmt(r.get('knn_lambda') or None, '.3g')} | {_fmt(r.get('k'))} | {_fmt(r.get('mem_size'))} | "
                         f"{_fmt(r.get('tokens'))} | {_fmt(r.get('loss'), '.4f')} | **{r['ppl']:.2f}** | "
                         f"{_fmt(r.get('word_ppl'), '.2f')} | {_fmt(r.get('bits_per_byte'), '.4f')} | "
                         f"{_paper_cell(r)} |")
        lines += ["", "\"paper (test)\": the TRIME paper's published test number for the same row (model objective "
                  "and memory) where the model has the architecture of a paper config (configs/wt103_247m.yaml, "
                  "wt103_150m.yaml, enwik8_38m.yaml; docs/PAPER_RECIPES.md); compare it with the column it names.", ""]
    return lines


def runs_table(inputs: Inputs) -> list[str]:
    lines = ["| run | objective | steps | tokens seen | final train loss | valid ppl (no memory) | "
             "valid ppl (memory) |", "|---|---|---|---|---|---|---|"]
    for run in inputs.runs:
        train = [r for r in run.records if "loss" in r]
        valid = [r for r in run.records if "valid_ce_ppl" in r]
        last_t, last_v = (train[-1] if train else {}), (valid[-1] if valid else {})
        lines.append(f"| {run.name} | {run.objective} | {_fmt(last_t.get('step'))} | {_fmt(last_t.get('tokens_seen'))} | "
                     f"{_fmt(last_t.get('loss'), '.4f')} | {_fmt(last_v.get('valid_ce_ppl'), '.2f')} | "
                     f"{_fmt(last_v.get('valid_memory_ppl'), '.2f')} |")
    return lines + [""]


def write_page(inputs: Inputs, figures: dict[str, str | None], out_dir: str, sources: list[str]) -> str:
    from trime_dist.core.io import atomic_write_text

    lines = ["# trime_dist report", "", "Made by `trime report " + " ".join(sources) + "`.", ""]
    if inputs.eval_rows:
        lines += ["## Results", ""] + results_table(inputs.eval_rows)
    if figures.get("sweeps"):
        lines += ["## Perplexity against τ, long-memory size and k", "",
                  f"![sweeps]({os.path.basename(figures['sweeps'])})", ""]
    if inputs.runs:
        lines += ["## Training runs", ""] + runs_table(inputs)
    if figures.get("curves"):
        lines += [f"![training curves]({os.path.basename(figures['curves'])})", ""]
    path = os.path.join(out_dir, "report.md")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
