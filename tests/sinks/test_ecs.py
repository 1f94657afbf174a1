"""ECS mapping: field values, the columnar JSON fast path, decoding back, aggregates, docs."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowship.model import ecs_decode, ecs_encode, ecs_fields
from flowship.model.schema import FLOW_SCHEMA, flows_from_rows

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_123_456_789


def _doc(row: dict) -> dict:
    return ecs_encode.to_documents(flows_from_rows([{"time": T0, **row}]))[0]


def test_fast_path_equals_dict_path_on_every_fixture(fixture_batches):
    total = 0
    for name, batch in fixture_batches.items():
        docs = ecs_encode.to_documents(batch)
        lines = ecs_encode.encode_documents(batch)
        assert len(lines) == len(docs) == batch.num_rows
        for doc, line in zip(docs, lines, strict=True):
            assert orjson.loads(line) == doc, name
        total += batch.num_rows
    assert total == 1518


def test_ndjson_lines_end_with_newline(fixture_batches):
    batch = fixture_batches["hubble-otel-basic-sample-5-dns-flows"]
    lines = ecs_encode.encode_ndjson(batch)
    assert len(lines) == 5
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    assert [orjson.loads(line) for line in lines] == ecs_encode.to_documents(batch)


def test_dropped_flow_fields(fixture_batches):
    docs = ecs_encode.to_documents(fixture_batches["cilium-docs-exporter-fieldmask-2-drops"])
    v6, v4 = docs
    assert v6["network"]["transport"] == "ipv6-icmp"
    assert v6["network"]["iana_number"] == "58"
    assert v6["network"]["type"] == "ipv6"
    assert v6["flowship"]["drop_reason"] == "INVALID_SOURCE_IP"
    assert v4["@timestamp"] == "2023-08-21T12:12:18.510175415Z"
    assert v4["event"]["kind"] == "event"
    assert v4["event"]["category"] == ["network"]
    assert v4["event"]["type"] == ["connection", "denied", "start"]  # SYN without ACK
    assert v4["event"]["action"] == "flow_dropped"
    assert v4["event"]["outcome"] == "failure"
    assert v4["event"]["dataset"] == "flowship.flows"
    assert v4["source"] == {"ip": "10.244.1.60", "port": 44916}
    assert v4["destination"] == {"ip": "10.244.1.5", "port": 80}
    assert v4["network"]["transport"] == "tcp"
    assert v4["network"]["iana_number"] == "6"
    assert v4["network"]["community_id"].startswith("1:")
    assert v4["host"]["name"] == "kind-kind/kind-worker"
    assert v4["orchestrator"]["cluster"]["name"] == "kind-kind"
    assert v4["related"]["ip"] == ["10.244.1.60", "10.244.1.5"]
    assert v4["flowship"]["verdict"] == "DROPPED"
    assert v4["flowship"]["drop_reason"] == "POLICY_DENIED"
    assert v4["flowship"]["tcp"]["flags"] == ["SYN"]
    assert v4["flowship"]["source"] == {"namespace": "default", "pod": "xwing"}
    assert v4["event"]["id"] == fixture_batches["cilium-docs-exporter-fieldmask-2-drops"].column("uuid")[1].as_py()


def test_http_fields(fixture_batches):
    batch = fixture_batches["hubble-otel-basic-sample-5-http-flows"]
    docs = ecs_encode.to_documents(batch)
    request = docs[0]
    assert request["network"]["protocol"] == "http"
    assert request["event"]["action"] == "http_request"
    assert request["event"]["type"] == ["connection", "allowed", "protocol"]
    assert request["http"] == {"request": {"method": "GET"}, "version": "1.1"}
    assert request["url"] == {"original": "http://10.128.0.4:9990/metrics", "scheme": "http",
                              "domain": "10.128.0.4", "port": 9990, "path": "/metrics"}
    assert request["user_agent"] == {"original": "Prometheus/2.15.1"}
    assert request["network"]["direction"] == "egress"
    assert request["orchestrator"] == {"type": "kubernetes", "namespace": "istio-system",
                                       "resource": {"type": "pod", "name": "prometheus-6655946b9f-6xcpf"}}
    responses = [d for d in docs if d["event"]["action"] == "http_response"]
    assert responses, "the fixture holds responses"
    for d in responses:
        code = d["http"]["response"]["status_code"]
        assert d["event"]["outcome"] == ("failure" if code >= 400 else "success")
        # a response travels back to the egress pod: the local endpoint is the destination
        assert d["orchestrator"]["resource"]["name"] == d["flowship"]["destination"]["pod"]


def test_dns_fields(fixture_batches):
    docs = ecs_encode.to_documents(fixture_batches["hubble-otel-basic-sample-5-dns-flows"])
    query, answer = docs[0], docs[1]
    assert query["dns"] == {"type": "query", "question": {
        "name": "istiod-istio-1611.istio-system.svc.istio-system.svc.cluster.local", "type": "A"}}
    assert query["event"]["action"] == "dns_query"
    assert answer["dns"]["type"] == "answer"
    assert answer["dns"]["response_code"] == "NXDOMAIN"
    assert answer["event"]["action"] == "dns_response"
    assert answer["event"]["outcome"] == "failure"
    assert answer["flowship"]["dns"]["query"].endswith("cluster.local.")
    assert answer["flowship"]["dns"]["rcode"] == 3


def test_counters_times_and_macs():
    doc = _doc({
        "uuid": "u-1", "start_time": T0 - 2_000_000_000, "ip_src": "10.0.0.1", "ip_dst": "10.0.0.2",
        "l4_protocol": "TCP", "src_port": 1234, "dst_port": 443, "ip_version": 4, "bytes": 100, "packets": 2,
        "reply_bytes": 5000, "reply_packets": 4, "eth_src": "46:e5:ea:1f:95:ff", "verdict": "FORWARDED",
        "flow_event": "close", "tcp_flags": 0x011, "tcp_handshake_ns": 1500, "server_time_ns": 2500,
        "ip_src_xlated": "192.168.1.1", "sample_rate": 10,
    })
    assert doc["@timestamp"] == "2023-11-14T22:13:20.123456789Z"
    assert doc["event"]["start"] == "2023-11-14T22:13:18.123456789Z"
    assert doc["event"]["end"] == doc["@timestamp"]
    assert doc["event"]["duration"] == 2_000_000_000
    assert doc["event"]["type"] == ["connection", "allowed", "end"]
    assert doc["source"] == {"ip": "10.0.0.1", "port": 1234, "mac": "46-E5-EA-1F-95-FF", "bytes": 100,
                             "packets": 2, "nat": {"ip": "192.168.1.1"}}
    assert doc["destination"] == {"ip": "10.0.0.2", "port": 443, "bytes": 5000, "packets": 4}
    assert doc["network"]["bytes"] == 5100 and doc["network"]["packets"] == 6
    assert doc["related"]["ip"] == ["10.0.0.1", "10.0.0.2", "192.168.1.1"]
    assert doc["flowship"]["tcp"] == {"flags_raw": 17, "flags": ["FIN", "ACK"], "handshake_ns": 1500}
    assert doc["flowship"]["server_time_ns"] == 2500
    assert doc["flowship"]["sample_rate"] == 10
    assert "orchestrator" not in doc


def test_json_escaping_of_awkward_strings():
    awkward = 'q"uote\\back\nline\ttab\x01ctl ünï €'
    batch = flows_from_rows([{"time": T0, "uuid": "a", "src_pod": awkward, "http_url": "/p?x=\"y\"",
                              "src_labels": [awkward, "k=v"], "dns_query": "a\\b."}])
    line = ecs_encode.encode_documents(batch)[0]
    doc = orjson.loads(line)
    assert doc == ecs_encode.to_documents(batch)[0]
    assert doc["flowship"]["source"]["pod"] == awkward
    assert doc["flowship"]["source"]["labels"] == [awkward, "k=v"]
    assert doc["url"]["query"] == 'x="y"'


def test_empty_batch():
    empty = flows_from_rows([])
    assert ecs_encode.encode_documents(empty) == []
    assert ecs_encode.encode_ndjson(empty) == []
    assert ecs_encode.to_documents(empty) == []


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_maybe_text = st.one_of(st.none(), _text)
_row = st.fixed_dictionaries({
    "time": st.integers(0, 4_000_000_000_000_000_000),
    "uuid": _text,
    "verdict": st.sampled_from([None, "FORWARDED", "DROPPED", "ERROR", "AUDIT"]),
    "ip_src": st.one_of(st.none(), st.ip_addresses().map(str)),
    "ip_dst": st.one_of(st.none(), st.ip_addresses().map(str)),
    "l4_protocol": st.sampled_from([None, "TCP", "UDP", "ICMPv4", "ICMPv6", "SCTP"]),
    "src_port": st.one_of(st.none(), st.integers(0, 65535)),
    "tcp_flags": st.one_of(st.none(), st.integers(0, 511)),
    "src_namespace": _maybe_text,
    "dst_pod": _maybe_text,
    "src_labels": st.one_of(st.none(), st.lists(_text, max_size=3)),
    "http_url": _maybe_text,
    "http_code": st.one_of(st.none(), st.integers(0, 599)),
    "dns_query": _maybe_text,
    "bytes": st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    "is_reply": st.one_of(st.none(), st.booleans()),
    "traffic_direction": st.sampled_from([None, "INGRESS", "EGRESS", "TRAFFIC_DIRECTION_UNKNOWN"]),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_row, min_size=1, max_size=25))
def test_fast_path_equals_dict_path_property(rows):
    batch = flows_from_rows(rows)
    docs = ecs_encode.to_documents(batch)
    assert [orjson.loads(x) for x in ecs_encode.encode_documents(batch)] == docs
    back, bad = ecs_decode.decode_ndjson(ecs_encode.encode_documents(batch))
    assert bad == []
    for column in ("time", "uuid", "verdict", "ip_src", "ip_dst", "l4_protocol", "src_port", "tcp_flags",
                   "src_namespace", "dst_pod", "src_labels", "bytes", "is_reply", "traffic_direction"):
        want, got = batch.column(column), back.column(column)
        if column == "time":
            want, got = want.cast(pa.int64()), got.cast(pa.int64())
        want = [v if v not in ("", []) else None for v in want.to_pylist()]
        got = [v if v not in ("", []) else None for v in got.to_pylist()]
        assert got == want, column


def test_decode_restores_fixture_columns(all_flows):
    lines = ecs_encode.encode_documents(all_flows)
    back, bad = ecs_decode.decode_ndjson(lines)
    assert bad == []
    assert back.num_rows == all_flows.num_rows
    restored = {f.inverse for f in ecs_fields.FLOW_FIELDS if f.inverse}
    assert {"time", "uuid", "ip_src", "ip_dst", "src_port", "dst_port", "l4_protocol", "verdict", "drop_reason",
            "src_namespace", "dst_pod", "src_labels", "http_url", "http_code", "dns_query", "dns_rcode",
            "tcp_flags", "traffic_direction", "community_id", "node_name", "eth_src"} <= restored
    for column in sorted(restored):
        want, got = all_flows.column(column), back.column(column)
        if pa.types.is_timestamp(want.type):
            want, got = want.cast(pa.int64()), got.cast(pa.int64())
        assert got.to_pylist() == want.to_pylist(), column


def test_decode_reports_bad_documents():
    good = ecs_encode.encode_documents(flows_from_rows([{"time": T0, "uuid": "ok"}]))[0]
    batch, bad = ecs_decode.decode_ndjson([good, b"not json", b"[1,2]", b'{"event":{"id":"x"}}',
                                    b'{"@timestamp":"2023-01-01T00:00:00Z","source":{"port":"eighty"}}'])
    assert batch.num_rows == 1
    assert [i for i, _ in bad] == [1, 2, 3, 4]
    assert "invalid JSON" in bad[0][1]
    assert "no @timestamp" in bad[2][1]


def test_aggregate_documents():
    from flowship.model.aggregate_schema import aggregate_schema

    schema = aggregate_schema()
    row = {name: None for name in schema.names}
    row.update({"window_start": T0, "window_end": T0 + 60_000_000_000, "node_name": "n1",
                "src_namespace": "shop", "dst_namespace": "db", "server_port": 5432, "l4_protocol": "TCP",
                "verdict": "DROPPED", "overflow": False, "flows": 12.0, "flows_raw": 12, "bytes": 10, "packets": 1,
                "reply_bytes": 0, "reply_packets": 0, "bytes_estimate": 10.0, "packets_estimate": 1.0,
                "connections": 3, "first_seen": T0 + 1, "last_seen": T0 + 2, "latency_samples": 0,
                "late_flows": 0})
    arrays = [pa.array([row[f.name]], f.type if not pa.types.is_timestamp(f.type) else pa.int64())
              for f in schema]
    arrays = [a.cast(f.type) for a, f in zip(arrays, schema, strict=True)]
    batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
    (doc,) = ecs_encode.aggregate_documents(batch)
    assert doc["@timestamp"] == "2023-11-14T22:13:20.123456789Z"
    assert doc["event"]["kind"] == "metric"
    assert doc["event"]["dataset"] == "flowship.aggregates"
    assert doc["event"]["end"] == "2023-11-14T22:14:20.123456789Z"
    assert doc["host"]["name"] == "n1"
    assert doc["destination"]["port"] == 5432
    assert doc["network"]["transport"] == "tcp"
    assert doc["flowship"]["verdict"] == "DROPPED"
    assert doc["flowship"]["source"]["namespace"] == "shop"
    assert doc["flowship"]["aggregate"]["flows"] == 12.0
    assert doc["flowship"]["aggregate"]["connections"] == 3
    assert doc["flowship"]["aggregate"]["first_seen"] == "2023-11-14T22:13:20.123456790Z"
    assert "type" not in doc["event"] or doc["event"]["type"] == ["info"]
    lines = ecs_encode.encode_ndjson(batch, kind="aggregates")
    assert orjson.loads(lines[0]) == doc


def test_every_field_is_documented():
    text = (REPO / "docs" / "ecs.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", text, re.M))
    mapped = {f.path for f in ecs_fields.FLOW_FIELDS}
    assert mapped - documented == set(), "fields missing from docs/ecs.md"
    assert documented - mapped - {"flowship.aggregate.*"} == set(), "docs/ecs.md lists fields the mapping lacks"


def test_es_mapping_types():
    props = ecs_fields.es_properties()
    assert props["@timestamp"] == {"type": "date_nanos"}
    assert props["source"]["properties"]["ip"] == {"type": "ip"}
    assert props["related"]["properties"]["ip"] == {"type": "ip"}
    assert props["source"]["properties"]["port"] == {"type": "long"}
    assert props["flowship"]["properties"]["socket_cookie"] == {"type": "unsigned_long"}
    assert props["event"]["properties"]["action"]["type"] == "keyword"


@pytest.mark.parametrize("column", [f.name for f in FLOW_SCHEMA])
def test_every_flow_column_is_exported_or_listed(column):
    used = {c for f in ecs_fields.FLOW_FIELDS for c in f.needs}
    assert column in used or column in ecs_fields.NOT_EXPORTED
