"""Reading documents from inputs: plain text, WikiText-style text, JSONL with a text field (each of them
optionally gzip / xz / zstd compressed), Parquet files with a text column, and Hugging Face `datasets`
folders written by `save_to_disk`.

Documents are yielded one at a time (files are streamed) and their text is kept verbatim, so decoding
the prepared shards gives back exactly these strings. Empty documents are skipped. A bad record names
the file and its line (or row).
"""
from __future__ import annotations

import glob
import io
import json
import os
from typing import Iterator, Optional

FORMATS = ("auto", "text", "file", "wikitext", "jsonl", "parquet", "hf_dataset")
SPLITTABLE = ("text", "wikitext", "jsonl")   # formats read from a byte range too (data_pipeline/input_pieces.py)
COMPRESSIONS = (".gz", ".xz", ".zst", ".zstd")
_SNIFF_BYTES = 1 << 20


def is_top_heading(line: str) -> bool:
    """WikiText top-level heading ` = Title = `; ` = = Sub = = ` (a section) is not one."""
    s = line.rstrip("\r\n")
    return s.startswith(" = ") and s.endswith(" = ") and not s.startswith(" = = ") and len(s) > 6


def is_hf_dataset(path: str) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk` (or a DatasetDict's, which holds splits)."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "state.json")) or
                                    os.path.isfile(os.path.join(path, "dataset_dict.json")))


def detect_format(path: str) -> str:
    """hf_dataset for a save_to_disk folder; jsonl / parquet by extension (under a compression suffix);
    wikitext if a top-level heading occurs in the first MiB; else text."""
    if is_hf_dataset(path):
        return "hf_dataset"
    base = uncompressed_name(path)
    if base.endswith((".jsonl", ".jsonl.txt", ".ndjson")):
        return "jsonl"
    if base.endswith(".parquet"):
        return "parquet"
    with _open(path) as f:
        try:
            head = f.read(_SNIFF_BYTES)
        except UnicodeDecodeError:
            raise utf8_error(path) from None
    return "wikitext" if any(is_top_heading(line) for line in head.splitlines(keepends=True)) else "text"


def uncompressed_name(path: str) -> str:
    """`a/b.jsonl.gz` -> `a/b.jsonl`: the name that says what the file holds."""
    return path[: -len(ext)] if (ext := next((e for e in COMPRESSIONS if path.endswith(e)), None)) else path


class _ByteRange(io.RawIOBase):
    """Bytes [start, end) of a file, read as a stream of their own."""

    def __init__(self, path: str, start: int, end: Optional[int]):
        self.f = open(path, "rb")
        self.f.seek(start)
        self.left = (os.path.getsize(path) if end is None else end) - start

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(min(len(b), self.left))
        b[:len(data)] = data
        self.left -= len(data)
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


def _open_binary(path: str, start: int = 0, end: Optional[int] = None):
    """The file's bytes (only [start, end) if given), decompressed by its suffix (.gz, .xz, .zst / .zstd)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if start or end is not None:
        if path.endswith(COMPRESSIONS):
            raise ValueError(f"{path}: a compressed file cannot be read from a byte range")
        return io.BufferedReader(_ByteRange(path, start, end))
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if path.endswith(".xz"):
        import lzma

        return lzma.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError:
            raise ValueError(f"{path}: reading .zst files needs the zstandard package (pip install zstandard)") from None
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _open(path: str, start: int = 0, end: Optional[int] = None):
    # newline="" keeps \r\n as is: the text round-trips byte for byte.
    return io.TextIOWrapper(_open_binary(path, start, end), encoding="utf-8", newline="")


def _lines(path: str, start: int = 0, end: Optional[int] = None) -> Iterator[tuple[int, str]]:
    """(line number counted from `start`, a line start, line) of the lines in bytes [start, end)."""
    with _open(path, start, end) as f:
        try:
            yield from enumerate(f, start=1)
        except UnicodeDecodeError:
            raise utf8_error(path) from None


def lines_before(path: str, offset: int, chunk: int = 1 << 24) -> int:
    """Newlines in the file's first `offset` bytes: the line number of a byte range's first line, less one
    (read only for an error message: it reads the file up to there)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0 and (data := f.read(min(chunk, offset))):
            count += data.count(b"\n")
            offset -= len(data)
    return count


def utf8_error(path: str) -> ValueError:
    """The one-line error for a file that is not UTF-8, naming its first bad line and byte (found again
    line by line: the text reader decodes in chunks, so its own position is not the line's)."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):  # "\n" is never inside a UTF-8 character
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return ValueError(f"{path}:{lineno}: not valid UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                  f"{e.start + 1}); convert the file to UTF-8")
    return ValueError(f"{path}: not valid UTF-8 text; convert the file to UTF-8")


def iter_wikitext(path: str, start: int = 0, end: Optional[int] = None) -> Iterator[str]:
    """One document per top-level heading, from the heading line up to the next one (verbatim).

    Text before the first heading is a document too unless it is only whitespace.
    """
    doc: list[str] = []
    for _, line in _lines(path, start, end):
        if is_top_heading(line) and doc:
            if "".join(doc).strip():
                yield "".join(doc)
            doc = []
        doc.append(line)
    if doc and "".join(doc).strip():
        yield "".join(doc)


def iter_paragraph_docs(path: str, start: int = 0, end: Optional[int] = None) -> Iterator[str]:
    """Documents separated by blank (whitespace-only) lines; the blank lines are separators."""
    doc: list[str] = []
    for _, line in _lines(path, start, end):
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


def iter_jsonl(path: str, text_field: str = "text", start: int = 0, end: Optional[int] = None) -> Iterator[str]:
    """The text field of each non-blank line; errors name the file and line."""
    for lineno, line in _lines(path, start, end):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lines_before(path, start) + lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{lines_before(path, start) + lineno}: expected an object with a string {text_field!r} field (--text-field), "
                             f"got {got}")
        if record[text_field]:
            yield record[text_field]


def _iter_column(batches, text_field: str, where: str) -> Iterator[str]:
    """The strings of column text_field over pyarrow record batches; a non-string value names its row."""
    row = 0
    for batch in batches:
        for value in batch.column(batch.schema.get_field_index(text_field)).to_pylist():
            row += 1
            if value is None or value == "":
                continue
            if not isinstance(value, str):
                raise ValueError(f"{where}: row {row}: column {text_field!r} holds a {type(value).__name__}, "
                                 "expected a string")
            yield value


def _require_column(schema, text_field: str, where: str) -> None:
    if schema.get_field_index(text_field) < 0:
        raise ValueError(f"{where}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
                         "choose one with --text-field")


def iter_parquet(path: str, text_field: str = "text") -> Iterator[str]:
    """The text column of a Parquet file, row group by row group (pyarrow)."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise ValueError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    _require_column(pf.schema_arrow, text_field, path)
    return _iter_column(pf.iter_batches(columns=[text_field]), text_field, path)


def hf_dataset_files(path: str) -> list[str]:
    """The Arrow files of a `save_to_disk` folder, in order (its state.json lists them)."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        raise ValueError(f"{path}: a DatasetDict folder with splits {', '.join(splits)}; give one split's folder "
                         f"(e.g. {os.path.join(path, splits[0] if splits else 'train')})")
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    files = [os.path.join(path, d["filename"]) for d in state.get("_data_files", [])]
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise ValueError(f"{path}/state.json: lists no Arrow files or missing ones ({', '.join(missing) or 'none'})")
    return files


def iter_hf_dataset(path: str, text_field: str = "text") -> Iterator[str]:
    """The text column of a Hugging Face `datasets` folder (save_to_disk: Arrow IPC stream files)."""
    import pyarrow as pa

    for arrow in hf_dataset_files(path):
        with pa.memory_map(arrow) as source:
            reader = pa.ipc.open_stream(source)
            _require_column(reader.schema, text_field, arrow)
            yield from _iter_column(reader, text_field, arrow)


_READERS = {"text": iter_paragraph_docs, "file": iter_whole_file, "wikitext": iter_wikitext, "jsonl": iter_jsonl,
            "parquet": iter_parquet, "hf_dataset": iter_hf_dataset}
_FIELD_FORMATS = ("jsonl", "parquet", "hf_dataset")   # the formats whose records have fields


def iter_documents(path: str, fmt: str = "auto", text_field: str = "text", start: int = 0,
                   end: Optional[int] = None) -> Iterator[str]:
    """Documents of one input. fmt: auto | text (blank-line separated) | file (the whole file is one
    document) | wikitext (` = Title = ` boundaries) | jsonl (a text field per line) | parquet (a text
    column) | hf_dataset (a `save_to_disk` folder's text column). Text files may be .gz / .xz / .zst.
    start / end: only the documents in bytes [start, end) of an uncompressed SPLITTABLE file, where start is
    a document boundary (data_pipeline/input_pieces.py)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}, expected one of {FORMATS}")
    if fmt == "auto":
        fmt = detect_format(path)
    if start or end is not None:
        if fmt not in SPLITTABLE:
            raise ValueError(f"{path}: a {fmt} input cannot be read from a byte range")
        return iter_jsonl(path, text_field, start, end) if fmt == "jsonl" else _READERS[fmt](path, start, end)
    if fmt in _FIELD_FORMATS:
        return _READERS[fmt](path, text_field)
    return _READERS[fmt](path)


def expand_inputs(paths: list[str]) -> list[str]:
    """Absolute, sorted, de-duplicated inputs. A directory stands for the non-hidden files below it
    (recursively; a `datasets` save_to_disk folder is one input); a path with * ? [ is a glob
    (`**` matches folders recursively)."""
    found = []
    for p in paths:
        if any(c in p for c in "*?["):
            matches = sorted(glob.glob(p, recursive=True))
            if not matches:
                raise FileNotFoundError(f"--input {p}: the pattern matches nothing")
            found += [m for m in matches if os.path.isfile(m) or is_hf_dataset(m)]
        elif is_hf_dataset(p):
            found.append(p)
        elif os.path.isdir(p):
            found += _walk(p)
        elif os.path.isfile(p):
            found.append(p)
        else:
            raise FileNotFoundError(f"input file not found: {p}")
    if not found:
        raise ValueError(f"no input files in {paths}")
    return sorted({os.path.abspath(f) for f in found})


def _walk(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in list(dirs):
            if is_hf_dataset(os.path.join(root, d)):   # one input; its Arrow files are not texts
                out.append(os.path.join(root, d))
                dirs.remove(d)
        out += [os.path.join(root, n) for n in files if not n.startswith(".")]
    return out


def input_size(path: str) -> int:
    """Bytes of an input (a folder's: all its files), for balancing inputs over ranks."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, n)) for r, _, fs in os.walk(path) for n in fs)
    return os.path.getsize(path)
