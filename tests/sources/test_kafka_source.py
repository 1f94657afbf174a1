"""Kafka source against a real Kafka 4 broker: decoding, commits after acknowledgement, rebalances,
and two `flowship export` processes sharing a consumer group with one of them killed."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sinks"))

import devservers  # noqa: E402
from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402
from helpers import generated_flows, make_ctx  # noqa: E402

from flowship.config import parse  # noqa: E402
from flowship.model import ecs_fields  # noqa: E402
from flowship.pipeline.envelope import Envelope, Receipt  # noqa: E402
from flowship.sinks.kafka import KafkaSink, KafkaSinkConfig  # noqa: E402
from flowship.sources.kafka import KafkaSource, KafkaSourceConfig, OffsetTracker, detect_encoding  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


kafka = devservers.kafka_server
fixture_batches = devservers.fixture_batches
all_flows = devservers.all_flows
run_id = devservers.run_id


def produce(brokers: str, topic: str, batch: pa.RecordBatch, encoding: str = "hubble-json",
            partitions: int = 6) -> None:
    sink = KafkaSink(parse(KafkaSinkConfig, {"brokers": brokers, "topic": topic, "encoding": encoding,
                                             "create_topic": {"partitions": partitions}}, "t"), make_ctx("producer"))
    sink.start()
    done: list = []
    sink.write(Envelope(batch, [Receipt(on_done=lambda r: done.append(r.failed), rows=batch.num_rows)]))
    sink.flush()
    sink.close()
    assert done == [False]


class Collector:
    """Runs a KafkaSource in a thread; keeps every emitted batch and its receipt."""

    def __init__(self, brokers: str, topic: str, group: str, release: bool = True, **kw) -> None:
        cfg = parse(KafkaSourceConfig, {"brokers": brokers, "topic": topic, "group_id": group,
                                        "commit_interval": "200ms", "poll_timeout": "200ms",
                                        "session_timeout": "6s", "drain_timeout": "2s", **kw}, "t")
        self.ctx = make_ctx("kafka-in")
        self.source = KafkaSource(cfg, self.ctx)
        self.release = release
        self.batches: list[pa.RecordBatch] = []
        self.receipts: list[Receipt] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.source.run, args=(self.emit, self.stop), daemon=True)

    def emit(self, batch: pa.RecordBatch, receipt: Receipt) -> None:
        with self.lock:
            self.batches.append(batch)
            self.receipts.append(receipt)
        if self.release:
            receipt.release()

    def start(self) -> Collector:
        self.thread.start()
        return self

    def rows(self) -> int:
        with self.lock:
            return sum(b.num_rows for b in self.batches)

    def uuids(self) -> list[str]:
        with self.lock:
            return [u for b in self.batches for u in b.column("uuid").to_pylist()]

    def wait_rows(self, n: int, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self.rows() < n and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.rows()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def committed(brokers: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": brokers, "group.id": group})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        c.close()
    return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}


def end_offsets(brokers: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": brokers, "group.id": "watermarks"})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------
# unit: offset tracking and encoding detection
# ---------------------------------------------------------------------------------------------


def test_offsets_advance_over_the_contiguous_acknowledged_prefix():
    t = OffsetTracker()
    t.assign([("t", 0), ("t", 1)])
    a = t.emitted({("t", 0): (0, 9), ("t", 1): (0, 4)})
    b = t.emitted({("t", 0): (10, 19)})
    c = t.emitted({("t", 0): (25, 30)})  # a gap (compacted or transaction markers) is fine
    t.completed(b)
    assert t.to_commit() == {}  # 0..9 not acknowledged yet
    t.completed(c)
    assert t.to_commit() == {}
    t.completed(a)
    assert t.to_commit() == {("t", 0): 31, ("t", 1): 5}
    t.mark_committed({("t", 0): 31, ("t", 1): 5})
    assert t.to_commit() == {}
    assert t.in_flight == 0


def test_revoked_partitions_forget_their_ranges():
    t = OffsetTracker()
    t.assign([("t", 0)])
    a = t.emitted({("t", 0): (0, 9)})
    b = t.emitted({("t", 0): (10, 19)})
    t.completed(a)
    assert t.revoke([("t", 0)]) == {("t", 0): 10}
    t.assign([("t", 0)])  # assigned again later: a new epoch
    t.completed(b)  # the old receipt completing must not move the new assignment
    assert t.to_commit() == {}


def test_detect_encoding():
    assert detect_encoding([("flowship-encoding", b"ecs-json")], b"{}") == "ecs-json"
    assert detect_encoding([("content-type", b"application/x-protobuf")], b"\x0a\x00") == "protobuf"
    assert detect_encoding(None, b'{"flow":{"time":"2021-01-01T00:00:00Z"}}') == "hubble-json"
    assert detect_encoding(None, b'{"@timestamp":"2021-01-01T00:00:00Z","event":{}}') == "ecs-json"
    assert detect_encoding(None, b"\x0a\x0c\x08\x01") == "protobuf"
    assert detect_encoding(None, b"\xff\xff\xff\xff\x10\x00") == "arrow"
    assert detect_encoding([("content-type", b"application/vnd.apache.arrow.stream")], b"") == "arrow"


# ---------------------------------------------------------------------------------------------
# against Kafka
# ---------------------------------------------------------------------------------------------


@pytest.mark.servers
def test_four_encodings_in_one_topic_round_trip(kafka, all_flows, run_id):
    topic = f"flowship-src-{run_id}-mixed"
    parts = [all_flows.slice(0, 400), all_flows.slice(400, 400), all_flows.slice(800, 300), all_flows.slice(1100)]
    for part, encoding in zip(parts, ["hubble-json", "ecs-json", "protobuf", "arrow"], strict=True):
        produce(kafka, topic, part, encoding)
    col = Collector(kafka, topic, f"g-{run_id}").start()
    assert col.wait_rows(all_flows.num_rows) == all_flows.num_rows
    time.sleep(1)
    col.close()
    assert col.rows() == all_flows.num_rows
    assert sorted(col.uuids()) == sorted(all_flows.column("uuid").to_pylist())
    got = pa.Table.from_batches(col.batches)
    by_uuid = dict(zip(got.column("uuid").to_pylist(), range(got.num_rows), strict=True))
    # hubble-json carries every column; ECS restores the columns it maps
    for batch, columns in ((parts[0], ["time", "verdict", "ip_src", "dst_port", "src_labels", "http_url",
                                       "dns_query", "community_id", "node_name", "tcp_flags"]),
                           (parts[1], sorted({f.inverse for f in ecs_fields.FLOW_FIELDS if f.inverse})),
                           (parts[3], list(all_flows.schema.names))):
        for column in columns:
            want = batch.column(column)
            rows = [by_uuid[u] for u in batch.column("uuid").to_pylist()]
            have = got.column(column).take(pa.array(rows))
            if pa.types.is_timestamp(want.type):
                want, have = want.cast(pa.int64()), have.cast(pa.int64())
            assert have.to_pylist() == want.to_pylist(), column
    assert col.source.summary()["rejected"] == 0
    assert committed(kafka, f"g-{run_id}", topic, 6) == end_offsets(kafka, topic, 6)


@pytest.mark.servers
def test_undecodable_messages_are_counted_and_skipped(kafka, fixture_batches, run_id):
    topic = f"flowship-src-{run_id}-bad"
    produce(kafka, topic, fixture_batches["hubble-otel-basic-sample-10-flows"], partitions=1)
    p = Producer({"bootstrap.servers": kafka})
    p.produce(topic, b"{not json", headers=[("flowship-encoding", b"hubble-json")])
    p.produce(topic, b"\xff\xfe garbage", headers=[("flowship-encoding", b"protobuf")])
    p.produce(topic, b'{"@timestamp": 5}', headers=[("flowship-encoding", b"ecs-json")])
    p.produce(topic, b"", headers=[("flowship-encoding", b"hubble-json")])
    p.flush(10)
    produce(kafka, topic, fixture_batches["hubble-otel-basic-sample-5-dns-flows"], partitions=1)
    col = Collector(kafka, topic, f"g-{run_id}").start()
    assert col.wait_rows(15) == 15
    deadline = time.monotonic() + 20
    while committed(kafka, f"g-{run_id}", topic, 1) != {0: 19} and time.monotonic() < deadline:
        time.sleep(0.2)
    col.close()
    assert col.rows() == 15
    summary = col.source.summary()
    assert summary["rejected"] == 4 and summary["messages"] == 19
    assert col.ctx.metrics.value("flowship_source_rejected_total", source="kafka-in") == 4
    assert committed(kafka, f"g-{run_id}", topic, 1) == {0: 19}  # skipped messages do not block commits


def _arrow(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


@pytest.mark.servers
def test_poison_arrow_messages_are_dead_lettered_alone_and_committed_past(kafka, run_id, tmp_path):
    """A null ``time`` and a duplicate column among 30 valid Arrow messages of one poll: the 3,000 valid flows are
    emitted, the two poison messages are counted, logged and written to the dead-letter file with their offsets
    and bytes, and the group commits past them."""
    topic = f"flowship-src-{run_id}-poison"
    flows = generated_flows(3000, seed=31)
    good = [_arrow(flows.slice(i * 100, 100)) for i in range(30)]
    t = flows.column("time").slice(0, 100)
    times = t.cast(pa.int64()).to_pylist()
    times[7] = None
    null_time = flows.slice(0, 100).set_column(0, pa.field("time", t.type, nullable=True),
                                               pa.array(times, pa.int64()).cast(t.type))
    dup = flows.slice(0, 100)
    dup = pa.RecordBatch.from_arrays([*dup.columns, dup.column("uuid")], names=[*dup.schema.names, "uuid"])
    values = good[:10] + [_arrow(null_time)] + good[10:20] + [_arrow(dup)] + good[20:]
    admin = AdminClient({"bootstrap.servers": kafka})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    p = Producer({"bootstrap.servers": kafka})
    for v in values:
        p.produce(topic, v, headers=[("flowship-encoding", b"arrow")])
    p.flush(10)
    dead_letter = tmp_path / "poison.jsonl"
    col = Collector(kafka, topic, f"g-{run_id}", dead_letter_path=str(dead_letter)).start()
    assert col.wait_rows(3000) == 3000
    deadline = time.monotonic() + 20
    while committed(kafka, f"g-{run_id}", topic, 1) != {0: 32} and time.monotonic() < deadline:
        time.sleep(0.2)
    col.close()
    assert col.rows() == 3000 and sorted(col.uuids()) == sorted(flows.column("uuid").to_pylist())
    assert committed(kafka, f"g-{run_id}", topic, 1) == {0: 32}
    summary = col.source.summary()
    assert summary["rejected"] == 2 and summary["dead_lettered"] == 2 and summary["messages"] == 32
    m = col.ctx.metrics
    assert m.value("flowship_source_rejected_total", source="kafka-in", reason="null_values") == 1
    assert m.value("flowship_source_rejected_total", source="kafka-in", reason="duplicate_columns") == 1
    assert m.value("flowship_source_dead_letter_total", source="kafka-in") == 2
    entries = [json.loads(line) for line in dead_letter.read_text().splitlines()]
    assert [(e["record"]["partition"], e["record"]["offset"], e["reason"]) for e in entries] == \
        [(0, 10, "null_values"), (0, 21, "duplicate_columns")]
    assert "column time is required" in entries[0]["detail"] and "uuid" in entries[1]["detail"]
    assert base64.b64decode(entries[0]["record"]["value_base64"]) == values[10]
    assert entries[0]["source"] == "kafka-in" and entries[0]["record"]["topic"] == topic


class _Msg:
    """A consumed message as confluent_kafka hands it over (the parts the source reads)."""

    def __init__(self, offset: int, value: bytes, encoding: str) -> None:
        self._offset, self._value, self._headers = offset, value, [("flowship-encoding", encoding.encode())]

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def key(self) -> None:
        return None

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, 1700000000000)


def test_a_decoder_that_raises_costs_only_the_message_that_made_it_raise(tmp_path, monkeypatch):
    """A decoder bug (an exception no decoder should raise) rejects the one message, not the poll."""
    import flowship.sources.kafka as kafka_source
    from flowship.model.hubble_encode import encode_lines

    real = kafka_source.decode_messages

    def flaky(values: list[bytes], encoding: str):
        if b"boom" in values:
            raise KeyError("a decoder bug")
        return real(values, encoding)

    monkeypatch.setattr(kafka_source, "decode_messages", flaky)
    flows = generated_flows(3, seed=5)
    lines = [line.rstrip(b"\n") for line in encode_lines(flows)]
    source = KafkaSource(parse(KafkaSourceConfig, {"topic": "t"}, "t"), make_ctx("in", tmp_path))
    source.tracker.assign([("t", 0)])
    emitted: list[pa.RecordBatch] = []
    source._handle([_Msg(0, lines[0], "hubble-json"), _Msg(1, b"boom", "hubble-json"),
                    _Msg(2, lines[1], "hubble-json"), _Msg(3, _arrow(flows.slice(2, 1)), "arrow")],
                   lambda batch, receipt: (emitted.append(batch), receipt.release()))
    assert sorted(u for b in emitted for u in b.column("uuid").to_pylist()) == sorted(flows.column("uuid").to_pylist())
    (entry,) = [json.loads(x) for x in source.dead_letter_path.read_text().splitlines()]
    assert entry["record"]["offset"] == 1 and "KeyError" in entry["detail"]
    assert base64.b64decode(entry["record"]["value_base64"]) == b"boom"
    assert source.tracker.to_commit() == {("t", 0): 4}  # committed past the rejected message


def test_dead_letter_path_defaults_under_data_dir(tmp_path):
    source = KafkaSource(parse(KafkaSourceConfig, {"topic": "t"}, "t"), make_ctx("in", tmp_path))
    assert source.dead_letter_path == tmp_path / "dead-letter" / "source-in.jsonl"
    assert not source.dead_letter_path.exists()  # created with the first rejected message


@pytest.mark.servers
def test_offsets_are_committed_only_after_acknowledgement(kafka, run_id):
    topic = f"flowship-src-{run_id}-acks"
    flows = generated_flows(3000)
    produce(kafka, topic, flows, partitions=1)
    col = Collector(kafka, topic, f"g-{run_id}", release=False, batch_rows=1000).start()
    assert col.wait_rows(3000) == 3000
    time.sleep(1.0)
    assert committed(kafka, f"g-{run_id}", topic, 1) == {}  # nothing acknowledged: nothing committed
    with col.lock:
        receipts = list(col.receipts)
        sizes = [b.num_rows for b in col.batches]
    assert len(receipts) >= 2
    receipts[1].release()  # out of order: the prefix is still missing
    time.sleep(1.0)
    assert committed(kafka, f"g-{run_id}", topic, 1) == {}
    receipts[0].release()
    expect = sizes[0] + sizes[1]
    deadline = time.monotonic() + 10
    while committed(kafka, f"g-{run_id}", topic, 1) != {0: expect} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert committed(kafka, f"g-{run_id}", topic, 1) == {0: expect}
    for r in receipts[2:]:
        r.release()
    col.close()
    assert committed(kafka, f"g-{run_id}", topic, 1) == {0: 3000}


@pytest.mark.servers
def _holding(collector: Collector) -> bool:
    return collector.ctx.metrics.value("flowship_kafka_assigned_partitions") > 0


def test_rebalance_between_two_members(kafka, run_id):
    topic = f"flowship-src-{run_id}-rebalance"
    group = f"g-{run_id}"
    first = generated_flows(6000, seed=1)
    produce(kafka, topic, first.slice(0, 0))  # creates the topic's 6 partitions
    a = Collector(kafka, topic, group, batch_rows=500).start()
    b = Collector(kafka, topic, group, batch_rows=500).start()
    deadline = time.monotonic() + 60
    # Both members hold partitions before the flows arrive (no race with the first rebalance).
    while not (_holding(a) and _holding(b)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _holding(a) and _holding(b)
    produce(kafka, topic, first)
    while a.rows() + b.rows() < 6000 and time.monotonic() < deadline:
        time.sleep(0.2)
    a.close()  # leaves the group: b takes over a's partitions
    second = generated_flows(6000, seed=2)
    produce(kafka, topic, second)
    want = set(first.column("uuid").to_pylist()) | set(second.column("uuid").to_pylist())
    deadline = time.monotonic() + 60
    while not want <= set(a.uuids()) | set(b.uuids()) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    b.close()
    assert set(a.uuids()) | set(b.uuids()) == want
    assert b.source.summary()["rebalances"] >= 2
    assert committed(kafka, group, topic, 6) == end_offsets(kafka, topic, 6)


# ---------------------------------------------------------------------------------------------
# two `flowship export` processes in one group; one is killed
# ---------------------------------------------------------------------------------------------


def _export_config(path: Path, brokers: str, topic: str, group: str, os_url: str, ds: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = path / "flowship.yaml"
    config.write_text(f"""
node_name: {path.name}
data_dir: {path}/state
shutdown_timeout: 60s
sources:
  - type: kafka
    brokers: "{brokers}"
    topic: {topic}
    group_id: {group}
    session_timeout: 6s
    commit_interval: 500ms
    drain_timeout: 15s
sinks:
  - type: parquet
    path: {path}/parquet
    max_file_age: 1s
  - type: elasticsearch
    url: {os_url}
    data_stream: {ds}
    aggregates_data_stream: {ds.replace('.flows-', '.aggregates-')}
    batch:
      timeout: 500ms
""")
    return config


def _start_export(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flowship.cli", "--log-format", "json", "export", "--config",
                             str(config)], cwd=config.parent, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _parquet_uuids(roots: list[Path]) -> tuple[int, set[str]]:
    files = [str(p) for root in roots for p in root.rglob("*.parquet")]
    if not files:
        return 0, set()
    rows = duckdb.sql(f"select uuid from read_parquet({files!r})").fetchall()
    return len(rows), {r[0] for r in rows}


def _holds_partitions(log: Path) -> bool:
    """The member was given partitions (its JSON log shows a non-empty assignment)."""
    assigned = [json.loads(line) for line in log.read_text().splitlines() if '"partitions assigned"' in line]
    return any(a.get("partitions") for a in assigned)


def _os_count(url: str, ds: str) -> int:
    devservers.http_json("POST", f"{url}/{ds}/_refresh")
    status, body = devservers.http_json("GET", f"{url}/{ds}/_count")
    return body.get("count", 0) if status == 200 else 0


@pytest.mark.servers
def test_two_export_processes_one_killed_nothing_lost(kafka, tmp_path, run_id):
    os_url = devservers.OPENSEARCH
    devservers.start("opensearch", os_url)
    topic = f"flowship-src-{run_id}-group"
    group = f"export-{run_id}"
    ds = f"logs-flowshipgroup{run_id}.flows-default"
    AdminClient({"bootstrap.servers": kafka})  # fail early if the broker is gone
    phases = [generated_flows(8000, seed=10 + i) for i in range(3)]
    want = {u for b in phases for u in b.column("uuid").to_pylist()}
    produce(kafka, topic, phases[0].slice(0, 0), "hubble-json")  # creates the topic's 6 partitions
    a_cfg = _export_config(tmp_path / "a", kafka, topic, group, os_url, ds)
    b_cfg = _export_config(tmp_path / "b", kafka, topic, group, os_url, ds)
    a = _start_export(a_cfg, tmp_path / "a.log")
    b = _start_export(b_cfg, tmp_path / "b.log")
    try:
        deadline = time.monotonic() + 120
        # Both members must hold partitions before the flows arrive, so that both work and a's
        # share has to be taken over when it dies.
        while not (_holds_partitions(tmp_path / "a.log") and _holds_partitions(tmp_path / "b.log")):
            assert time.monotonic() < deadline, (tmp_path / "a.log").read_text()[-3000:]
            assert a.poll() is None and b.poll() is None
            time.sleep(0.2)
        produce(kafka, topic, phases[0], "hubble-json")
        while _os_count(os_url, ds) < 4000 or not _parquet_uuids([tmp_path / "a" / "parquet"])[1]:
            assert time.monotonic() < deadline, (tmp_path / "a.log").read_text()[-3000:]
            assert a.poll() is None and b.poll() is None
            time.sleep(0.5)
        produce(kafka, topic, phases[1], "ecs-json")
        time.sleep(1.0)
        a.send_signal(signal.SIGKILL)  # mid-run: uncommitted work of a is read again by b
        a.wait(10)
        produce(kafka, topic, phases[2], "hubble-json")
        deadline = time.monotonic() + 180
        while True:
            rows, uuids = _parquet_uuids([tmp_path / "a" / "parquet", tmp_path / "b" / "parquet"])
            if uuids >= want and _os_count(os_url, ds) >= len(want):
                break
            assert time.monotonic() < deadline, f"parquet {len(uuids & want)}/{len(want)}, " \
                f"opensearch {_os_count(os_url, ds)}; b log: {(tmp_path / 'b.log').read_text()[-3000:]}"
            assert b.poll() is None, (tmp_path / "b.log").read_text()[-3000:]
            time.sleep(1.0)
        b.send_signal(signal.SIGTERM)
        assert b.wait(90) == 0, (tmp_path / "b.log").read_text()[-3000:]
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
        devservers.http_json("DELETE", f"{os_url}/_data_stream/{ds}")
    a_log, b_log = (tmp_path / "a.log").read_text(), (tmp_path / "b.log").read_text()
    assert "partitions assigned" in a_log  # a took part before it was killed
    assert b_log.count("partitions assigned") >= 2, b_log[-3000:]  # b took over a's partitions
    rows, uuids = _parquet_uuids([tmp_path / "a" / "parquet", tmp_path / "b" / "parquet"])
    rows_a, uuids_a = _parquet_uuids([tmp_path / "a" / "parquet"])
    assert 0 < len(uuids_a) < len(want)  # a delivered part of the flows before it died
    assert uuids == want  # every flow arrived (duplicates allowed: at-least-once)
    assert rows >= len(want)
    # the survivor committed everything: the group has no lag
    assert committed(kafka, group, topic, 6) == end_offsets(kafka, topic, 6)
