"""Prometheus metrics of one flowship process.

One :class:`Metrics` object per process owns a private registry (no global
state), hands components their series, and serves ``/metrics``, ``/healthz``
and ``/readyz``. Series are created on first use and cached by name, so two
components asking for the same series share it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


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

    def serve(self, address: str) -> ThreadingHTTPServer:
        """Serve /metrics, /healthz and /readyz on ``host:port`` in a daemon thread."""
        host, _, port = address.rpartition(":")
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                if self.path.startswith("/metrics"):
                    body, ctype, code = metrics.exposition(), CONTENT_TYPE_LATEST, 200
                elif self.path.startswith("/healthz"):
                    body, ctype, code = b"ok\n", "text/plain", 200
                elif self.path.startswith("/readyz"):
                    ok = metrics.ready()
                    body, ctype, code = (b"ready\n" if ok else b"not ready\n"), "text/plain", 200 if ok else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server
