"""A real HTTP server (http.server in a thread) serving a folder on localhost, for the URL-shard tests; it can
answer chosen paths with a redirect and records every path asked for (the security tests check who was asked)."""
from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from dataclasses import dataclass, field
from typing import Iterator


class _Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, redirects: dict, requests: list, **kw):
        self.redirects, self.requests = redirects, requests
        super().__init__(*args, **kw)

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@dataclass
class Served:
    url: str                                           # http://127.0.0.1:PORT
    requests: list[str] = field(default_factory=list)  # every path asked for, in order


@contextlib.contextmanager
def serve(root, redirects: dict[str, str] | None = None) -> Iterator[Served]:
    """Serve `root` over HTTP on 127.0.0.1; a path in `redirects` answers 302 to its value."""
    served = Served("")
    handler = functools.partial(_Handler, directory=str(root), redirects=dict(redirects or {}),
                                requests=served.requests)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    served.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def serve_folder(root) -> Iterator[str]:
    """Serve `root` over HTTP; yields its base URL (http://127.0.0.1:PORT)."""
    with serve(root) as served:
        yield served.url
