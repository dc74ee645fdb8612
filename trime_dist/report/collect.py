"""What a report shows, read from disk: training runs (RUN/metrics.jsonl, summary.json, config.yaml) and
`trime eval` rows (the JSON files `trime eval --out` writes). Plain Python: no torch."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

MAX_DEPTH = 4  # directories are searched this deep for runs and eval files


@dataclass
class Run:
    name: str                 # the run directory, relative to the folder it was found in
    path: str
    objective: str
    records: list[dict]       # metrics.jsonl: training steps and validation records
    summary: dict = field(default_factory=dict)


@dataclass
class Inputs:
    runs: list[Run] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)   # each with "source": the file it came from


def collect(paths: list[str]) -> Inputs:
    """Runs and eval rows under `paths` (run directories, eval JSON files, or folders holding them)."""
    found = Inputs()
    for path in paths:
        if os.path.isfile(path):
            rows = read_eval_rows(path)
            if rows is None:
                raise ValueError(f"{path}: not a `trime eval --out` file (expected a JSON list of rows with "
                                 "name, memory and ppl)")
            found.eval_rows += rows
        elif os.path.isdir(path):
            _scan(path, path, 0, found)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory (expected a run directory, an eval JSON "
                                    "file or a folder holding them)")
    if not found.runs and not found.eval_rows:
        raise ValueError(f"nothing to report in {', '.join(paths)}: no run directory (with metrics.jsonl) and no "
                         "`trime eval --out` JSON file found")
    return found


def _scan(root: str, path: str, depth: int, found: Inputs) -> None:
    if os.path.isfile(os.path.join(path, "metrics.jsonl")):
        name = os.path.relpath(path, root) if os.path.abspath(path) != os.path.abspath(root) else \
            os.path.basename(os.path.abspath(root))
        found.runs.append(read_run(path, name))
        return
    if depth > MAX_DEPTH:
        return
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            _scan(root, entry.path, depth + 1, found)
        elif entry.is_file() and entry.name.endswith(".json"):
            rows = read_eval_rows(entry.path)
            if rows:
                found.eval_rows += rows


def read_run(path: str, name: str) -> Run:
    records = []
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}/metrics.jsonl:{i}: not JSON ({e.msg})") from None
    summary = read_json_or_none(os.path.join(path, "summary.json")) or {}
    objective = summary.get("objective") or next((r["objective"] for r in records if "objective" in r), "?")
    return Run(name=name, path=path, objective=objective, records=records, summary=summary)


def read_eval_rows(path: str) -> list[dict] | None:
    """The rows of a `trime eval --out` file, each with "source"; None for any other JSON file."""
    data = read_json_or_none(path)
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and {"name", "memory", "ppl"} <= set(r)
                                                          for r in rows):
        return None
    return [{**r, "source": path} for r in rows]


def read_json_or_none(path: str):
    """A JSON file's content; None when it is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
