"""Where shard data lives: a local folder, an http(s) URL (a folder or its manifest.json) or a WebDataset
`pipe:` command whose output is the manifest, so that clusters can train from object storage. The one place
that resolves a name from a manifest against its data location and fetches remote bytes (SECURITY.md).

Trust: the data location itself comes from the user's command line or config and is trusted (a `pipe:`
command runs as the user typed it). Everything a manifest holds is not: a name inside a manifest (a shard, the
tokenizer file) must be a plain relative path that stays inside the data location (`check_manifest_name`), so
it can neither run a command, nor read a file elsewhere on the node, nor make the node request another host.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

MANIFEST = "manifest.json"
URL_PREFIXES = ("http://", "https://", "pipe:")
HTTP_TRIES = 3            # a failed connection or a 5xx answer is retried (object stores have bad seconds)
HTTP_TIMEOUT_S = 120.0
# A private CA: TRIME_CA_BUNDLE=/path/ca.pem (or OpenSSL's SSL_CERT_FILE / SSL_CERT_DIR, which the default
# context reads). Certificates are always checked.
CA_BUNDLE_ENV = "TRIME_CA_BUNDLE"
# The most one fetch may return (a shard is a few MB; a manifest of a billion tokens some MB).
MAX_FETCH_ENV, DEFAULT_MAX_FETCH_MB = "TRIME_MAX_FETCH_MB", 4096

# One part of a manifest name: a file or folder name of letters, digits and ._+=- (what prepare and group
# write: shard-r000-00000.tar, group-00000.tar, tokenizer.json); parts are joined by "/".
_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=-]*")
NAME_RULE = ("names in a manifest must be plain relative paths inside the data location: parts of letters, "
             "digits and ._+=- joined by '/', with no scheme or pipe:, no leading '/', no '.' or '..' part, "
             "no '%', spaces or control characters")


class UnsafeLocation(ValueError):
    """A name or location that data may not use: refused before any byte is read."""


def is_url(location: str) -> bool:
    return str(location).startswith(URL_PREFIXES)


def check_manifest_name(name, manifest: str, entry: str) -> str:
    """`name` (the value of `entry` in the manifest at `manifest`) if it follows NAME_RULE; else UnsafeLocation,
    one line naming the manifest, the entry and the rule."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or not all(_NAME_PART.fullmatch(p) for p in parts):
        raise UnsafeLocation(f"{manifest}: {entry} = {_shown(name)} refused: {NAME_RULE}")
    return name


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_data_location(data: str) -> str:
    """A data location the user gave: a folder, an http(s) URL or a pipe: command; any other scheme (file:,
    ftp:, s3: without pipe:) is refused with one line."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", str(data))
    if scheme and scheme.group(1).lower() not in ("http", "https"):
        raise UnsafeLocation(f"{data}: data locations are folders, http(s) URLs or pipe: commands, not "
                             f"{scheme.group(1)}:// (read object storage with pipe:, e.g. "
                             f"'pipe:aws s3 cp s3://bucket/path/{MANIFEST} -')")
    return data


def manifest_location(data: str) -> str:
    """The manifest of the data at `data`: DIR/manifest.json for a folder or a folder URL; a URL ending in
    .json is the manifest itself; a `pipe:` command must print the manifest (its name in the command is
    replaced by a shard's name to read that shard)."""
    check_data_location(data)
    if data.startswith("pipe:"):
        if MANIFEST not in data:
            raise ValueError(f"{data}: a pipe: data location is the command that prints {MANIFEST} (its shards "
                             f"are read by the same command with {MANIFEST} replaced by the shard's name)")
        return data
    if is_url(data):
        return data if urllib.parse.urlsplit(data).path.endswith(".json") else data.rstrip("/") + "/" + MANIFEST
    return os.path.join(data, MANIFEST)


def resolve(data: str, name: str) -> str:
    """Where the file `name` (from the manifest of the data at `data`) is: inside the manifest's folder, under
    its URL, or read by its pipe: command with the name (quoted) in place of manifest.json. The name must
    follow NAME_RULE; a local name whose real path (symlinks followed) leaves the folder is refused too."""
    manifest = manifest_location(data)
    check_manifest_name(name, manifest, "name")
    if manifest.startswith("pipe:"):
        i = manifest.rindex(MANIFEST)
        return manifest[:i] + shlex.quote(name) + manifest[i + len(MANIFEST):]
    if is_url(data):
        return urllib.parse.urljoin(manifest, urllib.parse.quote(name))
    return member_path(data, name, manifest, "name")


def member_path(folder: str, name, where: str, entry: str) -> str:
    """folder/name for a `name` that the file `where` in a local `folder` (a manifest, a datastore's metadata)
    lists as its `entry`: it must follow NAME_RULE and really be inside the folder."""
    check_manifest_name(name, where, entry)
    path = os.path.join(folder, name)
    check_inside(path, folder, where)
    return path


def check_inside(path: str, folder: str, manifest: str) -> None:
    """Refuse a local path whose real path (every symlink followed) is not inside the real path of `folder`:
    a downloaded folder's symlink cannot point the reader at a file elsewhere on the node."""
    root, real = os.path.realpath(folder), os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise UnsafeLocation(f"{manifest}: {os.path.relpath(path, folder)} refused: it is a symlink to "
                             f"{real}, outside the data location {root}")


def describe(data: str) -> str:
    """The data location as a run records it: an absolute path, or the URL as given."""
    return data if is_url(data) else os.path.abspath(data)


def max_fetch_bytes() -> int:
    value = os.environ.get(MAX_FETCH_ENV, str(DEFAULT_MAX_FETCH_MB))
    try:
        return int(float(value) * (1 << 20))
    except ValueError:
        raise ValueError(f"{MAX_FETCH_ENV}={value!r}: expected a number of MiB") from None


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


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib itself would follow ftp:), refused with one line naming both."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = urllib.parse.urljoin(req.full_url, headers.get("Location") or headers.get("URI") or "")
        if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
            raise UnsafeLocation(f"{req.full_url}: redirect to {_shown(target)} refused: only http(s) "
                                 f"redirects are followed")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _opener() -> urllib.request.OpenerDirector:
    context = ssl.create_default_context(cafile=os.environ.get(CA_BUNDLE_ENV) or None)
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _HttpOnlyRedirects())


def _read_bounded(response, url: str, limit: int) -> bytes:
    length = response.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > limit:
        raise UnsafeLocation(f"{url}: {int(length)} bytes is more than one fetch may return "
                             f"({limit} bytes; raise {MAX_FETCH_ENV}, in MiB, if the data is meant to be that big)")
    data = response.read(limit + 1)
    if len(data) > limit:
        raise UnsafeLocation(f"{url}: more than {limit} bytes, the most one fetch may return (raise "
                             f"{MAX_FETCH_ENV}, in MiB, if the data is meant to be that big)")
    return data


def _http_get(url: str, what: str) -> bytes:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeLocation(f"{url}: only http(s) URLs are fetched")
    opener, limit, attempt = _opener(), max_fetch_bytes(), 1
    while True:
        try:
            with opener.open(url, timeout=HTTP_TIMEOUT_S) as response:
                return _read_bounded(response, url, limit)
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == HTTP_TRIES:
                raise FileNotFoundError(f"{what} not found: {url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, ssl.SSLError):  # a bad certificate is not a bad second: no retry
                raise FileNotFoundError(f"{what} not found: {url}: TLS check failed ({e.reason}); point "
                                        f"{CA_BUNDLE_ENV} at your CA bundle for a private CA") from None
            if attempt == HTTP_TRIES:
                raise FileNotFoundError(f"{what} not found: {url}: cannot be read ({e.reason})") from None
        except OSError as e:  # timed out, cut off
            if attempt == HTTP_TRIES:
                raise FileNotFoundError(f"{what} not found: {url}: cannot be read ({e})") from None
        time.sleep(0.5 * 2 ** (attempt - 1))
        attempt += 1


def sha256_of(location: str) -> str:
    """sha256 of the file at a path or URL (a local file is read in blocks)."""
    if is_url(location):
        return hashlib.sha256(read_bytes(location)).hexdigest()
    from trime_dist.core.io import sha256_file

    return sha256_file(location)


def read_checked(location: str, sha256: str, what: str) -> bytes:
    """The bytes at `location` after checking them against `sha256` (from the manifest), before anyone parses
    them: a mismatch is one ValueError line naming the file."""
    data = read_bytes(location, what)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{location}: {what} checksum mismatch (sha256 {digest[:12]}..., the manifest says "
                         f"{str(sha256)[:12]}...): the file is corrupt or was modified")
    return data
