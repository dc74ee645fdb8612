"""Data someone else wrote cannot run code or read outside where the user pointed (SECURITY.md).

An attacker who controls only a served (or downloaded) manifest.json and its shard files tries each attack of
issue 19 through the real CLI (train, datastore build, eval, group, export) against a real localhost
http.server: each ends in one refusal line naming the manifest and the entry, no file is created, and no other
host is asked for anything. The honest paths (tests/test_url_shards.py) still give the local results."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil

import pytest

from trime_dist.cli import main as trime_main

from cli_runner import CONFIGS  # noqa: E402
from http_folder import serve  # noqa: E402
from shard_fixtures import write_pattern_splits  # noqa: E402

REFUSED = "refused: names in a manifest must be plain relative paths inside the data location"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """root/honest/{train,valid}: prepared data; root/run: a tiny exported model; root/secret.txt: a file on the
    node the attacker wants to read."""
    from trime_dist.model.config import ModelConfig
    from trime_dist.model.export import export_model
    from trime_dist.model.transformer import build_model

    root = tmp_path_factory.mktemp("untrusted")
    write_pattern_splits(root / "honest", real_tokenizer=True, valid_real_tokenizer=True)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_heads=2, d_ffn=32, max_seq_len=32)
    export_model(build_model(cfg, seed=0).state_dict(), cfg, str(root / "run"),
                 {"step": 0, "tokenizer_sha256": None, "train_manifest_sha256": "x", "seq_len": 32})
    (root / "secret.txt").write_text("the node's secret\n")
    return root


def evil_copy(world, name: str, edit) -> str:
    """A copy of the honest train split under world/NAME whose manifest `edit(manifest)` rewrote."""
    out = world / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(world / "honest" / "train", out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return str(out)


def set_shard(name):
    def edit(manifest):
        manifest["shards"][0]["path"] = name
    return edit


def set_tokenizer(name):
    def edit(manifest):
        manifest["tokenizer"]["file"] = name
    return edit


def stage_commands(world, data: str, out) -> dict[str, list[str]]:
    """Every stage that reads shards, pointed at `data`, writing under `out`."""
    return {
        "eval": ["eval", "--data", data, "--model", str(world / "run"), "--memory", "local",
                 "--out", str(out / "eval.json")],
        "datastore build": ["datastore", "build", "--model", str(world / "run"), "--data", data,
                            "--out", str(out / "ds")],
        "train": ["train", "--config", os.path.join(CONFIGS, "tiny.yaml"), f"data.train={data}", "data.valid=",
                  f"run.out_dir={out / 'run'}", "run.max_steps=1", "model.max_seq_len=32", "model.d_model=16",
                  "model.d_ffn=32", "model.n_heads=2", "deepspeed.zero_stage=0", "data.shuffle_shards=false"],
    }


def refusal(capsys, argv: list[str]) -> str:
    """Run the CLI; it must fail with exactly one error line, which is returned."""
    code = trime_main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


def assert_nothing_written(out) -> None:
    """No result, part, checkpoint or table: at most a stage's log, its config and datastore build's plan."""
    left = {p.name for p in out.rglob("*") if p.is_file()} if out.exists() else set()
    assert left <= {"train.log", "config.yaml", "build.json"}, left


ATTACKS = {  # shard name in the manifest -> what it would do if it were used
    "pipe": "pipe:touch {sentinel}",
    "pipe with a shell tail": "pipe:cat shard-r000-00000.tar; touch {sentinel}",
    "absolute path": "{secret}",
    "dot-dot": "../secret.txt",
    "url-encoded dot-dot": "%2e%2e/secret.txt",
    "another host": "{other}/shard.tar",
    "shell in the name": "shard.tar; touch {sentinel}",
    "command substitution": "$(touch {sentinel})shard.tar",
    "control character": "shard-r000-00000.tar\ntouch {sentinel}",
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_hostile_shard_name_is_refused_by_every_stage_over_http(world, tmp_path, capsys, attack):
    sentinel = tmp_path / "PWNED"
    with serve(tmp_path) as other:
        name = ATTACKS[attack].format(sentinel=sentinel, secret=world / "secret.txt", other=other.url)
        evil_copy(world, f"evil_{attack.replace(' ', '_')}", set_shard(name))
        with serve(world) as bucket:
            data = f"{bucket.url}/evil_{attack.replace(' ', '_')}"
            for stage, argv in stage_commands(world, data, tmp_path / "out").items():
                line = refusal(capsys, argv)
                assert f"{data}/manifest.json: shards[0].path = " in line and REFUSED in line, (stage, line)
            assert not any(p.endswith(".tar") for p in bucket.requests), bucket.requests  # no shard was fetched
        assert other.requests == []                          # the other host was never asked
    assert not sentinel.exists()
    assert_nothing_written(tmp_path / "out")


def test_a_downloaded_folder_with_hostile_names_is_refused(world, tmp_path, capsys):
    """The same manifest in a local folder (a downloaded dataset); group and export read it too."""
    sentinel = tmp_path / "PWNED"
    for i, name in enumerate([f"pipe:touch {sentinel}", "../secret.txt", str(world / "secret.txt")]):
        data = evil_copy(world, f"local_evil_{i}", set_shard(name))
        commands = stage_commands(world, data, tmp_path / "out")
        commands["group"] = ["group", "--input", data, "--output", str(tmp_path / "out" / "g"),
                             "--method", "random", "--group-size", "2"]
        for stage, argv in commands.items():
            line = refusal(capsys, argv)
            assert f"{data}/manifest.json: shards[0].path = " in line and REFUSED in line, (stage, line)
    assert not sentinel.exists()
    assert_nothing_written(tmp_path / "out")


def test_a_symlink_out_of_a_downloaded_folder_is_refused(world, tmp_path, capsys):
    data = evil_copy(world, "symlinked", lambda m: None)
    first = json.loads(open(os.path.join(data, "manifest.json")).read())["shards"][0]["path"]
    os.remove(os.path.join(data, first))
    os.symlink(world / "secret.txt", os.path.join(data, first))
    for stage, argv in stage_commands(world, data, tmp_path / "out").items():
        line = refusal(capsys, argv)
        assert f"{first} refused: it is a symlink to {world / 'secret.txt'}, outside the data location" in line, \
            (stage, line)
    os.remove(os.path.join(data, "manifest.json"))               # the manifest itself linked elsewhere
    os.symlink(world / "secret.txt", os.path.join(data, "manifest.json"))
    assert "outside the data location" in refusal(capsys, stage_commands(world, data, tmp_path / "o2")["eval"])
    assert_nothing_written(tmp_path / "out")


def test_a_hostile_tokenizer_file_is_refused_and_never_copied(world, tmp_path, capsys):
    sentinel = tmp_path / "PWNED"
    for name in (str(world / "secret.txt"), f"pipe:cat {world / 'secret.txt'}; touch {sentinel}", "../secret.txt"):
        data = evil_copy(world, "evil_tok", set_tokenizer(name))
        with serve(world) as bucket:
            for where in (data, f"{bucket.url}/evil_tok"):
                line = refusal(capsys, stage_commands(world, where, tmp_path / "out")["train"])
                assert "manifest.json: tokenizer.file = " in line and REFUSED in line, line
    assert not sentinel.exists()
    assert not list((tmp_path / "out").rglob("tokenizer.json"))
    # a tokenizer whose bytes are not the ones the manifest hashed: refused before training starts
    data = evil_copy(world, "swapped_tok", lambda m: None)
    shutil.copyfile(world / "secret.txt", os.path.join(data, "tokenizer.json"))
    line = refusal(capsys, stage_commands(world, data, tmp_path / "out")["train"])
    wrong = hashlib.sha256((world / "secret.txt").read_bytes()).hexdigest()[:12]
    hashed = json.loads(open(os.path.join(data, "manifest.json")).read())["tokenizer"]["sha256"][:12]
    assert line.endswith(f"tokenizer.json: tokenizer checksum mismatch (sha256 {wrong}..., the manifest says "
                         f"{hashed}...): the file is corrupt or was modified"), line
    assert_nothing_written(tmp_path / "out")


def test_a_modified_shard_is_refused_before_it_is_parsed_by_every_stage(world, tmp_path, capsys):
    data = evil_copy(world, "modified", lambda m: None)
    first = json.loads(open(os.path.join(data, "manifest.json")).read())["shards"][0]["path"]
    raw = bytearray(open(os.path.join(data, first), "rb").read())
    raw[700] ^= 0xFF
    open(os.path.join(data, first), "wb").write(bytes(raw))
    with serve(world) as bucket:
        for where in (data, f"{bucket.url}/modified"):
            for stage, argv in stage_commands(world, where, tmp_path / "out").items():
                line = refusal(capsys, argv)
                assert f"{where}/{first}: shard checksum mismatch" in line, (stage, line)
    assert_nothing_written(tmp_path / "out")


def test_remote_fetches_are_http_only_bounded_and_redirects_stay_on_http(world, tmp_path, capsys, monkeypatch):
    argv = lambda data: stage_commands(world, data, tmp_path / "out")["eval"]  # noqa: E731
    honest = str(world / "honest" / "train")
    # an object store may answer a shard with a redirect to another http(s) place: followed
    first = json.loads((world / "honest" / "valid" / "manifest.json").read_text())["shards"][0]["path"]
    (world / "elsewhere").mkdir(exist_ok=True)
    shutil.copyfile(world / "honest" / "valid" / first, world / "elsewhere" / "moved.tar")
    redirects = {"/moved/manifest.json": f"file://{honest}/manifest.json",      # to file: or ftp: is not
                 "/ftp/manifest.json": "ftp://127.0.0.1/manifest.json",
                 f"/honest/valid/{first}": "/elsewhere/moved.tar"}
    with serve(world, redirects=redirects) as bucket:
        for path, target in (("moved", "file://"), ("ftp", "ftp://")):
            line = refusal(capsys, argv(f"{bucket.url}/{path}"))
            assert f"/{path}/manifest.json: redirect to '{target}" in line and "only http(s) redirects" in line, line
        assert trime_main(argv(f"{bucket.url}/honest/valid")) == 0
        assert "/elsewhere/moved.tar" in bucket.requests
        # a bound on what one fetch may return
        monkeypatch.setenv("TRIME_MAX_FETCH_MB", "0.0001")
        line = refusal(capsys, argv(f"{bucket.url}/honest/valid"))
        assert "bytes is more than one fetch may return (104 bytes; raise TRIME_MAX_FETCH_MB" in line, line
    for location in (f"file://{honest}", "ftp://127.0.0.1/train"):
        line = refusal(capsys, argv(location))
        assert "data locations are folders, http(s) URLs or pipe: commands" in line, line


def test_a_pipe_location_quotes_the_shard_name(world, tmp_path):
    """pipe: comes only from the user; the manifest's names enter its command quoted."""
    from trime_dist.core import locations

    cmd = f"pipe:cat {shlex.quote(str(world / 'honest' / 'train' / 'manifest.json'))}"
    assert locations.resolve(cmd, "sub/shard-1.tar") == f"pipe:cat {world / 'honest' / 'train' / 'sub'}/shard-1.tar"
    with pytest.raises(locations.UnsafeLocation, match=r"shards\[0\].path = 'shard.tar; touch"):
        locations.check_manifest_name("shard.tar; touch x", "m.json", "shards[0].path")
