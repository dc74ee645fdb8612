"""Shards read from URLs: http(s) folders and manifest URLs served by a real localhost HTTP server, WebDataset
`pipe:` commands, and the one-line errors of a missing URL."""
from __future__ import annotations

import os
import shlex

import pytest

from trime_dist.core import locations, shards

from http_folder import serve_folder  # noqa: E402
from shard_fixtures import write_segment_dir  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    write_segment_dir(str(root / "train"), [90, 41, 7], seq_len=8, vocab_size=30, per_shard=4, real_tokenizer=True)
    with serve_folder(root) as url:
        yield root, url


def _all(data, **kw):
    manifest = shards.read_manifest(data)
    return [(i, t.tolist(), m) for i, t, m in shards.iter_range(data, manifest, **kw)]


def test_resolve_names_against_folder_manifest_url_and_pipe():
    assert locations.manifest_location("d/train") == os.path.join("d/train", "manifest.json")
    assert locations.manifest_location("http://h/d/train/") == "http://h/d/train/manifest.json"
    assert locations.manifest_location("https://h/d/m.json?x=1") == "https://h/d/m.json?x=1"
    assert locations.resolve("http://h/d/train", "shard-r000-00000.tar") == "http://h/d/train/shard-r000-00000.tar"
    assert locations.resolve("http://h/d/v2.json", "s.tar") == "http://h/d/s.tar"  # relative to the manifest URL
    assert locations.resolve("pipe:aws s3 cp s3://b/t/manifest.json -", "s.tar") == "pipe:aws s3 cp s3://b/t/s.tar -"
    assert locations.resolve("http://h/d", "sub/s.tar") == "http://h/d/sub/s.tar"
    for name in ("https://cdn/x.tar", "/etc/passwd", "../x.tar", "a/../../x.tar", "pipe:touch x", "%2e%2e/x.tar",
                 "a b.tar", "x.tar\n", "", ".", "./x.tar", "C:x.tar", "s.tar; touch x", "$(touch x)s.tar"):
        with pytest.raises(locations.UnsafeLocation, match="refused: names in a manifest must be plain relative"):
            locations.resolve("http://h/d", name)
    with pytest.raises(ValueError, match="pipe: data location is the command that prints manifest.json"):
        locations.manifest_location("pipe:cat shards.tar")


def test_http_folder_and_manifest_url_read_as_the_local_folder(served):
    root, url = served
    local = _all(str(root / "train"))
    assert len(local) == shards.read_manifest(str(root / "train"))["segments"] > 10
    for data in (f"{url}/train", f"{url}/train/", f"{url}/train/manifest.json"):
        assert shards.read_manifest(data) == shards.read_manifest(str(root / "train"))
        assert _all(data, check=True) == local
        assert _all(data, start=5, end=9) == local[5:9]
    manifest = shards.read_manifest(f"{url}/train")
    for entry in manifest["shards"]:
        shards.verify_shard(entry, f"{url}/train")
    assert shards.manifest_sha256(f"{url}/train") == shards.manifest_sha256(str(root / "train"))
    assert shards.shard_paths(f"{url}/train", manifest)[0] == f"{url}/train/{manifest['shards'][0]['path']}"


def test_pipe_command_reads_as_the_local_folder(served):
    root, _ = served
    data = f"pipe:cat {shlex.quote(str(root / 'train' / 'manifest.json'))}"
    assert _all(data, check=True) == _all(str(root / "train"))


def test_missing_urls_name_the_url(served, tmp_path):
    root, url = served
    with pytest.raises(FileNotFoundError, match=rf"^shard manifest not found: {url}/nowhere/manifest.json: HTTP 404"):
        shards.read_manifest(f"{url}/nowhere")
    with pytest.raises(FileNotFoundError, match=r"shard manifest not found: pipe:cat /no/manifest.json: the command "
                                                r"failed with exit status 1: cat: /no/manifest.json"):
        shards.read_manifest("pipe:cat /no/manifest.json")
    # a shard the manifest lists is gone from the server: the error names the shard's URL
    copy = tmp_path / "copy"
    write_segment_dir(str(copy), [40], seq_len=8, vocab_size=30, per_shard=2)
    gone = shards.read_manifest(str(copy))["shards"][-1]["path"]
    os.remove(copy / gone)
    with serve_folder(tmp_path) as other:
        with pytest.raises(FileNotFoundError, match=rf"shard not found: {other}/copy/{gone}: HTTP 404"):
            _all(f"{other}/copy")
    closed = f"{other}/copy"  # the server is down now: refused connections are retried, then named
    with pytest.raises(FileNotFoundError, match=rf"shard manifest not found: {closed}/manifest.json: cannot be read"):
        shards.read_manifest(closed)


def test_a_corrupt_remote_shard_is_refused(served, tmp_path):
    root, _ = served
    data = tmp_path / "bad"
    write_segment_dir(str(data), [40], seq_len=8, vocab_size=30, per_shard=2)
    first = shards.read_manifest(str(data))["shards"][0]["path"]
    raw = bytearray((data / first).read_bytes())
    raw[600] ^= 0xFF
    (data / first).write_bytes(bytes(raw))
    with serve_folder(tmp_path) as url:
        with pytest.raises(ValueError, match=rf"{url}/bad/{first}: shard checksum mismatch"):
            _all(f"{url}/bad", check=True)
        (data / first).write_bytes(bytes(raw[:1024]))  # cut short: its bytes are checked before parsing, check or not
        with pytest.raises(ValueError, match=rf"{url}/bad/{first}: shard checksum mismatch"):
            _all(f"{url}/bad")
