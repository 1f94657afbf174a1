"""HTTP/1.x snippet parsing and request/response pairing (agent/l7_http.py)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tcp_relay import TcpRelay

from flowship.agent.l7_http import (
    HttpPairer,
    HttpRequest,
    HttpResponse,
    ParseError,
    build_url,
    canonical_header_key,
    format_authority,
    parse_http,
    parse_http_messages,
)
from flowship.model.schema import FLOW_SCHEMA

REQ = (b"GET /products/123?color=red HTTP/1.1\r\n"
       b"Host: product-api.production.svc:8080\r\n"
       b"user-agent: curl/8.5.0\r\n"
       b"Accept: */*\r\n"
       b"Authorization: Bearer secret\r\n"
       b"X-Request-Id: 1f0c\r\n"
       b"\r\n")


# -- parse_http ------------------------------------------------------------------------------

def test_request_fields() -> None:
    msg = parse_http(REQ)
    assert msg == HttpRequest(
        method="GET", target="/products/123?color=red", protocol="HTTP/1.1",
        host="product-api.production.svc:8080", user_agent="curl/8.5.0",
        headers=(("Accept", "*/*"), ("User-Agent", "curl/8.5.0"), ("X-Request-Id", "1f0c")),
        truncated=False, length=len(REQ))


def test_header_allow_list_and_sensitive_headers() -> None:
    only = parse_http(REQ, header_allow=["x-request-id"])
    assert only.headers == (("X-Request-Id", "1f0c"),)
    assert only.user_agent == "curl/8.5.0"  # the column is filled whatever the allow-list
    everything = parse_http(REQ, header_allow=["*"])
    assert [k for k, _ in everything.headers] == ["Accept", "Host", "User-Agent", "X-Request-Id"]
    named = parse_http(REQ, header_allow=["*", "Authorization"])
    assert ("Authorization", "Bearer secret") in named.headers
    assert parse_http(REQ, header_allow=[]).headers == ()


def test_response_fields() -> None:
    raw = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nnope"
    assert parse_http(raw) == HttpResponse("HTTP/1.1", 503, False, len(raw))
    assert parse_http(b"HTTP/1.0 200 OK\r\n") == HttpResponse("HTTP/1.0", 200, True, None)
    assert parse_http(b"HTTP/1.1 204\r\n\r\n") == HttpResponse("HTTP/1.1", 204, False, 16)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "not_http"),  # TLS ClientHello
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "http2"),
    (b"GET / HTTP/2\r\n", "http2"),
    (b"FETCH /x HTTP/1.1\r\n", "not_http"),
    (b"GET /x SPDY/3\r\n", "bad_version"),
    (b"GET /x\r\n", "bad_version"),
    (b"GET  HTTP/1.1\r\n", "bad_request_line"),
    (b"GET \x00\x01 HTTP/1.1\r\n", "not_http"),
    (b"GET foo HTTP/1.1\r\n", "bad_target"),
    (b"HTTP/1.1 2000 OK\r\n", "bad_status_line"),
    (b"HTTP/1.1 abc OK\r\n", "bad_status_line"),
    (b"HTTP/1.1 099 x\r\n", "bad_status_line"),
    (b"HTTP/9.9 200 OK\r\n", "bad_version"),
    (b"HTTP/1.1 20", "truncated"),
    (b"GE", "truncated"),
    (b"GET ", "truncated"),
])
def test_not_http(data: bytes, reason: str) -> None:
    assert parse_http(data) == ParseError(reason)


def test_absolute_and_authority_targets() -> None:
    assert parse_http(b"GET http://example.com/a HTTP/1.1\r\n\r\n").target == "http://example.com/a"
    connect = parse_http(b"CONNECT billing:443 HTTP/1.1\r\nHost: billing:443\r\n\r\n")
    assert (connect.method, connect.target) == ("CONNECT", "billing:443")
    assert build_url("billing:443", "billing:443", None) == "billing:443"
    assert build_url("http://example.com/a", "other", None) == "http://example.com/a"
    assert build_url("/a?b=1", None, "10.0.0.1:80") == "http://10.0.0.1:80/a?b=1"
    assert build_url("/a", None, None) == "/a"
    assert format_authority("fd00::1", 8080) == "[fd00::1]:8080"
    assert format_authority("10.1.2.3", 9990) == "10.1.2.3:9990"
    assert format_authority(None, 80) is None


def test_canonical_header_key() -> None:
    assert canonical_header_key("x-prometheus-scrape-timeout-seconds") == "X-Prometheus-Scrape-Timeout-Seconds"
    assert canonical_header_key("ACCEPT-encoding") == "Accept-Encoding"


def test_truncation_at_every_length() -> None:
    """Cut anywhere: never raises, keeps the method, and the target is a prefix of the real one."""
    first_line = REQ.index(b"\r\n")
    for n in range(len(REQ) + 1):
        msg = parse_http(REQ[:n])
        if n < 5:  # "GET " plus at least one byte of the target
            assert msg == ParseError("empty" if n == 0 else "truncated"), n
            continue
        assert isinstance(msg, HttpRequest), (n, msg)
        assert msg.method == "GET"
        assert "/products/123?color=red".startswith(msg.target)
        assert msg.truncated == (n < len(REQ))
        assert msg.protocol == ("HTTP/1.1" if n >= first_line else "")
        # Headers appear only once their line is complete.
        for key, value in msg.headers:
            assert f"{key.lower()}: {value}\r\n".encode() in REQ.lower()
        assert (msg.host is not None) == (n >= REQ.index(b"\r\nuser-agent") + 2)
        assert (msg.length is not None) == (n == len(REQ))


def test_response_truncation_at_every_length() -> None:
    resp = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found"
    for n in range(len(resp) + 1):
        msg = parse_http(resp[:n])
        if n < 12:
            assert msg == ParseError("empty" if n == 0 else "truncated"), n
        else:
            assert (msg.protocol, msg.code) == ("HTTP/1.1", 404), n
            header_end = resp.index(b"\r\n\r\n") + 4
            assert msg.truncated == (n < header_end)
            assert msg.length == (len(resp) if n >= header_end else None)


# hypothesis: garbage never raises ---------------------------------------------------------------

_PREFIXES = st.sampled_from([b"", b"GET ", b"POST /", b"HTTP/1.1 ", b"HTTP/1.1 200 ", b"GET / HTTP/1.1\r\n",
                             b"HTTP/1.1 200 OK\r\nContent-Length: ", b"PRI * "])


@settings(max_examples=3000, deadline=None)
@given(_PREFIXES, st.binary(max_size=300))
def test_fuzz_never_raises(prefix: bytes, tail: bytes) -> None:
    data = prefix + tail
    msg = parse_http(data, header_allow=["*"])
    assert isinstance(msg, (HttpRequest, HttpResponse, ParseError))
    assert msg != ParseError("internal")
    msgs = parse_http_messages(data)
    assert 1 <= len(msgs) <= 16 or not data
    assert all(m != ParseError("internal") for m in msgs)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.binary(max_size=80),
                          st.sampled_from([REQ, b"HTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n"])),
                max_size=40),
       st.integers(min_value=1, max_value=4))
def test_fuzz_pairer_never_raises(payloads: list[bytes | None], conns: int) -> None:
    pairer = HttpPairer(max_pending=3, max_connections=2)
    n = len(payloads)
    out = pairer.process(np.arange(n, dtype=np.uint64) % conns, np.arange(n, dtype=np.int64) * 10, payloads,
                         direction=np.arange(n) % 2)
    assert sorted(set(out.row)) == list(range(n))
    out.arrays()
    assert pairer.connections <= 2


# -- real bytes from http.client and http.server --------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if self.path.startswith("/status/"):
            self._reply(404, b'{"error":"unknown payment"}')
        else:
            time.sleep(0.02)  # some server time, so latencies are clearly above zero
            self._reply(200, json.dumps({"path": self.path}).encode())

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        self._reply(503, b'{"error":"denied"}')

    def log_message(self, *args: object) -> None:
        pass


class RecordingRelay(TcpRelay):
    """A TCP relay between a client and a server that records every chunk it forwards.

    Each recv() on either side is one "payload event", like the kernel's
    snippet events: (monotonic ns, direction 0 = client→server / 1 = back, bytes).
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.events: list[tuple[int, int, bytes]] = []
        self.lock = threading.Lock()
        super().__init__(upstream)

    def pump(self, src: socket.socket, dst: socket.socket, direction: int) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            with self.lock:
                self.events.append((time.monotonic_ns(), direction, data))
            dst.sendall(data)

    def close(self) -> None:
        self.listener.close()
        for t in self.threads:
            t.join(5)


@pytest.fixture()
def relay():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rel = RecordingRelay(server.server_address)
    yield rel
    rel.close()
    server.shutdown()
    server.server_close()


def _feed(events: list[tuple[int, int, bytes]], snippet: int, pairer: HttpPairer):
    ts = np.array([e[0] for e in events], dtype=np.int64)
    direction = np.array([e[1] for e in events])
    payloads = [e[2][:snippet] for e in events]
    return pairer.process(np.full(len(events), 7, dtype=np.uint64), ts, payloads, direction=direction,
                          dst_ip=["10.0.1.5"] * len(events), dst_port=np.full(len(events), 8080))


def _rows(out, kind: str) -> list[int]:
    return [j for j, t in enumerate(out.l7_type) if t == kind]


@pytest.mark.parametrize("snippet", [64, 256, 4096])
def test_keepalive_with_http_client(relay: RecordingRelay, snippet: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    conn.request("GET", "/products/123", headers={"User-Agent": "frontend/1.0", "X-Request-Id": "r1"})
    assert conn.getresponse().read() == b'{"path": "/products/123"}'
    conn.request("POST", "/charge", body=b'{"amount": 1000}', headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (503, b'{"error":"denied"}')
    conn.request("GET", "/status/42")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (404, b'{"error":"unknown payment"}')
    conn.close()
    relay.close()

    pairer = HttpPairer()
    out = _feed(relay.events, snippet, pairer)
    reqs, resps = _rows(out, "REQUEST"), _rows(out, "RESPONSE")
    assert [out.http_method[j] for j in reqs] == ["GET", "POST", "GET"]
    host = f"127.0.0.1:{relay.port}"
    if snippet >= 64:
        # http.client sends "Host:" as the first header line; at 64 bytes it may be cut.
        expected_urls = [f"http://{host}/products/123", f"http://{host}/charge", f"http://{host}/status/42"]
        got = [out.http_url[j] for j in reqs]
        for url, exp in zip(got, expected_urls, strict=True):
            assert url in (exp, exp.replace(host, "10.0.1.5:8080")), url
    assert [out.http_code[j] for j in resps] == [200, 503, 404]
    assert [out.http_method[j] for j in resps] == ["GET", "POST", "GET"]
    assert [out.http_url[j] for j in resps] == [out.http_url[j] for j in reqs]
    # latency = kernel-side timestamp of the response event minus that of its request event
    by_row = {j: relay.events[out.row[j]][0] for j in reqs + resps}
    for rq, rs in zip(reqs, resps, strict=True):
        assert out.l7_latency_ns[rs] == by_row[rs] - by_row[rq]
        assert out.server_time_ns[rs] == out.l7_latency_ns[rs]
    assert out.l7_latency_ns[resps[0]] >= 20_000_000  # the handler slept 20 ms
    if snippet == 4096:
        assert out.http_user_agent[reqs[0]] == "frontend/1.0"
        assert {"key": "X-Request-Id", "value": "r1"} in out.http_headers[resps[0]]
    assert pairer.stats.matched == 3
    assert pairer.stats.unmatched_responses == 0
    assert pairer.pending == 0


def test_pipelined_requests(relay: RecordingRelay) -> None:
    sock = socket.create_connection(("127.0.0.1", relay.port))
    sock.sendall(b"GET /a HTTP/1.1\r\nHost: billing\r\n\r\n"
                 b"GET /status/1 HTTP/1.1\r\nHost: billing\r\n\r\n"
                 b"GET /c HTTP/1.1\r\nHost: billing\r\nConnection: close\r\n\r\n")
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    relay.close()
    assert received.count(b"HTTP/1.1 ") == 3

    # The relay's recv() may split the responses anywhere; present them as one segment,
    # as a server that writes them at once would put them on the wire.
    requests = [e for e in relay.events if e[1] == 0]
    responses = [e for e in relay.events if e[1] == 1]
    events = requests + [(responses[0][0], 1, b"".join(e[2] for e in responses))]
    out = _feed(events, 4096, HttpPairer())
    reqs, resps = _rows(out, "REQUEST"), _rows(out, "RESPONSE")
    assert [out.http_url[j] for j in reqs] == ["http://billing/a", "http://billing/status/1", "http://billing/c"]
    assert [out.http_code[j] for j in resps] == [200, 404, 200]
    assert [out.http_url[j] for j in resps] == ["http://billing/a", "http://billing/status/1", "http://billing/c"]
    # the three requests came in one segment: one input row, three output rows
    assert out.row.count(out.row[reqs[0]]) >= 3
    assert out.expanded


def test_fixture_request_headers_match_hubble(fixture_files) -> None:
    """Bytes of the Prometheus scrape in the recording give Hubble's headers and URL."""
    path = next(p for p in fixture_files if p.name == "hubble-otel-basic-sample-5-http-flows.jsonl")
    flow = json.loads(path.read_text().splitlines()[0])["flow"]
    http = flow["l7"]["http"]
    raw = "GET /metrics HTTP/1.1\r\nHost: 10.128.0.4:9990\r\n"
    for h in reversed(http["headers"]):  # wire order differs from Hubble's sorted order
        raw += f"{h['key'].lower()}: {h['value']}\r\n"
    msg = parse_http((raw + "\r\n").encode(), header_allow=["*"])
    headers = [{"key": k, "value": v} for k, v in msg.headers if k != "Host"]
    assert headers == http["headers"]
    assert build_url(msg.target, msg.host, None) == http["url"] == "http://10.128.0.4:9990/metrics"
    assert msg.protocol == http["protocol"]


# -- pairer state ---------------------------------------------------------------------------

def _one(pairer: HttpPairer, conn: int, ts: int, payload: bytes, direction: int):
    return pairer.process(np.array([conn], dtype=np.uint64), np.array([ts]), [payload],
                          direction=np.array([direction]))


def test_unmatched_response_and_interim() -> None:
    pairer = HttpPairer()
    out = _one(pairer, 1, 100, b"HTTP/1.1 200 OK\r\n\r\n", 1)
    assert (out.l7_type, out.http_code, out.l7_latency_ns, out.http_url) == (["RESPONSE"], [200], [None], [None])
    assert pairer.stats.unmatched_responses == 1
    _one(pairer, 1, 1000, b"POST /charge HTTP/1.1\r\nHost: b\r\nExpect: 100-continue\r\n\r\n", 0)
    cont = _one(pairer, 1, 1500, b"HTTP/1.1 100 Continue\r\n\r\n", 1)
    assert cont.l7_latency_ns == [500] and pairer.pending == 1
    final = _one(pairer, 1, 4000, b"HTTP/1.1 201 Created\r\n\r\n", 1)
    assert final.l7_latency_ns == [3000] and final.http_url == ["http://b/charge"]
    assert pairer.pending == 0 and pairer.stats.matched == 1


def test_directions_are_separate_queues() -> None:
    pairer = HttpPairer()
    _one(pairer, 9, 10, b"GET /from-a HTTP/1.1\r\nHost: a\r\n\r\n", 0)
    _one(pairer, 9, 20, b"GET /from-b HTTP/1.1\r\nHost: b\r\n\r\n", 1)
    to_b = _one(pairer, 9, 35, b"HTTP/1.1 200 OK\r\n\r\n", 0)  # answers the request sent by b
    to_a = _one(pairer, 9, 50, b"HTTP/1.1 202 OK\r\n\r\n", 1)
    assert (to_b.http_url, to_b.l7_latency_ns) == (["http://b/from-b"], [15])
    assert (to_a.http_url, to_a.l7_latency_ns) == (["http://a/from-a"], [40])


def test_bounds_ttl_and_close() -> None:
    pairer = HttpPairer(max_pending=2, max_connections=3, ttl_ns=1000)
    for i in range(3):
        _one(pairer, 1, 10 + i, f"GET /{i} HTTP/1.1\r\nHost: h\r\n\r\n".encode(), 0)
    assert pairer.stats.overflow_requests == 1 and pairer.pending == 2
    out = _one(pairer, 1, 20, b"HTTP/1.1 200 OK\r\n\r\n", 1)
    assert out.http_url == ["http://h/1"]  # /0 was pushed out
    for conn in (2, 3, 4):
        _one(pairer, conn, 30, b"GET /x HTTP/1.1\r\n\r\n", 0)
    assert pairer.connections == 3
    assert pairer.stats.evicted_connections == 1 and pairer.stats.evicted_requests == 1  # conn 1 (/2)
    assert pairer.close(np.array([2], dtype=np.uint64)) == 1
    assert pairer.stats.closed_requests == 1
    _one(pairer, 5, 2000, b"GET /late HTTP/1.1\r\n\r\n", 0)  # everything older than 1000 ns expires
    assert pairer.stats.expired_requests == 2
    assert pairer.connections == 1 and pairer.pending == 1


def test_arrays_have_schema_types() -> None:
    pairer = HttpPairer()
    out = pairer.process(np.array([1, 1, 1], dtype=np.uint64), np.array([0, 5, 9]),
                         [REQ, None, b"HTTP/1.1 200 OK\r\n\r\n"], direction=np.array([0, 0, 1]))
    arrays = out.arrays()
    for name, arr in arrays.items():
        assert arr.type == FLOW_SCHEMA.field(name).type, name
        assert len(arr) == 3
    assert arrays["l7_latency_ns"].to_pylist() == [None, None, 9]
    assert arrays["http_code"].type == pa.uint16()
    assert arrays["l7_type"].to_pylist() == ["REQUEST", None, "RESPONSE"]
    assert out.row == [0, 1, 2] and not out.expanded
