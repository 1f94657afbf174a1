"""Kafka sink against a real Kafka 4 broker (deploy/dev/servers start kafka)."""

from __future__ import annotations

import threading
import time

import orjson
import pyarrow as pa
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from helpers import aggregate_rows, generated_flows, make_ctx

from flowship.config import ConfigError, parse
from flowship.model.ids import connection_hashes
from flowship.model.schema import flows_from_rows
from flowship.pipeline.envelope import Envelope, Receipt
from flowship.sinks.kafka import KafkaSink, KafkaSinkConfig, encode_keys, producer_config
from flowship.sources.kafka import decode_messages, detect_encoding

pytestmark = pytest.mark.servers


def _cfg(**kw) -> KafkaSinkConfig:
    return parse(KafkaSinkConfig, kw, "flowship.yaml", "sinks[0]")


class Producing:
    def __init__(self, ctx=None, **kw) -> None:
        self.ctx = ctx or make_ctx("kafka")
        self.sink = KafkaSink(_cfg(**kw), self.ctx)
        self.sink.start()
        self.done: list[bool] = []

    def write(self, batch: pa.RecordBatch, kind: str = "flows") -> None:
        self.sink.write(Envelope(batch, [Receipt(on_done=lambda r: self.done.append(r.failed),
                                                 rows=batch.num_rows)], kind))

    def finish(self) -> list[bool]:
        self.sink.flush()
        self.sink.close()
        return self.done


def consume_all(brokers: str, topic: str, expected: int, timeout: float = 60.0) -> list:
    c = Consumer({"bootstrap.servers": brokers, "group.id": f"check-{topic}-{time.time_ns()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    out = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for msg in c.consume(5000, 0.5):
                if msg.error() is None:
                    out.append(msg)
        # nothing beyond what was expected
        for msg in c.consume(5000, 1.0):
            if msg.error() is None:
                out.append(msg)
    finally:
        c.close()
    return out


# ---------------------------------------------------------------------------------------------


def test_config():
    c = _cfg()
    conf = producer_config(c)
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    assert conf["compression.type"] == "zstd" and conf["linger.ms"] == 50
    assert conf["batch.num.messages"] == 10000
    with pytest.raises(ConfigError) as err:
        _cfg(topic="bad topic!", security_protocol="sasl_ssl", linger_ms=-1)
    text = str(err.value)
    assert "sinks[0].topic: 'bad topic!' is not a valid topic name" in text
    assert "sinks[0].sasl_username: required" in text
    assert "sinks[0].linger_ms" in text


def test_sasl_secrets_resolve(monkeypatch):
    monkeypatch.setenv("KAFKA_PW", "pw!")
    conf = producer_config(_cfg(security_protocol="sasl_ssl", sasl_mechanism="SCRAM-SHA-512",
                                sasl_username="svc", sasl_password="env:KAFKA_PW", ssl_ca_location="/ca.pem"))
    assert conf["sasl.password"] == "pw!" and conf["sasl.username"] == "svc"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512" and conf["ssl.ca.location"] == "/ca.pem"


def test_connection_keys_are_direction_independent():
    flows = flows_from_rows([
        {"time": 1, "ip_src": "10.0.0.1", "ip_dst": "10.0.0.2", "l4_protocol": "TCP", "src_port": 1234, "dst_port": 80},
        {"time": 2, "ip_src": "10.0.0.2", "ip_dst": "10.0.0.1", "l4_protocol": "TCP", "src_port": 80, "dst_port": 1234},
        {"time": 3, "ip_src": "10.0.0.1", "ip_dst": "10.0.0.2", "l4_protocol": "TCP", "src_port": 1235, "dst_port": 80},
    ])
    keys = encode_keys(flows, "connection")
    assert keys[0] == keys[1] != keys[2] and len(keys[0]) == 8
    assert int.from_bytes(keys[0], "big") == int(connection_hashes(flows)[0])
    hexed = encode_keys(flows, "connection", "hex")
    assert hexed[0] == keys[0].hex().encode()
    assert encode_keys(flows, "uuid") == [u.encode() for u in flows.column("uuid").to_pylist()]
    assert encode_keys(flows, "none") is None


@pytest.mark.parametrize("encoding", ["hubble-json", "ecs-json", "protobuf", "arrow"])
def test_every_flow_is_produced_once_and_decodes_back(kafka_server, all_flows, run_id, encoding):
    topic = f"flowship-test-{run_id}-{encoding}"
    p = Producing(brokers=kafka_server, topic=topic, encoding=encoding, create_topic={"partitions": 6})
    p.write(all_flows.slice(0, 700))
    p.write(all_flows.slice(700))
    assert p.finish() == [False, False]
    msgs = consume_all(kafka_server, topic, all_flows.num_rows if encoding != "arrow" else 6)
    if encoding == "arrow":
        # a few messages per partition, each an Arrow IPC stream of up to arrow_max_rows flows
        batch, bad = decode_messages([m.value() for m in msgs], encoding)
        assert bad == [] and batch.num_rows == all_flows.num_rows
        assert sorted(batch.column("uuid").to_pylist()) == sorted(all_flows.column("uuid").to_pylist())
        by_uuid = dict(zip(batch.column("uuid").to_pylist(), range(batch.num_rows), strict=True))
        order = pa.array([by_uuid[u] for u in all_flows.column("uuid").to_pylist()])
        assert batch.take(order).equals(all_flows)  # every column, exactly
        # a connection's flows are all in one partition
        for m in msgs:
            flows = decode_messages([m.value()], encoding)[0]
            keys = set(encode_keys(flows, "connection"))
            for other in msgs:
                if other.partition() != m.partition():
                    assert not keys & set(encode_keys(decode_messages([other.value()], encoding)[0],
                                                      "connection"))
        assert dict(msgs[0].headers())["flowship-encoding"] == b"arrow"
        return
    assert len(msgs) == all_flows.num_rows
    for m in msgs[:50]:
        headers = dict(m.headers())
        assert headers["flowship-encoding"] == encoding.encode()
        assert detect_encoding(m.headers(), m.value()) == encoding
    batch, bad = decode_messages([m.value() for m in msgs], encoding)
    assert bad == []
    assert sorted(batch.column("uuid").to_pylist()) == sorted(all_flows.column("uuid").to_pylist())
    # both directions of a connection share a key, and a key lives in one partition
    partitions: dict[bytes, set[int]] = {}
    for m in msgs:
        partitions.setdefault(m.key(), set()).add(m.partition())
    assert all(len(p) == 1 for p in partitions.values())
    assert len({m.partition() for m in msgs}) > 1
    assert p.ctx.metrics.value("flowship_sink_bytes_total", sink="kafka") > 0


def test_aggregates_go_to_their_topic(kafka_server, fixture_batches, run_id):
    topic = f"flowship-test-{run_id}-agg"
    aggs = aggregate_rows(fixture_batches["hubble-otel-basic-sample-400-tcp-flows"])
    p = Producing(brokers=kafka_server, topic=topic, create_topic={"partitions": 1})
    p.write(aggs, "aggregates")
    assert p.finish() == [False]
    msgs = consume_all(kafka_server, f"{topic}.aggregates", aggs.num_rows)
    assert len(msgs) == aggs.num_rows
    assert dict(msgs[0].headers())["flowship-kind"] == b"aggregates"
    rows = [orjson.loads(m.value()) for m in msgs]
    assert sum(r["flows"] for r in rows) == 400
    assert all(r["window_start"].endswith("Z") for r in rows)


def test_message_too_large_is_dead_lettered_rest_delivered(kafka_server, run_id, tmp_path):
    topic = f"flowship-test-{run_id}-big"
    rows = [{"time": 10**18 + i, "uuid": f"flow-{i}", "summary": "s" * (20_000 if i == 7 else 10)}
            for i in range(20)]
    flows = flows_from_rows(rows)
    ctx = make_ctx("kafka", tmp_path)
    p = Producing(ctx, brokers=kafka_server, topic=topic, compression="none", batch_size=4096, linger_ms=5,
                  create_topic={"partitions": 1, "config": {"max.message.bytes": "8192"}})
    p.write(flows)
    assert p.finish() == [True]
    msgs = consume_all(kafka_server, topic, 19)
    assert len(msgs) == 19
    (entry,) = [orjson.loads(x) for x in (tmp_path / "dead-letter" / "kafka.jsonl").read_bytes().splitlines()]
    assert entry["reason"] == "msg_size_too_large"
    assert '"uuid":"flow-7"' in entry["record"]["value"]
    assert ctx.metrics.value("flowship_sink_dead_letter_total", sink="kafka", reason="msg_size_too_large") == 1


def test_full_local_queue_is_backpressure_not_loss(kafka_server, run_id):
    topic = f"flowship-test-{run_id}-bp"
    flows = generated_flows(20_000)
    p = Producing(brokers=kafka_server, topic=topic, encoding="ecs-json", queue_max_messages=200,
                  create_topic={"partitions": 3})
    p.write(flows)
    assert p.finish() == [False]
    assert p.ctx.metrics.value("flowship_kafka_queue_full_total", sink="kafka") > 0
    admin = AdminClient({"bootstrap.servers": kafka_server})
    md = admin.list_topics(topic, timeout=10)
    c = Consumer({"bootstrap.servers": kafka_server, "group.id": f"wm-{run_id}"})
    total = 0
    for part in md.topics[topic].partitions:
        lo, hi = c.get_watermark_offsets(TopicPartition(topic, part), timeout=10)
        total += hi - lo
    c.close()
    assert total == 20_000


def test_unreachable_broker_keeps_flows_unacknowledged(run_id, tmp_path):
    ctx = make_ctx("kafka", tmp_path)
    p = Producing(ctx, brokers="127.0.0.1:1", topic=f"flowship-test-{run_id}-down", message_timeout="1s",
                  flush_timeout="4s")
    p.write(generated_flows(50))
    result: list = []
    t = threading.Thread(target=lambda: result.append(p.finish()))
    t.start()
    t.join(30)
    assert result == [[]]  # flush gave up: nothing acknowledged
    assert ctx.metrics.value("flowship_kafka_reproduced_total", sink="kafka") >= 50  # timed out, produced again
    assert not (tmp_path / "dead-letter" / "kafka.jsonl").exists()
