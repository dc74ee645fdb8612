"""`trime prepare`: input parsing, tokenizers, segmenting, shard round trip, MPI ranks, resume, errors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import corpus, tokenizer
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.segmenter import Segmenter
from data_pipeline.text_input import iter_documents
from trime_dist.core import shards
from trime_dist.core.rank_logs import short_host

from cli_runner import BIN, run_trime  # noqa: E402
from cli_runner import REPO as ROOT  # noqa: E402

TEXTS = ["Hello  world\twith tabs\n\n = Title = \n", "ünïcödé 日本語 🙂 and\r\nCRLF", " leading space ",
         "a literal <eod> and <pad> are text", "x"]


# ----------------------------------------------------------------------------- pieces

def test_segmenter_matches_reference_slicing():
    rng = np.random.default_rng(0)
    for _ in range(50):
        L, T = int(rng.integers(1, 9)), int(rng.integers(1, 60))
        stream = rng.integers(0, 100, size=T).astype(np.int32)
        # reference: segment k = stream[k*L : k*L + n + 1], n = min(L, T - 1 - k*L) >= 1
        ref = [(k, k * L, stream[k * L: k * L + min(L, T - 1 - k * L) + 1]) for k in range(T) if T - 1 - k * L >= 1]
        seg, got = Segmenter(L), []
        cuts = np.sort(rng.integers(0, T + 1, size=3))
        for piece in np.split(stream, cuts):
            got += list(seg.push(piece))
        got += list(seg.finish())
        assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in ref]
        assert all(np.array_equal(a[2], b[2]) for a, b in zip(got, ref))


def test_wikitext_and_paragraph_parsing(tmp_path):
    wiki = " \n = A = \n \n text a \n \n = = Sub = = \n more a \n = B = \n text b \n"
    p = tmp_path / "w.txt"
    p.write_text(wiki)
    assert list(iter_documents(str(p), "auto")) == [" = A = \n \n text a \n \n = = Sub = = \n more a \n",
                                                    " = B = \n text b \n"]
    p.write_text("para one\nline two\n\n  \npara two\n")
    assert list(iter_documents(str(p), "auto")) == ["para one\nline two\n", "para two\n"]
    assert list(iter_documents(str(p), "file")) == ["para one\nline two\n\n  \npara two\n"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": ""}\n{"text": "two"}\n')
    assert list(iter_documents(str(p))) == ["one", "two"]
    p.write_text('{"text": "one"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: invalid JSON"):
        list(iter_documents(str(p)))
    p.write_text('{"text": "one"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: expected an object with a string 'text' field"):
        list(iter_documents(str(p)))


@pytest.mark.parametrize("kind", tokenizer.KINDS)
def test_tokenizer_round_trip_and_reload(tmp_path, kind):
    tok = tokenizer.build_tokenizer(kind, iter(TEXTS * 20), 300)
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    loaded = tokenizer.load_tokenizer(str(path))
    ids = tokenizer.encode_docs(tok, TEXTS)
    assert tokenizer.encode_docs(loaded, TEXTS) == ids
    assert [tokenizer.decode(loaded, i) for i in ids] == TEXTS
    info = tokenizer.tokenizer_info(str(path))
    assert (info["kind"], info["pad_id"], info["eod_id"]) == (kind, 0, 1)
    assert all(info["eod_id"] not in i and info["pad_id"] not in i for i in ids)
    assert info["vocab_size"] == tok.get_vocab_size() and len(info["sha256"]) == 64


# ----------------------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    corpus.write_corpus(corpus.CorpusConfig(out=str(out), seed=5, scale=0.04, train_files=4, doc_words=300))
    return out


def _cfg(inputs, out, **kw):
    kw.setdefault("vocab_size", 400)
    return PrepareConfig(input=[str(i) for i in inputs], output=str(out), seq_len=32, shard_segments=50, **kw)


def _segments(out):
    manifest = shards.read_manifest(str(out))
    return [(k, t, m) for p in shards.shard_paths(str(out), manifest) for k, t, m in shards.iter_segments(p)]


def _decoded_docs(out):
    """Rebuild each stream from its segments (placed at `start`), split at <eod>, decode."""
    manifest = shards.read_manifest(str(out))
    tok = tokenizer.load_tokenizer(os.path.join(out, manifest["tokenizer"]["file"]))
    streams: dict[int, list[int]] = {}
    for _, tokens, meta in _segments(out):
        s = streams.setdefault(meta["stream"], [])
        assert len(s) == meta["start"] + (1 if meta["index"] else 0)  # segments arrive in stream order
        s[meta["start"]:] = tokens.tolist()
    eod = manifest["tokenizer"]["eod_id"]
    return [tokenizer.decode(tok, d) for sid in streams for d in tokenizer.split_at_eod(streams[sid], eod)]


@pytest.mark.parametrize("per_doc", [False, True])
def test_prepare_round_trip(small_corpus, tmp_path, per_doc):
    files = sorted((small_corpus / "train").iterdir())
    manifest = prepare(_cfg([small_corpus / "train"], tmp_path, stream_per_document=per_doc))
    docs = [d for f in files for d in iter_documents(str(f))]
    assert _decoded_docs(tmp_path) == docs
    assert manifest["documents"] == len(docs)
    assert manifest["streams"] == (len(docs) if per_doc else len(files))
    segs = _segments(tmp_path)
    assert manifest["segments"] == len(segs) and manifest["tokens"] == sum(len(t) - 1 for _, t, _ in segs)
    last = {}
    for _, _, m in segs:
        last[m["stream"]] = max(last.get(m["stream"], 0), m["index"])
    assert all(m["length"] == 32 for _, _, m in segs if m["index"] < last[m["stream"]])
    for e in manifest["shards"]:
        shards.verify_shard(e, str(tmp_path))


def test_jsonl_and_existing_tokenizer(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    m1 = prepare(_cfg([src], tmp_path / "a", tokenizer_kind="byte"))
    assert _decoded_docs(tmp_path / "a") == TEXTS and m1["tokenizer"]["kind"] == "byte"
    m2 = prepare(_cfg([src], tmp_path / "b", tokenizer=str(tmp_path / "a" / "tokenizer.json")))
    assert m2["tokenizer"]["sha256"] == m1["tokenizer"]["sha256"]
    assert [(k, t.tolist()) for k, t, _ in _segments(tmp_path / "a")] == \
        [(k, t.tolist()) for k, t, _ in _segments(tmp_path / "b")]
    compact = tmp_path / "compact.json"  # a tokenizer file in another layout is copied as is
    compact.write_text(tokenizer.load_tokenizer(str(tmp_path / "a" / "tokenizer.json")).to_str())
    m3 = prepare(_cfg([src], tmp_path / "c", tokenizer=str(compact)))
    assert m3["tokenizer"]["sha256"] == tokenizer.tokenizer_info(str(compact))["sha256"] != m1["tokenizer"]["sha256"]


def _run_cli(args, n_ranks=0, env=None):
    return run_trime(["prepare", *args], n_ranks or 1, launcher="mpi", check=False, timeout=300, env=env)


def test_two_mpi_ranks_give_the_same_segments(small_corpus, tmp_path):
    common = ["--input", small_corpus / "train", "--seq-len", "32", "--vocab-size", "400", "--shard-segments", "40"]
    one = _run_cli(common + ["--output", tmp_path / "one"])
    assert one.returncode == 0, one.stderr
    # stderr is a pipe (no terminal): progress lines from rank 0 only (at every update here), no redraws;
    # with TRIME_LOG_DIR each rank also writes its own log file, named by host and rank
    two = _run_cli(common + ["--output", tmp_path / "two"], n_ranks=2,
                   env={"TRIME_PROGRESS_EVERY_S": "0", "TRIME_LOG_DIR": str(tmp_path / "logs")})
    assert two.returncode == 0, two.stderr
    bars = [line for line in two.stderr.splitlines() if "trime_dist.core.progress" in line]
    assert len(bars) >= 2 and all(" prepare (job, est. from rank 0): " in line for line in bars), two.stderr
    assert sum("elapsed" in line for line in bars) == 1 and "elapsed" in bars[-1], bars
    assert "\r" not in two.stderr
    host = short_host()
    assert sorted(os.listdir(tmp_path / "logs")) == [f"prepare-{host}-rank0.log", f"prepare-{host}-rank1.log"]
    rank0, rank1 = (open(tmp_path / "logs" / f"prepare-{host}-rank{r}.log").read() for r in (0, 1))
    assert "INFO data_pipeline.prepare: rank 0: " in rank0 and "rank 1: " not in rank0 and "core.progress" in rank0
    assert "INFO data_pipeline.prepare: rank 1: " in rank1 and "rank 0: " not in rank1 and "progress" not in rank1
    m1, m2 = shards.read_manifest(str(tmp_path / "one")), shards.read_manifest(str(tmp_path / "two"))
    assert m2["world_size"] == 2 and {e["path"][:10] for e in m2["shards"]} == {"shard-r000", "shard-r001"}
    assert m1["tokenizer"]["sha256"] == m2["tokenizer"]["sha256"]
    s1, s2 = _segments(tmp_path / "one"), _segments(tmp_path / "two")
    assert [k for k, _, _ in s1] == [k for k, _, _ in s2]
    assert all(np.array_equal(a[1], b[1]) and a[2] == b[2] for a, b in zip(s1, s2))
    assert not os.path.exists(tmp_path / "two" / "shard-r002-00000.tar")


def test_a_failing_rank_fails_every_rank(small_corpus, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_text((small_corpus / "valid" / "valid.txt").read_text())
    (inputs / "b.jsonl").write_text('{"text": "ok"}\n{oops\n')  # owned by rank 1
    r = _run_cli(["--input", inputs, "--output", tmp_path / "o", "--tokenizer-kind", "byte"], n_ranks=2)
    assert r.returncode != 0 and f"rank 1 on {socket.gethostname()}: {inputs / 'b.jsonl'}:2: invalid JSON" in r.stderr
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


def test_rerun_after_deleting_manifest_resumes(small_corpus, tmp_path):
    cfg = _cfg([small_corpus / "valid"], tmp_path)
    prepare(cfg)
    before = (tmp_path / "manifest.json").read_bytes()
    shard = tmp_path / "shard-r000-00000.tar"
    os.utime(shard, (1, 1))
    os.remove(tmp_path / "manifest.json")
    os.remove(tmp_path / ".prepare-r000.json")  # force re-tokenizing: shards must still be kept
    prepare(cfg)
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert os.stat(shard).st_mtime == 1
    # a damaged shard is redone on rerun
    shard.write_bytes(b"\0" * 100)
    prepare(cfg)
    assert (tmp_path / "manifest.json").read_bytes() == before
    shards.verify_shard(shards.read_manifest(str(tmp_path))["shards"][0], str(tmp_path))
    # a complete output with the same settings is left alone, even if the inputs were rewritten identically
    for f in (small_corpus / "valid").iterdir():
        os.utime(f)
    os.utime(tmp_path / "manifest.json", (2, 2))
    prepare(cfg)
    assert os.stat(tmp_path / "manifest.json").st_mtime == 2


def test_refuses_other_settings_unless_overwrite(small_corpus, tmp_path):
    prepare(_cfg([small_corpus / "valid"], tmp_path))
    with pytest.raises(ValueError, match="other settings.*seq_len.*--overwrite"):
        prepare(PrepareConfig(input=[str(small_corpus / "valid")], output=str(tmp_path), seq_len=16,
                              vocab_size=400, shard_segments=50))
    m = prepare(PrepareConfig(input=[str(small_corpus / "valid")], output=str(tmp_path), seq_len=16,
                              vocab_size=400, shard_segments=50, overwrite=True))
    assert m["seq_len"] == 16 and shards.read_manifest(str(tmp_path))["seq_len"] == 16


def test_bad_inputs_give_one_clear_line(tmp_path):
    r = _run_cli(["--input", tmp_path / "missing.txt", "--output", tmp_path / "o"])
    assert r.returncode == 2 and f"input file not found: {tmp_path / 'missing.txt'}" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    r = _run_cli(["--input", bad, "--output", tmp_path / "o", "--tokenizer-kind", "byte"])
    assert r.returncode == 2 and f"{bad}:2: expected an object" in r.stderr
    assert not os.path.exists(tmp_path / "o" / "manifest.json")
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        shards.read_manifest(str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        prepare(_cfg([bad], tmp_path / "p", tokenizer=str(tmp_path / "nope.json")))


@pytest.mark.parametrize("content", [b"", b"\n\n   \n\t\n"], ids=["empty", "blank_lines"])
def test_input_without_text_is_refused(tmp_path, content):
    src = tmp_path / "in.txt"
    src.write_bytes(content)
    r = _run_cli(["--input", src, "--output", tmp_path / "o", "--tokenizer-kind", "char", "--seq-len", "8"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == \
        f"trime prepare: error: {src}: no text to prepare (0 documents, 0 segments): the input is empty or only " \
        "blank lines"
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


@pytest.mark.parametrize("fmt", ["auto", "text", "jsonl"])
def test_non_utf8_input_names_file_and_line(tmp_path, fmt):
    from data_pipeline.text_input import utf8_error

    src = tmp_path / "in.jsonl" if fmt == "jsonl" else tmp_path / "in.txt"
    src.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n' if fmt == "jsonl" else b"ok\nline two, \xff\n")
    with pytest.raises(ValueError, match=rf"^{src}:2: not valid UTF-8 text \(byte 0x(e9|ff) at column (11|14)\)"):
        list(iter_documents(str(src), fmt))
    r = _run_cli(["--input", src, "--output", tmp_path / "o", "--tokenizer-kind", "byte"])
    assert r.returncode == 2 and "Traceback" not in r.stderr and f"{src}:2: not valid UTF-8" in r.stderr
    assert not os.path.exists(tmp_path / "o" / "manifest.json")
    assert str(utf8_error(str(src))).startswith(f"{src}:2:")


def test_stage_modules_do_not_import_heavy_deps_at_import():
    code = ("import sys, data_pipeline.prepare, data_pipeline.corpus, trime_dist.core.shards; "
            "print([m for m in ('mpi4py', 'webdataset') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr


MPI_SCRIPT = """
import json, sys
import numpy as np
from trime_dist.core import mpi
r = mpi.rank()
x = np.random.default_rng(r).standard_normal((3, 4))
total = mpi.allreduce_sum(x)
open(f"{sys.argv[1]}/out-{r}-{mpi.size()}.json", "w").write(json.dumps({"rank": r, "size": mpi.size(), "total": total.tolist(), "x": x.tolist(),
                  "gather": mpi.gather({"r": r}), "bcast": mpi.bcast(["root", r] if r == 0 else None),
                  "allgather": mpi.allgather(r * 3)}))  # ranks' stdout would interleave
mpi.barrier()
"""


def test_mpi_helpers_two_real_ranks_and_one_process(tmp_path):
    script = tmp_path / "m.py"
    script.write_text(MPI_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    two = subprocess.run([os.path.join(BIN, "mpiexec"), "-n", "2", sys.executable, str(script), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert two.returncode == 0, two.stderr
    out = [json.loads((tmp_path / f"out-{r}-2.json").read_text()) for r in range(2)]
    ref = np.sum([np.array(o["x"], dtype=np.float64) for o in out], axis=0)  # the sum, done in one place
    for o in out:
        assert o["size"] == 2 and np.allclose(o["total"], ref, rtol=0, atol=1e-12)
        assert o["bcast"] == ["root", 0] and o["allgather"] == [0, 3]
    assert out[0]["gather"] == [{"r": 0}, {"r": 1}] and out[1]["gather"] is None
    one = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert one.returncode == 0, one.stderr
    o = json.loads((tmp_path / "out-0-1.json").read_text())
    assert o["size"] == 1 and o["total"] == o["x"] and o["gather"] == [{"r": 0}] and o["allgather"] == [0]


def test_error_on_one_rank_aborts_instead_of_hanging(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("from trime_dist.core import mpi\n"
                      "with mpi.abort_on_error():\n"
                      "    if mpi.rank() == 1:\n"
                      "        raise RuntimeError('boom on rank 1 only')\n"
                      "    mpi.bcast(None)  # rank 0 would wait here forever\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([os.path.join(BIN, "mpiexec"), "-n", "2", sys.executable, str(script)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "boom on rank 1 only" in r.stdout + r.stderr
