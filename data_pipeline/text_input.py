"""Reading documents from input files: plain text, WikiText-style text, or JSONL with a `text` field.

Documents are yielded one at a time (files are streamed line by line) and their text is kept
verbatim, so decoding the prepared shards gives back exactly these strings. Empty documents
are skipped.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

FORMATS = ("auto", "text", "file", "wikitext", "jsonl")
_SNIFF_BYTES = 1 << 20


def is_top_heading(line: str) -> bool:
    """WikiText top-level heading ` = Title = `; ` = = Sub = = ` (a section) is not one."""
    s = line.rstrip("\r\n")
    return s.startswith(" = ") and s.endswith(" = ") and not s.startswith(" = = ") and len(s) > 6


def detect_format(path: str) -> str:
    """jsonl by extension, wikitext if a top-level heading occurs in the first MiB, else text."""
    if path.endswith((".jsonl", ".jsonl.txt", ".ndjson")):
        return "jsonl"
    with _open(path) as f:
        try:
            head = f.read(_SNIFF_BYTES)
        except UnicodeDecodeError:
            raise utf8_error(path) from None
    return "wikitext" if any(is_top_heading(line) for line in head.splitlines(keepends=True)) else "text"


def _open(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    # newline="" keeps \r\n as is: the text round-trips byte for byte.
    return open(path, encoding="utf-8", newline="")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    with _open(path) as f:
        try:
            yield from enumerate(f, start=1)
        except UnicodeDecodeError:
            raise utf8_error(path) from None


def utf8_error(path: str) -> ValueError:
    """The one-line error for a file that is not UTF-8, naming its first bad line and byte (found again
    line by line: the text reader decodes in chunks, so its own position is not the line's)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):  # "\n" is never inside a UTF-8 character
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return ValueError(f"{path}:{lineno}: not valid UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                  f"{e.start + 1}); convert the file to UTF-8")
    return ValueError(f"{path}: not valid UTF-8 text; convert the file to UTF-8")


def iter_wikitext(path: str) -> Iterator[str]:
    """One document per top-level heading, from the heading line up to the next one (verbatim).

    Text before the first heading is a document too unless it is only whitespace.
    """
    doc: list[str] = []
    for _, line in _lines(path):
        if is_top_heading(line) and doc:
            if "".join(doc).strip():
                yield "".join(doc)
            doc = []
        doc.append(line)
    if doc and "".join(doc).strip():
        yield "".join(doc)


def iter_paragraph_docs(path: str) -> Iterator[str]:
    """Documents separated by blank (whitespace-only) lines; the blank lines are separators."""
    doc: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            doc.append(line)
        elif doc:
            yield "".join(doc)
            doc = []
    if doc:
        yield "".join(doc)


def iter_whole_file(path: str) -> Iterator[str]:
    text = "".join(line for _, line in _lines(path))
    if text:
        yield text


def iter_jsonl(path: str) -> Iterator[str]:
    """The `text` field of each non-blank line; errors name the file and line."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{lineno}: expected an object with a string 'text' field, got {got}")
        if record["text"]:
            yield record["text"]


_READERS = {"text": iter_paragraph_docs, "file": iter_whole_file, "wikitext": iter_wikitext, "jsonl": iter_jsonl}


def iter_documents(path: str, fmt: str = "auto") -> Iterator[str]:
    """Documents of one input file. fmt: auto | text (blank-line separated) | file (the whole file
    is one document) | wikitext (` = Title = ` boundaries) | jsonl (`text` field per line)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}, expected one of {FORMATS}")
    if fmt == "auto":
        fmt = detect_format(path)
    return _READERS[fmt](path)


def expand_inputs(paths: list[str]) -> list[str]:
    """Absolute, sorted, de-duplicated input files; a directory stands for its non-hidden files."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += [os.path.join(p, n) for n in os.listdir(p)
                      if not n.startswith(".") and os.path.isfile(os.path.join(p, n))]
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"input file not found: {p}")
    if not files:
        raise ValueError(f"no input files in {paths}")
    return sorted({os.path.abspath(f) for f in files})
