"""Fuzzing the binary and message decoders: protobuf flows, GetFlowsResponse frames, Kafka messages.

* Kafka messages of each encoding (``decode_messages``): random bytes, mutated
  messages of real flows, and ``flow.Flow`` messages whose fields hold any
  value their protobuf type allows (ports up to 2^32-1, times far outside the
  flow schema's range): never raises; each bad message is reported with its
  index and a reason; good messages in the same poll are kept.
* ``detect_encoding`` on random headers and values never raises.
* ``GetFlowsResponse`` frames as the hubble source receives them: random and
  mutated frames either fail protobuf decoding (gRPC reports that as a
  stream error) or give a message whose flow time the source can read.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from flowship.model import ecs_encode
from flowship.model.hubble_decode import decode_lines
from flowship.model.hubble_encode import encode_lines
from flowship.model.proto import from_flow_bytes, timestamp_ns, to_flow_bytes
from flowship.model.schema import FLOW_SCHEMA
from flowship.proto.flow import flow_pb2
from flowship.proto.observer import observer_pb2
from flowship.sources.kafka import decode_messages, detect_encoding

FUZZ = settings(max_examples=300, deadline=10_000, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.data_too_large])
FIXTURES = Path(os.environ.get("FLOWSHIP_FIXTURES",
                               Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "hubble"))
ENCODINGS = ("hubble-json", "protobuf", "ecs-json")


@functools.cache
def flows() -> pa.RecordBatch:
    data = b"".join(p.read_bytes() for p in sorted(FIXTURES.glob("*.jsonl")))
    batch = decode_lines(data).batch
    if batch.num_rows < 1000:
        pytest.fail(f"expected the recorded Hubble flows in {FIXTURES} (set FLOWSHIP_FIXTURES)", pytrace=False)
    return batch


@functools.cache
def messages(encoding: str) -> tuple[bytes, ...]:
    """Kafka message values of the fixture flows, as the kafka sink writes them."""
    batch = flows()
    if encoding == "protobuf":
        return tuple(to_flow_bytes(batch))
    if encoding == "ecs-json":
        return tuple(ecs_encode.encode_documents(batch))
    return tuple(line.rstrip(b"\n") for line in encode_lines(batch))


@pytest.fixture(scope="module", autouse=True)
def _build_before_timing() -> None:
    for encoding in ENCODINGS:
        messages(encoding)


def check_decode(values: list[bytes], encoding: str, good: set[int]) -> None:
    """decode_messages never raises, accounts for every message and keeps the ``good`` ones."""
    batch, bad = decode_messages(values, encoding)
    assert isinstance(batch, pa.RecordBatch) and batch.schema.equals(FLOW_SCHEMA)
    batch.validate(full=True)
    bad_indexes = [i for i, _ in bad]
    assert len(set(bad_indexes)) == len(bad_indexes) and all(0 <= i < len(values) for i in bad_indexes)
    assert all(isinstance(reason, str) and reason for _, reason in bad)
    assert not good & set(bad_indexes), f"a good message was rejected: {bad}"
    assert batch.num_rows + len(bad) <= len(values) or encoding == "hubble-json"
    assert batch.num_rows >= len(good)


def mutate(data: st.DataObject, value: bytes) -> bytes:
    buf = bytearray(value)
    for _ in range(data.draw(st.integers(1, 4))):
        if not buf:
            break
        at = data.draw(st.integers(0, len(buf) - 1))
        op = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate", "byte"]))
        if op == "flip":
            buf[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "delete":
            del buf[at:at + data.draw(st.integers(1, 16))]
        elif op == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del buf[at:]
        else:
            buf[at] = data.draw(st.integers(0, 255))
    return bytes(buf)


# -- Kafka messages ----------------------------------------------------------------------------

@FUZZ
@given(values=st.lists(st.binary(max_size=600), min_size=1, max_size=8), encoding=st.sampled_from(ENCODINGS))
def test_random_messages(values, encoding, tried):
    tried[f"kafka: random {encoding} messages"] += 1
    check_decode(values, encoding, set())


@FUZZ
@given(data=st.data(), encoding=st.sampled_from(ENCODINGS))
def test_mutated_messages_keep_good_neighbours(data, encoding, tried):
    tried[f"kafka: mutated {encoding} messages"] += 1
    pool = messages(encoding)
    good = [data.draw(st.sampled_from(pool)) for _ in range(2)]
    bad = mutate(data, data.draw(st.sampled_from(pool)))
    check_decode([good[0], bad, good[1]], encoding, {0, 2})


U32 = st.integers(0, 2**32 - 1)
I32 = st.integers(-(2**31), 2**31 - 1)


@st.composite
def extreme_flow(draw) -> flow_pb2.Flow:  # noqa: ANN001
    """A flow.Flow with values anywhere in their protobuf types' ranges."""
    f = flow_pb2.Flow()
    f.time.seconds = draw(st.one_of(st.integers(0, 2**33), st.integers(-(2**63), 2**63 - 1)))
    f.time.nanos = draw(st.integers(-(2**31), 2**31 - 1))
    f.uuid = draw(st.text(max_size=40))
    f.verdict = draw(st.integers(0, 2**31 - 1))
    f.IP.source = draw(st.text(max_size=40))
    f.IP.destination = draw(st.sampled_from(["10.0.0.1", "::1", "", "999.1.1.1"]))
    proto = draw(st.sampled_from(["TCP", "UDP", "ICMPv4", "SCTP"]))
    if proto == "ICMPv4":
        f.l4.ICMPv4.type = draw(U32)
        f.l4.ICMPv4.code = draw(U32)
    else:
        ports = getattr(f.l4, proto)
        ports.source_port = draw(U32)
        ports.destination_port = draw(U32)
    f.source.identity = draw(U32)
    f.source.ID = draw(U32)
    f.source.labels.extend(draw(st.lists(st.text(max_size=20), max_size=3)))
    f.destination.namespace = draw(st.text(max_size=20))
    f.event_type.type = draw(I32)
    f.l7.latency_ns = draw(st.integers(0, 2**64 - 1))
    f.l7.http.code = draw(U32)
    f.l7.http.url = draw(st.text(max_size=60))
    f.l7.dns.rcode = draw(U32)
    f.l7.dns.ttl = draw(U32)
    f.drop_reason_desc = draw(st.integers(0, 2**31 - 1))
    f.traffic_direction = draw(st.integers(0, 2**31 - 1))
    f.Summary = draw(st.text(max_size=50))
    return f


@FUZZ
@given(extremes=st.lists(extreme_flow(), min_size=1, max_size=4), data=st.data())
def test_protobuf_values_out_of_the_schemas_range(extremes, data, tried):
    """A poison message (a port above 65535, a time past 2262) is rejected alone, never raised."""
    tried["kafka: protobuf flows with extreme values"] += 1
    good = [data.draw(st.sampled_from(messages("protobuf"))) for _ in range(2)]
    values = [good[0], *(m.SerializeToString() for m in extremes), good[1]]
    check_decode(values, "protobuf", {0, len(values) - 1})


@FUZZ
@given(headers=st.one_of(st.none(), st.lists(st.tuples(st.sampled_from(["flowship-encoding", "content-type", "x"]),
                                                        st.binary(max_size=30)), max_size=3)),
       value=st.binary(max_size=300))
def test_detect_encoding_never_raises(headers, value, tried):
    tried["kafka: detect_encoding"] += 1
    assert isinstance(detect_encoding(headers, value), str)


# -- protobuf flows and GetFlowsResponse frames -------------------------------------------------

@FUZZ
@given(payload=st.binary(max_size=800))
def test_random_flow_bytes(payload, tried):
    """from_flow_bytes: a batch, or DecodeError for bytes that are not a flow.Flow."""
    tried["proto: random flow.Flow bytes"] += 1
    try:
        msg = flow_pb2.Flow.FromString(payload)
    except DecodeError:
        with pytest.raises(DecodeError):
            from_flow_bytes([payload])
        return
    assert isinstance(msg, flow_pb2.Flow)
    check_decode([payload], "protobuf", set())


def response_frames() -> list[bytes]:
    out = []
    for i, payload in enumerate(messages("protobuf")[:200]):
        resp = observer_pb2.GetFlowsResponse(node_name=f"node-{i % 3}")
        resp.flow.ParseFromString(payload)
        resp.time.CopyFrom(resp.flow.time)
        out.append(resp.SerializeToString())
    lost = observer_pb2.GetFlowsResponse(node_name="n")
    lost.lost_events.num_events_lost = 7
    out.append(lost.SerializeToString())
    return out


@functools.cache
def frames() -> tuple[bytes, ...]:
    return tuple(response_frames())


def read_frame(frame: bytes) -> tuple[str | None, int | None]:
    """What the hubble source does with one response: its kind and the flow's time (ns)."""
    resp = observer_pb2.GetFlowsResponse.FromString(frame)
    kind = resp.WhichOneof("response_types")
    if kind != "flow":
        return kind, None
    flow = resp.flow
    t = timestamp_ns(flow.time) if flow.HasField("time") else (
        timestamp_ns(resp.time) if resp.HasField("time") else None)
    return kind, t


@FUZZ
@given(data=st.data())
def test_get_flows_response_frames(data, tried):
    tried["hubble: GetFlowsResponse frames (random and mutated)"] += 1
    if data.draw(st.booleans()):
        frame = data.draw(st.binary(max_size=800))
    else:
        frame = mutate(data, data.draw(st.sampled_from(frames())))
    try:
        kind, t = read_frame(frame)
    except DecodeError:
        return  # grpc turns this into a stream error; the source reconnects
    assert kind in (None, "flow", "node_status", "lost_events", "agent_event", "debug_event")
    assert t is None or isinstance(t, int)
    if kind == "flow":
        resp = observer_pb2.GetFlowsResponse.FromString(frame)
        check_decode([resp.flow.SerializeToString()], "protobuf", set())


# -- Arrow messages that decode but cannot be written (poison) ------------------------------------

POISON_KINDS = ("null_time", "null_time_strict_schema", "duplicate_column", "wrong_type", "port_out_of_range",
                "time_out_of_range", "missing_time", "invalid_utf8", "truncated_stream", "garbage")
VALID_KINDS = ("plain", "extra_column", "missing_nullable_column", "wider_integers", "microsecond_times",
               "dictionary_strings", "null_uuid")


def arrow_ipc(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _with(batch: pa.RecordBatch, name: str, array: pa.Array, field: pa.Field | None = None) -> pa.RecordBatch:
    return batch.set_column(batch.schema.get_field_index(name), field or name, array)


def arrow_variant(kind: str, batch: pa.RecordBatch, row: int) -> bytes:
    """An Arrow IPC message of ``batch`` (FLOW_SCHEMA rows) made into ``kind``; ``row`` is the row spoiled."""
    n = batch.num_rows
    times = batch.column("time").cast(pa.int64()).to_pylist()
    if kind == "plain":
        return arrow_ipc(batch)
    if kind == "extra_column":
        return arrow_ipc(batch.append_column("from_a_newer_writer", pa.array(range(n), pa.int64())))
    if kind == "missing_nullable_column":
        return arrow_ipc(batch.drop_columns(["http_url", "dns_ips", "tcp_flags"]))
    if kind == "wider_integers":
        return arrow_ipc(_with(batch, "src_port", batch.column("src_port").cast(pa.int64())))
    if kind == "microsecond_times":
        us = pa.array([t // 1000 for t in times], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        return arrow_ipc(_with(batch, "time", us))
    if kind == "dictionary_strings":
        return arrow_ipc(_with(batch, "verdict", batch.column("verdict").dictionary_encode()))
    if kind == "null_uuid":
        values = batch.column("uuid").to_pylist()
        values[row] = None
        return arrow_ipc(_with(batch, "uuid", pa.array(values, pa.string()), pa.field("uuid", pa.string())))
    if kind in ("null_time", "null_time_strict_schema"):
        times[row] = None
        nulled = pa.array(times, pa.int64()).cast(batch.schema.field("time").type)
        if kind == "null_time":
            return arrow_ipc(_with(batch, "time", nulled, pa.field("time", nulled.type, nullable=True)))
        columns = list(batch.columns)
        columns[0] = nulled
        return arrow_ipc(pa.RecordBatch.from_arrays(columns, schema=FLOW_SCHEMA))  # claims non-null, holds a null
    if kind == "duplicate_column":
        return arrow_ipc(pa.RecordBatch.from_arrays([*batch.columns, batch.column("dst_port")],
                                                    names=[*batch.schema.names, "dst_port"]))
    if kind == "wrong_type":
        ports = [str(p) for p in batch.column("dst_port").to_pylist()]
        ports[row] = "http"
        return arrow_ipc(_with(batch, "dst_port", pa.array(ports, pa.string())))
    if kind == "port_out_of_range":
        ports = batch.column("src_port").cast(pa.int64()).to_pylist()
        ports[row] = 70000
        return arrow_ipc(_with(batch, "src_port", pa.array(ports, pa.int64())))
    if kind == "time_out_of_range":
        seconds = [t // 10**9 for t in times]
        seconds[row] = 32503680000  # year 3000: past what nanoseconds since 1970 can hold
        return arrow_ipc(_with(batch, "time", pa.array(seconds, pa.int64()).cast(pa.timestamp("s", tz="UTC"))))
    if kind == "missing_time":
        return arrow_ipc(batch.drop_columns(["time"]))
    if kind == "invalid_utf8":
        urls = [b"/ok"] * n
        urls[row] = b"/\xff\xfe"
        raw = pa.array(urls, pa.binary())
        return arrow_ipc(_with(batch, "http_url", pa.Array.from_buffers(pa.string(), n, raw.buffers())))
    if kind == "truncated_stream":
        whole = arrow_ipc(batch)
        return whole[:len(whole) // 2]
    if kind == "garbage":
        return b"\xff\xff\xff\xff" + bytes(range(64))
    raise AssertionError(kind)


def check_writable(batch: pa.RecordBatch) -> None:
    """What the sinks do with a batch: Parquet, ECS and Hubble JSON encodings, never raise."""
    pq.write_table(pa.Table.from_batches([batch]), pa.BufferOutputStream())
    if batch.num_rows:
        ecs_encode.ndjson_array(batch)
        encode_lines(batch)


@st.composite
def arrow_plan(draw: st.DrawFn, kinds: tuple[str, ...] = POISON_KINDS + VALID_KINDS) -> list[tuple[str, int, int]]:
    """(kind, rows, spoiled row) per message."""
    out = []
    for _ in range(draw(st.integers(2, 10))):
        rows = draw(st.integers(1, 12))
        out.append((draw(st.sampled_from(kinds)), rows, draw(st.integers(0, rows - 1))))
    return out


@FUZZ
@given(plan=arrow_plan())
def test_arrow_poison_messages_are_rejected_alone(plan, tried):
    """Each Arrow message a sink could not write is rejected by itself; valid ones in the same poll are kept
    and what they decode to every sink can encode."""
    tried["kafka: arrow messages, poison and valid"] += 1
    base = flows()
    values, start = [], 0
    for kind, rows, row in plan:
        values.append(arrow_variant(kind, base.slice(start % (base.num_rows - 20), rows), row))
        start += rows
    batch, bad = decode_messages(values, "arrow")
    poison = {i for i, (kind, _, _) in enumerate(plan) if kind in POISON_KINDS}
    assert {i for i, _ in bad} == poison, bad
    assert batch.num_rows == sum(rows for kind, rows, _ in plan if kind not in POISON_KINDS)
    assert batch.schema.equals(FLOW_SCHEMA)
    batch.validate(full=True)
    assert batch.column("time").null_count == 0 and batch.column("uuid").null_count == 0
    check_writable(batch)


# -- the same messages on the real broker, consumed by `flowship export` into every sink type ---------

REPO = Path(__file__).resolve().parents[2]
EXIT_REJECTED = 3  # README: finished, but some input was rejected
BROKER = settings(max_examples=3, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _devservers() -> ModuleType:
    """tests/sinks/devservers.py: starts the dev servers or fails naming `deploy/dev/servers start`."""
    sys.path.insert(0, str(REPO / "tests" / "sinks"))
    return importlib.import_module("devservers")


def _export_config(root: Path, servers: ModuleType, run: str, topic: str) -> Path:
    config = root / "flowship.yaml"
    config.write_text(f"""
node_name: fuzz
data_dir: {root}/state
shutdown_timeout: 30s
sources:
  - type: kafka
    brokers: "{servers.KAFKA}"
    topic: {topic}
    group_id: fuzz-{run}
    commit_interval: 200ms
    poll_timeout: 200ms
sinks:
  - type: parquet
    path: {root}/parquet
    max_file_age: 1s
  - type: file
    path: {root}/flows.jsonl
  - type: kafka
    brokers: "{servers.KAFKA}"
    topic: {topic}-out
    encoding: hubble-json
    create_topic:
      partitions: 1
  - type: elasticsearch
    url: {servers.OPENSEARCH}
    data_stream: logs-flowshipfuzz{run}.flows-default
    aggregates_data_stream: logs-flowshipfuzz{run}.aggregates-default
    batch:
      timeout: 200ms
  - type: loki
    url: {servers.VICTORIALOGS}/insert/loki/api/v1/push?disable_message_parsing=1
    static_labels:
      job: fuzz{run}
    batch:
      timeout: 200ms
""")
    return config


def _offsets(brokers: str, topic: str, partitions: int, group: str | None = None) -> dict[int, int]:
    """End offsets of a topic's partitions, or a group's committed offsets (-1: none)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    c = Consumer({"bootstrap.servers": brokers, "group.id": group or f"probe-{uuid.uuid4().hex}"})
    try:
        if group:
            return {tp.partition: tp.offset for tp in c.committed([TopicPartition(topic, p)
                                                                   for p in range(partitions)], timeout=10)}
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    except KafkaException:  # the group's coordinator is still being chosen: ask again
        return {}
    finally:
        c.close()


def _victorialogs_count(base: str, job: str, want: int) -> int:
    """Entries of a stream, once ``want`` are searchable (VictoriaLogs shows new entries within seconds)."""
    query = urllib.parse.urlencode({"query": f'_stream:{{job="{job}"}} | stats count() c'})
    deadline = time.monotonic() + 15
    while True:
        with urllib.request.urlopen(f"{base}/select/logsql/query?{query}", timeout=30) as resp:
            rows = [json.loads(line) for line in resp.read().decode().splitlines() if line.strip()]
        got = int(rows[0]["c"]) if rows else 0
        if got >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def _interleaved_kinds() -> list[tuple[str, int, int]]:
    kinds = [(k, 5, 2) for k in POISON_KINDS]
    valid = [(k, 4, 1) for k in VALID_KINDS]
    return [m for pair in zip(valid, kinds, strict=False) for m in pair] + kinds[len(valid):]


@pytest.mark.servers
@BROKER
@example(plan=_interleaved_kinds())
@given(plan=arrow_plan())
def test_poison_messages_on_the_broker_reach_no_sink_and_stop_nothing(plan, tried):
    """Arrow messages produced to the real broker and consumed by ``flowship export`` with a parquet, file,
    kafka, elasticsearch (OpenSearch) and loki (VictoriaLogs) sink: every valid flow reaches every sink exactly
    once, each poison message is in the source's dead-letter file with its partition and offset, the group
    commits past all of them, and the run ends by itself when asked (no crash, no restart loop)."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from flowship.model.schema import flows_from_rows

    tried["kafka: arrow messages on the broker through every sink"] += 1
    servers = _devservers()
    for name, address in (("kafka", servers.KAFKA), ("opensearch", servers.OPENSEARCH),
                          ("victorialogs", servers.VICTORIALOGS)):
        servers.start(name, address)  # fails naming `deploy/dev/servers start` when a server is missing
    run = f"{int(time.time())}{uuid.uuid4().hex[:6]}"
    topic = f"flowship-fuzz-{run}"
    admin = AdminClient({"bootstrap.servers": servers.KAFKA})
    for future in admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)]).values():
        future.result(30)

    now = time.time_ns() - 30 * 10**9  # recent: VictoriaLogs keeps only its retention period
    total = sum(rows for _, rows, _ in plan)
    base = flows_from_rows([{"time": now + i * 1000, "node_name": "fuzz", "verdict": "FORWARDED",
                             "ip_src": "10.1.0.1", "ip_dst": "10.2.0.2", "l4_protocol": "TCP",
                             "src_port": 1024 + i, "dst_port": 443, "src_namespace": "fuzz",
                             "uuid": f"{run}-{i}"} for i in range(total)])
    producer = Producer({"bootstrap.servers": servers.KAFKA})
    placed: list[tuple[int, int]] = []
    start = 0
    for i, (kind, rows, row) in enumerate(plan):
        value = arrow_variant(kind, base.slice(start, rows), row)
        start += rows
        producer.produce(topic, value, partition=i % 2, headers=[("flowship-encoding", b"arrow")],
                         on_delivery=lambda err, msg: placed.append((msg.partition(), msg.offset())))
        producer.flush(30)  # in order, one by one: placed[i] belongs to plan[i]
    assert len(placed) == len(plan)
    poison = {placed[i] for i, (kind, _, _) in enumerate(plan) if kind in POISON_KINDS}
    want: set[str] = set()
    start = 0
    for kind, rows, row in plan:
        ids = [f"{run}-{j}" for j in range(start, start + rows)]
        if kind == "null_uuid":
            ids.pop(row)  # computed from the flow's content
        if kind not in POISON_KINDS:
            want.update(ids)
        start += rows
    delivered = sum(rows for kind, rows, _ in plan if kind not in POISON_KINDS)

    root = Path(tempfile.mkdtemp(prefix="flowship-fuzz-"))
    config = _export_config(root, servers, run, topic)
    log = root / "export.log"
    proc = subprocess.Popen([sys.executable, "-m", "flowship.cli", "--log-format", "json", "export", "--config",
                             str(config)], cwd=root, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    ds = f"logs-flowshipfuzz{run}.flows-default"
    try:
        end = _offsets(servers.KAFKA, topic, 2)
        deadline = time.monotonic() + 120
        while _offsets(servers.KAFKA, topic, 2, f"fuzz-{run}") != end:  # commits follow every sink's ack
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"not committed to {end}: {log.read_text()[-3000:]}"
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        text = log.read_text()
        assert code == (EXIT_REJECTED if poison else 0), text[-3000:]

        rejected = [json.loads(line) for line in text.splitlines() if '"message rejected"' in line]
        assert {(r["partition"], r["offset"]) for r in rejected} == poison
        dead_file = root / "state" / "dead-letter" / "source-kafka.jsonl"
        dead = [json.loads(line) for line in dead_file.read_text().splitlines()] if poison else []
        assert not poison or dead_file.exists()
        assert sorted((d["record"]["partition"], d["record"]["offset"]) for d in dead) == sorted(poison)
        assert all(d["source"] == "kafka" and d["record"]["topic"] == topic and d["record"]["value_base64"]
                   for d in dead)
        assert not list((root / "state" / "dead-letter").glob("[!s]*.jsonl")), "a sink dead-lettered flows"

        parquet = pa.concat_tables([pq.read_table(p)
                                    for p in sorted((root / "parquet").rglob("*.parquet"))]) \
            if delivered else None
        if parquet is not None:
            assert parquet.num_rows == delivered
            ids = [u for u in parquet.column("uuid").to_pylist() if u.startswith(run)]
            assert set(ids) == want and len(ids) == len(want)
        lines = (root / "flows.jsonl").read_bytes().splitlines() if (root / "flows.jsonl").exists() else []
        assert len(lines) == delivered
        assert sum(_offsets(servers.KAFKA, f"{topic}-out", 1).values()) == delivered if delivered else True
        servers.http_json("POST", f"{servers.OPENSEARCH}/{ds}/_refresh")
        status, body = servers.http_json("GET", f"{servers.OPENSEARCH}/{ds}/_count")
        assert (body.get("count", 0) if status == 200 else 0) == delivered
        assert _victorialogs_count(servers.VICTORIALOGS, f"fuzz{run}", delivered) == delivered
    finally:
        if proc.poll() is None:
            proc.kill()
        for name in (ds, f"logs-flowshipfuzz{run}.aggregates-default"):
            servers.http_json("DELETE", f"{servers.OPENSEARCH}/_data_stream/{name}")
        for name in (f"logs-flowshipfuzz{run}.flows", f"logs-flowshipfuzz{run}.aggregates"):
            servers.http_json("DELETE", f"{servers.OPENSEARCH}/_index_template/{name}")
        admin.delete_topics([topic, f"{topic}-out"])
