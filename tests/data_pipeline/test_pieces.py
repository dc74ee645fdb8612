"""One big file uses every rank: inputs cut into byte ranges at document boundaries, read piece by piece as
the whole file reads, and `trime prepare` giving the same segments and tokenizer on 1, 2 and 3 MPI ranks."""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from data_pipeline import corpus
from data_pipeline.input_pieces import plan_pieces, rank_block
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.text_input import iter_documents
from trime_dist.core import shards

from cli_runner import run_trime  # noqa: E402

WORDS = ["alpha", "beta", "ünï", "日本", "🙂", "=", "= =", "x\ty", "{", '"q"']


def _random_text(rng: np.random.Generator, fmt: str, n_docs: int) -> str:
    """A file of `fmt` with CRLF and LF line ends, blank and whitespace-only lines, non-ASCII text."""
    def line():
        return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 8))).tolist())

    def end():
        return "\r\n" if rng.random() < 0.3 else "\n"

    docs = []
    for d in range(n_docs):
        body = "".join(line() + end() for _ in range(int(rng.integers(1, 6))))
        if fmt == "jsonl":
            docs.append(json.dumps({"text": body, "id": d}, ensure_ascii=bool(rng.random() < 0.5)) + end()
                        + ("\n" if rng.random() < 0.2 else ""))
        elif fmt == "wikitext":
            docs.append(f" = Title {d} = {end()} {end()}{body} = = Sub = = {end()}{body}")
        else:
            docs.append(body + "".join(rng.choice(["\n", " \n", "\r\n", "\t\n"]) for _ in range(rng.integers(1, 3))))
    return (" \n" if fmt == "wikitext" else "") + "".join(docs)


@pytest.mark.parametrize("fmt", ["text", "wikitext", "jsonl"])
def test_pieces_read_as_the_whole_file(tmp_path, fmt):
    rng = np.random.default_rng(["text", "wikitext", "jsonl"].index(fmt))
    path = tmp_path / f"in.{'jsonl' if fmt == 'jsonl' else 'txt'}"
    path.write_bytes(_random_text(rng, fmt, 300).encode("utf-8"))
    size = os.path.getsize(path)
    whole = list(iter_documents(str(path), "auto"))
    assert len(whole) >= 300 - (fmt == "text") * 50
    for split_mb in (50 / 2**20, 700 / 2**20, 4000 / 2**20, size / 3 / 2**20):
        pieces = plan_pieces([str(path)], "auto", split_mb)
        assert len(pieces) > 1 and {p.fmt for p in pieces} == {fmt}
        assert pieces[0].start == 0 and pieces[-1].end == size
        assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))  # contiguous, nothing lost
        # cuts only where a document may start: after the target size, and no piece smaller than it but the last
        assert all(p.size >= split_mb * 2**20 for p in pieces[:-1])
        got = [d for p in pieces for d in iter_documents(p.path, p.fmt, "text", p.start, p.end)]
        assert got == whole


def test_small_compressed_and_unsplittable_inputs_stay_whole(tmp_path):
    text = _random_text(np.random.default_rng(3), "jsonl", 100)
    (tmp_path / "a.jsonl").write_text(text)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(text)
    (tmp_path / "c.txt").write_text("one small doc\n")
    (tmp_path / "d.txt").write_text("x" * 5000 + "\n")  # one document bigger than the split size: no cut inside it
    files = sorted(str(p) for p in tmp_path.iterdir())
    pieces = plan_pieces(files, "auto", 1000 / 2**20)
    by_file = {f: [p for p in pieces if p.path == f] for f in files}
    assert len(by_file[files[0]]) > 1
    assert [(p.start, p.end) for f in files[1:] for p in by_file[f]] == [(0, None)] * 3
    assert plan_pieces(files, "auto", 0) == plan_pieces(files, "auto", 1000)  # 0: never cut


def test_rank_blocks_are_contiguous_and_balanced():
    sizes = [10, 500, 20, 30, 400, 5, 5]
    for world in (1, 2, 3, 9):
        blocks = [rank_block(sizes, r, world) for r in range(world)]
        assert sum(blocks, []) == list(range(len(sizes)))
    assert rank_block([100] * 6, 1, 3) == [2, 3]


def test_bad_record_in_a_later_piece_names_the_line_in_the_file(tmp_path):
    lines = [json.dumps({"text": f"document {i} " * 5}) for i in range(400)]
    lines[350] = '{"text": 7}'
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    pieces = plan_pieces([str(path)], "auto", 2000 / 2**20)
    bad = next(p for p in pieces if p.start <= path.read_text().index('{"text": 7}') < p.end)
    assert bad.start > 0
    with pytest.raises(ValueError, match=r"big.jsonl:351: expected an object with a string 'text' field"):
        list(iter_documents(bad.path, bad.fmt, "text", bad.start, bad.end))
    cfg = PrepareConfig(input=[str(path)], output=str(tmp_path / "o"), tokenizer_kind="byte", seq_len=16,
                        split_mb=2000 / 2**20)
    with pytest.raises(ValueError, match=r"big.jsonl:351: expected"):
        prepare(cfg)
    assert not os.path.exists(tmp_path / "o" / shards.MANIFEST)


@pytest.fixture(scope="module")
def one_big_file(tmp_path_factory):
    """The built-in corpus's train split as one WikiText file (~90 documents, ~330 KB)."""
    out = tmp_path_factory.mktemp("corpus")
    corpus.write_corpus(corpus.CorpusConfig(out=str(out), seed=7, scale=0.3, train_files=1, doc_words=150))
    return out / "train" / "train.txt"


def _segments(out):
    manifest = shards.read_manifest(str(out))
    return [(k, t.tolist(), m) for p in shards.shard_paths(str(out), manifest) for k, t, m in shards.iter_segments(p)]


ARGS = ["--seq-len", "32", "--vocab-size", "500", "--shard-segments", "100", "--split-mb", "0.02"]


def test_one_file_gives_the_same_segments_and_tokenizer_on_1_2_and_3_ranks(one_big_file, tmp_path):
    assert os.path.getsize(one_big_file) > 10 * 0.02 * 2**20
    runs = {}
    for ranks in (1, 2, 3):
        out = tmp_path / f"r{ranks}"
        run_trime(["prepare", "--input", one_big_file, "--output", out, *ARGS], ranks, launcher="mpi", timeout=300)
        runs[ranks] = (shards.read_manifest(str(out)), _segments(out))
        for r in range(ranks):  # every rank had a share of the one file
            with open(out / f".prepare-r{r:03d}.json") as f:
                assert sum(e["segments"] for e in json.load(f)["result"]["shards"]) > 0
    (m1, s1) = runs[1]
    assert m1["streams"] > 10 and len({m["stream"] for _, _, m in s1}) == m1["streams"]
    for ranks in (2, 3):
        m, s = runs[ranks]
        assert m["world_size"] == ranks and m["tokenizer"]["sha256"] == m1["tokenizer"]["sha256"]
        assert s == s1  # keys, tokens and meta, in manifest order
        assert {k: m[k] for k in ("segments", "tokens", "streams", "documents", "text")} == \
            {k: m1[k] for k in ("segments", "tokens", "streams", "documents", "text")}


def test_rerun_after_a_lost_rank_keeps_finished_pieces(one_big_file, tmp_path):
    cfg = PrepareConfig(input=[str(one_big_file)], output=str(tmp_path), seq_len=32, vocab_size=500,
                        shard_segments=100, split_mb=0.02)
    prepare(cfg)
    before = (tmp_path / shards.MANIFEST).read_bytes()
    assert len(shards.read_manifest(str(tmp_path))["settings"]["cuts"][str(one_big_file)]) > 10
    tars = sorted(tmp_path.glob("shard-*.tar"))
    for t in tars:
        os.utime(t, (1, 1))
    # as after a kill: no manifest, the rank's record gone, its last shard half-written
    os.remove(tmp_path / shards.MANIFEST)
    os.remove(tmp_path / ".prepare-r000.json")
    tars[-1].write_bytes(tars[-1].read_bytes()[:1000])
    prepare(cfg)
    assert (tmp_path / shards.MANIFEST).read_bytes() == before
    assert all(os.stat(t).st_mtime == 1 for t in tars[:-1])  # finished shards kept, not rewritten
    shards.verify_shard(shards.read_manifest(str(tmp_path))["shards"][-1], str(tmp_path))
    with pytest.raises(ValueError, match="other settings.*cuts"):  # other cuts, other streams: refused
        prepare(PrepareConfig(**{**cfg.__dict__, "split_mb": 0.05}))


def test_a_run_killed_midway_goes_on_after_its_finished_pieces(one_big_file, tmp_path, monkeypatch):
    from data_pipeline import prepare as prep

    cfg = PrepareConfig(input=[str(one_big_file)], output=str(tmp_path / "killed"), seq_len=32, vocab_size=500,
                        shard_segments=100, split_mb=0.02)
    clean = prepare(PrepareConfig(**{**cfg.__dict__, "output": str(tmp_path / "clean")}))
    n_pieces = len(clean["settings"]["cuts"][str(one_big_file)]) + 1
    tokenized = []
    real = prep.tokenize_piece

    def tokenize_then_die(piece, index, *args):
        if index == 6:
            raise KeyboardInterrupt  # as a kill: nothing after this runs
        tokenized.append(index)
        return real(piece, index, *args)

    monkeypatch.setattr(prep, "tokenize_piece", tokenize_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert tokenized == list(range(6)) and not os.path.exists(tmp_path / "killed" / shards.MANIFEST)
    tokenized.clear()
    monkeypatch.setattr(prep, "tokenize_piece",
                        lambda piece, index, *args: tokenized.append(index) or real(piece, index, *args))
    manifest = prepare(cfg)
    assert tokenized == list(range(6, n_pieces))  # the six finished pieces were not read again
    assert manifest == clean and _segments(tmp_path / "killed") == _segments(tmp_path / "clean")
    assert not list((tmp_path / "killed").glob("*progress*"))
