"""HTTP/1.x parsing of payload snippets and request/response pairing.

The kernel hands user space the first bytes (the *snippet*, a configurable
size) of TCP payloads that may start an L7 message. This module turns those
bytes into the flow schema's HTTP columns:

* :func:`parse_http` — a pure function over bytes: a request line plus headers,
  or a status line. It never raises; anything that is not HTTP/1.x gives a
  :class:`ParseError` with a short reason. A snippet cut anywhere (even inside
  the request line) still yields what is complete: the method and the part of
  the target that arrived, the complete header lines only.
* :class:`HttpPairer` — pairs requests and responses per connection in order
  (HTTP/1.1 keep-alive and pipelining are FIFO), computes
  ``l7_latency_ns = response timestamp - request timestamp`` on the response
  row (as Hubble does) and keeps bounded state.

URLs are written the way Hubble writes them (``http://10.128.0.4:9990/metrics``):
``http://{Host header, else server ip:port}{path?query}``. An absolute-form
target (``GET http://example.com/x``, proxy requests) is kept as sent.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict, deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from flowship.agent.l7_pairing import ParseError, batch_keys, rows_in_order
from flowship.model.schema import FLOW_SCHEMA

# Request methods recognised at the start of a payload. A closed list keeps
# binary protocols that happen to start with letters from being read as HTTP.
METHODS: frozenset[bytes] = frozenset(
    m.encode()
    for m in (
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT", "SEARCH",
        "MKCALENDAR", "PURGE",
    )
)
_MAX_METHOD = max(len(m) for m in METHODS)

# Headers exported by default; ``"*"`` in the allow-list exports every header
# except the credential-bearing ones below, which must be named explicitly.
DEFAULT_HEADER_ALLOW: tuple[str, ...] = (
    "Accept", "Accept-Encoding", "Content-Length", "Content-Type", "User-Agent",
    "X-Forwarded-For", "X-Request-Id", "Traceparent",
)
SENSITIVE_HEADERS: frozenset[str] = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})

# Bytes allowed in a request target (RFC 3986 characters plus the few that
# real clients send unescaped); anything else means "not an HTTP request".
# (checked with bytes.translate, which deletes the allowed bytes in C: anything left is a bad byte)
_TARGET_OK = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
_TOKEN_OK = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    target: str                  # request target as sent (origin or absolute form)
    protocol: str                # "HTTP/1.1"; "" when the request line was cut short
    host: str | None
    user_agent: str | None
    headers: tuple[tuple[str, str], ...]
    truncated: bool              # the snippet ended before the end of the headers
    length: int | None = None    # bytes of the whole message when known (headers + body)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    protocol: str
    code: int
    truncated: bool
    length: int | None = None


@functools.lru_cache(maxsize=4096)
def canonical_header_key(key: str) -> str:
    """``x-request-id`` → ``X-Request-Id`` (the form Hubble prints)."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in key.split("-"))


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _header_filter(allow: Collection[str]) -> tuple[bool, frozenset[str]]:
    return _header_filter_cached(tuple(allow))


@functools.lru_cache(maxsize=64)
def _header_filter_cached(allow: tuple[str, ...]) -> tuple[bool, frozenset[str]]:
    lowered = frozenset(a.lower() for a in allow)
    return "*" in lowered, lowered - {"*"}


def parse_http(data: bytes, header_allow: Collection[str] = DEFAULT_HEADER_ALLOW
               ) -> HttpRequest | HttpResponse | ParseError:
    """Parse the first bytes of an HTTP/1.x message; never raises."""
    try:
        return _parse(bytes(data), 0, _header_filter(header_allow))
    except Exception:  # noqa: BLE001 - a parser over hostile bytes must not take the agent down
        return ParseError("internal")


def parse_http_messages(data: bytes, header_allow: Collection[str] = DEFAULT_HEADER_ALLOW,
                        max_messages: int = 16) -> list[HttpRequest | HttpResponse | ParseError]:
    """Every message that starts inside the snippet (pipelined requests, back-to-back responses).

    Messages are delimited by their headers and Content-Length; reading stops
    at the first message whose end is unknown (chunked, close-delimited, cut)
    or at bytes that are not HTTP. A first message that is not HTTP gives
    ``[ParseError]``; later non-HTTP bytes are body data and end the list.
    """
    out: list[HttpRequest | HttpResponse | ParseError] = []
    try:
        data = bytes(data)
        allow = _header_filter(header_allow)
        pos = 0
        while pos < len(data) and len(out) < max_messages:
            msg = _parse(data, pos, allow)
            if isinstance(msg, ParseError):
                if not out:
                    out.append(msg)
                break
            out.append(msg)
            if msg.length is None:
                break
            pos += msg.length
    except Exception:  # noqa: BLE001 - see parse_http
        return out or [ParseError("internal")]
    return out


def _parse(data: bytes, start: int, allow: tuple[bool, frozenset[str]]
           ) -> HttpRequest | HttpResponse | ParseError:
    if start >= len(data):
        return ParseError("empty")
    if data.startswith(b"HTTP/", start):
        return _parse_response(data, start)
    if data.startswith(b"PRI * HTTP/2", start):
        return ParseError("http2")
    space = data.find(b" ", start, start + _MAX_METHOD + 1)
    if space <= start:
        rest = data[start:]
        if len(rest) <= _MAX_METHOD and (b"HTTP/".startswith(rest) or any(m.startswith(rest) for m in METHODS)):
            return ParseError("truncated")
        return ParseError("not_http")
    method = data[start:space]
    if method not in METHODS:
        return ParseError("not_http")
    return _parse_request(data, start, method, space, allow)


def _line_end(data: bytes, start: int) -> tuple[int, int]:
    """(end of line content, start of next line) or (-1, -1) when the line is cut."""
    nl = data.find(b"\n", start)
    if nl < 0:
        return -1, -1
    end = nl - 1 if nl > start and data[nl - 1] == 0x0D else nl
    return end, nl + 1


class _Headers(NamedTuple):
    fields: list[tuple[str, str, str]]  # (lower-case name, name as sent, value)
    end: int                            # offset just after the blank line, -1 if cut


def _read_headers(data: bytes, pos: int) -> _Headers:
    blank = data.find(b"\r\n\r\n", pos - 2) if pos >= 2 else -1
    if blank >= pos - 2 and b"\n" not in data[pos:blank].replace(b"\r\n", b""):
        # The common case, a complete CRLF header section: split it in one go.
        if blank < pos:
            return _Headers([], pos + 2)
        fields = []
        for line in data[pos:blank].split(b"\r\n"):
            parsed = _header_line(line)
            if parsed is None:
                if line[:1] in (b" ", b"\t"):
                    continue
                return _Headers(fields, -1)
            fields.append(parsed)
        return _Headers(fields, blank + 4)
    fields = []
    while True:
        end, nxt = _line_end(data, pos)
        if end < 0:
            return _Headers(fields, -1)
        if end == pos:
            return _Headers(fields, nxt)  # blank line: end of the header section
        line = data[pos:end]
        pos = nxt
        parsed = _header_line(line)
        if parsed is None:
            if line[:1] in (b" ", b"\t"):
                continue  # obsolete line folding: ignore the continuation
            return _Headers(fields, -1)  # not a header line: keep what was read, end unknown
        fields.append(parsed)


def _header_line(line: bytes) -> tuple[str, str, str] | None:
    colon = line.find(b":")
    if colon <= 0:
        return None
    name = line[:colon]
    if name.translate(None, _TOKEN_OK):
        return None
    key = name.decode("latin-1")
    return key.lower(), key, _text(line[colon + 1:].strip(b" \t"))


def _body_length(fields: list[tuple[str, str, str]], default: int | None) -> int | None:
    """Content-Length if the framing is that simple, ``default`` when no body header is present."""
    length = default
    for lower, _, value in fields:
        if lower == "transfer-encoding":
            return None
        if lower == "content-length":
            if not value.isdigit():
                return None
            length = int(value)
    return length


def _parse_request(data: bytes, start: int, method: bytes, space: int,
                   allow: tuple[bool, frozenset[str]]) -> HttpRequest | ParseError:
    end, nxt = _line_end(data, space + 1)
    line_cut = end < 0
    rest = data[space + 1:] if line_cut else data[space + 1:end]
    target, sep, version = rest.partition(b" ")
    if not target:
        return ParseError("truncated" if line_cut else "bad_request_line")
    if target.translate(None, _TARGET_OK):
        return ParseError("not_http")
    if not (target[:1] in (b"/", b"*") or target[:7].lower() == b"http://"[: len(target[:7])]
            or target[:8].lower() == b"https://"[: len(target[:8])] or method == b"CONNECT"):
        return ParseError("bad_target")
    protocol = ""
    if sep:
        if line_cut:
            # "HTTP/1.1" cut short: keep it only if it is whole.
            version = version.rstrip(b"\r")
            protocol = version.decode("latin-1") if version in (b"HTTP/1.0", b"HTTP/1.1") else ""
            if version and not b"HTTP/1.1".startswith(version) and not b"HTTP/1.0".startswith(version):
                return ParseError("bad_version")
        elif version in (b"HTTP/1.0", b"HTTP/1.1"):
            protocol = version.decode("latin-1")
        elif version.startswith(b"HTTP/2") or version.startswith(b"HTTP/3"):
            return ParseError("http2")
        else:
            return ParseError("bad_version")
    elif not line_cut:
        # "GET /path" with no version: HTTP/0.9, not something we export.
        return ParseError("bad_version")

    host = user_agent = None
    headers: list[tuple[str, str]] = []
    length = None
    truncated = True
    if not line_cut:
        allow_all, allowed = allow
        fields, hdr_end = _read_headers(data, nxt)
        for lower, key, value in fields:
            if lower == "host" and host is None:
                host = value
            elif lower == "user-agent" and user_agent is None:
                user_agent = value
            if lower in allowed or (allow_all and lower not in SENSITIVE_HEADERS):
                headers.append((canonical_header_key(key), value))
        if hdr_end >= 0:
            truncated = False
            body = _body_length(fields, 0)
            length = None if body is None else hdr_end - start + body
    return HttpRequest(_text(method), _text(target), protocol, host, user_agent, _sorted(headers), truncated,
                       length)


def _sorted(headers: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    # Hubble lists headers sorted by canonical key (values keep their order).
    return tuple(sorted(headers, key=lambda kv: kv[0]))


def _parse_response(data: bytes, start: int) -> HttpResponse | ParseError:
    # "HTTP/1.1 200 OK": the protocol and three digits are all that is needed.
    head = data[start:start + 13]
    if len(head) < 12:
        return ParseError("truncated")
    version = head[:8]
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        return ParseError("http2" if version.startswith((b"HTTP/2", b"HTTP/3")) else "bad_version")
    code = head[9:12]
    if head[8:9] != b" " or not code.isdigit() or code[:1] == b"0":
        return ParseError("bad_status_line")
    if len(head) > 12 and head[12:13] not in (b" ", b"\r", b"\n"):
        return ParseError("bad_status_line")
    status = int(code)
    end, nxt = _line_end(data, start + 12)
    if end < 0:
        return HttpResponse(version.decode("latin-1"), status, True)
    fields, hdr_end = _read_headers(data, nxt)
    if hdr_end < 0:
        return HttpResponse(version.decode("latin-1"), status, True)
    no_body = 100 <= status < 200 or status in (204, 304)
    body = 0 if no_body else _body_length(fields, None)
    length = None if body is None else hdr_end - start + body
    return HttpResponse(version.decode("latin-1"), status, False, length)


def format_authority(ip: str | None, port: int | None) -> str | None:
    """``10.0.0.1:80`` / ``[fd00::1]:80``: the URL authority when no Host header was seen."""
    if not ip:
        return None
    try:
        is_v6 = ipaddress.ip_address(ip).version == 6
    except ValueError:
        is_v6 = ":" in ip
    host = f"[{ip}]" if is_v6 else ip
    return f"{host}:{port}" if port else host


def build_url(target: str, host: str | None, fallback_authority: str | None) -> str:
    """The Hubble-style URL: ``http://{host}{path}``; absolute targets as sent."""
    lower = target[:8].lower()
    if lower.startswith("http://") or lower.startswith("https://"):
        return target
    if not target.startswith("/"):
        return target  # authority form (CONNECT host:port) or "*"
    authority = host or fallback_authority
    return f"http://{authority}{target}" if authority else target


# ---------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------

@dataclass
class PairerStats:
    """Counters of a pairer, for the agent's metrics."""

    requests: int = 0
    responses: int = 0
    matched: int = 0
    unmatched_responses: int = 0   # a response with no pending request on its connection
    expired_requests: int = 0      # pending longer than the TTL
    overflow_requests: int = 0     # dropped because a connection had max_pending waiting
    evicted_connections: int = 0   # connections dropped to stay under max_connections
    evicted_requests: int = 0      # requests pending on those connections
    closed_requests: int = 0       # pending when the connection was closed
    parse_errors: dict[str, int] = field(default_factory=dict)


class _Pending(NamedTuple):
    ts: int
    method: str
    url: str
    protocol: str
    user_agent: str | None
    headers: tuple[tuple[str, str], ...]


@dataclass
class HttpColumns:
    """Output columns; ``row[j]`` is the input row output row ``j`` came from.

    Normally one output row per input row (``row == range(n)``) and rows that
    are not HTTP hold None. A snippet holding several messages (pipelined
    requests) gives several consecutive output rows with the same ``row``;
    the caller then repeats its other columns with ``batch.take(row)``.
    """

    row: list[int]
    http_method: list[str | None]
    http_url: list[str | None]
    http_code: list[int | None]
    http_protocol: list[str | None]
    http_user_agent: list[str | None]
    http_headers: list[list[dict[str, str]] | None]
    l7_type: list[str | None]
    l7_latency_ns: list[int | None]
    server_time_ns: list[int | None]
    parse_error: list[str | None]

    COLUMNS = ("http_method", "http_url", "http_code", "http_protocol", "http_user_agent", "http_headers",
               "l7_type", "l7_latency_ns", "server_time_ns")

    @classmethod
    def empty(cls) -> HttpColumns:
        return cls(*([] for _ in range(11)))

    @property
    def expanded(self) -> bool:
        """True when some input row produced more than one output row."""
        return len(self.row) != (self.row[-1] + 1 if self.row else 0)

    def _append(self, row: int) -> int:
        self.row.append(row)
        for name in (*self.COLUMNS, "parse_error"):
            getattr(self, name).append(None)
        return len(self.row) - 1

    def arrays(self) -> dict[str, pa.Array]:
        """Arrow arrays typed as the flow schema's columns of the same names."""
        return {name: pa.array(getattr(self, name), type=FLOW_SCHEMA.field(name).type) for name in self.COLUMNS}


class HttpPairer:
    """Pairs HTTP requests with responses per connection, in order, with bounded state.

    State is a FIFO of pending requests per (connection key, request direction);
    a response pops the oldest request of its connection's opposite direction.
    Interim ``1xx`` responses (except ``101``) report latency without consuming
    the request. Pending requests expire after ``ttl_ns`` of connection
    inactivity; connections beyond ``max_connections`` are dropped oldest-first.
    """

    def __init__(self, *, max_pending: int = 64, max_connections: int = 65536,
                 ttl_ns: int = 120_000_000_000, header_allow: Collection[str] = DEFAULT_HEADER_ALLOW) -> None:
        self.max_pending = max_pending
        self.max_connections = max_connections
        self.ttl_ns = ttl_ns
        self.header_allow = tuple(header_allow)
        self.stats = PairerStats()
        # (conn key, direction) -> (last activity ns, pending requests); ordered by last activity.
        self._conns: OrderedDict[tuple[int, int], tuple[int, deque[_Pending]]] = OrderedDict()

    @property
    def pending(self) -> int:
        return sum(len(q) for _, q in self._conns.values())

    @property
    def connections(self) -> int:
        return len(self._conns)

    def process(self, conn: np.ndarray, ts_ns: np.ndarray, payloads: Sequence[bytes | None], *,
                direction: np.ndarray | None = None, dst_ip: Sequence[str | None] | None = None,
                dst_port: np.ndarray | None = None) -> HttpColumns:
        """Parse and pair one batch of rows (in capture order).

        ``conn``: connection keys (``flowship.model.ids.connection_hashes``),
        ``ts_ns``: kernel timestamps, ``payloads``: snippet bytes or None,
        ``direction``: 0/1 per row (which side sent it; requests and their
        responses travel in opposite directions), ``dst_ip``/``dst_port``: the
        receiver, used for the URL when a request has no Host header.
        """
        out = HttpColumns.empty()
        conn_l, ts_l = batch_keys(conn, ts_ns)
        dir_l = np.asarray(direction, dtype=np.int64).tolist() if direction is not None else None
        port_l = np.asarray(dst_port, dtype=np.int64).tolist() if dst_port is not None else None
        errors = self.stats.parse_errors
        for i in rows_in_order(len(payloads), ts_l, self.expire):
            payload = payloads[i]
            if not payload:
                out._append(i)
                continue
            d = dir_l[i] if dir_l is not None else 0
            for msg in parse_http_messages(payload, self.header_allow):
                j = out._append(i)
                if isinstance(msg, ParseError):
                    out.parse_error[j] = msg.reason
                    errors[msg.reason] = errors.get(msg.reason, 0) + 1
                elif isinstance(msg, HttpRequest):
                    authority = format_authority(dst_ip[i] if dst_ip is not None else None,
                                                 port_l[i] if port_l is not None else None)
                    url = build_url(msg.target, msg.host, authority)
                    pend = _Pending(ts_l[i], msg.method, url, msg.protocol, msg.user_agent, msg.headers)
                    self._push((conn_l[i], d), pend)
                    self.stats.requests += 1
                    out.l7_type[j] = "REQUEST"
                    out.http_method[j] = msg.method
                    out.http_url[j] = url
                    out.http_protocol[j] = msg.protocol or None
                    out.http_user_agent[j] = msg.user_agent
                    out.http_headers[j] = [{"key": k, "value": v} for k, v in msg.headers]
                else:
                    self._respond(out, j, msg, (conn_l[i], d ^ 1 if dir_l is not None else 0), ts_l[i])
        return out

    def _respond(self, out: HttpColumns, j: int, msg: HttpResponse, key: tuple[int, int], ts: int) -> None:
        self.stats.responses += 1
        final = not (100 <= msg.code < 200) or msg.code == 101
        req = self._pop(key, consume=final)
        out.l7_type[j] = "RESPONSE"
        out.http_code[j] = msg.code
        out.http_protocol[j] = msg.protocol
        if req is None:
            self.stats.unmatched_responses += 1
            return
        if final:
            self.stats.matched += 1
        latency = max(0, ts - req.ts)
        out.l7_latency_ns[j] = latency
        out.server_time_ns[j] = latency
        out.http_method[j] = req.method
        out.http_url[j] = req.url
        out.http_user_agent[j] = req.user_agent
        out.http_headers[j] = [{"key": k, "value": v} for k, v in req.headers]

    def _push(self, key: tuple[int, int], pend: _Pending) -> None:
        entry = self._conns.pop(key, None)
        queue = entry[1] if entry is not None else deque()
        if len(queue) >= self.max_pending:
            queue.popleft()
            self.stats.overflow_requests += 1
        queue.append(pend)
        self._conns[key] = (pend.ts, queue)
        while len(self._conns) > self.max_connections:
            _, (_, dropped) = self._conns.popitem(last=False)
            self.stats.evicted_connections += 1
            self.stats.evicted_requests += len(dropped)

    def _pop(self, key: tuple[int, int], consume: bool) -> _Pending | None:
        entry = self._conns.get(key)
        if entry is None:
            return None
        _, queue = entry
        if not consume:
            return queue[0]
        req = queue.popleft()
        if not queue:
            del self._conns[key]
        return req

    def expire(self, now_ns: int) -> int:
        """Drop connections idle for longer than the TTL; returns requests dropped."""
        dropped = 0
        limit = now_ns - self.ttl_ns
        while self._conns:
            key, (last, queue) = next(iter(self._conns.items()))
            if last >= limit:
                break
            del self._conns[key]
            dropped += len(queue)
        self.stats.expired_requests += dropped
        return dropped

    def close(self, conn_keys: Sequence[int] | np.ndarray) -> int:
        """Forget closed connections (both directions); returns requests left unanswered."""
        dropped = 0
        for key in np.asarray(conn_keys, dtype=np.uint64).tolist():
            for d in (0, 1):
                entry = self._conns.pop((key, d), None)
                if entry is not None:
                    dropped += len(entry[1])
        self.stats.closed_requests += dropped
        return dropped
