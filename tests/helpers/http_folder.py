"""A real HTTP server (http.server in a thread) serving a folder on localhost, for the URL-shard tests."""
from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from typing import Iterator


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@contextlib.contextmanager
def serve_folder(root) -> Iterator[str]:
    """Serve `root` over HTTP; yields its base URL (http://127.0.0.1:PORT)."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
