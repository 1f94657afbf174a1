"""``flowship history --follow`` over a live source: the archive's flows, then the live ones, seamed without a gap.

The parquet sink publishes a file per batch or rotation, so the archive always lags the network by up to a
file's age. A follow request on a server with a live source (``--live-observer`` — an agent's Observer, a
Cilium node, Hubble Relay — or ``--live-kafka`` — the topic a kafka sink writes) is answered in two parts:

1. The stored part, as without a live source (``since``/``number``/filters), from the archive.
2. The **seam**: per node, the time of its newest archived flow. The live stream is opened ``window`` before
   the oldest seam (an Observer: ``since`` with ``follow``, the client's whitelist and blacklist passed on;
   Kafka: ``offsets_for_times`` on every partition, a group-less ``assign``, no commits).
3. **De-duplication in the window.** The (node_name, time, uuid) of the archived flows between the window's
   start and the seam are read from the archive (those columns only). A live flow older than its node's
   window start, or whose key is archived, is dropped; every other one is passed on, through the same
   FlowFilter compiler (:mod:`flowship.model.flowfilter`) and field mask as the stored part.
4. **A live source that no longer holds the window** (a ring overwritten, a topic's retention past it) may
   have lost flows the archive does not have either: the client is sent a LostEvent, as Hubble's ring sends
   one to a reader it overtook — source ``HUBBLE_RING_BUFFER``, ``num_events_lost`` 1 (the count is not
   known), ``first``/``last`` the time span where flows may be missing.

``until`` ends the stream once a live flow is later than it (it is not passed on: an Observer following
with ``until`` ends only on a newly published later flow), or once the source has been idle for
``_CAUGHT_UP`` and the clock is past ``until`` by more than the window (matching flows may be rare). A client's
cancel or the server's stop ends it within ``_TICK`` seconds, and the live stream (gRPC call or Kafka
consumer) is closed with it.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from flowship.model.schema import FLOW_SCHEMA
from flowship.observer_server import FlowRequest, unix_path
from flowship.proto.flow import flow_pb2
from flowship.proto.observer import observer_pb2, observer_pb2_grpc


class ArchiveFile(Protocol):
    """A published file of the archive, as :class:`flowship.history.Archive` lists it."""

    path: str
    hour: int | None


class Archive(Protocol):
    """What following needs of :class:`flowship.history.Archive` (named here so neither module imports the other)."""

    fs: Any

    def files(self, since_ns: int | None = None, until_ns: int | None = None,
              among: list[Any] | None = None) -> list[Any]: ...

DEFAULT_WINDOW = 30.0  # seconds looked back before the seam: longer than a published file's usual lag
DEFAULT_KAFKA_TOPIC = "flowship.flows"
_TICK = 0.2  # seconds between checks that the client is still there
_CAUGHT_UP = 1.0  # seconds without live flows after which a source is taken to have sent what it held
_MAX_ROWS = 1024  # live flows converted, filtered and sent at a time
_TIME_TYPE = FLOW_SCHEMA.field("time").type
_LOST_SOURCE = flow_pb2.LostEventSource.Value("HUBBLE_RING_BUFFER")
_EMPTY = pa.RecordBatch.from_pylist([], schema=FLOW_SCHEMA)

Done = Callable[[], bool]


@dataclass(frozen=True)
class Gap:
    """Flows between ``first_ns`` and ``last_ns`` may be missing: the live source no longer holds them."""

    node_name: str
    first_ns: int
    last_ns: int | None


Item = pa.RecordBatch | Gap | observer_pb2.GetFlowsResponse  # the last: a LostEvent of the live server


class LiveFeed(Protocol):
    """One live stream: FLOW_SCHEMA batches, gaps before the stream and the live server's own LostEvents.

    It yields (possibly empty batches) at least every ``_TICK`` seconds so that the caller can check its client,
    and stops, closing its connection, once ``done()`` is true or the generator is closed.
    """

    def stream(self, since_ns: int | None, starts: dict[str, int], request: observer_pb2.GetFlowsRequest,
               done: Done) -> Iterator[Item]: ...


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclass
class ObserverLiveConfig:
    """``--live-observer``: an Observer GetFlows server (a Cilium node, Hubble Relay, a flowship agent)."""

    address: str  # host:port or unix:PATH
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None  # a client certificate, for mTLS
    key_file: str | None = None
    server_name: str | None = None  # the name the server's certificate carries, when not the address's host
    window: float = DEFAULT_WINDOW
    connect_timeout: float = 10.0

    def validate(self) -> list[str]:
        problems = _window_problems(self.window)
        if unix_path(self.address) is None and ":" not in self.address:
            problems.append(f"live.address: expected host:port or unix:PATH, got {self.address!r}")
        if bool(self.cert_file) != bool(self.key_file):
            problems.append("live.cert_file and live.key_file go together")
        problems.extend(f"live.{key}: file not found: {getattr(self, key)}"
                        for key in ("ca_file", "cert_file", "key_file")
                        if getattr(self, key) and not Path(getattr(self, key)).is_file())
        return problems

    def feed(self) -> ObserverFeed:
        return ObserverFeed(self)


@dataclass
class KafkaLiveConfig:
    """``--live-kafka``: the topic a kafka sink writes (any of its encodings)."""

    brokers: str
    topic: str = DEFAULT_KAFKA_TOPIC
    window: float = DEFAULT_WINDOW
    librdkafka: dict[str, str] = field(default_factory=dict)
    timeout: float = 10.0  # metadata and offset look-ups

    def validate(self) -> list[str]:
        problems = _window_problems(self.window)
        if not self.brokers:
            problems.append("live.brokers: give host:port[,host:port...]")
        if not self.topic:
            problems.append("live.topic: give the kafka sink's topic")
        return problems

    def feed(self) -> KafkaFeed:
        return KafkaFeed(self)


LiveConfig = ObserverLiveConfig | KafkaLiveConfig


def _window_problems(window: float) -> list[str]:
    return [] if window > 0 else [f"live.window: expected a positive number of seconds, got {window}"]


# ---------------------------------------------------------------------------------------------
# The seam
# ---------------------------------------------------------------------------------------------

def archive_seams(archive: Archive, files: list[ArchiveFile]) -> dict[str, int]:
    """Per node, the time of its newest flow in ``files``; only the newest two hour partitions are read.

    A node whose last flow is older than that is treated as one the archive does not know: its live flows
    are all passed on from the window's start.
    """
    hours = [f.hour for f in files if f.hour is not None]
    newest = max(hours) if hours else None
    recent = [f.path for f in files if f.hour is None or newest is None or f.hour >= newest - 1]
    if not recent:
        return {}
    table = ds.dataset(recent, schema=FLOW_SCHEMA, format="parquet", filesystem=archive.fs).to_table(
        columns=["node_name", "time"])
    if not table.num_rows:
        return {}
    table = table.set_column(0, "node_name", pc.fill_null(table.column("node_name"), ""))
    table = table.set_column(1, "time", table.column("time").cast(pa.int64()))
    grouped = table.group_by("node_name").aggregate([("time", "max")])
    return dict(zip(grouped.column("node_name").to_pylist(), grouped.column("time_max").to_pylist(), strict=True))


def archived_keys(archive: Archive, files: list[ArchiveFile], since_ns: int,
                  until_ns: int) -> set[tuple[str, int, str]]:
    """(node_name, time ns, uuid) of the archived flows in [since, until]: what the live stream must not repeat."""
    paths = [f.path for f in archive.files(since_ns, until_ns, among=files)]
    if not paths:
        return set()
    moment = ds.field("time")
    scan = (moment >= pa.scalar(since_ns, type=_TIME_TYPE)) & (moment <= pa.scalar(until_ns, type=_TIME_TYPE))
    table = ds.dataset(paths, schema=FLOW_SCHEMA, format="parquet", filesystem=archive.fs).to_table(
        columns=["node_name", "time", "uuid"], filter=scan)
    nodes = pc.fill_null(table.column("node_name"), "").to_pylist()
    times = table.column("time").cast(pa.int64()).to_pylist()
    uuids = pc.fill_null(table.column("uuid"), "").to_pylist()
    return set(zip(nodes, times, uuids, strict=True))


class Seam:
    """Which live flows the archive already answered: older than a node's window start, or archived keys."""

    def __init__(self, starts: dict[str, int], default_start: int | None, keys: set[tuple[str, int, str]]) -> None:
        self.starts = starts
        self.default_start = default_start  # nodes the archive does not know
        self.keys = keys
        self.newest_key_ns = max((k[1] for k in keys), default=None)

    def keep(self, batch: pa.RecordBatch) -> np.ndarray:
        """The rows of a live batch that are new to the client."""
        times = batch.column("time").cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        nodes = pc.fill_null(batch.column("node_name"), "").to_pylist()
        keep = np.ones(batch.num_rows, dtype=bool)
        if self.default_start is not None or self.starts:
            floor = self.default_start if self.default_start is not None else np.iinfo(np.int64).min
            starts = np.fromiter((self.starts.get(n, floor) for n in nodes), dtype=np.int64, count=len(nodes))
            keep &= times >= starts
        if self.newest_key_ns is not None:
            uuids = pc.fill_null(batch.column("uuid"), "").to_pylist()
            for i in np.flatnonzero(keep & (times <= self.newest_key_ns)).tolist():
                if (nodes[i], int(times[i]), uuids[i]) in self.keys:
                    keep[i] = False
        return keep


def follow_live(live: LiveConfig, archive: Archive, listed: list[ArchiveFile],
                request: observer_pb2.GetFlowsRequest, query: FlowRequest, context: grpc.ServicerContext,
                stopping: threading.Event) -> Iterator[bytes]:
    """The live part of a follow request, after the stored part was sent from ``listed``."""
    ended = threading.Event()
    context.add_callback(ended.set)

    def done() -> bool:
        return ended.is_set() or stopping.is_set() or not context.is_active()

    seam = Seam({}, None, set())
    since_ns: int | None = None
    if request.number or query.since is not None:  # a stored part was asked for: the live one continues it
        window = int(live.window * 1e9)
        seams = archive_seams(archive, listed)
        if query.until is not None and seams and min(seams.values()) > query.until:
            return  # every node stored a flow later than until: the range is complete
        starts = {node: max(t - window, query.since or t - window) for node, t in seams.items()}
        since_ns = min(starts.values()) if starts else query.since
        keys = archived_keys(archive, listed, since_ns, max(seams.values())) if seams and since_ns is not None \
            else set()
        seam = Seam(starts, since_ns, keys)
    stream = live.feed().stream(since_ns, seam.starts, request, done)
    idle_since = time.monotonic()
    try:
        for item in stream:
            if done():
                return
            if isinstance(item, pa.RecordBatch) and not item.num_rows:
                if query.until is not None and time.monotonic() - idle_since > _CAUGHT_UP \
                        and time.time_ns() > query.until + int(live.window * 1e9):
                    return  # the source caught up with a present past until: nothing older can come
                continue
            idle_since = time.monotonic()
            if isinstance(item, Gap):
                yield _lost_response(item.node_name or query.node_name, item.first_ns, item.last_ns)
            elif isinstance(item, observer_pb2.GetFlowsResponse):
                yield item.SerializeToString()
            elif item.num_rows:
                finished = yield from _send(item, seam, query)
                if finished:
                    return
    finally:
        stream.close()


def _send(batch: pa.RecordBatch, seam: Seam, query: FlowRequest) -> Iterator[bytes]:
    """The new, matching flows of a live batch; returns True once a flow is later than ``until``."""
    from flowship.model.proto import to_flow_messages

    keep = seam.keep(batch)
    past = False
    if query.until is not None:
        times = batch.column("time").cast(pa.int64()).to_numpy(zero_copy_only=False)
        later = np.flatnonzero(times > query.until)
        if len(later):
            past = True
            keep[later[0]:] = False
    if query.filters is not None and keep.any():
        keep &= query.filters.mask(batch)
    if keep.any():
        for msg in to_flow_messages(batch.filter(pa.array(keep))):
            yield query.response(msg)
    return past


def _lost_response(node_name: str, first_ns: int | None, last_ns: int | None) -> bytes:
    """A GetFlowsResponse carrying a LostEvent for a window the live source no longer holds (as Hubble's ring:
    the count is not known, 1 says that some were lost)."""
    lost = flow_pb2.LostEvent(source=_LOST_SOURCE, num_events_lost=1)
    if first_ns is not None:
        lost.first.FromNanoseconds(first_ns)
    if last_ns is not None:
        lost.last.FromNanoseconds(last_ns)
    out = observer_pb2.GetFlowsResponse(lost_events=lost, node_name=node_name)
    out.time.FromNanoseconds(time.time_ns())
    return out.SerializeToString()


# ---------------------------------------------------------------------------------------------
# An Observer
# ---------------------------------------------------------------------------------------------

class ObserverFeed:
    """GetFlows(since, follow) on an Observer, read by a thread into a queue so that cancels are prompt."""

    def __init__(self, config: ObserverLiveConfig) -> None:
        self.config = config

    def _channel(self) -> grpc.Channel:
        from flowship.sources.hubble import observer_channel

        return observer_channel(self.config)

    def oldest(self, stub: observer_pb2_grpc.ObserverStub, node: str) -> int | None:
        """The time of the oldest flow of ``node`` the server holds (GetFlows first=1), None when it holds none."""
        request = observer_pb2.GetFlowsRequest(number=1, first=True)
        if node:
            request.whitelist.append(flow_pb2.FlowFilter(node_name=[node]))
        for response in stub.GetFlows(request, timeout=self.config.connect_timeout):
            if response.HasField("flow"):
                return _response_time(response)
        return None

    def stream(self, since_ns: int | None, starts: dict[str, int], request: observer_pb2.GetFlowsRequest,
               done: Done) -> Iterator[Item]:
        from flowship.model.proto import from_flow_messages

        channel = self._channel()
        call = None
        try:
            stub = observer_pb2_grpc.ObserverStub(channel)
            checks = starts or ({"": since_ns} if since_ns is not None else {})
            for node, start in sorted(checks.items()):  # before the stream: what it will not hold
                oldest = self.oldest(stub, node)
                if oldest is not None and oldest > start:
                    yield Gap(node, start, oldest)
            live = observer_pb2.GetFlowsRequest(follow=True, whitelist=request.whitelist,
                                                blacklist=request.blacklist)
            if since_ns is not None:
                live.since.FromNanoseconds(since_ns)
            call = stub.GetFlows(live)
            responses: queue.Queue[Any] = queue.Queue(maxsize=8 * _MAX_ROWS)
            threading.Thread(target=_read, args=(call, responses, done), daemon=True, name="history-live").start()
            while not done():
                try:
                    first = responses.get(timeout=_TICK)
                except queue.Empty:
                    yield _EMPTY
                    continue
                taken = [first]
                while len(taken) < _MAX_ROWS:
                    try:
                        taken.append(responses.get_nowait())
                    except queue.Empty:
                        break
                messages: list[flow_pb2.Flow] = []
                nodes: list[str] = []
                times: list[int | None] = []
                for item in taken:
                    if isinstance(item, _End):
                        if messages:
                            yield from_flow_messages(messages, nodes, times)
                        if item.error is not None:
                            raise LiveSourceError(f"the live Observer {self.config.address}: {item.error}")
                        return
                    if item.HasField("flow"):
                        messages.append(item.flow)
                        nodes.append(item.node_name)
                        times.append(_response_time(item))
                    elif item.HasField("lost_events"):
                        if messages:
                            yield from_flow_messages(messages, nodes, times)
                            messages, nodes, times = [], [], []
                        yield item
                if messages:
                    yield from_flow_messages(messages, nodes, times)
        except grpc.RpcError as exc:
            raise LiveSourceError(f"the live Observer {self.config.address}: {_rpc_reason(exc)}") from None
        finally:
            if call is not None:
                call.cancel()
            channel.close()


class LiveSourceError(ConnectionError):
    """The live source cannot be read (unreachable, refused the request, ended the stream with an error)."""


@dataclass
class _End:
    error: str | None = None


def _read(call: Any, out: queue.Queue[Any], done: Done) -> None:
    """Move a GetFlows stream's responses into ``out``; an _End closes it (with the error, unless cancelled).

    A full queue (a slow client) holds the live stream back; once the client is gone the thread ends instead of
    waiting for room forever.
    """
    def put(item: Any) -> bool:
        while not done():
            try:
                out.put(item, timeout=_TICK)
                return True
            except queue.Full:
                continue
        return False

    try:
        for response in call:
            if not put(response):
                return
        put(_End())
    except grpc.RpcError as exc:
        put(_End(None if exc.code() == grpc.StatusCode.CANCELLED else _rpc_reason(exc)))


def _rpc_reason(exc: grpc.RpcError) -> str:
    return f"{exc.code().name}: {exc.details()}" if hasattr(exc, "code") else str(exc)


def _response_time(response: observer_pb2.GetFlowsResponse) -> int | None:
    from flowship.model.proto import timestamp_ns

    if response.flow.HasField("time"):
        return timestamp_ns(response.flow.time)
    if response.HasField("time"):
        return timestamp_ns(response.time)
    return None


# ---------------------------------------------------------------------------------------------
# A Kafka topic
# ---------------------------------------------------------------------------------------------

class KafkaFeed:
    """The topic read from ``since`` on every partition by a consumer of no group: nothing is committed.

    Offsets are found by message timestamp. The kafka sink's messages carry their produce time, which is not
    earlier than the flows they hold, so seeking to ``since`` misses no flow of the window. A partition whose
    oldest retained message is already inside the window (retention deleted older ones) may have lost flows of
    the window: a :class:`Gap`. Flows come in (time, uuid) order within each poll; across partitions the
    topic itself has no order.
    """

    def __init__(self, config: KafkaLiveConfig) -> None:
        self.config = config

    def _consumer(self) -> Any:
        from confluent_kafka import Consumer

        from flowship.kafka import KafkaConnectionConfig

        conf: dict[str, Any] = {
            **KafkaConnectionConfig(brokers=self.config.brokers, client_id="flowship-history").client_settings(),
            # assign() joins no group and nothing is committed; librdkafka still wants a group id
            "group.id": f"flowship-history-{uuid.uuid4().hex}",
            "enable.auto.commit": False, "enable.auto.offset.store": False, "auto.offset.reset": "latest",
            **self.config.librdkafka,
        }
        return Consumer(conf)

    def stream(self, since_ns: int | None, starts: dict[str, int], request: observer_pb2.GetFlowsRequest,
               done: Done) -> Iterator[Item]:
        from confluent_kafka import OFFSET_END, KafkaException, TopicPartition

        c = self.config
        consumer = self._consumer()
        try:
            try:
                meta = consumer.list_topics(c.topic, timeout=c.timeout)
                topic = meta.topics.get(c.topic)
                if topic is None or topic.error is not None or not topic.partitions:
                    reason = topic.error if topic is not None and topic.error is not None else "no such topic"
                    raise LiveSourceError(f"the live topic {c.topic!r} at {c.brokers}: {reason}")
                partitions = sorted(topic.partitions)
                if since_ns is None:
                    assigned = [TopicPartition(c.topic, p, OFFSET_END) for p in partitions]
                else:
                    wanted = [TopicPartition(c.topic, p, since_ns // 1_000_000) for p in partitions]
                    found = consumer.offsets_for_times(wanted, timeout=c.timeout)
                    assigned = []
                    gap = False
                    for tp in found:
                        low, high = consumer.get_watermark_offsets(tp, timeout=c.timeout)
                        offset = tp.offset if tp.offset >= 0 else high  # nothing produced since: the end
                        gap = gap or (offset == low and low > 0)
                        assigned.append(TopicPartition(c.topic, tp.partition, offset))
                    if gap:
                        yield Gap("", since_ns, None)
                consumer.assign(assigned)
            except KafkaException as exc:
                raise LiveSourceError(f"the live topic {c.topic!r} at {c.brokers}: {exc}") from None
            while not done():
                messages = consumer.consume(num_messages=_MAX_ROWS, timeout=_TICK)
                batch = _decode(messages)
                yield batch if batch is not None else _EMPTY
        finally:
            consumer.close()


def _decode(messages: list[Any]) -> pa.RecordBatch | None:
    """Flows of polled messages in (time, uuid) order; undecodable messages and broker notices are skipped."""
    from flowship.sources.kafka import PoisonMessageError, conform, decode_messages, detect_encoding

    by_encoding: dict[str, list[bytes]] = {}
    for msg in messages:
        if msg.error() is not None or not msg.value():
            continue
        by_encoding.setdefault(detect_encoding(msg.headers(), msg.value()), []).append(msg.value())
    batches = []
    for encoding, values in by_encoding.items():
        batch, _bad = decode_messages(values, encoding)
        try:
            batch = conform(batch)
        except PoisonMessageError:
            continue
        if batch.num_rows:
            batches.append(batch)
    if not batches:
        return None
    table = pa.Table.from_batches(batches, schema=FLOW_SCHEMA)
    table = table.take(pc.sort_indices(table, sort_keys=[("time", "ascending"), ("uuid", "ascending")]))
    return table.combine_chunks().to_batches()[0] if table.num_rows else None
