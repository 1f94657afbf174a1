"""Prometheus metrics of one flowship process.

One :class:`Metrics` object per process owns a private registry (no global
state), hands components their series, and serves ``/metrics``, ``/healthz``
and ``/readyz``. Series are created on first use and cached by name, so two
components asking for the same series share it.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# No ``*_created`` series: Cilium's Go client does not write them, and they double every counter's series count.
disable_created_metrics()


class Metrics:
    """Factory and registry of the process's series."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._series: dict[str, object] = {}
        self._lock = threading.Lock()
        self.ready: Callable[[], bool] = lambda: True

    def _get(self, kind: type, name: str, doc: str, labels: Sequence[str], **kw: object):
        with self._lock:
            series = self._series.get(name)
            if series is None:
                series = kind(name, doc, list(labels), registry=self.registry, **kw)
                self._series[name] = series
            return series

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return self._get(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return self._get(Gauge, name, doc, labels)

    def histogram(self, name: str, doc: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] | None = None) -> Histogram:
        kw = {"buckets": buckets} if buckets else {}
        return self._get(Histogram, name, doc, labels, **kw)

    # The series every component family shares -------------------------------------------
    def flows_in(self, source: str) -> Counter:
        return self.counter("flowship_flows_in_total", "Flows read by a source.", ["source"]).labels(source)

    def rejected(self, source: str, reason: str) -> Counter:
        return self.counter("flowship_source_rejected_total",
                            "Input records a source could not decode, by reason.",
                            ["source", "reason"]).labels(source, reason)

    def lost_events(self, source: str, lost_source: str) -> Counter:
        return self.counter("flowship_lost_events_total",
                            "Events lost upstream (Hubble LostEvent or kernel ring buffer), by where.",
                            ["source", "lost_source"]).labels(source, lost_source)

    def record_lost(self, source: str, lost_source: str, count: int) -> None:
        """Events lost upstream: flowship's series and Hubble's hubble_lost_events_total."""
        self.lost_events(source, lost_source).inc(count)
        self.counter("hubble_lost_events_total", "Number of lost events", ["source"]).labels(lost_source).inc(count)

    def stage_dropped(self, stage: str, reason: str) -> Counter:
        return self.counter("flowship_stage_dropped_total",
                            "Flows a stage removed on purpose, by stage and rule.",
                            ["stage", "reason"]).labels(stage, reason)

    def flows_out(self, sink: str) -> Counter:
        return self.counter("flowship_sink_flows_total",
                            "Rows a sink delivered and acknowledged.", ["sink"]).labels(sink)

    def sink_batches(self, sink: str, outcome: str) -> Counter:
        return self.counter("flowship_sink_batches_total", "Sink requests or files, by outcome.",
                            ["sink", "outcome"]).labels(sink, outcome)

    def sink_bytes(self, sink: str) -> Counter:
        return self.counter("flowship_sink_bytes_total", "Bytes a sink wrote or sent.",
                            ["sink"]).labels(sink)

    def sink_errors(self, sink: str, kind: str) -> Counter:
        return self.counter("flowship_sink_errors_total", "Sink errors, by kind (retried or not).",
                            ["sink", "kind"]).labels(sink, kind)

    def dead_letters(self, sink: str, reason: str) -> Counter:
        return self.counter("flowship_sink_dead_letter_total",
                            "Rows a sink gave up on and wrote to its dead-letter file.",
                            ["sink", "reason"]).labels(sink, reason)

    def sink_latency(self, sink: str) -> Histogram:
        return self.histogram("flowship_sink_request_seconds", "Duration of sink requests or writes.",
                              ["sink"]).labels(sink)

    def queue_depth(self, queue: str) -> Gauge:
        return self.gauge("flowship_queue_depth_batches", "Batches waiting in a bounded queue.",
                          ["queue"]).labels(queue)

    def queue_capacity(self, queue: str) -> Gauge:
        return self.gauge("flowship_queue_capacity_batches", "Capacity of a bounded queue.",
                          ["queue"]).labels(queue)

    def value(self, name: str, **labels: str) -> float:
        """Sum of a series' samples matching ``labels`` (for summaries and tests)."""
        total = 0.0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name != name:
                    continue
                if all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, address: str, **limits: float) -> MetricsServer:
        """Serve /metrics, /healthz and /readyz on ``host:port`` (see :class:`MetricsServer`)."""
        host, port = parse_listen_address(address)
        server = MetricsServer(self, host, port, **limits)
        server.start()
        return server

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of ``path``."""
        if path.startswith("/metrics"):
            return 200, CONTENT_TYPE_LATEST, self.exposition()
        if path.startswith("/healthz"):
            return 200, "text/plain", b"ok\n"
        if path.startswith("/readyz"):
            ok = self.ready()
            return (200, "text/plain", b"ready\n") if ok else (503, "text/plain", b"not ready\n")
        return 404, "text/plain", b"not found\n"


def parse_listen_address(address: str) -> tuple[str, int]:
    """(host, port) of ``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (every interface); ValueError says why.

    An IPv6 address needs its brackets, as in a URL: ``::1:9966`` could be read two ways.
    """
    text = str(address).strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [IPv6]:PORT, got {address!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected HOST:PORT (for example 127.0.0.1:9966), got {address!r}: no port")
        if ":" in host:
            raise ValueError(f"expected HOST:PORT, got {address!r}: write an IPv6 address in brackets, "
                             f"as in [{host}]:{port_text}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port number 0-65535, got {address!r}")
    return host or "0.0.0.0", int(port_text)


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class _Conn:
    __slots__ = ("writer", "waiting")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.waiting = True  # waiting for a request (evictable), not answering one


class MetricsServer:
    """A small HTTP/1.1 server on one event-loop thread: idle connections cost a socket, not a thread.

    Bounded everywhere: a connection must send a complete request head within ``request_timeout`` (also
    between keep-alive requests) and take a response within ``write_timeout``; heads are limited to
    ``max_head_bytes``; at most ``max_connections`` are open, and a new connection beyond that closes the
    oldest one that is only waiting, so a scrape still gets in while idle sockets pile up. The kernel
    queues at most ``backlog`` connections not yet accepted. Bodies are built on a two-thread pool so a
    slow collection never stalls accepting.
    """

    def __init__(self, metrics: Metrics, host: str, port: int, *, max_connections: int = 256,
                 request_timeout: float = 10.0, write_timeout: float = 10.0, backlog: int = 512,
                 max_head_bytes: int = 8192) -> None:
        self.metrics = metrics
        self.host, self.port = host, port
        self.max_connections = int(max_connections)
        self.request_timeout = float(request_timeout)
        self.write_timeout = float(write_timeout)
        self.backlog = int(backlog)
        self.max_head_bytes = int(max_head_bytes)
        self.server_address: tuple[str, int] = (host, port)
        self._conns: dict[asyncio.Task, _Conn] = {}  # insertion order: oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="metrics-body")
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: OSError | None = None
        self.evicted = 0

    @property
    def connections(self) -> int:
        return len(self._conns)

    def start(self) -> None:
        """Bind (an OSError names the address) and serve in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            exc = self._error
            reason = ("the address is already in use by another process" if exc.errno == errno.EADDRINUSE
                      else exc.strerror or str(exc))
            raise OSError(exc.errno, f"metrics: cannot listen on {format_address(self.host, self.port)}: {reason}") \
                from exc

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            self._server = loop.run_until_complete(asyncio.start_server(
                self._handle, self.host, self.port, backlog=self.backlog, limit=self.max_head_bytes,
                reuse_address=True))
        except OSError as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self.server_address = self._server.sockets[0].getsockname()[:2]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def shutdown(self) -> None:
        """Stop accepting, close every connection, end the thread."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            return

        def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._conns):
                task.cancel()
            loop.call_later(0.05, loop.stop)

        loop.call_soon_threadsafe(stop)
        self._thread.join(5)
        self._pool.shutdown(wait=False)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= self.max_connections:
            victim = next((t for t, c in self._conns.items() if c.waiting), None)
            if victim is None:  # every connection is being answered: this one waits its turn elsewhere
                writer.transport.abort()
                self.evicted += 1
                return
            self._conns.pop(victim).writer.transport.abort()
            self.evicted += 1
        conn = self._conns[task] = _Conn(writer)
        try:
            while True:
                conn.waiting = True
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.request_timeout)
                except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return  # idle too long, closed by the client, or a head too large: just close
                conn.waiting = False
                keep_alive = await self._respond(head, writer)
                if not keep_alive:
                    return
        except (TimeoutError, ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._conns.pop(task, None)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a client that does not read its answer: drop it now
            else:
                writer.close()

    async def _respond(self, head: bytes, writer: asyncio.StreamWriter) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            code, ctype, body, keep_alive = 400, "text/plain", b"bad request\n", False
        elif parts[0] not in ("GET", "HEAD"):
            code, ctype, body, keep_alive = 405, "text/plain", b"method not allowed\n", False
        else:
            loop = asyncio.get_running_loop()
            code, ctype, body = await loop.run_in_executor(self._pool, self.metrics.answer, parts[1])
            connection = headers.get("connection", "").lower()
            keep_alive = connection != "close" if parts[2] == "HTTP/1.1" else connection == "keep-alive"
        head_out = (f"HTTP/1.1 {code} {_REASONS.get(code, '')}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}"
                    "\r\n\r\n").encode()
        writer.write(head_out if parts[0] == "HEAD" else head_out + body)
        await asyncio.wait_for(writer.drain(), self.write_timeout)
        return keep_alive
