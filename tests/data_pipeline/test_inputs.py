"""The inputs people have: compressed text and JSONL, --text-field, Parquet, Hugging Face `datasets` folders,
folders searched recursively and globs; bad records name the file and line or row; prepare reads them all."""
import gzip
import json
import lzma
import os

import pytest

from data_pipeline import tokenizer
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.text_input import expand_inputs, iter_documents
from trime_dist.core import shards

DOCS = ["The first document.\nIt has two lines.\n", "Zwei — ünïcode ✓ and a tab\there.", "third\r\nwith CRLF\r\n"]


def _jsonl(docs, field="text"):
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs))


def _write_compressed(path, text: str):
    data = text.encode("utf-8")
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    elif str(path).endswith(".xz"):
        with lzma.open(path, "wb") as f:
            f.write(data)
    elif str(path).endswith(".zst"):
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz", ".zst"])
def test_compressed_jsonl_and_text_give_the_same_documents(tmp_path, suffix):
    jsonl = tmp_path / f"docs.jsonl{suffix}"
    _write_compressed(jsonl, _jsonl(DOCS))
    assert list(iter_documents(str(jsonl))) == DOCS
    text = tmp_path / f"docs.txt{suffix}"
    _write_compressed(text, "\n\n".join(d.strip("\n") for d in DOCS[:2]) + "\n")
    assert list(iter_documents(str(text))) == [DOCS[0], DOCS[1] + "\n"]


def test_text_field_and_its_errors(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    _write_compressed(path, _jsonl(DOCS, field="body"))
    assert list(iter_documents(str(path), text_field="body")) == DOCS
    with pytest.raises(ValueError, match=r"docs.jsonl.gz:1: expected an object with a string 'text' field"):
        list(iter_documents(str(path)))
    bad = tmp_path / "bad.jsonl.xz"
    _write_compressed(bad, _jsonl(DOCS[:1]) + "{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl.xz:2: invalid JSON"):
        list(iter_documents(str(bad)))
    latin = tmp_path / "latin.txt.gz"
    with gzip.open(latin, "wb") as f:
        f.write("ok\nnot utf-8: \xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt.gz:2: not valid UTF-8 text \(byte 0xe9 at column 12\)"):
        list(iter_documents(str(latin)))


def test_parquet_text_column_and_a_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [0, 1, 2, 3], "content": [DOCS[0], None, DOCS[1], DOCS[2]]}), path, row_group_size=2)
    assert list(iter_documents(str(path), text_field="content")) == DOCS   # None rows are skipped
    with pytest.raises(ValueError, match=r"docs.parquet: no column 'text' \(columns: id, content\)"):
        list(iter_documents(str(path)))
    # Parquet columns are typed: a non-text column is refused at its first row
    with pytest.raises(ValueError, match=r"docs.parquet: row 1: column 'id' holds a int, expected a string"):
        list(iter_documents(str(path), text_field="id"))
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"fake.parquet: not a readable Parquet file"):
        list(iter_documents(str(tmp_path / "fake.parquet")))


def test_hf_datasets_folder_and_dict_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": DOCS, "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(str(tmp_path / "ds"))) == DOCS
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"dd: a DatasetDict folder with splits .*give one split's folder"):
        list(iter_documents(str(tmp_path / "dd")))
    assert list(iter_documents(str(tmp_path / "dd" / "test"))) == DOCS


def test_folders_are_searched_recursively_and_globs_expand(tmp_path):
    import datasets

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.txt").write_text("x\n")
    (tmp_path / "a" / "b" / "two.jsonl.gz").write_bytes(gzip.compress(_jsonl(["y"]).encode()))
    (tmp_path / "a" / ".hidden").write_text("z\n")
    datasets.Dataset.from_dict({"text": ["w"]}).save_to_disk(str(tmp_path / "a" / "b" / "hf"))
    got = expand_inputs([str(tmp_path / "a")])
    assert [os.path.relpath(p, tmp_path) for p in got] == ["a/b/hf", "a/b/two.jsonl.gz", "a/one.txt"]
    assert expand_inputs([str(tmp_path / "a" / "**" / "*.jsonl.gz")]) == [str(tmp_path / "a" / "b" / "two.jsonl.gz")]
    with pytest.raises(FileNotFoundError, match=r"\*.parquet: the pattern matches nothing"):
        expand_inputs([str(tmp_path / "**" / "*.parquet")])


def test_prepare_reads_every_kind_of_input(tmp_path):
    """One prepare over gzip JSONL (a custom field), Parquet and a datasets folder: the documents come back."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    _write_compressed(src / "a.jsonl.gz", _jsonl(DOCS[:1], field="body"))
    pq.write_table(pa.table({"body": DOCS[1:2]}), src / "b.parquet")
    datasets.Dataset.from_dict({"body": DOCS[2:]}).save_to_disk(str(src / "c"))
    manifest = prepare(PrepareConfig(input=[str(src)], output=str(tmp_path / "out"), seq_len=16, shard_segments=50,
                                     tokenizer_kind="byte", text_field="body"))
    assert manifest["documents"] == 3 and manifest["streams"] == 3
    tok = tokenizer.load_tokenizer(str(tmp_path / "out" / "tokenizer.json"))
    eod = manifest["tokenizer"]["eod_id"]
    streams = {}
    for path in shards.shard_paths(str(tmp_path / "out"), manifest):
        for _, tokens, meta in shards.iter_segments(path):
            streams.setdefault(meta["stream"], [])[meta["start"]:] = tokens.tolist()
    docs = [tokenizer.decode(tok, d) for s in sorted(streams) for d in tokenizer.split_at_eod(streams[s], eod)]
    assert docs == DOCS


def test_manifest_counts_the_text_and_eval_reports_word_ppl_and_bits(tmp_path):
    """prepare records words / line ends / bytes / chars of the text; eval turns the total NLL into word-level
    perplexity and bits per byte (checked against the row's own loss × tokens)."""
    import math

    from trime_dist.cli import main
    from trime_dist.model.config import ModelConfig
    from trime_dist.model.export import export_model
    from trime_dist.model.transformer import build_model

    (tmp_path / "docs.jsonl").write_text(_jsonl(DOCS))
    manifest = prepare(PrepareConfig(input=[str(tmp_path / "docs.jsonl")], output=str(tmp_path / "data"), seq_len=16,
                                     shard_segments=50, tokenizer_kind="byte"))
    words = sum(len(d.split()) for d in DOCS)
    assert manifest["text"] == {"words": words, "lines": sum(d.count("\n") for d in DOCS),
                                "bytes": sum(len(d.encode()) for d in DOCS), "chars": sum(len(d) for d in DOCS)}
    cfg = ModelConfig(vocab_size=manifest["tokenizer"]["vocab_size"], d_model=16, n_heads=2, d_ffn=32, max_seq_len=16)
    export_model(build_model(cfg, seed=0).state_dict(), cfg, str(tmp_path / "run"),
                 {"step": 0, "tokenizer_sha256": manifest["tokenizer"]["sha256"], "train_manifest_sha256": "x",
                  "seq_len": 16})
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--memory", "none",
                 "local", "--device", "cpu", "--out", str(tmp_path / "rows.json")]) == 0
    for row in json.load(open(tmp_path / "rows.json")):
        nll = row["loss"] * row["tokens"]
        assert row["tokens"] == manifest["tokens"]
        assert row["words"] == words + manifest["text"]["lines"]
        assert row["word_ppl"] == pytest.approx(math.exp(nll / row["words"]))
        assert row["bits_per_byte"] == pytest.approx(nll / (manifest["text"]["bytes"] * math.log(2)))
    # part of the split scored: no per-word numbers (they would not be comparable)
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--memory", "none",
                 "--max-segments", "1", "--device", "cpu", "--out", str(tmp_path / "part.json")]) == 0
    assert json.load(open(tmp_path / "part.json"))[0]["word_ppl"] is None
