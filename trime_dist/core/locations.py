"""Where shard data lives: a local folder, an http(s) URL (a folder or its manifest.json) or a WebDataset
`pipe:` command whose output is the manifest, so that clusters can train from object storage. The one place
that resolves a shard's name against its data location and fetches remote bytes.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

MANIFEST = "manifest.json"
URL_PREFIXES = ("http://", "https://", "pipe:")
HTTP_TRIES = 3            # a failed connection or a 5xx answer is retried (object stores have bad seconds)
HTTP_TIMEOUT_S = 120.0


def is_url(location: str) -> bool:
    return str(location).startswith(URL_PREFIXES)


def manifest_location(data: str) -> str:
    """The manifest of the data at `data`: DIR/manifest.json for a folder or a folder URL; a URL ending in
    .json is the manifest itself; a `pipe:` command must print the manifest (its name in the command is
    replaced by a shard's name to read that shard)."""
    if data.startswith("pipe:"):
        if MANIFEST not in data:
            raise ValueError(f"{data}: a pipe: data location is the command that prints {MANIFEST} (its shards "
                             f"are read by the same command with {MANIFEST} replaced by the shard's name)")
        return data
    if is_url(data):
        return data if urllib.parse.urlsplit(data).path.endswith(".json") else data.rstrip("/") + "/" + MANIFEST
    return os.path.join(data, MANIFEST)


def resolve(data: str, name: str) -> str:
    """Where the file `name` (a shard path from the manifest) of the data at `data` is: relative names are
    relative to the manifest's location (its folder, its URL, or its pipe: command); URLs and absolute
    paths are kept."""
    if is_url(name) or os.path.isabs(name):
        return name
    if not is_url(data):
        return os.path.join(data, name)
    manifest = manifest_location(data)
    if manifest.startswith("pipe:"):
        i = manifest.rindex(MANIFEST)
        return manifest[:i] + name + manifest[i + len(MANIFEST):]
    return urllib.parse.urljoin(manifest, urllib.parse.quote(name))


def describe(data: str) -> str:
    """The data location as a run records it: an absolute path, or the URL as given."""
    return data if is_url(data) else os.path.abspath(data)


def read_bytes(location: str, what: str = "file") -> bytes:
    """The bytes at a local path, an http(s) URL or a pipe: command's output. A missing file, an HTTP error
    or a failed command raises FileNotFoundError naming the location (`what` says what it should be)."""
    if location.startswith("pipe:"):
        proc = subprocess.run(location[len("pipe:"):], shell=True, capture_output=True)
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise FileNotFoundError(f"{what} not found: {location}: the command failed with exit status "
                                    f"{proc.returncode}{': ' + err[-1] if err else ''}")
        return proc.stdout
    if is_url(location):
        return _http_get(location, what)
    if not os.path.isfile(location):
        raise FileNotFoundError(f"{what} not found: {location}")
    with open(location, "rb") as f:
        return f.read()


def _http_get(url: str, what: str) -> bytes:
    attempt = 1
    while True:
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == HTTP_TRIES:
                raise FileNotFoundError(f"{what} not found: {url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:  # refused, unresolvable, timed out, cut off
            if attempt == HTTP_TRIES:
                reason = getattr(e, "reason", e)
                raise FileNotFoundError(f"{what} not found: {url}: cannot be read ({reason})") from None
        time.sleep(0.5 * 2 ** (attempt - 1))
        attempt += 1


def sha256_of(location: str) -> str:
    """sha256 of the file at a path or URL (a local file is read in blocks)."""
    if is_url(location):
        return hashlib.sha256(read_bytes(location)).hexdigest()
    from trime_dist.core.io import sha256_file

    return sha256_file(location)
