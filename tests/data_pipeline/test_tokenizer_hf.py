"""`trime prepare --tokenizer PATH` with Hugging Face tokenizers: a tokenizer.json or a save_pretrained
folder, no pad token, EOS (or --eod-token) as the end-of-document token; special ids checked against
transformers' own reading of the folder; 1 vs 2 MPI ranks; one-line errors for bad inputs."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from cli_runner import run_trime
from hf_fixtures import EOS, write_tiny_tokenizer

from data_pipeline import corpus, tokenizer
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.text_input import iter_documents
from trime_dist.core import shards

TEXTS = ["the quick brown fox\n", "ünïcödé 日本語 🙂 and\r\nCRLF", " leading space ",
         "a literal <|endoftext|> and <pad> are text", "x"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny"))


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory):
    """A byte-level BPE whose <|endoftext|> is the last id (as in GPT-2), saved as a HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    tok.add_special_tokens([EOS])
    out = tmp_path_factory.mktemp("tok") / "gpt2"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def with_doc_token(tiny, tmp_path_factory):
    """The tiny folder with one more special token, <|doc|> (id 300, past the trained vocabulary)."""
    out = tmp_path_factory.mktemp("tok") / "doc"
    shutil.copytree(tiny, out)
    tok = tokenizer.load_tokenizer(tiny)
    tok.add_special_tokens(["<|doc|>"])
    tok.save(str(out / "tokenizer.json"))
    return str(out)


def _without_eos(src: str, dst) -> str:
    """A copy of a HF folder whose settings name no EOS (nor bos/unk) token."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "tokenizer_config.json")
    settings = json.load(open(path))
    for key in ("eos_token", "bos_token", "unk_token"):
        settings.pop(key, None)
    json.dump(settings, open(path, "w"))
    return str(dst)


# ----------------------------------------------------------------------------- the tokenizer module

@pytest.mark.parametrize("which", ["tiny", "gpt2_style"])
def test_special_ids_match_transformers(request, which):
    from transformers import AutoTokenizer

    path = request.getfixturevalue(which)
    ref = AutoTokenizer.from_pretrained(path)                      # the reference reading of the folder
    for given in (path, os.path.join(path, "tokenizer.json")):    # the folder, and its bare tokenizer.json
        info = tokenizer.tokenizer_info(given)
        assert info["eod_id"] == ref.eos_token_id and info["eod_token"] == EOS
        assert info["pad_id"] == info["eod_id"]                     # no pad token: padding uses the EOD id
        assert info["vocab_size"] == len(ref) and info["kind"] == "hf"
        assert info["sha256"] == tokenizer.tokenizer_info(path)["sha256"]
    assert ref.eos_token_id == (0 if which == "tiny" else len(ref) - 1)
    tok = tokenizer.load_tokenizer(path)
    ids = tokenizer.encode_docs(tok, TEXTS)
    assert [tokenizer.decode(tok, i) for i in ids] == TEXTS
    assert all(ref.eos_token_id not in i for i in ids)            # a literal "<|endoftext|>" is text
    assert ids[0] == ref(TEXTS[0], add_special_tokens=False).input_ids


def test_eod_token_and_pad_token_settings(tiny, with_doc_token, tmp_path):
    info = tokenizer.tokenizer_info(with_doc_token, eod_token="<|doc|>")
    assert (info["eod_id"], info["pad_id"], info["vocab_size"]) == (300, 300, 301)  # added tokens count
    win = tokenizer.load_tokenizer(tiny).token_to_id("Ġwin")
    assert tokenizer.tokenizer_info(tiny, eod_token="Ġwin")["eod_id"] == win  # an ordinary token works too
    with pytest.raises(ValueError, match=r"tiny: --eod-token '<\|nope\|>' is not in the tokenizer's vocabulary"):
        tokenizer.tokenizer_info(tiny, eod_token="<|nope|>")
    # a pad token in the settings is used; v4-style special_tokens_map.json with {"content": ...} entries
    folder = _without_eos(tiny, tmp_path / "v4")
    json.dump({"eos_token": {"content": EOS, "special": True}, "pad_token": "Ġwin"},
              open(os.path.join(folder, "special_tokens_map.json"), "w"))
    info = tokenizer.tokenizer_info(folder)
    assert (info["eod_id"], info["pad_id"]) == (0, win)


def test_tokenizer_without_eos_is_refused_naming_the_path(tiny, tmp_path):
    folder = _without_eos(tiny, tmp_path / "no-eos")
    with pytest.raises(ValueError, match=f"^{folder}: the tokenizer has no EOS token.*--eod-token$"):
        tokenizer.tokenizer_info(folder)
    assert tokenizer.tokenizer_info(folder, eod_token=EOS)["eod_id"] == 0
    bare = tmp_path / "bare.json"  # a tokenizer.json names no EOS: none of the known ones is in this one
    bare.write_text(open(os.path.join(tiny, "tokenizer.json")).read().replace(EOS, "<|sep|>"))
    with pytest.raises(ValueError, match=f"^{bare}: a tokenizer.json does not name its EOS token.*--eod-token$"):
        tokenizer.tokenizer_info(str(bare))
    assert tokenizer.tokenizer_info(str(bare), eod_token="<|sep|>")["eod_id"] == 0


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"tokenizer file not found: {tmp_path / 'nope'}"):
        tokenizer.load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=f"tokenizer file not found: {tmp_path / 'tokenizer.json'} "
                                                r"\(the folder has no tokenizer.json"):
        tokenizer.load_tokenizer(str(tmp_path))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path / 'broken.json'}: not a valid tokenizers JSON file"):
        tokenizer.load_tokenizer(str(tmp_path / "broken.json"))


# ----------------------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    corpus.write_corpus(corpus.CorpusConfig(out=str(out), seed=3, scale=0.02, train_files=3, doc_words=200))
    return out / "train"


def _cfg(inputs, out, tok, **kw):
    return PrepareConfig(input=[str(inputs)], output=str(out), seq_len=24, shard_segments=40, tokenizer=str(tok), **kw)


def _segments(out):
    manifest = shards.read_manifest(str(out))  # every sample is checked against seq_len and vocab_size
    return [(k, t.tolist(), m) for p in shards.shard_paths(str(out), manifest) for k, t, m in shards.iter_segments(p)]


def _decoded_docs(out, tok_path=None):
    """Each stream rebuilt from its segments, split at the manifest's eod_id, decoded with the output's tokenizer."""
    manifest = shards.read_manifest(str(out))
    tok = tokenizer.load_tokenizer(tok_path or str(out))
    streams: dict[int, list[int]] = {}
    for _, tokens, meta in _segments(out):
        streams.setdefault(meta["stream"], [])[meta["start"]:] = tokens
    eod = manifest["tokenizer"]["eod_id"]
    return [tokenizer.decode(tok, d) for s in streams.values() for d in tokenizer.split_at_eod(s, eod)]


def test_prepare_with_folder_and_with_its_tokenizer_json(small_corpus, tiny, tmp_path):
    from transformers import AutoTokenizer

    docs = [d for f in sorted(small_corpus.iterdir()) for d in iter_documents(str(f))]
    m1 = prepare(_cfg(small_corpus, tmp_path / "folder", tiny))
    m2 = prepare(_cfg(small_corpus, tmp_path / "file", os.path.join(tiny, "tokenizer.json")))
    assert _decoded_docs(tmp_path / "folder") == docs == _decoded_docs(tmp_path / "file")
    assert _segments(tmp_path / "folder") == _segments(tmp_path / "file")
    src_sha = tokenizer.tokenizer_info(tiny)["sha256"]
    for m in (m1, m2):
        assert {k: m["tokenizer"][k] for k in ("kind", "vocab_size", "eod_token", "eod_id", "pad_id", "sha256")} == \
            {"kind": "hf", "vocab_size": 300, "eod_token": EOS, "eod_id": 0, "pad_id": 0, "sha256": src_sha}
    # the folder's output is itself a HF tokenizer folder (self-contained); the bare file's has no settings
    assert (tmp_path / "folder" / "tokenizer_config.json").read_bytes() == \
        open(os.path.join(tiny, "tokenizer_config.json"), "rb").read()
    assert AutoTokenizer.from_pretrained(str(tmp_path / "folder")).eos_token_id == 0
    assert not (tmp_path / "file" / "tokenizer_config.json").exists()
    # another split with the output folder as its tokenizer: same ids, same sha256
    m3 = prepare(_cfg(small_corpus, tmp_path / "again", tmp_path / "folder"))
    assert m3["tokenizer"] == m1["tokenizer"] and _segments(tmp_path / "again") == _segments(tmp_path / "folder")
    # `trime group` keeps the output a tokenizer folder too
    from data_pipeline.group import GroupConfig, group_segments

    group_segments(GroupConfig(input=str(tmp_path / "folder"), output=str(tmp_path / "grouped"), method="random",
                               group_size=2, similarity_groups=0))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "grouped")).eos_token_id == 0


def test_eod_token_is_honoured_and_part_of_the_settings(small_corpus, with_doc_token, tmp_path):
    docs = [d for f in sorted(small_corpus.iterdir()) for d in iter_documents(str(f))]
    m = prepare(_cfg(small_corpus, tmp_path, with_doc_token, eod_token="<|doc|>", stream_per_document=True))
    t = m["tokenizer"]
    assert (t["eod_token"], t["eod_id"], t["pad_id"], t["vocab_size"]) == ("<|doc|>", 300, 300, 301)
    assert _decoded_docs(tmp_path) == docs
    ends = {}
    for _, tokens, meta in _segments(tmp_path):
        ends[meta["stream"]] = tokens[-1]
    assert len(ends) == m["documents"] and set(ends.values()) == {300}  # every document ends with it
    with pytest.raises(ValueError, match="other settings.*eod_token"):
        prepare(_cfg(small_corpus, tmp_path, with_doc_token, stream_per_document=True))


def test_gpt2_style_last_id(small_corpus, gpt2_style, tmp_path):
    docs = [d for f in sorted(small_corpus.iterdir()) for d in iter_documents(str(f))]
    m = prepare(_cfg(small_corpus, tmp_path, gpt2_style))
    V = m["tokenizer"]["vocab_size"]
    assert m["tokenizer"]["eod_id"] == m["tokenizer"]["pad_id"] == V - 1
    assert _decoded_docs(tmp_path) == docs
    assert max(max(t) for _, t, _ in _segments(tmp_path)) == V - 1


def _cli(args, ranks=1):
    return run_trime(["prepare", *map(str, args)], ranks, launcher="mpi", check=False, timeout=300)


def test_two_mpi_ranks_equal_one(small_corpus, tiny, tmp_path):
    common = ["--input", small_corpus, "--seq-len", "24", "--shard-segments", "30", "--tokenizer", tiny]
    one = _cli(common + ["--output", tmp_path / "one"])
    assert one.returncode == 0, one.stderr
    two = _cli(common + ["--output", tmp_path / "two"], ranks=2)
    assert two.returncode == 0, two.stderr
    m1, m2 = shards.read_manifest(str(tmp_path / "one")), shards.read_manifest(str(tmp_path / "two"))
    assert m2["world_size"] == 2 and {e["path"][:10] for e in m2["shards"]} == {"shard-r000", "shard-r001"}
    assert m1["tokenizer"] == m2["tokenizer"]
    assert _segments(tmp_path / "one") == _segments(tmp_path / "two")
    assert np.all([(tmp_path / d / "tokenizer_config.json").is_file() for d in ("one", "two")])


def test_bad_tokenizers_give_one_clear_line(small_corpus, tiny, tmp_path):
    common = ["--input", small_corpus, "--output", tmp_path / "o"]
    r = _cli(common + ["--tokenizer", tmp_path / "missing"])
    assert r.returncode == 2 and f"tokenizer file not found: {tmp_path / 'missing'}" in r.stderr
    folder = _without_eos(tiny, tmp_path / "no-eos")
    r = _cli(common + ["--tokenizer", folder])
    line = f"{folder}: the tokenizer has no EOS token"
    assert r.returncode == 2 and line in r.stderr and len([s for s in r.stderr.splitlines() if line in s]) == 1
    r = _cli(common + ["--tokenizer", tiny, "--eod-token", "<|nope|>"])
    assert r.returncode == 2 and "--eod-token '<|nope|>' is not in the tokenizer's vocabulary" in r.stderr
    assert not os.path.exists(tmp_path / "o")  # refused before the output is touched
