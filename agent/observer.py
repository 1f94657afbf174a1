"""A Hubble-compatible Observer gRPC server over the agent's recent flows.

``hubble observe --server unix:///run/flowship/hubble.sock`` (the private
default), Hubble Relay over mTLS, Hubble UI's backend and flowship's own
``hubble`` source can read a flowship agent as they read a Cilium node:
``GetFlows`` (number/first/follow/since/until, whitelist and blacklist
FlowFilters, field_mask), ``ServerStatus``, ``GetNodes`` and ``GetNamespaces``
of service ``observer.Observer``.

The ring keeps the most recent ``max_flows`` flows (4095 by default, like
Hubble) as Arrow record batches, not messages: filters and time bounds are
evaluated on columns (``flowship.model.flowfilter.compile_filter_set``), and a
batch is converted to ``flow.Flow`` messages once, when a reader first needs
it. Memory stays bounded by the ring capacity plus one published batch. A
follower that reads slower than flows arrive is overtaken by the ring; it is
then told how many flows it missed with a ``LostEvent`` from
``HUBBLE_RING_BUFFER`` (at most one per ``lost_event_interval``), as Hubble does.

Every GetFlows stream holds a worker thread, so streams are counted per client
and in total and refused with RESOURCE_EXHAUSTED beyond ``max_streams_per_client``
/ ``max_streams``; ``max_workers`` exceeds ``max_streams`` so that unary calls
always find a thread. The agent feeds the ring through :class:`ObserverSink`,
after the pipeline's shared stages.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import structlog

from flowship.components import Context, Sink
from flowship.config import Duration
from flowship.metrics import Metrics
from flowship.observer_server import (
    VERSION,
    FlowRequest,
    ObserverTLSConfig,
    address_problems,
    client_id,
    flow_response,
    health_handler,
    is_private,
    listen,
    new_grpc_server,
    observer_handler,
    unix_path,
)
from flowship.pipeline.envelope import Envelope
from flowship.proto.flow import flow_pb2
from flowship.proto.observer import observer_pb2, observer_pb2_grpc

__all__ = ["DEFAULT_ADDRESS", "VERSION", "FlowRing", "ObserverConfig", "ObserverServer", "ObserverSink",
           "ObserverTLSConfig", "is_private", "unix_path"]

_LOST_SOURCE = flow_pb2.LostEventSource.Value("HUBBLE_RING_BUFFER")
_NAMESPACE_TTL_NS = 3600 * 10**9  # Hubble forgets namespaces not seen for an hour


# Private by default, like Hubble's own local socket (/var/run/cilium/hubble.sock): no TCP port, so
# nothing collides with Cilium's Hubble server (4244), Relay (4245) or metrics (9962-9965) on a node that
# runs both with hostNetwork, and file permissions (0600, in a 0700 directory) decide who reads flows.
DEFAULT_ADDRESS = "unix:///run/flowship/hubble.sock"


@dataclass
class ObserverConfig:
    """``observer:`` in the agent's config (and the ``observer`` sink's keys)."""

    enabled: bool = True
    address: str = DEFAULT_ADDRESS         # unix:PATH, 127.0.0.1:PORT, or host:PORT with mTLS
    max_flows: int = 4095                  # ring capacity: 2^n - 1, at most 65535 (as Hubble)
    tls: ObserverTLSConfig | None = None
    allow_unauthenticated: bool = False    # serve a non-loopback address without client certificates
    max_workers: int = 72                  # RPC threads (made on demand); streams hold at most max_streams
    max_streams: int = 64                  # open GetFlows streams, all clients together
    max_streams_per_client: int = 8        # ... per client (certificate CN, else peer address)
    keepalive: Duration = Duration(60.0)   # ping idle connections this often ...
    keepalive_timeout: Duration = Duration(20.0)  # ... and drop them (freeing their streams) when unanswered
    lost_event_interval: Duration = Duration(1.0)
    follow_poll: Duration = Duration(0.5)  # how often an idle follower checks its client is still there
    server_name: str | None = None         # reported in GetNodes' TLS info

    def validate(self) -> list[str]:
        problems = []
        if not (0 < self.max_flows <= 65535 and (self.max_flows + 1) & self.max_flows == 0):
            problems.append(f"max_flows: expected 2^n-1 between 1 and 65535 (e.g. 4095), got {self.max_flows}")
        problems.extend(address_problems(self.address, self.tls, self.allow_unauthenticated, self.enabled))
        if self.max_streams < 1:
            problems.append(f"max_streams: expected at least 1, got {self.max_streams}")
        if self.max_streams_per_client < 1:
            problems.append(f"max_streams_per_client: expected at least 1, got {self.max_streams_per_client}")
        if self.max_workers < self.max_streams + 2:
            problems.append(f"max_workers: expected at least max_streams + 2 ({self.max_streams + 2}) so that "
                            f"ServerStatus and other short calls always find a thread, got {self.max_workers}")
        return problems


# ---------------------------------------------------------------------------------------------
# The ring
# ---------------------------------------------------------------------------------------------

class _Entry:
    """One published batch (or its newest part) with the sequence number of its first row."""

    __slots__ = ("start", "batch", "times", "_messages", "_encoded", "_lock")

    def __init__(self, start: int, batch: pa.RecordBatch) -> None:
        self.start = start
        self.batch = batch
        self.times = batch.column("time").cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        self._messages: list[flow_pb2.Flow] | None = None
        self._encoded: list[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def end(self) -> int:
        return self.start + self.batch.num_rows

    def view(self) -> tuple[int, pa.RecordBatch, np.ndarray]:
        """(first sequence number, rows, times), consistent with each other."""
        with self._lock:
            return self.start, self.batch, self.times

    def messages(self) -> tuple[int, list[flow_pb2.Flow]]:
        """(first sequence number, one Flow per row), converted on first use."""
        with self._lock:
            if self._messages is None:
                from flowship.model.proto import to_flow_messages

                self._messages = to_flow_messages(self.batch)
            return self.start, self._messages

    def encoded(self, node_name: str) -> tuple[int, list[bytes]]:
        """(first sequence number, one serialized GetFlowsResponse per row), built once.

        Readers without a field mask are sent these bytes as they are, so a
        flow is converted and serialized once however many clients read it.
        """
        start, messages = self.messages()
        with self._lock:
            if self._encoded is None or len(self._encoded) != len(messages):
                self._encoded = [flow_response(m, node_name).SerializeToString() for m in messages]
            return self.start, self._encoded

    def drop_front(self, n: int) -> None:
        """Forget the ``n`` oldest rows; copy when most of the buffers would be dead weight."""
        with self._lock:
            keep = self.batch.num_rows - n
            compact = keep * 2 < self.batch.num_rows
            sliced = self.batch.slice(n)
            self.batch = sliced.take(pa.array(np.arange(keep))) if compact else sliced
            self.times = self.times[n:].copy() if compact else self.times[n:]
            if self._messages is not None:
                self._messages = self._messages[n:]
            if self._encoded is not None:
                self._encoded = self._encoded[n:]
            self.start += n


class FlowRing:
    """The last ``capacity`` flows, by sequence number; publishers wake followers."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: deque[_Entry] = deque()
        self.next_seq = 0          # = flows ever published (seen_flows)
        self.size = 0
        self.cond = threading.Condition()
        self.closed = False

    @property
    def oldest_seq(self) -> int:
        return self.next_seq - self.size

    def publish(self, batch: pa.RecordBatch) -> None:
        n = batch.num_rows
        if n == 0:
            return
        with self.cond:
            if n > self.capacity:
                # rows that would be overwritten at once still count as seen
                skipped = n - self.capacity
                self.next_seq += skipped
                batch = batch.slice(skipped).take(pa.array(np.arange(self.capacity)))
                n = self.capacity
            self.entries.append(_Entry(self.next_seq, batch))
            self.next_seq += n
            self.size += n
            while self.size > self.capacity:
                oldest = self.entries[0]
                excess = self.size - self.capacity
                if oldest.batch.num_rows <= excess:
                    self.entries.popleft()
                    self.size -= oldest.batch.num_rows
                else:
                    oldest.drop_front(excess)
                    self.size -= excess
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def snapshot(self) -> tuple[list[_Entry], int]:
        with self.cond:
            return list(self.entries), self.next_seq

    def ranges(self, start: int) -> tuple[list[tuple[_Entry, int, int]], int, int]:
        """Entries holding sequence numbers >= start, the count of those already gone, the end."""
        with self.cond:
            lost = max(0, self.oldest_seq - start)
            start = max(start, self.oldest_seq)
            out = [(entry, start, entry.end) for entry in self.entries if entry.end > start]
            return out, lost, self.next_seq


# ---------------------------------------------------------------------------------------------
# Request evaluation
# ---------------------------------------------------------------------------------------------

class _Query(FlowRequest):
    """A compiled GetFlowsRequest evaluated on the ring's entries."""

    def seqs(self, entry: _Entry, lo_seq: int, hi_seq: int) -> np.ndarray:
        """Sequence numbers in [lo_seq, hi_seq) of the entry that pass time bounds and filters."""
        start, batch, times = entry.view()
        lo = max(0, lo_seq - start)
        hi = min(batch.num_rows, hi_seq - start)
        if hi <= lo:
            return np.empty(0, dtype=np.int64)
        part_times = times[lo:hi]
        keep = np.ones(hi - lo, dtype=bool)
        if self.since is not None:
            keep &= part_times >= self.since
        if self.until is not None:
            keep &= part_times <= self.until
        if self.filters is not None and keep.any():
            keep &= self.filters.mask(batch.slice(lo, hi - lo))
        return np.flatnonzero(keep) + lo + start

    def past_until(self, entry: _Entry, hi_seq: int) -> bool:
        """True once the stream reached a flow later than ``until``."""
        if self.until is None:
            return False
        start, _, times = entry.view()
        idx = min(len(times), hi_seq - start) - 1
        return idx >= 0 and times[idx] > self.until


# ---------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------

class _Servicer(observer_pb2_grpc.ObserverServicer):
    def __init__(self, server: ObserverServer) -> None:
        self.s = server

    def GetFlows(self, request, context) -> Iterator[bytes]:  # noqa: N802 - gRPC naming
        try:
            query = _Query(request, self.s.node_name)
        except ValueError as exc:  # FilterError is a ValueError too
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        client = client_id(context)
        refused = self.s._admit(client)
        if refused:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        try:
            yield from self.s._get_flows(request, query, context)
        finally:
            self.s._release(client)

    def ServerStatus(self, request, context) -> observer_pb2.ServerStatusResponse:  # noqa: N802
        return self.s.status()

    def GetNodes(self, request, context) -> observer_pb2.GetNodesResponse:  # noqa: N802
        return observer_pb2.GetNodesResponse(nodes=[self.s.node()])

    def GetNamespaces(self, request, context) -> observer_pb2.GetNamespacesResponse:  # noqa: N802
        return observer_pb2.GetNamespacesResponse(namespaces=self.s.namespaces())


class ObserverServer:
    """Serves the ring over gRPC. ``publish`` is called by the agent with every flow batch."""

    def __init__(self, config: ObserverConfig, metrics: Metrics | None = None, node_name: str | None = None,
                 log: Any = None, config_key: str = "observer") -> None:
        self.config = config
        self.config_key = config_key  # where `address` sits in the config file, for error messages
        self.metrics = metrics or Metrics()
        self.node_name = node_name or socket.gethostname()
        self.log = log or structlog.get_logger().bind(component="observer")
        self.ring = FlowRing(config.max_flows)
        self.started_ns = time.monotonic_ns()
        self.port: int | None = None
        self._server: grpc.Server | None = None
        self._rate: deque[tuple[float, int]] = deque()
        self._namespaces: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._streams: dict[str, int] = {}  # open GetFlows streams per client
        self._followers = 0  # follow streams past their snapshot: they see every flow published from now on
        m = self.metrics
        self._published = m.counter("flowship_observer_flows_total", "Flows published to the Observer ring.")
        self._lost = m.counter("flowship_observer_lost_events_total",
                               "Flows GetFlows followers missed because the ring overtook them.")
        self._sent = m.counter("flowship_observer_sent_flows_total", "Flows sent to GetFlows clients.")
        self._ring_gauge = m.gauge("flowship_observer_ring_flows", "Flows held in the Observer ring.")
        self._client_gauge = m.gauge("flowship_observer_clients", "Open GetFlows streams.")
        self._refused = m.counter("flowship_observer_refused_streams_total",
                                  "GetFlows streams refused with RESOURCE_EXHAUSTED, by limit.", ["limit"])

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> int:
        """Bind and serve; returns the port (0 for a unix socket). A failure names the config key."""
        problems = self.config.validate()
        if problems:
            raise ValueError(f"{self.config_key}." + f"\n{self.config_key}.".join(problems))
        cfg = self.config
        # Streams are capped below max_workers, so short calls always find a thread.
        server = new_grpc_server(cfg.max_workers, float(cfg.keepalive), float(cfg.keepalive_timeout))
        server.add_generic_rpc_handlers((observer_handler(_Servicer(self)), health_handler()))
        key = self.config_key
        port = listen(server, cfg.address, cfg.tls, f"{key}.address",
                      tcp_hint=f"(on a node that runs Cilium, 4244 is its Hubble server and 4245 Hubble Relay; "
                               f"choose another port, a unix:PATH, or set {key}.enabled: false)")
        tls = cfg.tls
        server.start()
        self._server = server
        self.port = port
        self.log.info("observer listening", address=cfg.address, port=port, tls=tls is not None,
                      client_certificates=bool(tls and tls.client_ca_file))
        return port

    def stop(self, grace: float | None = 5.0) -> None:
        self.ring.close()  # followers end their streams
        if self._server is not None:
            self._server.stop(grace).wait(grace)
            self._server = None

    # -- input -------------------------------------------------------------------------------
    def publish(self, batch: pa.RecordBatch) -> None:
        """Add flows (FLOW_SCHEMA rows, oldest first) to the ring."""
        n = batch.num_rows
        if n == 0:
            return
        self.ring.publish(batch)
        self._published.inc(n)
        self._ring_gauge.set(self.ring.size)
        now = time.monotonic()
        wall = time.time_ns()
        with self._lock:
            self._rate.append((now, n))
            while self._rate and now - self._rate[0][0] > 60:
                self._rate.popleft()
            cluster_cols = ("src_cluster", "dst_cluster")
            for ns_col, cl_col in (("src_namespace", cluster_cols[0]), ("dst_namespace", cluster_cols[1])):
                pairs = pa.RecordBatch.from_arrays([batch.column(cl_col), batch.column(ns_col)], ["c", "n"])
                distinct = pa.Table.from_batches([pairs]).group_by(["c", "n"]).aggregate([])
                for c, ns in zip(distinct.column("c").to_pylist(), distinct.column("n").to_pylist(), strict=True):
                    if ns:
                        self._namespaces[(c or "", ns)] = wall

    # -- RPCs ----------------------------------------------------------------------------------
    def _admit(self, client: str) -> str | None:
        """Count a new GetFlows stream of ``client``; the reason when a limit refuses it."""
        cfg = self.config
        with self._lock:
            total = sum(self._streams.values())
            mine = self._streams.get(client, 0)
            if total >= cfg.max_streams:
                self._refused.labels("max_streams").inc()
                return (f"too many GetFlows streams: {total} open, the Observer's limit is max_streams = "
                        f"{cfg.max_streams}")
            if mine >= cfg.max_streams_per_client:
                self._refused.labels("max_streams_per_client").inc()
                return (f"too many GetFlows streams from {client}: {mine} open, the limit is "
                        f"max_streams_per_client = {cfg.max_streams_per_client}")
            self._streams[client] = mine + 1
        self._client_gauge.inc()
        return None

    def _release(self, client: str) -> None:
        with self._lock:
            left = self._streams.get(client, 0) - 1
            if left > 0:
                self._streams[client] = left
            else:
                self._streams.pop(client, None)
        self._client_gauge.dec()

    def _emit(self, query: _Query, entry: _Entry, seqs: np.ndarray) -> Generator[bytes, None, int]:
        """Yield serialized responses; returns how many the ring dropped before they could be sent."""
        if query.mask is None:
            start, items = entry.encoded(self.node_name)
        else:
            start, items = entry.messages()
        skipped = 0
        for seq in seqs.tolist():
            idx = seq - start
            if idx < 0:
                skipped += 1  # overwritten while this reader was slow
                continue
            if idx < len(items):
                self._sent.inc()
                yield items[idx] if query.mask is None else query.response(items[idx])
        return skipped

    def followers(self) -> int:
        """Open follow streams that took their position in the ring: each receives what is published next."""
        with self._lock:
            return self._followers

    def _get_flows(self, request: observer_pb2.GetFlowsRequest, query: _Query,
                   context: grpc.ServicerContext) -> Iterator[bytes]:
        entries, cursor = self.ring.snapshot()
        if not request.follow:
            yield from self._serve(request, query, context, entries, cursor)
            return
        with self._lock:
            self._followers += 1
        try:
            yield from self._serve(request, query, context, entries, cursor)
        finally:
            with self._lock:
                self._followers -= 1

    def _serve(self, request: observer_pb2.GetFlowsRequest, query: _Query, context: grpc.ServicerContext,
               entries: list[_Entry], cursor: int) -> Iterator[bytes]:
        number = request.number
        lost_pending = 0
        last_lost = 0.0
        # The stored part: the whole ring, the first N or the last N matching flows.
        if number or not request.follow or query.since is not None:
            picked: list[tuple[_Entry, np.ndarray]] = []
            remaining = number if number else None
            for entry in (entries if request.first else reversed(entries)):
                seqs = query.seqs(entry, 0, cursor)
                if remaining is not None:
                    seqs = seqs[:remaining] if request.first else seqs[max(0, len(seqs) - remaining):]
                    remaining -= len(seqs)
                if len(seqs):
                    picked.append((entry, seqs))
                if remaining == 0:
                    break
            if not request.first:
                picked.reverse()
            for entry, seqs in picked:
                if not context.is_active():
                    return
                lost_pending += yield from self._emit(query, entry, seqs)
        if lost_pending:
            self._lost.inc(lost_pending)
        if not request.follow:
            if lost_pending:
                yield self._lost_event(lost_pending)
            return
        # Following: everything published after the snapshot.
        interval = float(self.config.lost_event_interval)
        while context.is_active():
            with self.ring.cond:
                if self.ring.next_seq == cursor and not self.ring.closed:
                    self.ring.cond.wait(float(self.config.follow_poll))
                if self.ring.closed:
                    return
            ranges, lost, end = self.ring.ranges(cursor)
            if lost:
                lost_pending += lost
                self._lost.inc(lost)
            now = time.monotonic()
            if lost_pending and now - last_lost >= interval:
                yield self._lost_event(lost_pending)
                lost_pending, last_lost = 0, now
            for entry, _lo, _hi in ranges:
                skipped = yield from self._emit(query, entry, query.seqs(entry, cursor, end))
                if skipped:
                    lost_pending += skipped
                    self._lost.inc(skipped)
                if query.past_until(entry, end):
                    return  # a flow later than until: the stream is complete
            cursor = end

    def _lost_event(self, count: int) -> bytes:
        resp = observer_pb2.GetFlowsResponse(
            lost_events=flow_pb2.LostEvent(source=_LOST_SOURCE, num_events_lost=count),
            node_name=self.node_name)
        resp.time.FromNanoseconds(time.time_ns())
        return resp.SerializeToString()

    def status(self) -> observer_pb2.ServerStatusResponse:
        return observer_pb2.ServerStatusResponse(
            num_flows=self.ring.size, max_flows=self.ring.capacity, seen_flows=self.ring.next_seq,
            uptime_ns=time.monotonic_ns() - self.started_ns, version=VERSION, flows_rate=self.flows_rate())

    def flows_rate(self) -> float:
        """Flows per second over the last minute (or since start, if shorter)."""
        with self._lock:
            if not self._rate:
                return 0.0
            span = max(1.0, min(60.0, time.monotonic() - self.started_ns / 1e9))
            return sum(n for _, n in self._rate) / span

    def node(self) -> observer_pb2.Node:
        tls = self.config.tls
        return observer_pb2.Node(
            name=self.node_name, version=VERSION, address=self.config.address,
            state=observer_pb2.NodeState.Value("NODE_CONNECTED"),
            tls=observer_pb2.TLS(enabled=tls is not None, server_name=self.config.server_name or ""),
            uptime_ns=time.monotonic_ns() - self.started_ns, num_flows=self.ring.size,
            max_flows=self.ring.capacity, seen_flows=self.ring.next_seq)

    def namespaces(self) -> list[observer_pb2.Namespace]:
        cutoff = time.time_ns() - _NAMESPACE_TTL_NS
        with self._lock:
            for key in [k for k, seen in self._namespaces.items() if seen < cutoff]:
                del self._namespaces[key]
            keys = sorted(self._namespaces)
        return [observer_pb2.Namespace(cluster=c, namespace=ns) for c, ns in keys]


class ObserverSink(Sink):
    """The Observer fed like any sink: after the shared stages, so ``redact`` and ``filter`` apply to it.

    Built like every sink, from its config and a :class:`Context` (whose ``config_key`` names where its
    options sit); the agent source brings one along (``Source.companion_sinks``) when its ``observer`` is
    enabled. A batch is delivered once it is in the ring, so the Observer never holds back a source's
    checkpoint; aggregate rows are not flows and are passed over.
    """

    def __init__(self, config: ObserverConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.server = ObserverServer(config, metrics=ctx.metrics, node_name=ctx.node_name, log=ctx.log,
                                     config_key=ctx.config_key or "observer")

    def start(self) -> None:
        self.server.start()

    def write(self, env: Envelope) -> None:
        if env.kind == "flows":
            self.server.publish(env.batch)
        env.ack()

    def close(self) -> None:
        self.server.stop()
