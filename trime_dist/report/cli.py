"""`trime report`: one folder with a Markdown page and PNG figures from run directories and eval JSON files."""
from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", help="run directories, `trime eval --out` JSON files, or folders "
                                                 "holding them (searched a few levels deep)")
    parser.add_argument("--out", required=True, help="the report folder (report.md, report.json, *.png)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def run(args: argparse.Namespace) -> int:
    from trime_dist.core.io import atomic_write_json
    from trime_dist.report.collect import collect
    from trime_dist.report.page import write_page
    from trime_dist.report.plots import sweep_figure, sweep_series, training_curves

    inputs = collect(args.paths)
    if os.path.isfile(args.out):
        raise ValueError(f"--out {args.out}: is a file, expected a folder for the report")
    os.makedirs(args.out, exist_ok=True)
    series = sweep_series(inputs.eval_rows)
    figures = {"curves": training_curves(inputs.runs, os.path.join(args.out, "training_curves.png")),
               "sweeps": sweep_figure(series, os.path.join(args.out, "sweeps.png"))}
    atomic_write_json(os.path.join(args.out, "report.json"), {
        "sources": args.paths, "eval_rows": inputs.eval_rows, "sweeps": series,
        "runs": [{"name": r.name, "path": r.path, "objective": r.objective, "summary": r.summary} for r in inputs.runs]})
    page = write_page(inputs, figures, args.out, args.paths)
    print(f"report: {page} ({len(inputs.runs)} runs, {len(inputs.eval_rows)} eval rows, "
          f"{sum(1 for f in figures.values() if f)} figures)")
    return 0
