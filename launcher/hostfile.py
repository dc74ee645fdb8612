"""DeepSpeed/MPI-style hostfiles (`host slots=N` per line): parse strictly, write, and build from `h1:8,h2:8`."""
from __future__ import annotations

import re

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.:\-\[\]]+)\s+slots=(?P<slots>\d+)\s*(#.*)?$")
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def parse_hostfile_text(text: str, source: str = "hostfile") -> dict[str, int]:
    """{host: slots} in file order; blank lines and `#` comments are skipped, anything else is an error."""
    hosts: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"{source}:{lineno}: malformed line {raw!r}; expected 'HOST slots=N' "
                             f"(e.g. 'node001 slots=8')")
        host, slots = m["host"], int(m["slots"])
        if slots < 1:
            raise ValueError(f"{source}:{lineno}: {host} has slots={slots}; expected at least 1")
        if host in hosts:
            raise ValueError(f"{source}:{lineno}: host {host} is listed again (first on line {first_seen[host]})")
        hosts[host], first_seen[host] = slots, lineno
    if not hosts:
        raise ValueError(f"{source}: no hosts; expected lines of the form 'HOST slots=N'")
    return hosts


def read_hostfile(path: str) -> dict[str, int]:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"hostfile not found: {path}") from None
    return parse_hostfile_text(text, path)


def parse_hosts_arg(spec: str) -> dict[str, int]:
    """`node1:8,node2:8` -> {"node1": 8, "node2": 8}."""
    lines = []
    for i, item in enumerate(p.strip() for p in spec.split(",")):
        host, sep, slots = item.rpartition(":")
        if not sep or not host or not slots.isdigit():
            raise ValueError(f"--hosts item {i + 1} {item!r}: expected HOST:SLOTS, e.g. node001:8")
        lines.append(f"{host} slots={slots}")
    return parse_hostfile_text("\n".join(lines), "--hosts")


def format_hostfile(hosts: dict[str, int]) -> str:
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts.items())


def is_local(host: str) -> bool:
    import socket

    return host in LOCAL_NAMES or host in (socket.gethostname(), socket.gethostname().split(".")[0])
