"""The built-in corpus: deterministic by seed, with the properties each memory type relies on."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from data_pipeline import corpus
from data_pipeline.text_input import iter_documents

from cli_runner import run_trime


def _cfg(out, seed=0, scale=0.05):
    return corpus.CorpusConfig(out=str(out), seed=seed, scale=scale, train_files=4)


def _read_all(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, n), root)] = f.read()
    return out


def test_deterministic_by_seed(tmp_path):
    corpus.write_corpus(_cfg(tmp_path / "a", seed=3))
    corpus.write_corpus(_cfg(tmp_path / "b", seed=3))
    corpus.write_corpus(_cfg(tmp_path / "c", seed=4))
    a, b, c = (_read_all(tmp_path / x) for x in "abc")
    assert sorted(a) == ["corpus.json", "test/test.txt"] + [f"train/train-{i:02d}.txt" for i in range(4)] + \
        ["valid/valid.txt"]
    assert a == b
    assert a["train/train-00.txt"] != c["train/train-00.txt"]


def test_files_parse_back_into_the_documents(tmp_path):
    cfg = _cfg(tmp_path)
    corpus.write_corpus(cfg)
    world = corpus.make_world(cfg.seed, cfg.families)
    n_train = max(cfg.train_files, round(cfg.train_docs * cfg.scale))
    docs = corpus.make_documents(cfg.seed, 0, n_train, world, cfg.doc_words)
    files = sorted((tmp_path / "train").iterdir())
    parsed = [d for f in files for d in iter_documents(str(f), "auto")]
    assert parsed == [d.text for d in docs]


def _repeat_fraction(doc: corpus.Document) -> float:
    """Fraction of a document's words that repeat one of its own rare names seen earlier in it."""
    words = doc.text.split()
    seen, repeats = set(), 0
    for w in words:
        if w in doc.names:
            repeats += w in seen
            seen.add(w)
    return repeats / len(words)


def test_documents_repeat_their_rare_names_and_are_long():
    world = corpus.make_world(0, 8)
    docs = corpus.make_documents(0, 0, 30, world, 700)
    fractions = np.array([_repeat_fraction(d) for d in docs])
    assert fractions.min() > 0.04, fractions
    # the names are rare: no other document uses them
    for d, e in itertools.combinations(docs, 2):
        assert not set(d.names) & set(e.text.split())
    # every document spans several 128-token segments (>= 1 token per word)
    assert min(len(d.text.split()) for d in docs) > 3 * 128


def test_families_share_vocabulary():
    world = corpus.make_world(1, 6)
    docs = corpus.make_documents(1, 0, 60, world, 400)
    common = set(world.common)

    def rare_words(d):
        return {w for w in d.text.split() if w.lower() not in common and w.isalpha()}

    same, other = [], []
    for d, e in itertools.combinations(docs, 2):
        a, b = rare_words(d), rare_words(e)
        (same if d.family == e.family else other).append(len(a & b) / len(a | b))
    assert len(same) > 10
    assert np.mean(same) > 0.2 and np.mean(other) < 0.02, (np.mean(same), np.mean(other))


def test_heldout_documents_come_from_training_families():
    world = corpus.make_world(0, 8)
    train_fams = {d.family for d in corpus.make_documents(0, 0, 40, world, 300)}
    valid = corpus.make_documents(0, 1, 10, world, 300)
    assert {d.family for d in valid} <= train_fams
    assert valid[0].text != corpus.make_documents(0, 0, 1, world, 300)[0].text


def test_bad_scale_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        corpus.write_corpus(_cfg(tmp_path, scale=0))


def test_cli_stage(tmp_path):
    r = run_trime(["corpus", "--out", tmp_path, "--seed", "2", "--scale", "0.02", "--train-files", "2"],
                  check=False, timeout=300)
    assert r.returncode == 0, r.stderr
    corpus.write_corpus(corpus.CorpusConfig(out=str(tmp_path / "ref"), seed=2, scale=0.02, train_files=2))
    assert (tmp_path / "train" / "train-01.txt").read_bytes() == (tmp_path / "ref" / "train" / "train-01.txt").read_bytes()
