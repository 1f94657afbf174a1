"""Fault-injection HTTP servers for answers a real server will not give on demand.

These are fakes by name and purpose: they answer 413, 429 with Retry-After,
500 or 400 following a script, and otherwise accept, so the sinks' split and
backoff paths can be exercised. Everything else is tested against the real
servers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# (status, headers, body) or a callable(body) -> that tuple
Answer = tuple[int, dict[str, str], bytes]


class FakeFaultServer:
    """A tiny local HTTP server that answers POSTs from a script, then with ``default``."""

    def __init__(self, script: list[Answer | Callable[[bytes], Answer]] | None = None,
                 default: Answer | Callable[[bytes], Answer] = (204, {}, b"")) -> None:
        self.script = list(script or [])
        self.default = default
        self.requests: list[tuple[str, dict[str, str], bytes, int]] = []  # path, headers, body, status answered
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with fake.lock:
                    step = fake.script.pop(0) if fake.script else fake.default
                status, headers, answer = step(body) if callable(step) else step
                with fake.lock:
                    fake.requests.append((self.path, dict(self.headers), body, status))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def _json(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                self._json(b'{"version":{"number":"2.19.0","distribution":"opensearch"}}')

            def do_HEAD(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_PUT(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self._json(b'{"acknowledged":true}')

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeFaultServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def statuses(self) -> list[int]:
        with self.lock:
            return [r[3] for r in self.requests]
