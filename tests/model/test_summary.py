"""Summary written like Hubble's parsers: the recorded flows' own Summary is the expected text."""

from __future__ import annotations

import pyarrow as pa

from flowship.model.hubble_decode import decode_lines
from flowship.model.schema import FLOW_SCHEMA
from flowship.model.summary import fill_summary, summaries, tcp_flags_text


def test_every_recorded_summary_is_reproduced(fixture_lines):
    """Hubble wrote these Summaries (TCP flags, UDP, ICMPv4, DNS query/answer, HTTP request/response)."""
    batch = decode_lines(b"\n".join(fixture_lines)).batch
    recorded = batch.column("summary").to_pylist()
    ours = summaries(batch).to_pylist()
    pairs = [(r, o) for r, o in zip(recorded, ours, strict=True) if r is not None]
    assert len(pairs) > 1500
    kinds = {r.split(" ")[0] for r, _ in pairs}
    assert {"TCP", "UDP", "ICMPv4", "DNS", "HTTP/1.1"} <= kinds
    assert [o for _, o in pairs] == [r for r, _ in pairs]


def test_fill_summary_keeps_given_and_fills_missing():
    rows = [
        {"summary": "kept", "l4_protocol": "UDP"},
        {"l4_protocol": "TCP", "tcp_flags": 0x012},                        # SYN|ACK
        {"l4_protocol": "ICMPv6", "icmp_type": 128, "icmp_code": 0},
        {"l4_protocol": "UDP", "l7_type": "RESPONSE", "dns_query": "web.demo.", "dns_rcode": 0,
         "dns_qtypes": ["A"], "dns_ips": ["10.0.0.2", "10.0.0.3"], "dns_ttl": 30, "dns_observation_source": "ebpf"},
        {"l4_protocol": "TCP", "l7_type": "RESPONSE", "http_method": "GET", "http_url": "http://web/x",
         "http_protocol": "HTTP/1.1", "http_code": 404, "l7_latency_ns": 3_900_000},
        {"summary": "", "ip_version": 6},
    ]
    columns = {f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in FLOW_SCHEMA
               if f.name in {k for r in rows for k in r}}
    batch = pa.RecordBatch.from_pydict({f.name: columns.get(f.name, pa.nulls(len(rows), f.type))
                                        for f in FLOW_SCHEMA}, schema=FLOW_SCHEMA)
    assert fill_summary(batch).column("summary").to_pylist() == [
        "kept", "TCP Flags: SYN, ACK", "ICMPv6 EchoRequest",
        'DNS Answer "10.0.0.2,10.0.0.3" TTL: 30 (Query web.demo. A)',
        "HTTP/1.1 404 3ms (GET http://web/x)", "IPv6"]


def test_tcp_flags_order():
    assert tcp_flags_text(0x1FF) == "SYN, ACK, RST, FIN, PSH, URG, ECE, CWR, NS"
    assert tcp_flags_text(None) == ""
