"""The columnar Hubble and ECS encoders write exactly the bytes of the per-row reference encoders."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from encode_reference import ecs_lines_slow, encode_lines_slow

from flowship.model import ecs_encode, hubble_encode, json_columns
from flowship.model.hubble_decode import decode_lines
from flowship.model.schema import empty_flows, flows_from_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from flowgen import generate_batch  # noqa: E402

T0 = 1_700_000_000_123_456_789
BIG = 2**64 - 1
AWKWARD = "".join(chr(i) for i in range(0x20)) + '"\\/\x7f\u2028é😀'

EDGE_ROWS: list[dict] = [
    # uint64 at and above 2**63 in every 64-bit column
    {"time": T0, "socket_cookie": 2**63, "cgroup_id": BIG, "l7_latency_ns": BIG, "bytes": 2**63 + 1,
     "packets": BIG, "reply_bytes": 2**63, "reply_packets": 1, "tcp_handshake_ns": BIG, "server_time_ns": 2**63,
     "l7_type": "RESPONSE", "http_code": 200},
    # null list elements, [""] and empty lists
    {"time": T0 + 1, "src_labels": [None, "k8s:app=a"], "dst_labels": [""], "node_labels": [],
     "src_names": [None], "dst_names": ["a", "", None], "dns_query": "x.", "dns_ips": [],
     "dns_cnames": [""], "dns_qtypes": [None, None], "dns_rrtypes": ["A"]},
    # strings needing every kind of escape, in scalars, lists, headers and the l4 key
    {"time": T0 + 2, "uuid": AWKWARD, "node_name": AWKWARD, "src_pod": AWKWARD, "src_labels": [AWKWARD, "plain"],
     "http_method": "GET", "http_url": "/a\"b\\c\x01d\ne\tf", "http_protocol": "HTTP/1.1",
     "http_headers": [{"key": AWKWARD, "value": "v"}, {"key": "k", "value": None}, None, {"key": "", "value": ""}],
     "l4_protocol": 'TCP"\n', "summary": AWKWARD, "flow_event": AWKWARD, "kernel_drop_reason": ""},
    # zero enum names are omitted, an unnamed flag bit gives an empty flags object, l7 with only a zero type
    {"time": T0 + 3, "verdict": "VERDICT_UNKNOWN", "flow_type": "UNKNOWN_TYPE", "trace_point": "UNKNOWN_POINT",
     "traffic_direction": "TRAFFIC_DIRECTION_UNKNOWN", "l7_type": "UNKNOWN_L7_TYPE", "l4_protocol": "UDP",
     "tcp_flags": 0x200, "src_port": 0, "dst_port": 53, "is_reply": False, "event_type": 0, "interface_index": 0},
    # ICMP, every flag, services, workloads, aggregate counters, interface by name only
    {"time": T0 + 4, "l4_protocol": "ICMPv6", "icmp_type": 128, "icmp_code": 0, "ip_src": "::1", "ip_dst": "::2",
     "ip_version": 6, "ip_encrypted": True, "src_workload": "w", "src_workload_kind": "Deployment",
     "dst_workload": "", "dst_workload_kind": "StatefulSet", "src_service": "svc", "dst_service_namespace": "ns",
     "aggregate_egress_count": 3, "interface_name": "eth0", "reply": True, "sample_rate": 1, "is_reply": True},
    {"time": T0 + 5, "l4_protocol": "TCP", "tcp_flags": 0x1FF, "src_port": 1, "dst_port": 2, "ip_dst": "10.0.0.1",
     "eth_dst": "aa:bb", "event_type": 4, "event_subtype": 3, "sample_rate": 0, "start_time": -1,
     "ip_version": 4, "dns_rcode": 0},
    # times: before 1970, whole seconds, milli- and microsecond precision
    {"time": -1}, {"time": 0}, {"time": 1_000_000}, {"time": 1_000}, {"time": 2**63 - 1},
    {"time": T0, "sample_rate": 10, "l4_protocol": "SCTP", "src_port": 9},
]


def _fixture_batch(fixture_lines: list[bytes]) -> pa.RecordBatch:
    result = decode_lines(b"\n".join(fixture_lines))
    assert result.errors == []
    return result.batch


def _batches(fixture_lines: list[bytes]) -> dict[str, pa.RecordBatch]:
    fixtures = _fixture_batch(fixture_lines)
    edge = flows_from_rows(EDGE_ROWS)
    return {"fixtures": fixtures, "generated": generate_batch(4000, seed=11), "edge": edge,
            "fixtures sliced": fixtures.slice(7, 500), "edge sliced": edge.slice(1, 4)}


@pytest.mark.parametrize("extensions", [True, False])
def test_hubble_lines_equal_the_reference_byte_for_byte(fixture_lines, extensions):
    for name, batch in _batches(fixture_lines).items():
        reference = encode_lines_slow(batch, extensions)
        assert hubble_encode.encode_lines(batch, extensions) == reference, name
        assert hubble_encode.encode_ndjson(batch, extensions) == b"".join(reference), name
        text = hubble_encode.encode_text_column(batch, extensions).to_pylist()
        assert [t.encode() + b"\n" for t in text] == reference, name


def test_single_flow_batches_come_out_as_the_reference_writes_them(fixture_lines):
    batch = _fixture_batch(fixture_lines)
    assert batch.num_rows == len(fixture_lines)
    for i in range(0, batch.num_rows, 101):
        row = batch.slice(i, 1)
        assert hubble_encode.encode_lines(row) == encode_lines_slow(row), i
        assert ecs_encode.encode_documents(row) == ecs_lines_slow(row), i


def test_ecs_documents_equal_the_reference_byte_for_byte(fixture_lines):
    for name, batch in _batches(fixture_lines).items():
        reference = ecs_lines_slow(batch)
        assert ecs_encode.encode_documents(batch) == reference, name
        assert ecs_encode.encode_ndjson(batch) == [doc + b"\n" for doc in reference], name
        assert bytes(ecs_encode.ndjson_buffer(batch)) == b"".join(doc + b"\n" for doc in reference), name


def test_edge_values_come_out_as_json_says():
    lines = [orjson.loads(line) for line in hubble_encode.encode_lines(flows_from_rows(EDGE_ROWS))]
    first, lists, awkward, zero = lines[0], lines[1], lines[2], lines[3]
    assert first["flow"]["cgroup_id"] == str(BIG) and first["flowship"]["bytes"] == str(2**63 + 1)
    assert lists["flow"]["source"]["labels"] == [None, "k8s:app=a"]
    assert lists["flow"]["destination"]["labels"] == [""] and "node_labels" not in lists["flow"]
    assert awkward["flow"]["source"]["pod_name"] == AWKWARD and awkward["node_name"] == AWKWARD
    assert awkward["flow"]["l7"]["http"]["headers"][1:3] == [{"key": "k", "value": None}, None]
    assert awkward["flow"]["l4"] == {'TCP"\n': {}}
    assert zero["flow"]["l4"] == {"UDP": {"destination_port": 53, "flags": {}}}
    assert zero["flow"]["l7"] == {} and "verdict" not in zero["flow"] and zero["flow"]["is_reply"] is False
    assert [line["time"] for line in lines[6:11]] == [
        "1969-12-31T23:59:59.999999999Z", "1970-01-01T00:00:00Z", "1970-01-01T00:00:00.001Z",
        "1970-01-01T00:00:00.000001Z", "2262-04-11T23:47:16.854775807Z"]


def test_an_empty_batch_encodes_to_nothing():
    empty = empty_flows()
    assert hubble_encode.encode_lines(empty) == encode_lines_slow(empty) == []
    assert hubble_encode.encode_ndjson(empty) == b""
    assert len(hubble_encode.encode_text_column(empty)) == 0
    assert ecs_encode.encode_documents(empty) == ecs_lines_slow(empty) == []
    assert bytes(ecs_encode.ndjson_buffer(empty)) == b""


def test_joining_rows_whose_fragments_are_all_absent_keeps_every_row():
    a = pa.array(["a", None, None, "b"])
    b = pa.array([None, None, "c", "d"])
    assert json_columns.join([a, b], 4).to_pylist() == ["a", "", "c", "b,d"]


def test_string_escapes_match_orjson_for_every_code_point_below_0x80():
    values = [chr(i) for i in range(0x80)] + [AWKWARD, "", None]
    assert json_columns.strings(pa.array(values)).to_pylist() == [
        None if v is None else orjson.dumps(v).decode() for v in values]
