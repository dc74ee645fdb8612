"""`trime group`: complete and exact groups, 1 rank == 2 real MPI ranks, resume after a kill, bad input."""
import json
import os
import shutil

import numpy as np
import pytest

from cli_runner import MPIEXEC, run_trime

from data_pipeline.group import GroupConfig, group_segments
from data_pipeline.bm25 import recall_at_k
from data_pipeline.group_search import STOP_ENV, load_neighbours
from trime_dist.cli import main as trime_main
from trime_dist.core import shards
from trime_dist.core.io import atomic_write_json

from group_fixtures import write_topic_corpus



@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("segments"))
    write_topic_corpus(out)
    return out


def _cfg(src, out, **kw):
    base = dict(input=src, output=out, method="bm25", group_size=4, groups_per_shard=5, query_block=16, top_k=8)
    base.update(kw)
    return GroupConfig(**base)


def _flags(cfg: GroupConfig) -> list[str]:
    return ["group", "--input", cfg.input, "--output", cfg.output, "--method", cfg.method,
            "--group-size", str(cfg.group_size), "--groups-per-shard", str(cfg.groups_per_shard),
            "--query-block", str(cfg.query_block), "--top-k", str(cfg.top_k), "--seed", str(cfg.seed),
            "--query-terms", str(cfg.query_terms), "--candidates", str(cfg.candidates)]


def _shard_digests(out):
    m = shards.read_manifest(out)
    return [(e["path"], e["sha256"]) for e in m["shards"]], m


def _read_groups(out):
    m = shards.read_manifest(out)
    return [(k, t, meta) for p in shards.shard_paths(out, m) for k, t, meta in shards.iter_groups(p)]


def _source_segments(src):
    m = shards.read_manifest(src)
    return [(k, t, meta) for p in shards.shard_paths(src, m) for k, t, meta in shards.iter_segments(p)]


@pytest.mark.parametrize("method", ["bm25", "random", "consecutive"])
def test_every_segment_exactly_once_with_its_tokens(corpus, tmp_path, method):
    out = str(tmp_path / "out")
    assert group_segments(_cfg(corpus, out, method=method)) == 0
    m = shards.read_manifest(out)
    source = {k: t for k, t, _ in _source_segments(corpus)}
    seen = []
    for gi, (key, tokens, meta) in enumerate(_read_groups(out)):
        assert key == shards.group_key(gi) and tokens.shape == (4, 17)
        for row, seg in zip(tokens, meta["segments"]):
            skey = shards.segment_key(seg["stream"], seg["index"])
            n = seg["length"] + 1
            np.testing.assert_array_equal(row[:n], source[skey])
            assert (row[n:] == 0).all()  # right-padded with pad_id
            seen.append(skey)
    assert len(seen) == len(set(seen)) == m["segments"] == 4 * m["groups"]
    assert sorted(seen + m["dropped_keys"]) == sorted(source)
    assert m["dropped_segments"] == len(source) % 4 == len(m["dropped_keys"])
    assert m["grouping"]["method"] == method and m["format"] == shards.GROUPS_FORMAT
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    if method == "consecutive":  # groups follow the manifest (= stream) order
        assert seen == [k for k, _, _ in _source_segments(corpus)][: len(seen)]


def test_bm25_groups_are_more_similar_than_random(corpus, tmp_path, caplog):
    caplog.set_level("INFO", logger="data_pipeline.group")
    group_segments(_cfg(corpus, str(tmp_path / "bm25")))
    assert "grouped 150 segments into 37 groups of 4 (2 dropped) with bm25" in caplog.text
    assert "mean within-group BM25 similarity" in caplog.text
    group_segments(_cfg(corpus, str(tmp_path / "random"), method="random"))
    bm25 = shards.read_manifest(str(tmp_path / "bm25"))["similarity"]
    rand = shards.read_manifest(str(tmp_path / "random"))["similarity"]
    assert bm25["mean_within_group_bm25"] > 2 * bm25["mean_within_group_bm25_random"]
    assert rand["mean_within_group_bm25"] < 1.5 * rand["mean_within_group_bm25_random"]


@pytest.mark.parametrize("method,ranks,kw", [("bm25", 2, {}), ("random", 2, {}),
                                             ("bm25", 3, dict(query_terms=4, candidates=10))])
def test_mpi_ranks_give_identical_output(corpus, tmp_path, method, ranks, kw):
    if not os.path.exists(MPIEXEC):
        pytest.skip("mpiexec not installed in the venv")
    one = _cfg(corpus, str(tmp_path / "one"), method=method, **kw)
    many = _cfg(corpus, str(tmp_path / "many"), method=method, **kw)
    group_segments(one)
    proc = run_trime(_flags(many), ranks, launcher="mpi", check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d1, m1 = _shard_digests(one.output)
    d2, m2 = _shard_digests(many.output)
    assert m2["world_size"] == ranks and m1["world_size"] == 1
    assert d1 == d2 and m1["dropped_keys"] == m2["dropped_keys"] and m1["similarity"] == m2["similarity"]


def test_pruned_search_reports_its_recall_and_keeps_groups_similar(corpus, tmp_path):
    """The pruned search: exact when nothing is cut; with a cut, the sampled recall@k in the manifest equals
    the recall of its neighbour blocks against those of the exact run on the same segments."""
    exact = _cfg(corpus, str(tmp_path / "exact"))
    uncut = _cfg(corpus, str(tmp_path / "uncut"), query_terms=10_000, candidates=150)
    cut = _cfg(corpus, str(tmp_path / "cut"), query_terms=2, candidates=8, recall_sample=150)
    for cfg in (exact, uncut, cut):
        group_segments(cfg)
    assert _shard_digests(uncut.output)[0] == _shard_digests(exact.output)[0]
    m = shards.read_manifest(cut.output)
    assert m["grouping"]["query_terms"] == 2 and "query_terms" not in shards.read_manifest(exact.output)["grouping"]
    nb = {c.output: load_neighbours(os.path.join(c.output, "neighbours"), 150, 8, 16) for c in (exact, cut)}
    want = recall_at_k(nb[cut.output], nb[exact.output])
    assert m["similarity"]["pruned_search"] == {"segments_sampled": 150, "recall_at_8": pytest.approx(want)}
    assert 0.3 < want < 1.0
    assert m["similarity"]["mean_within_group_bm25"] > 2 * m["similarity"]["mean_within_group_bm25_random"]


def test_error_on_one_mpi_rank_stops_all_ranks(corpus, tmp_path):
    if not os.path.exists(MPIEXEC):
        pytest.skip("mpiexec not installed in the venv")
    src = str(tmp_path / "src")
    shutil.copytree(corpus, src)
    last = shards.read_manifest(src)["shards"][-1]["path"]  # read by rank 1 only
    os.remove(os.path.join(src, last))
    cfg = _cfg(src, str(tmp_path / "out"))
    proc = run_trime(_flags(cfg), 2, launcher="mpi", check=False, timeout=120)
    assert proc.returncode != 0 and f"not found: {os.path.join(src, last)}" in proc.stderr
    assert not os.path.exists(os.path.join(cfg.output, "manifest.json"))


@pytest.mark.parametrize("kw", [{}, dict(query_terms=4, candidates=10)])  # exact / pruned search
def test_resume_after_kill_gives_identical_output(corpus, tmp_path, monkeypatch, kw):
    clean = _cfg(corpus, str(tmp_path / "clean"), **kw)
    group_segments(clean)
    want, _ = _shard_digests(clean.output)

    killed = _cfg(corpus, str(tmp_path / "killed"), **kw)
    monkeypatch.setenv(STOP_ENV, "3")
    with pytest.raises(SystemExit):
        group_segments(killed)
    monkeypatch.delenv(STOP_ENV)
    work = os.path.join(killed.output, "neighbours")
    assert len([f for f in os.listdir(work) if f.startswith("block-")]) == 3
    assert not os.path.exists(os.path.join(killed.output, "manifest.json"))  # not complete
    group_segments(killed)
    assert _shard_digests(killed.output)[0] == want

    # a kill during writing: manifest and a shard gone, a block lost, a stale temp file left behind
    os.remove(os.path.join(killed.output, "manifest.json"))
    os.remove(os.path.join(killed.output, "group-00001.tar"))
    os.remove(os.path.join(work, "block-000002.npz"))
    open(os.path.join(killed.output, ".group-00002.tar.x.tmp"), "wb").close()
    group_segments(killed)
    assert _shard_digests(killed.output)[0] == want
    assert not [f for f in os.listdir(killed.output) if f.endswith(".tmp")]
    assert group_segments(killed) == 0  # complete: nothing to do


def test_changed_settings_discard_old_blocks(corpus, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    monkeypatch.setenv(STOP_ENV, "4")
    with pytest.raises(SystemExit):
        group_segments(_cfg(corpus, out, top_k=3))
    monkeypatch.delenv(STOP_ENV)
    group_segments(_cfg(corpus, out))
    group_segments(_cfg(corpus, str(tmp_path / "clean")))
    assert _shard_digests(out)[0] == _shard_digests(str(tmp_path / "clean"))[0]


def _cli_error(capsys, cfg):
    assert trime_main(_flags(cfg)) == 2
    return capsys.readouterr().err


def _edit_manifest(src, **changes):
    m = json.load(open(os.path.join(src, "manifest.json")))
    m.update(changes)
    atomic_write_json(os.path.join(src, "manifest.json"), m)
    return m


def test_bad_inputs_give_clear_errors(corpus, tmp_path, capsys):
    def copy():
        dst = str(tmp_path / f"src{len(os.listdir(tmp_path))}")
        shutil.copytree(corpus, dst)
        return dst

    src = copy()
    os.remove(os.path.join(src, "shard-r000-00003.tar"))
    assert "shard-r000-00003.tar" in _cli_error(capsys, _cfg(src, str(tmp_path / "o1")))

    src = copy()
    _edit_manifest(src, seq_len=8)
    assert "seq_len=8" in _cli_error(capsys, _cfg(src, str(tmp_path / "o2")))

    src = copy()
    tok = _edit_manifest(src)["tokenizer"]
    _edit_manifest(src, tokenizer=dict(tok, vocab_size=100))
    assert "vocabulary [0, 100)" in _cli_error(capsys, _cfg(src, str(tmp_path / "o3")))

    src = copy()
    with open(os.path.join(src, "tokenizer.json"), "a") as f:
        f.write(" ")
    assert "another tokenizer" in _cli_error(capsys, _cfg(src, str(tmp_path / "o4")))

    err = _cli_error(capsys, _cfg(corpus, str(tmp_path / "o5"), group_size=1000))
    assert "--group-size" in err and "150 segments" in err

    src = copy()
    _edit_manifest(src, shards=[], segments=0)
    assert "empty" in _cli_error(capsys, _cfg(src, str(tmp_path / "o6")))

    group_segments(_cfg(corpus, str(tmp_path / "o7"), method="random"))
    assert "another grouping" in _cli_error(capsys, _cfg(corpus, str(tmp_path / "o7")))

    err = _cli_error(capsys, _cfg(corpus, str(tmp_path / "o8"), query_terms=8, candidates=3))
    assert err.count("\n") == 1 and "--candidates: must be >= --top-k (8) for the pruned search, got 3" in err
    err = _cli_error(capsys, _cfg(corpus, str(tmp_path / "o9"), query_terms=-1))
    assert err.count("\n") == 1 and "--query-terms: must be >= 0 (0 = exact search), got -1" in err

    for name in ("o1", "o2", "o3", "o4", "o5", "o6", "o8", "o9"):  # nothing looks complete after a failure
        assert not os.path.exists(tmp_path / name / "manifest.json")


def test_pruned_search_with_a_rank_that_holds_no_segments(tmp_path):
    """One source shard and 2 ranks: rank 1 reads and indexes nothing, yet scores every query block with
    rank 0 and writes its share; the output equals the 1-rank output."""
    if not os.path.exists(MPIEXEC):
        pytest.skip("mpiexec not installed in the venv")
    src = str(tmp_path / "src")
    write_topic_corpus(src, per_shard=10_000)
    assert len(shards.read_manifest(src)["shards"]) == 1
    one = _cfg(src, str(tmp_path / "one"), query_terms=4, candidates=10)
    two = _cfg(src, str(tmp_path / "two"), query_terms=4, candidates=10)
    group_segments(one)
    proc = run_trime(_flags(two), 2, launcher="mpi", check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1: 10 of 10 query blocks to score (pruned search, 0 segments indexed here)" in proc.stderr
    d1, m1 = _shard_digests(one.output)
    d2, m2 = _shard_digests(two.output)
    assert d1 == d2 and m1["similarity"] == m2["similarity"] and m2["world_size"] == 2
