"""``kafka`` sink: one message per flow, produced with librdkafka (confluent-kafka).

The producer is idempotent (``enable.idempotence=true``, which implies
``acks=all``, unlimited internal retries and ordering per partition), batches
with ``linger.ms`` 50 and compresses with zstd. librdkafka does the batching
and retrying, so this sink does not use :mod:`flowship.sinks.delivery`'s
request loop; it shares its dead-letter writer and acknowledgement tracking:
every message carries its envelope in its delivery-report callback, and the
envelope is acknowledged once every one of its messages is delivered (or
dead-lettered after a permanent error such as MSG_SIZE_TOO_LARGE). Messages
that time out in librdkafka's queue (broker unreachable for longer than
``message_timeout``) are produced again, never dropped.

The key is the direction-independent connection hash
(:func:`flowship.model.ids.connection_hashes`, 8 bytes big-endian) so both
directions of a connection, and its L7 flows, land in one partition in
order. Values are Hubble ExportEvent JSON (``hubble-json``), serialized
``flow.Flow`` (``protobuf``) or ECS JSON (``ecs-json``); the
``flowship-encoding`` and ``content-type`` headers name the encoding so the
Kafka source can decode any mix.

``encoding: arrow`` is for flowship-to-flowship transport (agents producing,
``flowship export`` consuming) at high rates: each message is an Arrow IPC
stream of up to ``arrow_max_rows`` flows of one partition, chosen by the
connection hash modulo the partition count, so connections still stay in one
partition while the per-message cost is paid once per thousand flows.

A full local queue (BufferError) is backpressure: the sink serves delivery
reports and tries again, blocking the pipeline instead of losing flows.
"""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson
import pyarrow as pa
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from flowship.components import Context, Sink
from flowship.config import ByteSize, Duration
from flowship.kafka import KafkaConnectionConfig, Throttle, admin_config, client_logger
from flowship.model import ecs_encode
from flowship.model.ids import connection_hashes
from flowship.pipeline.envelope import Envelope
from flowship.sinks import aggregate_json
from flowship.sinks.delivery import DeadLetterWriter, Outstanding, PendingEnvelope, default_dead_letter_path

Encoding = Literal["hubble-json", "protobuf", "ecs-json", "arrow"]
CONTENT_TYPES: dict[str, bytes] = {
    "hubble-json": b"application/json",
    "ecs-json": b"application/json",
    "protobuf": b"application/x-protobuf; messageType=flow.Flow",
    "arrow": b"application/vnd.apache.arrow.stream",
}
ENCODING_HEADER = "flowship-encoding"
KIND_HEADER = "flowship-kind"

# Errors after which producing the same message again cannot succeed.
_PERMANENT = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG, KafkaError.INVALID_MSG_SIZE,
    KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.INVALID_RECORD, KafkaError.TOPIC_EXCEPTION,
    KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT, KafkaError._INVALID_ARG,
})


@dataclass
class CreateTopicConfig:
    partitions: int = 6
    replication_factor: int = 1
    config: dict[str, str] = field(default_factory=dict)  # topic configs, e.g. retention.ms


@dataclass
class KafkaSinkConfig(KafkaConnectionConfig):
    """``type: kafka`` — see docs/sinks.md. Connection and security keys: :class:`flowship.kafka.KafkaConnectionConfig`."""

    topic: str = "flowship.flows"
    aggregates_topic: str | None = None  # default: "<topic>.aggregates"
    encoding: Encoding = "hubble-json"
    key: Literal["connection", "uuid", "none"] = "connection"
    key_format: Literal["binary", "hex"] = "binary"  # connection key as 8 bytes or 16 hex characters
    arrow_max_rows: int = 2000  # encoding arrow: rows per message (one Arrow IPC stream)
    arrow_compression: Literal["zstd", "lz4", "none"] = "zstd"  # encoding arrow: IPC buffer compression
    compression: Literal["zstd", "lz4", "snappy", "gzip", "none"] = "zstd"
    linger_ms: int = 50
    batch_size: ByteSize = ByteSize(1024 * 1024)
    batch_num_messages: int = 10000
    queue_max_messages: int = 500000  # librdkafka's local queue; full = backpressure
    queue_max_bytes: ByteSize = ByteSize(256 * 1024 * 1024)
    message_timeout: Duration = Duration(300.0)  # then the message is produced again
    flush_timeout: Duration = Duration(60.0)
    create_topic: CreateTopicConfig | None = None
    librdkafka: dict[str, str] = field(default_factory=dict)  # extra producer properties
    dead_letter_path: str | None = None

    def validate(self) -> list[str]:
        problems = []
        if not self.broker_list():
            problems.append("brokers: at least one host:port is needed")
        if not isinstance(self.topic, str) or not self.topic or len(self.topic) > 249 or not all(
                ch.isalnum() or ch in "._-" for ch in self.topic):
            problems.append(f"topic: {self.topic!r} is not a valid topic name ([a-zA-Z0-9._-], 1-249 chars)")
        if isinstance(self.linger_ms, int) and not 0 <= self.linger_ms <= 900000:
            problems.append(f"linger_ms: expected 0..900000, got {self.linger_ms}")
        problems += self.connection_problems()
        if self.create_topic is not None and isinstance(self.create_topic.partitions, int) \
                and self.create_topic.partitions < 1:
            problems.append("create_topic.partitions: expected an integer >= 1")
        return problems


def producer_config(c: KafkaSinkConfig) -> dict[str, Any]:
    conf: dict[str, Any] = {
        **c.client_settings(),
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": c.compression,
        "linger.ms": c.linger_ms,
        "batch.size": int(c.batch_size),
        "batch.num.messages": c.batch_num_messages,
        "queue.buffering.max.messages": c.queue_max_messages,
        "queue.buffering.max.kbytes": max(1, int(c.queue_max_bytes) // 1024),
        "message.timeout.ms": int(float(c.message_timeout) * 1000),
    }
    if c.encoding == "arrow":
        conf["compression.type"] = "none"  # the Arrow IPC buffers are compressed already
    conf.update(c.librdkafka or {})
    return conf


def encode_values(batch: pa.RecordBatch, encoding: str, kind: str = "flows") -> list[bytes]:
    """Message values for a batch (no trailing newlines)."""
    if kind != "flows":
        if encoding == "ecs-json":
            return ecs_encode.encode_documents(batch, kind="aggregates")
        return aggregate_json(batch)
    if encoding == "ecs-json":
        return ecs_encode.encode_documents(batch)
    if encoding == "protobuf":
        from flowship.model.proto import to_flow_bytes

        return to_flow_bytes(batch)
    from flowship.model.hubble_encode import encode_text_column

    return encode_text_column(batch).cast(pa.binary()).to_pylist()


def encode_keys(batch: pa.RecordBatch, key: str, key_format: str = "binary") -> list[bytes] | None:
    """Message keys: connection hash (8 bytes big-endian or hex), uuid, or None."""
    if key == "none" or batch.num_rows == 0:
        return None
    if key == "uuid":
        return [u.encode() for u in batch.column("uuid").to_pylist()]
    hashes = connection_hashes(batch).astype(">u8")
    if key_format == "hex":
        return [format(int(h), "016x").encode() for h in hashes.astype(np.uint64).tolist()]
    raw = hashes.tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


@dataclass
class _Route:
    topic: str
    headers: list[tuple[str, bytes]]
    keyed: bool  # flows are keyed by connection (or uuid); aggregate rows are not


class _Tracker:
    """Delivery reports of one envelope's messages."""

    __slots__ = ("pending", "topic")

    def __init__(self, pending: PendingEnvelope, topic: str) -> None:
        self.pending = pending
        self.topic = topic


class KafkaSink(Sink):
    """Produces flows to a Kafka topic; see the module doc."""

    def __init__(self, config: KafkaSinkConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.producer: Producer | None = None
        self.dead_letters: DeadLetterWriter | None = None
        self._lock = threading.Lock()
        self._retry: list[tuple[_Tracker, bytes | None, bytes, list, int | None, int]] = []
        self._partition_counts: dict[str, tuple[int, float]] = {}
        self._pending = Outstanding(lambda exc: f"kafka producer failed: {exc.args[0].str()}")
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._closing = False
        m = ctx.metrics
        self._bytes = m.sink_bytes(ctx.name)
        self._ok = m.sink_batches(ctx.name, "ok")
        self._reproduced = m.counter("flowship_kafka_reproduced_total",
                                     "Messages produced again after librdkafka gave up on them (timeouts).",
                                     ["sink"]).labels(ctx.name)
        self._backpressure = m.counter("flowship_kafka_queue_full_total",
                                       "Times the local producer queue was full (BufferError).",
                                       ["sink"]).labels(ctx.name)
        self.stats: dict[str, Any] = {}
        self._error_throttle = Throttle()
        self._routes = {kind: self._route(kind) for kind in ("flows", "aggregates")}

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        c = self.config
        conf = producer_config(c)
        conf["error_cb"] = self._on_error
        conf["logger"] = client_logger(self.ctx)
        if "statistics.interval.ms" in conf:
            conf["stats_cb"] = self._on_stats
        if c.create_topic is not None:
            self._create_topics(conf)
        self.producer = Producer(conf)
        self.dead_letters = DeadLetterWriter(c.dead_letter_path or default_dead_letter_path(self.ctx),
                                             self.ctx.name, self.ctx)
        self._poller = threading.Thread(target=self._poll_loop, name=f"{self.ctx.name}-poll", daemon=True)
        self._poller.start()
        self.ctx.log.info("kafka sink ready", brokers=c.broker_list(), topic=c.topic, encoding=c.encoding,
                          key=c.key, compression=c.compression)

    def _aggregates_topic(self) -> str:
        return self.config.aggregates_topic or f"{self.config.topic}.aggregates"

    def _route(self, kind: str) -> _Route:
        """Topic, headers and keying of one kind of rows: flows, or aggregate rows (own topic, no key)."""
        c = self.config
        flows = kind == "flows"
        encoding = c.encoding.encode() if flows or c.encoding in ("ecs-json", "arrow") else b"json"
        headers = [(ENCODING_HEADER, encoding), ("content-type", CONTENT_TYPES.get(c.encoding, b"application/json"))]
        if not flows:
            headers.append((KIND_HEADER, kind.encode()))
        return _Route(c.topic if flows else self._aggregates_topic(), headers, keyed=flows)

    def _create_topics(self, conf: dict[str, Any]) -> None:
        spec = self.config.create_topic
        admin = AdminClient(admin_config(conf))
        topics = [NewTopic(t, num_partitions=spec.partitions, replication_factor=spec.replication_factor,
                           config=dict(spec.config or {}))
                  for t in (self.config.topic, self._aggregates_topic())]
        for topic, future in admin.create_topics(topics, request_timeout=15).items():
            try:
                future.result(timeout=30)
                self.ctx.log.info("topic created", topic=topic, partitions=spec.partitions)
            except KafkaException as exc:
                err = exc.args[0]
                if err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise RuntimeError(f"creating topic {topic} failed: {err.str()}") from None

    def write(self, env: Envelope) -> None:
        self._pending.raise_fatal()
        c = self.config
        route = self._routes[env.kind]
        self._pending.add()
        tracker = _Tracker(PendingEnvelope(env, env.batch.num_rows, self._settled), route.topic)
        if c.encoding == "arrow":
            messages = self._arrow_messages(env.batch, route.topic, route.keyed)
        else:
            values = encode_values(env.batch, c.encoding, env.kind)
            keys = encode_keys(env.batch, c.key, c.key_format) if route.keyed else None
            messages = ((keys[i] if keys is not None else None, value, None, 1) for i, value in enumerate(values))
        headers = route.headers
        nbytes = 0
        for key, value, partition, rows in messages:
            nbytes += len(value) + (len(key) if key else 0)
            self._produce(tracker, key, value, headers, partition, rows)
        self._bytes.inc(nbytes)
        self._produce_retries()

    def _produce(self, tracker: _Tracker, key: bytes | None, value: bytes, headers: list,
                 partition: int | None, rows: int) -> None:
        callback = self._callback(tracker, rows, partition)
        while True:
            try:
                if partition is None:
                    self.producer.produce(tracker.topic, value, key, headers=headers, on_delivery=callback)
                else:
                    self.producer.produce(tracker.topic, value, key, partition=partition, headers=headers,
                                          on_delivery=callback)
                return
            except BufferError:
                self._backpressure.inc()
                self.producer.poll(0.05)
                self._pending.raise_fatal()

    def _partitions(self, topic: str) -> int:
        now = time.monotonic()
        cached = self._partition_counts.get(topic)
        if cached is None or now - cached[1] > 60:
            md = self.producer.list_topics(topic, timeout=10)
            t = md.topics.get(topic)
            count = len(t.partitions) if t is not None and t.error is None and t.partitions else 0
            if not count:
                raise RuntimeError(f"topic {topic} has no partitions (does it exist? create_topic can create it)")
            cached = (count, now)
            self._partition_counts[topic] = cached
        return cached[0]

    def _arrow_messages(self, batch: pa.RecordBatch, topic: str, flows: bool):  # noqa: ANN202 - generator
        """(key, Arrow IPC bytes, partition, rows) per message; connections keep their partition."""
        c = self.config
        options = pa.ipc.IpcWriteOptions(compression=None if c.arrow_compression == "none" else c.arrow_compression)
        if flows:
            count = self._partitions(topic)
            part = (connection_hashes(batch) % np.uint64(count)).astype(np.int64)
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(count + 1))
            groups = [(p, order[bounds[p]:bounds[p + 1]]) for p in range(count) if bounds[p + 1] > bounds[p]]
        else:
            groups = [(None, np.arange(batch.num_rows))]
        for partition, rows in groups:
            for start in range(0, len(rows), c.arrow_max_rows):
                chunk = batch.take(pa.array(rows[start:start + c.arrow_max_rows], pa.int64()))
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, chunk.schema, options=options) as writer:
                    writer.write_batch(chunk)
                yield None, sink.getvalue().to_pybytes(), partition, chunk.num_rows

    def tick(self, now_ns: int) -> None:
        self._pending.raise_fatal()
        self._produce_retries()

    def flush(self) -> None:
        """Wait until every produced message is delivered (or dead-lettered)."""
        deadline = time.monotonic() + float(self.config.flush_timeout)
        while True:
            self._produce_retries()
            remaining = self.producer.flush(max(0.0, min(1.0, deadline - time.monotonic())))
            with self._lock:
                done = self._pending.count == 0 and not self._retry
            if done:
                return
            self._pending.raise_fatal()
            if time.monotonic() >= deadline:
                self.ctx.log.error("kafka flush timed out; undelivered flows stay unacknowledged",
                                   queued=remaining, envelopes=self._pending.count)
                return

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
        if self.producer is not None:
            if self.producer.flush(0):
                # undelivered messages stay unacknowledged (read again upstream); stop retrying them
                self._closing = True
                self.producer.purge(in_queue=True, in_flight=True, blocking=False)
                self.producer.poll(0)
            self.producer = None
        if self.dead_letters is not None:
            self.dead_letters.close()

    # -- delivery reports -------------------------------------------------------------------
    def _poll_loop(self) -> None:
        producer = self.producer
        while not self._stop.is_set():
            producer.poll(0.1)

    def _callback(self, tracker: _Tracker, rows: int = 1, partition: int | None = None):  # noqa: ANN202
        pending = tracker.pending

        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            if err is None:
                pending.settle(delivered=rows)
                return
            self._on_failure(tracker, err, msg, rows, partition)

        return on_delivery

    def _on_failure(self, tracker: _Tracker, err: KafkaError, msg: Any, rows: int, partition: int | None) -> None:
        if err.fatal():
            self._pending.fail(KafkaException(err))
        if err.code() in _PERMANENT or self._pending.fatal is not None:
            value = msg.value() or b""
            record: dict[str, Any] = {"topic": tracker.topic, "key": (msg.key() or b"").hex() or None}
            if self.config.encoding == "arrow":
                record.update(partition=partition, rows=rows, arrow_ipc_base64=base64.b64encode(value).decode())
            elif self.config.encoding == "protobuf":
                record["value_hex"] = value.hex()
            else:
                record["value"] = value.decode("utf-8", "replace")
            self.dead_letters.write([(err.name().lower().lstrip("_"), err.str(), record)])
            tracker.pending.settle(failed=rows)
            return
        if self._closing:
            return  # purged at close: left unacknowledged
        # Timed out in the local queue or a transient error: produce it again.
        with self._lock:
            self._retry.append((tracker, msg.key(), msg.value(), msg.headers() or [], partition, rows))

    def _produce_retries(self) -> None:
        with self._lock:
            retry, self._retry = self._retry, []
        for tracker, key, value, headers, partition, rows in retry:
            self._reproduced.inc()
            self._produce(tracker, key, value, headers, partition, rows)

    def _settled(self, pending: PendingEnvelope) -> None:
        self._ok.inc()
        self._pending.settled(pending)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._pending.fail(KafkaException(err))
            self.ctx.log.error("kafka producer fatal error", error=err.str())
            return
        held = self._error_throttle.allow(err.name())
        if held is not None:  # a broker that keeps refusing would otherwise log many lines a second
            self.ctx.log.warning("kafka client error", error=err.str(), code=err.name(), repeated=held or None)

    def _on_stats(self, text: str) -> None:
        try:
            self.stats = orjson.loads(text)
        except orjson.JSONDecodeError:
            pass

    @property
    def outstanding(self) -> int:
        return self._pending.count
