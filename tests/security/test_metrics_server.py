"""The metrics HTTP server stays bounded under idle and slow connections, and a scrape still answers."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowship.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


_SERVE = """
import sys, time
from flowship.metrics import Metrics
m = Metrics()
m.counter("flowship_test_total", "A series to scrape.").inc(7)
server = m.serve("127.0.0.1:0", max_connections=256)
print(server.server_address[1], flush=True)
sys.stdin.read()
"""


@pytest.fixture()
def metrics() -> Metrics:
    m = Metrics()
    m.counter("flowship_test_total", "A series to scrape.").inc(7)
    return m


def _scrape(port: int, path: str = "/metrics", timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_thousands_of_idle_connections_cost_no_threads() -> None:
    """3,000 idle connections: no thread each, little memory, and a real scrape still answers at once.

    The server runs in a process of its own so that its threads and memory are what is measured.
    """
    proc = subprocess.Popen([sys.executable, "-c", _SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    idle: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert _scrape(port)[0] == 200
        before = _proc_status(proc.pid)
        for _ in range(3000):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1)
        started = time.monotonic()
        status, body = _scrape(port)
        assert status == 200 and b"flowship_test_total 7.0" in body
        assert time.monotonic() - started < 2
        after = _proc_status(proc.pid)
        assert int(after["Threads"]) <= int(before["Threads"]) + 1  # a body thread at most, never one each
        grown_kib = int(after["VmRSS"].split()[0]) - int(before["VmRSS"].split()[0])
        assert grown_kib < 20 * 1024, f"RSS grew {grown_kib} KiB"
        open_fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert open_fds < 256 + 50  # max_connections: the oldest idle ones were closed
    finally:
        for s in idle:
            s.close()
        proc.kill()
        proc.wait(10)


def test_idle_and_slow_clients_are_closed(metrics) -> None:
    server = metrics.serve("127.0.0.1:0", request_timeout=0.3)
    port = server.server_address[1]
    try:
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
        started = time.monotonic()
        assert silent.recv(100) == b"" and slow.recv(100) == b""
        assert time.monotonic() - started < 3
        huge = socket.create_connection(("127.0.0.1", port), timeout=5)
        huge.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        assert huge.recv(100) == b""  # a head beyond max_head_bytes is not buffered
        for s in (silent, slow, huge):
            s.close()
        assert _scrape(port, "/healthz") == (200, b"ok\n")
    finally:
        server.shutdown()


def test_keep_alive_readiness_and_errors(metrics) -> None:
    server = metrics.serve("127.0.0.1:0")
    port = server.server_address[1]
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(3):  # one connection, several scrapes (Prometheus keeps connections open)
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            assert resp.status == 200 and b"flowship_test_total" in resp.read()
        conn.close()
        assert _scrape(port, "/readyz") == (200, b"ready\n")
        metrics.ready = lambda: False
        assert _scrape(port, "/readyz") == (503, b"not ready\n")
        assert _scrape(port, "/nope")[0] == 404
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/metrics", body=b"")
        assert conn.getresponse().status == 405
        conn.close()
    finally:
        server.shutdown()


def test_a_taken_port_names_the_address(metrics, tmp_path, flowship_cmd) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    message = f"metrics: cannot listen on 127.0.0.1:{port}: the address is already in use by another process"
    try:
        with pytest.raises(OSError, match=message):
            metrics.serve(f"127.0.0.1:{port}")
        cfg = tmp_path / "m.yaml"
        cfg.write_text(f"data_dir: {tmp_path}/state\nmetrics: 127.0.0.1:{port}\nsources: [{{type: stdin}}]\n"
                       "sinks: [{type: stdout}]\n")
        proc = subprocess.run([*flowship_cmd, "export", "--config", str(cfg)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
        assert proc.returncode == 1 and f"flowship: cannot start: {message}" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        taken.close()
