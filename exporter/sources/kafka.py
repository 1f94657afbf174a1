"""``kafka`` source: consume flows from Kafka topics as a consumer group.

Processes sharing a ``group_id`` split the topic's partitions between them
(the cluster shape: agents produce, a group of ``flowship export`` processes
consumes). Messages may be Hubble ExportEvent JSON, serialized ``flow.Flow``,
ECS JSON or Arrow IPC streams of many flows; the encoding comes from the ``flowship-encoding`` (or
``content-type``) header the kafka sink writes, from the first byte when a
message has no header, or from ``encoding:``.

Offsets are committed by hand (``enable.auto.commit=false``) and only up to
the last offset before which *every* message was acknowledged by every sink:
each emitted batch carries a receipt naming the offset range it holds per
partition; receipts complete in any order, and a partition's commit point
advances over the contiguous prefix of completed ranges. On a rebalance the
acknowledged prefix of each revoked partition is committed synchronously and
the rest is forgotten (its batches may still be delivered, and the new owner
reads them again: at-least-once, duplicates possible, never loss).

Poison messages are rejected one by one: a message that cannot be decoded,
or whose flows a sink could not write (Arrow messages are checked against
``FLOW_SCHEMA`` first: a null ``time``, duplicate or missing required columns,
a value its column's type cannot hold), is counted
(``flowship_source_rejected_total{source,reason}`` and
``flowship_source_dead_letter_total{source,reason}``), logged with
topic/partition/offset, written with its bytes to the dead-letter file
(``dead_letter_path``; fsynced before its offset can be committed), and
skipped: its offset counts as done, and the messages polled with it go on.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from flowship.components import Context, Emit, Source
from flowship.config import Duration, positive_ints
from flowship.kafka import KafkaConnectionConfig, client_logger
from flowship.model import ecs_decode
from flowship.model.ids import complete
from flowship.model.schema import FLOW_SCHEMA, empty_flows
from flowship.pipeline.envelope import Receipt
from flowship.sinks.delivery import DeadLetterWriter, default_dead_letter_path

Encoding = Literal["auto", "hubble-json", "protobuf", "ecs-json", "arrow"]
MAX_REPORTED = 20  # undecodable messages logged one by one; after that only counted


@dataclass
class KafkaSourceConfig(KafkaConnectionConfig):
    """``type: kafka`` source — see docs/sinks.md (Kafka source). Connection and security keys:
    :class:`flowship.kafka.KafkaConnectionConfig`."""

    topic: str | None = None  # default: flowship.flows
    topics: list[str] = field(default_factory=list)
    group_id: str = "flowship-export"
    encoding: Encoding = "auto"
    start_from: Literal["earliest", "latest"] = "earliest"  # with no committed offset
    batch_rows: int = 20000  # messages per poll at most
    poll_timeout: Duration = Duration(0.5)
    commit_interval: Duration = Duration(1.0)
    drain_timeout: Duration = Duration(10.0)  # on stop: wait for in-flight flows to be acknowledged
    session_timeout: Duration = Duration(30.0)
    max_poll_interval: Duration = Duration(300.0)
    assignment_strategy: Literal["cooperative-sticky", "range", "roundrobin"] = "cooperative-sticky"
    librdkafka: dict[str, str] = field(default_factory=dict)
    dead_letter_path: str | None = None  # rejected messages; default <data_dir>/dead-letter/source-<name>.jsonl

    def topic_list(self) -> list[str]:
        if self.topics:
            return list(self.topics)
        return [self.topic or "flowship.flows"]

    def validate(self) -> list[str]:
        problems = []
        if self.topic and self.topics:
            problems.append("topics: give either topic or topics")
        if not self.group_id:
            problems.append("group_id: a consumer group id is needed")
        problems += positive_ints(self, "batch_rows")
        return problems + self.connection_problems()


def consumer_config(c: KafkaSourceConfig) -> dict[str, Any]:
    conf: dict[str, Any] = {
        **c.client_settings(),
        "group.id": c.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": c.start_from,
        "session.timeout.ms": int(float(c.session_timeout) * 1000),
        "max.poll.interval.ms": int(float(c.max_poll_interval) * 1000),
        "partition.assignment.strategy": c.assignment_strategy,
    }
    conf.update(c.librdkafka or {})
    return conf


# ---------------------------------------------------------------------------------------------
# Offset tracking
# ---------------------------------------------------------------------------------------------

class _Range:
    __slots__ = ("first", "last", "done")

    def __init__(self, first: int, last: int) -> None:
        self.first = first
        self.last = last
        self.done = False


class _Partition:
    """Emitted offset ranges of one assigned partition, in order."""

    __slots__ = ("epoch", "ranges", "by_first", "commit_at", "committed")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.ranges: deque[_Range] = deque()
        self.by_first: dict[int, _Range] = {}
        self.commit_at: int | None = None  # next offset to read: everything before it is acknowledged
        self.committed: int | None = None

    def advance(self) -> None:
        while self.ranges and self.ranges[0].done:
            r = self.ranges.popleft()
            del self.by_first[r.first]
            self.commit_at = r.last + 1


class OffsetTracker:
    """Per-partition contiguous-acknowledgement tracking (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[tuple[str, int], _Partition] = {}
        self._epoch = 0
        self.in_flight = 0

    def assign(self, keys: list[tuple[str, int]]) -> None:
        with self._lock:
            for key in keys:
                self._epoch += 1
                self._parts[key] = _Partition(self._epoch)

    def revoke(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Forget partitions; return the commit points not yet committed."""
        out = {}
        with self._lock:
            for key in keys:
                part = self._parts.pop(key, None)
                if part is not None and part.commit_at is not None and part.commit_at != part.committed:
                    out[key] = part.commit_at
        return out

    def owns(self, key: tuple[str, int]) -> bool:
        with self._lock:
            return key in self._parts

    def emitted(self, ranges: dict[tuple[str, int], tuple[int, int]]) -> list[tuple[str, int, int, int]]:
        """Register ranges about to be emitted; returns the receipt position."""
        position = []
        with self._lock:
            self.in_flight += 1
            for key, (first, last) in ranges.items():
                part = self._parts.get(key)
                if part is None:
                    continue
                r = _Range(first, last)
                part.ranges.append(r)
                part.by_first[first] = r
                position.append((key[0], key[1], part.epoch, first))
        return position

    def completed(self, position: list[tuple[str, int, int, int]]) -> None:
        with self._lock:
            self.in_flight -= 1
            for topic, partition, epoch, first in position:
                part = self._parts.get((topic, partition))
                if part is None or part.epoch != epoch:
                    continue  # revoked meanwhile: the new owner reads it again
                r = part.by_first.get(first)
                if r is not None:
                    r.done = True
                part.advance()

    def to_commit(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return {key: p.commit_at for key, p in self._parts.items()
                    if p.commit_at is not None and p.commit_at != p.committed}

    def mark_committed(self, offsets: dict[tuple[str, int], int]) -> None:
        with self._lock:
            for key, offset in offsets.items():
                part = self._parts.get(key)
                if part is not None:
                    part.committed = offset


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def detect_encoding(headers: list[tuple[str, bytes]] | None, value: bytes) -> str:
    """Encoding of one message: header first, then a look at the bytes."""
    if headers:
        for key, raw in headers:
            if key == "flowship-encoding" and raw:
                return raw.decode("ascii", "replace")
        for key, raw in headers:
            if key == "content-type" and raw and b"protobuf" in raw:
                return "protobuf"
            if key == "content-type" and raw and b"arrow" in raw:
                return "arrow"
    if value[:4] == b"\xff\xff\xff\xff":  # an Arrow IPC stream starts with a continuation marker
        return "arrow"
    head = value.lstrip()[:1]
    if head == b"{":
        return "ecs-json" if b'"@timestamp"' in value[:200] and b'"flow"' not in value[:20] else "hubble-json"
    return "protobuf"


def decode_messages(values: list[bytes], encoding: str) -> tuple[pa.RecordBatch, list[tuple[int, str]]]:
    """Decode message values of one encoding; returns (batch, [(index, reason)])."""
    if encoding == "hubble-json":
        from flowship.model.hubble_decode import decode_lines

        bad: list[tuple[int, str]] = []
        if any(b"\n" in v for v in values):
            batches = []
            for i, v in enumerate(values):
                result = decode_lines(v.replace(b"\n", b" "))
                if result.errors or result.batch.num_rows != 1:
                    bad.append((i, result.errors[0][1] if result.errors else "not a flow"))
                else:
                    batches.append(result.batch)
            return (pa.concat_batches(batches) if batches else empty_flows()), bad
        result = decode_lines(b"\n".join(values))
        for number, reason in result.errors:
            bad.append((max(0, number - 1), reason))
        return result.batch, bad  # lost_events / node status lines are neither flows nor errors
    if encoding == "protobuf":
        from flowship.model.proto import from_flow_messages
        from flowship.proto.flow import flow_pb2

        msgs, indexes, bad = [], [], []
        for i, v in enumerate(values):
            try:
                msgs.append(flow_pb2.Flow.FromString(v))
                indexes.append(i)
            except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
                bad.append((i, f"invalid flow.Flow protobuf: {exc}"))
        if not msgs:
            return empty_flows(), bad
        try:
            return from_flow_messages(msgs), bad
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError):
            # A value the flow schema cannot hold (a port above 65535...): find the culprits one by one.
            good = []
            for i, msg in zip(indexes, msgs, strict=True):
                try:
                    good.append(from_flow_messages([msg]))
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError) as exc:
                    bad.append((i, f"flow.Flow value out of range: {exc}"))
            return (pa.concat_batches(good) if good else empty_flows()), sorted(bad)
    if encoding == "ecs-json":
        return ecs_decode.decode_ndjson(values)
    if encoding == "arrow":
        batches, bad = [], []
        for i, v in enumerate(values):
            try:
                batch = arrow_message(v)
            except PoisonMessageError as exc:
                bad.append((i, str(exc)))
                continue
            except Exception as exc:  # a decoder bug costs this message only
                bad.append((i, f"undecodable Arrow message: {type(exc).__name__}: {exc}"))
                continue
            if batch.num_rows:
                batches.append(batch)
        return (pa.concat_batches(batches) if batches else empty_flows()), bad
    return empty_flows(), [(i, f"unknown encoding {encoding!r}") for i in range(len(values))]


class PoisonMessageError(ValueError):
    """A message that decodes (or not) but whose flows the sinks could not write; its text is the reason."""


_REQUIRED = tuple(f.name for f in FLOW_SCHEMA if not f.nullable)


def arrow_message(value: bytes) -> pa.RecordBatch:
    """One Arrow IPC stream message as one FLOW_SCHEMA batch, or :class:`PoisonMessageError`.

    The whole message is checked before any of it enters the pipeline: a batch
    that reaches a sink with a null ``time`` or a column it cannot convert
    fails the sink for every flow polled with it, on every restart.
    """
    try:
        reader = pa.ipc.open_stream(value)
        parts = list(reader)
    except (pa.ArrowException, ValueError, TypeError, OSError) as exc:
        raise PoisonMessageError(f"invalid Arrow IPC stream: {exc}") from None
    conformed = [conform(b) for b in parts]
    conformed = [b for b in conformed if b.num_rows]
    if not conformed:
        return empty_flows()
    return conformed[0] if len(conformed) == 1 else pa.concat_batches(conformed)


def _decode_one_by_one(values: list[bytes], encoding: str) -> tuple[pa.RecordBatch, list[tuple[int, str]]]:
    """After a decoder raised for a poll: decode each message alone, so the one that raises costs only itself."""
    batches, bad = [], []
    for i, v in enumerate(values):
        try:
            batch, errors = decode_messages([v], encoding)
        except Exception as exc:  # a decoder bug: this message is the culprit
            bad.append((i, f"undecodable: {type(exc).__name__}: {exc}"))
            continue
        if errors:
            bad.append((i, errors[0][1]))
        elif batch.num_rows:
            batches.append(batch)
    return (pa.concat_batches(batches) if batches else empty_flows()), bad


def conform(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch of (possibly older or newer) flow columns as valid FLOW_SCHEMA rows.

    Missing nullable columns become null and extra columns are dropped (older
    and newer writers); a duplicate column, a required column that is missing
    or null, a value its column's type cannot hold (a safe cast fails: wrong
    type, out of range) or malformed Arrow data raise :class:`PoisonMessageError`.
    A null or empty ``uuid`` is computed from the flow's content, as the other
    decoders do.
    """
    names = batch.schema.names
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise PoisonMessageError(f"duplicate columns: {', '.join(dupes)[:200]}")
    if "time" not in names:
        raise PoisonMessageError("missing required column: time")
    try:
        batch.validate(full=True)
    except pa.ArrowException as exc:
        raise PoisonMessageError(f"malformed Arrow data: {exc}") from None
    if not batch.schema.equals(FLOW_SCHEMA, check_metadata=False):
        arrays = []
        for f in FLOW_SCHEMA:
            if f.name not in names:
                arrays.append(pa.nulls(batch.num_rows, f.type))
                continue
            column = batch.column(f.name)
            if column.type != f.type:
                try:
                    column = column.cast(f.type)  # safe: overflow, truncation and bad strings raise
                except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
                    text = str(exc)
                    what = "value out of range" if any(w in text.lower() for w in ("range", "overflow", "out of bounds")) \
                        else "wrong type"
                    raise PoisonMessageError(f"{what}: column {f.name} of {column.type} cannot be "
                                             f"{f.type}: {text[:200]}") from None
            arrays.append(column)
        batch = pa.RecordBatch.from_arrays(arrays, schema=FLOW_SCHEMA)
    for name in _REQUIRED:
        if name == "uuid":
            continue
        nulls = batch.column(name).null_count
        if nulls:
            raise PoisonMessageError(f"null values: column {name} is required ({nulls} of {batch.num_rows} null)")
    uuid_col = batch.column("uuid")
    if batch.num_rows and (uuid_col.null_count or pc.any(pc.equal(uuid_col, "")).as_py()):
        batch = complete(batch)
    return batch


# ---------------------------------------------------------------------------------------------
# The source
# ---------------------------------------------------------------------------------------------

class KafkaSource(Source):
    """Consumes flows as a member of a consumer group; see the module doc."""

    def __init__(self, config: KafkaSourceConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.tracker = OffsetTracker()
        self.consumer: Consumer | None = None
        self.counts = {"messages": 0, "flows": 0, "rejected": 0, "skipped_aggregates": 0, "commits": 0,
                       "rebalances": 0}
        self._reported = 0
        self.dead_letter_path = Path(config.dead_letter_path) if config.dead_letter_path \
            else default_dead_letter_path(ctx, "source")
        self.dead_letters = DeadLetterWriter(self.dead_letter_path, ctx.name, ctx, kind="source")
        self._rejects: list[tuple[str, str, dict[str, Any]]] = []  # of the poll being handled
        self._closed = False
        m = ctx.metrics
        self._commits = m.counter("flowship_kafka_commits_total", "Offset commits by the Kafka source.",
                                  ["source"]).labels(ctx.name)
        self._in_flight = m.gauge("flowship_kafka_inflight_batches",
                                  "Batches emitted and not yet acknowledged by every sink.",
                                  ["source"]).labels(ctx.name)
        self._assigned = m.gauge("flowship_kafka_assigned_partitions", "Partitions assigned to this process.",
                                 ["source"]).labels(ctx.name)

    # -- rebalance callbacks (run inside consume()) ------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(p.topic, p.partition) for p in partitions]
        self.tracker.assign(keys)
        self.counts["rebalances"] += 1
        self._assigned.inc(len(keys))
        self.ctx.log.info("partitions assigned", partitions=[f"{t}[{p}]" for t, p in keys])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(p.topic, p.partition) for p in partitions]
        pending = self.tracker.revoke(keys)
        self._assigned.dec(len(keys))
        if pending:
            try:
                consumer.commit(offsets=[TopicPartition(t, p, off) for (t, p), off in pending.items()],
                                asynchronous=False)
                self._count_commit()
            except KafkaException as exc:
                self.ctx.log.warning("commit on revoke failed", error=str(exc))
        self.ctx.log.info("partitions revoked", partitions=[f"{t}[{p}]" for t, p in keys],
                          committed={f"{t}[{p}]": o for (t, p), o in pending.items()})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(p.topic, p.partition) for p in partitions]
        self.tracker.revoke(keys)
        self._assigned.dec(len(keys))
        self.ctx.log.warning("partitions lost (session expired); their in-flight flows will be read again",
                             partitions=[f"{t}[{p}]" for t, p in keys])

    # -- main loop ----------------------------------------------------------------------------
    def run(self, emit: Emit, stop: threading.Event) -> None:
        c = self.config
        conf = consumer_config(c)
        conf["logger"] = client_logger(self.ctx)
        self.consumer = Consumer(conf)
        self.consumer.subscribe(c.topic_list(), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        self.ctx.log.info("kafka source subscribed", topics=c.topic_list(), group=c.group_id)
        next_commit = time.monotonic() + float(c.commit_interval)
        try:
            while not stop.is_set():
                msgs = self.consumer.consume(num_messages=c.batch_rows, timeout=float(c.poll_timeout))
                if msgs:
                    self._handle(msgs, emit)
                if time.monotonic() >= next_commit:
                    next_commit = time.monotonic() + float(c.commit_interval)
                    self.commit()
            self._drain()
        finally:
            self.close()

    def _handle(self, msgs: list, emit: Emit) -> None:
        c = self.config
        ranges: dict[tuple[str, int], tuple[int, int]] = {}
        groups: dict[str, list[tuple[Any, bytes]]] = {}
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    self.ctx.log.warning("kafka consumer error", error=err.str())
                continue
            key = (msg.topic(), msg.partition())
            if not self.tracker.owns(key):
                continue  # revoked while fetched
            offset = msg.offset()
            first_last = ranges.get(key)
            ranges[key] = (first_last[0] if first_last else offset, offset)
            self.counts["messages"] += 1
            headers = msg.headers()
            if headers and any(k == "flowship-kind" and v != b"flows" for k, v in headers):
                self.counts["skipped_aggregates"] += 1
                continue
            value = msg.value()
            if not value:
                self._reject(msg, "empty message")
                continue
            encoding = c.encoding if c.encoding != "auto" else detect_encoding(headers, value)
            groups.setdefault(encoding, []).append((msg, value))
        if not ranges:
            self._flush_rejects()
            return
        batches = []
        for encoding, items in groups.items():
            try:
                batch, bad = decode_messages([v for _, v in items], encoding)
            except Exception:  # a decoder bug must not stop the group member: find the culprit
                batch, bad = _decode_one_by_one([v for _, v in items], encoding)
            for index, reason in bad:
                self._reject(items[index][0], reason)
            if batch.num_rows:
                batches.append(batch)
        batch = pa.concat_batches(batches) if len(batches) > 1 else (batches[0] if batches else empty_flows())
        self._flush_rejects()  # durable before any receipt of this poll can let the commit pass them
        self.counts["flows"] += batch.num_rows
        position = self.tracker.emitted(ranges)
        receipt = Receipt(self._completed, position=position, rows=batch.num_rows)
        self._in_flight.inc()
        if batch.num_rows == 0:
            receipt.release()  # nothing to deliver: the offsets are done
            return
        emit(batch, receipt)

    def _completed(self, receipt: Receipt) -> None:
        self._in_flight.dec()
        self.tracker.completed(receipt.position)

    def _reject(self, msg: Any, reason: str) -> None:
        """Count, log and queue for the dead-letter file one message the pipeline cannot take."""
        self.counts["rejected"] += 1
        category = reason.split(":", 1)[0].strip().lower().replace(" ", "_")[:40] or "undecodable"
        self.ctx.metrics.rejected(self.ctx.name, category).inc()
        if self._reported < MAX_REPORTED:
            self._reported += 1
            self.ctx.log.warning("message rejected", topic=msg.topic(), partition=msg.partition(),
                                 offset=msg.offset(), reason=str(reason)[:300],
                                 dead_letter_path=str(self.dead_letter_path))
        value = msg.value() or b""
        key = msg.key()
        record = {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
                  "timestamp_ms": msg.timestamp()[1] if msg.timestamp()[0] else None,
                  "key_base64": base64.b64encode(key).decode() if key else None,
                  "headers": {k: (v or b"").decode("utf-8", "replace") for k, v in (msg.headers() or [])},
                  "value_base64": base64.b64encode(value).decode()}
        self._rejects.append((category, str(reason)[:2000], record))

    def _flush_rejects(self) -> None:
        """Write the poll's rejected messages (one fsync) before their offsets can be committed."""
        if self._rejects:
            entries, self._rejects = self._rejects, []
            self.dead_letters.write(entries)

    # -- commits ------------------------------------------------------------------------------
    def commit(self, synchronous: bool = False) -> None:
        offsets = self.tracker.to_commit()
        if not offsets or self.consumer is None:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                 asynchronous=not synchronous)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not (isinstance(err, KafkaError) and err.code() == KafkaError._NO_OFFSET):
                self.ctx.log.warning("offset commit failed", error=str(exc))
            return
        self.tracker.mark_committed(offsets)
        self._count_commit()

    def _count_commit(self) -> None:
        self.counts["commits"] += 1
        self._commits.inc()

    def _drain(self) -> None:
        """Stop reading; give in-flight flows ``drain_timeout`` to be acknowledged, committing as they are."""
        deadline = time.monotonic() + float(self.config.drain_timeout)
        while self.tracker.in_flight and time.monotonic() < deadline:
            self.commit()
            time.sleep(0.1)  # heartbeats run in librdkafka's own thread
        self.commit(synchronous=True)
        if self.tracker.in_flight:
            self.ctx.log.warning("stopping with unacknowledged flows; they will be read again",
                                 batches=self.tracker.in_flight)

    def close(self) -> None:
        """Commit what is acknowledged and leave the group (idempotent)."""
        if self._closed or self.consumer is None:
            return
        self._closed = True
        try:
            self.commit(synchronous=True)
        finally:
            self.consumer.close()
            self.dead_letters.close()

    def summary(self) -> dict[str, Any]:
        return {**self.counts, "dead_lettered": self.dead_letters.count}
