"""Hubble JSON in and out: the recorded flows round-trip, every input shape is read."""

from __future__ import annotations

import gzip
import re
import uuid
from pathlib import Path

import orjson
import pytest

from flowship.model.hubble_decode import decode_lines
from flowship.model.hubble_encode import encode_lines
from flowship.model.proto import from_flow_messages, to_flow_messages
from flowship.model.schema import FLOW_SCHEMA
from flowship.model.times import format_time, parse_time


def test_every_fixture_line_parses(fixture_lines):
    result = decode_lines(b"\n".join(fixture_lines))
    assert result.errors == []
    assert result.batch.num_rows == len(fixture_lines) == 1518
    assert result.batch.schema == FLOW_SCHEMA


def test_round_trip_is_semantically_equal_line_by_line(fixture_lines):
    """Decode → columns → encode gives back each input object (keys in any order).

    The one allowed difference: a flow without a uuid (Cilium < 1.11) gets one.
    """
    batch = decode_lines(b"\n".join(fixture_lines)).batch
    out = encode_lines(batch)
    assert len(out) == len(fixture_lines)
    mismatches = []
    for i, (line, encoded) in enumerate(zip(fixture_lines, out, strict=True)):
        original, again = orjson.loads(line), orjson.loads(encoded)
        if "uuid" not in original["flow"]:
            added = again["flow"].pop("uuid")
            assert uuid.UUID(added)
        if original != again:
            mismatches.append(i)
    assert mismatches == []


def test_columnar_fast_path_equals_the_line_decoder(fixture_lines):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from flowgen import generate_batch

    from flowship.model.hubble_arrow import decode_fast

    generated = b"".join(encode_lines(generate_batch(5000, seed=3)))
    for data in (b"\n".join(fixture_lines), generated):
        fast = decode_fast(data)
        slow = decode_lines(data, fast=False)
        assert fast is not None and slow.errors == []
        assert fast.equals(slow.batch)


def test_columnar_encoder_equals_the_reference_encoder(fixture_lines):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from encode_reference import encode_lines_slow
    from flowgen import generate_batch

    from flowship.model.hubble_encode import encode_ndjson

    tricky = decode_lines(b'{"flow":{"time":"2024-01-01T00:00:00.000001Z","l7":{"type":"REQUEST","http":{"method":"GET",'
                          b'"url":"/a\\"b\\\\c\\u0001d\\ne","headers":[{"key":"X","value":"tab\\there"}]}},'
                          b'"source":{"labels":["k8s:a=\\"q\\""]}},"node_name":"n","time":"2024-01-01T00:00:00Z"}').batch
    for batch in (decode_lines(b"\n".join(fixture_lines)).batch, generate_batch(3000, seed=9), tricky):
        assert encode_lines(batch) == encode_lines_slow(batch)
        assert b"".join(encode_lines(batch)) == encode_ndjson(batch)


def test_generated_uuids_are_deterministic_and_hubble_uuids_kept(fixture_lines):
    first = decode_lines(b"\n".join(fixture_lines)).batch.column("uuid").to_pylist()
    second = decode_lines(b"\n".join(fixture_lines)).batch.column("uuid").to_pylist()
    assert first == second
    line = b'{"flow":{"time":"2024-01-01T00:00:00Z","uuid":"11111111-2222-3333-4444-555555555555","verdict":"FORWARDED"},"node_name":"n","time":"2024-01-01T00:00:00Z"}'
    assert decode_lines(line).batch.column("uuid").to_pylist() == ["11111111-2222-3333-4444-555555555555"]


def test_protobuf_round_trip_over_fixtures(fixture_lines):
    batch = decode_lines(b"\n".join(fixture_lines)).batch
    again = from_flow_messages(to_flow_messages(batch))
    assert [orjson.loads(x) for x in encode_lines(again)] == [orjson.loads(x) for x in encode_lines(batch)]


def test_protobuf_mapping_equals_the_json_mapping(fixture_lines):
    import sys

    from encode_reference import flow_dicts
    from google.protobuf import json_format

    from flowship.proto.flow import flow_pb2

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from flowgen import generate_batch

    for batch in (decode_lines(b"\n".join(fixture_lines)).batch, generate_batch(3000, seed=4)):
        reference = []
        for flow, _ext in flow_dicts(batch):
            msg = flow_pb2.Flow()
            json_format.ParseDict(flow, msg)
            reference.append(msg)
        assert to_flow_messages(batch) == reference


def test_field_values_of_a_known_http_flow(fixture_lines):
    line = next(line for line in fixture_lines if b"Prometheus/2.15.1" in line)
    batch = decode_lines(line).batch
    row = {name: batch.column(name)[0].as_py()
           for name in ("http_method", "http_user_agent", "l4_protocol", "l7_type", "flow_type", "dst_labels")}
    assert row == {"http_method": "GET", "http_user_agent": "Prometheus/2.15.1", "l4_protocol": "TCP",
                   "l7_type": "REQUEST", "flow_type": "L7", "dst_labels": ["reserved:world"]}


CAMEL = (b'{"flow":{"time":"2023-01-02T03:04:05.5Z","verdict":"DROPPED","IP":{"source":"10.0.0.1",'
         b'"destination":"10.0.0.2","ipVersion":"IPv4"},"l4":{"TCP":{"sourcePort":1234,"destinationPort":80,'
         b'"flags":{"SYN":true}}},"source":{"namespace":"a","podName":"p1"},"destination":{"namespace":"b"},'
         b'"Type":"L3_L4","nodeName":"n1","trafficDirection":"EGRESS","dropReasonDesc":"POLICY_DENIED",'
         b'"isReply":false},"nodeName":"n1","time":"2023-01-02T03:04:05.5Z"}')


def test_camel_case_input():
    batch = decode_lines(CAMEL).batch
    row = {k: batch.column(k)[0].as_py() for k in ("src_port", "dst_port", "src_pod", "node_name",
                                                   "traffic_direction", "drop_reason", "is_reply", "tcp_flags")}
    assert row == {"src_port": 1234, "dst_port": 80, "src_pod": "p1", "node_name": "n1",
                   "traffic_direction": "EGRESS", "drop_reason": "POLICY_DENIED", "is_reply": False, "tcp_flags": 2}


def test_bare_flows_arrays_unknown_fields_and_numeric_enums():
    bare = (b'{"time":"2023-01-02T03:04:05Z","verdict":2,"Type":1,"IP":{"source":"::1","destination":"::2",'
            b'"ipVersion":"IPv6"},"l4":{"UDP":{"source_port":53,"destination_port":5353}},"node_name":"x",'
            b'"brand_new_field":{"nested":[1,2,3]}}')
    batch = decode_lines(bare).batch
    assert batch.num_rows == 1
    assert batch.column("verdict")[0].as_py() == "DROPPED"
    assert batch.column("flow_type")[0].as_py() == "L3_L4"
    assert batch.column("ip_version")[0].as_py() == 6
    array = b"[" + CAMEL + b"," + bare + b"]"
    assert decode_lines(array).batch.num_rows == 2


def test_bad_lines_are_reported_with_line_numbers_and_neighbours_survive(fixture_lines):
    good = fixture_lines[:3]
    data = b"\n".join([good[0], b"{not json", good[1], b'{"flow":{"verdict":"FORWARDED"}}', b"[1,2",
                       good[2], b'{"flow":{"time":"yesterday"}}'])
    result = decode_lines(data, first_line=10)
    assert result.batch.num_rows == 3
    assert [n for n, _ in result.errors] == [11, 13, 14, 16]
    assert "invalid JSON" in result.errors[0][1]
    assert "no time" in result.errors[1][1]
    assert "RFC 3339" in result.errors[3][1]


def test_lost_events_lines_are_returned_separately():
    line = b'{"lost_events":{"source":"HUBBLE_RING_BUFFER","num_events_lost":"42","cpu":1},"node_name":"n","time":"2024-01-01T00:00:00Z"}'
    result = decode_lines(line)
    assert result.batch.num_rows == 0
    assert result.lost_events[0]["source"] == "HUBBLE_RING_BUFFER"
    assert result.lost_events[0]["num_events_lost"] == 42


@pytest.mark.parametrize("text,ns", [
    ("2021-10-04T14:28:38.735173594Z", 1633357718735173594),
    ("2021-10-04T14:28:38Z", 1633357718000000000),
    ("2021-10-04T14:28:38.5Z", 1633357718500000000),
    ("2021-10-04T16:28:38.5+02:00", 1633357718500000000),
])
def test_parse_time(text, ns):
    assert parse_time(text) == ns


@pytest.mark.parametrize("ns,text", [
    (1633357718735173594, "2021-10-04T14:28:38.735173594Z"),
    (1633357718000000000, "2021-10-04T14:28:38Z"),
    (1633357718500000000, "2021-10-04T14:28:38.500Z"),
    (1633357718500001000, "2021-10-04T14:28:38.500001Z"),
])
def test_format_time_trims_like_protojson(ns, text):
    assert format_time(ns) == text


def test_flowship_extension_round_trips():
    line = (b'{"flow":{"time":"2024-01-01T00:00:00Z","uuid":"u1","IP":{"source":"10.0.0.1","destination":"10.0.0.2",'
            b'"ipVersion":"IPv4"},"source":{},"destination":{},"node_name":"n"},"node_name":"n","time":"2024-01-01T00:00:00Z",'
            b'"flowship":{"bytes":"1500",'
            b'"packets":"3","sample_rate":10,"tcp_handshake_ns":"125000","flow_event":"end"}}')
    batch = decode_lines(line).batch
    assert {k: batch.column(k)[0].as_py() for k in ("bytes", "packets", "sample_rate", "tcp_handshake_ns",
                                                    "flow_event")} == {
        "bytes": 1500, "packets": 3, "sample_rate": 10, "tcp_handshake_ns": 125000, "flow_event": "end"}
    assert orjson.loads(encode_lines(batch)[0]) == orjson.loads(line)


def test_gzip_is_not_this_modules_business_but_bytes_are():
    # The decoder takes bytes; the file source decompresses. A gzip blob is simply not JSON.
    result = decode_lines(gzip.compress(b'{"flow":{}}\n', mtime=0))
    assert result.batch.num_rows == 0 and len(result.errors) >= 1


def test_schema_columns_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "schema.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", doc, flags=re.M))
    assert documented == set(FLOW_SCHEMA.names)
