"""Flow assembly on hand-made kernel events: rows per direction, exact sums, ids, drops, L7, losses.

No kernel needed: the events are numpy records of the ABI dtypes, filled as the BPF programs would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from flowship.agent import events as ev
from flowship.agent.assemble import AssembleConfig, Assembler, hash128, uuid_strings
from flowship.agent.capture import LOSS_STATS, CaptureBatch
from flowship.agent.drop_reasons import HUBBLE_DROP_REASONS
from flowship.agent.kernel_drops import DropReasons
from flowship.metrics import Metrics
from flowship.model.ids import digest_uuid
from flowship.model.schema import FLOW_SCHEMA

WALL = 1_700_000_000_000_000_000
KERNEL_REASONS = {f"SKB_DROP_REASON_{name}": i + 2 for i, name in enumerate(
    ["NO_SOCKET", "PKT_TOO_SMALL", "TCP_CSUM", "NETFILTER_DROP", "IP_RPFILTER", "IP_OUTNOROUTES", "IP_NOPROTO",
     "IP_CSUM", "UDP_CSUM", "SOCKET_FILTER", "OTHERHOST", "QUEUE_PURGE", "TCP_OLD_DATA"])}


def flow_events(rows: list[dict[str, Any]]) -> np.ndarray:
    out = np.zeros(len(rows), dtype=ev.FLOW_EVENT_DTYPE)
    for rec, row in zip(out, rows, strict=True):
        rec["kind"] = ev.Kind.FLOW
        rec["ip_version"] = 4
        rec["ifindex"] = 7
        rec["init_hook"] = ev.Hook.INGRESS
        for key, value in row.items():
            rec[key] = ev.address_bytes(value) if key.endswith("_addr") else value
    return out


def l7_events(rows: list[dict[str, Any]]) -> np.ndarray:
    out = np.zeros(len(rows), dtype=ev.l7_event_dtype(256))
    for rec, row in zip(out, rows, strict=True):
        rec["ip_version"] = 4
        rec["ifindex"] = 7
        for key, value in row.items():
            if key == "data":
                rec["data"][: len(value)] = np.frombuffer(value, dtype=np.uint8)
                rec["captured_len"] = rec["payload_len"] = len(value)
            else:
                rec[key] = ev.address_bytes(value) if key.endswith("_addr") else value
    return out


def capture(flows: np.ndarray | None = None, drops: np.ndarray | None = None, l7: np.ndarray | None = None,
            lost: dict[str, int] | None = None) -> CaptureBatch:
    empty = np.zeros(0, dtype=ev.FLOW_EVENT_DTYPE)
    return CaptureBatch(flows=flows if flows is not None else empty, drops=drops if drops is not None else empty,
                        l7=l7 if l7 is not None else np.zeros(0, dtype=ev.l7_event_dtype(256)),
                        lost={k: 0 for k in LOSS_STATS} | (lost or {}), stats={}, wall_offset_ns=WALL)


def assembler(metrics: Metrics | None = None, **kw: Any) -> Assembler:
    return Assembler(AssembleConfig(node_name="node-a", **kw), metrics=metrics, drop_names=DropReasons(KERNEL_REASONS))


TCP = {"src_addr": "10.0.0.1", "dst_addr": "10.0.0.2", "src_port": 40000, "dst_port": 80, "l4_proto": 6,
       "first_ns": 1_000, "syn_ns": 1_000}
CONNECTION = [
    TCP | {"trigger": ev.Trigger.NEW, "hook": 1, "packets": 1, "bytes": 74, "tcp_flags": 0x02, "last_ns": 1_000},
    TCP | {"trigger": ev.Trigger.FLAGS, "hook": 2, "reply_packets": 1, "reply_bytes": 74, "reply_tcp_flags": 0x12,
           "last_ns": 1_500, "synack_ns": 1_500},
    TCP | {"trigger": ev.Trigger.END, "hook": 1, "packets": 4, "bytes": 400, "tcp_flags": 0x19,
           "reply_packets": 3, "reply_bytes": 900, "reply_tcp_flags": 0x19, "last_ns": 9_000, "synack_ns": 1_500},
    TCP | {"trigger": ev.Trigger.EVICT, "hook": 0, "packets": 1, "bytes": 66, "tcp_flags": 0x10, "last_ns": 9_100,
           "ts_ns": 2_000_000_000, "synack_ns": 1_500},
]


def rows_of(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    for i, f in enumerate(batch.schema):
        if pa.types.is_timestamp(f.type):
            batch = batch.set_column(i, f.name, batch.column(i).cast(pa.int64()))
    return batch.to_pylist()


def test_one_row_per_direction_with_exact_sums() -> None:
    flows = flow_events([{"ts_ns": r.get("ts_ns", r["last_ns"])} | r for r in CONNECTION])
    out = assembler().assemble(capture(flows), {7: "veth7"})
    assert out.schema == FLOW_SCHEMA
    rows = rows_of(out)
    fwd = [r for r in rows if not r["is_reply"]]
    rev = [r for r in rows if r["is_reply"]]
    assert len(fwd) == 3 and len(rev) == 2
    assert sum(r["packets"] for r in fwd) == 6 and sum(r["bytes"] for r in fwd) == 540
    assert sum(r["packets"] for r in rev) == 4 and sum(r["bytes"] for r in rev) == 974
    assert {(r["ip_src"], r["src_port"], r["ip_dst"], r["dst_port"]) for r in fwd} == {("10.0.0.1", 40000,
                                                                                        "10.0.0.2", 80)}
    assert {(r["ip_src"], r["src_port"], r["ip_dst"], r["dst_port"]) for r in rev} == {("10.0.0.2", 80,
                                                                                        "10.0.0.1", 40000)}
    assert [r["flow_event"] for r in fwd] == ["new", "end", "evicted"]
    assert [r["flow_event"] for r in rev] == ["flags", "end"]
    assert [r["tcp_flags"] for r in fwd] == [0x02, 0x19, 0x10]
    assert [r["tcp_flags"] for r in rev] == [0x12, 0x19]
    assert {r["traffic_direction"] for r in rows} == {"INGRESS"}
    assert {r["trace_point"] for r in fwd} == {"FROM_NETWORK"} and {r["trace_point"] for r in rev} == {"TO_NETWORK"}
    assert {r["event_subtype"] for r in fwd} == {10} and {r["event_subtype"] for r in rev} == {11}
    assert [r["trace_reason"] for r in fwd] == ["NEW", "ESTABLISHED", "ESTABLISHED"]
    assert {r["trace_reason"] for r in rev} == {"REPLY"}
    assert [r["tcp_handshake_ns"] for r in rev] == [500, None]
    assert all(r["tcp_handshake_ns"] is None for r in fwd)
    assert {r["start_time"] for r in rows} == {WALL + 1_000}
    # the sweep's eviction carries the sweep's time, packet events the last packet's
    assert [r["time"] for r in fwd] == [WALL + 1_000, WALL + 9_000, WALL + 2_000_000_000]
    assert {(r["verdict"], r["flow_type"], r["event_type"], r["l4_protocol"], r["interface_name"], r["node_name"],
             r["interface_index"], r["ip_version"], r["sample_rate"]) for r in rows} == {
        ("FORWARDED", "L3_L4", 4, "TCP", "veth7", "node-a", 7, 4, 1)}
    assert all(r["reply_bytes"] is None and r["reply_packets"] is None for r in rows)
    assert len({r["community_id"] for r in rows}) == 1 and rows[0]["community_id"].startswith("1:")
    assert len({r["uuid"] for r in rows}) == len(rows)


def test_uuids_are_deterministic_and_digest_shaped() -> None:
    flows = flow_events([{"ts_ns": r["last_ns"]} | r for r in CONNECTION[:3]])
    first = assembler().assemble(capture(flows), {}).column("uuid").to_pylist()
    again = assembler().assemble(capture(flows.copy()), {}).column("uuid").to_pylist()
    assert sorted(first) == sorted(again)
    other_node = Assembler(AssembleConfig(node_name="node-b"), drop_names=DropReasons(KERNEL_REASONS))
    assert not set(first) & set(other_node.assemble(capture(flows), {}).column("uuid").to_pylist())
    hi, lo = hash128([np.arange(100, dtype=np.uint64)], 100)
    assert uuid_strings(hi, lo).to_pylist() == [digest_uuid(f"{int(h):016x}{int(ell):016x}")
                                                for h, ell in zip(hi, lo, strict=True)]


def test_idle_eviction_without_packets_still_marks_the_end() -> None:
    flows = flow_events([TCP | {"trigger": ev.Trigger.EVICT, "hook": 0, "last_ns": 5_000, "ts_ns": 40_000}])
    rows = rows_of(assembler().assemble(capture(flows), {}))
    assert [(r["flow_event"], r["packets"], r["bytes"], r["is_reply"], r["time"]) for r in rows] == [
        ("evicted", 0, 0, False, WALL + 40_000)]


def test_udp_and_icmp_columns() -> None:
    flows = flow_events([
        {"src_addr": "10.0.0.1", "dst_addr": "10.0.0.9", "src_port": 5353, "dst_port": 53, "l4_proto": 17,
         "trigger": ev.Trigger.NEW, "hook": 2, "init_hook": 2, "packets": 1, "bytes": 80, "reply_packets": 1,
         "reply_bytes": 120, "first_ns": 10, "last_ns": 20, "ts_ns": 20},
        {"src_addr": "10.0.0.1", "dst_addr": "10.0.0.9", "l4_proto": 1, "icmp_type": 8, "icmp_id": 77,
         "trigger": ev.Trigger.NEW, "hook": 2, "init_hook": 2, "packets": 1, "bytes": 98, "first_ns": 30,
         "last_ns": 30, "ts_ns": 30},
    ])
    rows = rows_of(assembler().assemble(capture(flows), {}))
    udp = [r for r in rows if r["l4_protocol"] == "UDP"]
    icmp = [r for r in rows if r["l4_protocol"] == "ICMPv4"]
    assert [(r["is_reply"], r["src_port"], r["dst_port"], r["tcp_flags"], r["bytes"]) for r in udp] == [
        (False, 5353, 53, None, 80), (True, 53, 5353, None, 120)]
    assert {r["traffic_direction"] for r in udp} == {"EGRESS"}
    assert [(r["src_port"], r["icmp_type"], r["icmp_code"], r["tcp_flags"]) for r in icmp] == [(None, 8, 0, None)]


def test_untracked_events_use_their_packet_hook() -> None:
    flows = flow_events([TCP | {"trigger": ev.Trigger.UNTRACKED, "hook": 2, "init_hook": 0, "packets": 1,
                                "bytes": 60, "tcp_flags": 0x10, "last_ns": 5, "ts_ns": 5}])
    rows = rows_of(assembler().assemble(capture(flows), {}))
    assert [(r["flow_event"], r["trace_point"], r["traffic_direction"]) for r in rows] == [
        ("untracked", "TO_NETWORK", "EGRESS")]


def drop_events(reasons: list[int]) -> np.ndarray:
    out = np.zeros(len(reasons), dtype=ev.FLOW_EVENT_DTYPE)
    for i, (rec, reason) in enumerate(zip(out, reasons, strict=True)):
        rec["kind"] = ev.Kind.DROP
        rec["src_addr"] = ev.address_bytes("10.0.0.5")
        rec["dst_addr"] = ev.address_bytes("10.0.0.6")
        rec["src_port"], rec["dst_port"], rec["l4_proto"], rec["ip_version"] = 40000 + i, 6432, 6, 4
        rec["drop_reason"], rec["packets"], rec["bytes"], rec["tcp_flags"], rec["ts_ns"] = reason, 1, 60, 2, 100 + i
        rec["ifindex"] = 3
    return out


def test_drop_rows_map_kernel_reasons_to_hubble_where_they_match() -> None:
    names = DropReasons(KERNEL_REASONS)
    values = [names.value(n) for n in ("NETFILTER_DROP", "NO_SOCKET", "SOCKET_FILTER")] + [999]
    rows = rows_of(assembler().assemble(capture(drops=drop_events(values)), {3: "eth0"}))
    got = [(r["kernel_drop_reason"], r["drop_reason"], r["drop_reason_code"]) for r in rows]
    assert got == [("NETFILTER_DROP", "POLICY_DENIED", 133), ("NO_SOCKET", "SOCKET_LOOKUP_FAILED", 178),
                   ("SOCKET_FILTER", None, None), ("999", None, None)]
    assert {(r["verdict"], r["event_type"], r["flow_event"], r["packets"], r["bytes"], r["tcp_flags"],
             r["interface_name"], r["dst_port"]) for r in rows} == {("DROPPED", 1, "drop", 1, 60, 2, "eth0", 6432)}
    assert all(r["is_reply"] is None and r["traffic_direction"] is None for r in rows)


@pytest.mark.parametrize("kernel,hubble", sorted((k, v[0]) for k, v in HUBBLE_DROP_REASONS.items()))
def test_drop_reason_table(kernel: str, hubble: str) -> None:
    names = DropReasons(KERNEL_REASONS)
    rows = rows_of(assembler().assemble(capture(drops=drop_events([names.value(kernel)])), {}))
    assert (rows[0]["kernel_drop_reason"], rows[0]["drop_reason"]) == (kernel, hubble)


def test_benign_drops_are_counted_not_exported() -> None:
    names = DropReasons(KERNEL_REASONS)
    values = [names.value(n) for n in ("QUEUE_PURGE", "NETFILTER_DROP", "QUEUE_PURGE", "TCP_OLD_DATA")]
    metrics = Metrics()
    asm = assembler(metrics)
    rows = rows_of(asm.assemble(capture(drops=drop_events(values)), {}))
    assert [(r["verdict"], r["kernel_drop_reason"]) for r in rows] == [("DROPPED", "NETFILTER_DROP")]
    counted = {(reason, cls): metrics.value("flowship_agent_kernel_drops_total", reason=reason, **{"class": cls})
               for reason, cls in (("QUEUE_PURGE", "benign"), ("TCP_OLD_DATA", "benign"),
                                   ("NETFILTER_DROP", "dropped"))}
    assert counted == {("QUEUE_PURGE", "benign"): 2, ("TCP_OLD_DATA", "benign"): 1, ("NETFILTER_DROP", "dropped"): 1}
    assert asm.totals["benign_drops"] == 3 and asm.totals["drop_events"] == 4
    only_benign = asm.assemble(capture(drops=drop_events([names.value("QUEUE_PURGE")])), {})
    assert only_benign.num_rows == 0


def test_listed_benign_drops_are_exported_as_traced() -> None:
    names = DropReasons(KERNEL_REASONS)
    values = [names.value(n) for n in ("QUEUE_PURGE", "TCP_OLD_DATA", "NETFILTER_DROP")]
    asm = assembler(drop_export_benign=frozenset({"QUEUE_PURGE"}))
    rows = rows_of(asm.assemble(capture(drops=drop_events(values)), {}))
    assert [(r["verdict"], r["kernel_drop_reason"], r["drop_reason"], r["event_type"], r["flow_event"])
            for r in rows] == [("TRACED", "QUEUE_PURGE", None, 1, "drop"),
                               ("DROPPED", "NETFILTER_DROP", "POLICY_DENIED", 1, "drop")]
    assert asm.totals["benign_drops"] == 1


HTTP = {"src_port": 40000, "dst_port": 8080, "l4_proto": 6, "flow_first_ns": 1}
REQ = {"src_addr": "10.0.0.1", "dst_addr": "10.0.0.2", "is_reply": 0, "hook": 1,
       "l7_kind": ev.L7Kind.HTTP_REQUEST} | HTTP
RESP = {"src_addr": "10.0.0.2", "dst_addr": "10.0.0.1", "is_reply": 1, "hook": 2, "src_port": 8080,
        "dst_port": 40000, "l7_kind": ev.L7Kind.HTTP_RESPONSE, "l4_proto": 6}


def test_http_rows_pair_across_batches_and_keep_headers() -> None:
    asm = assembler(http_headers=("X-Request-Id",))
    req = l7_events([REQ | {"ts_ns": 1_000, "tcp_seq": 1, "data": b"GET /a?x=1 HTTP/1.1\r\nHost: api\r\n"
                            b"User-Agent: curl/8\r\nX-Request-Id: r1\r\nCookie: secret\r\n\r\n"}])
    resp = l7_events([RESP | {"ts_ns": 251_000, "tcp_seq": 9, "data": b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"}])
    first = rows_of(asm.assemble(capture(l7=req), {7: "veth7"}))
    second = rows_of(asm.assemble(capture(l7=resp), {7: "veth7"}))
    assert [(r["l7_type"], r["http_method"], r["http_url"], r["http_code"]) for r in first + second] == [
        ("REQUEST", "GET", "http://api/a?x=1", None), ("RESPONSE", "GET", "http://api/a?x=1", 503)]
    assert first[0]["http_headers"] == [{"key": "User-Agent", "value": "curl/8"}, {"key": "X-Request-Id", "value": "r1"}]
    assert first[0]["http_user_agent"] == "curl/8"
    assert (second[0]["l7_latency_ns"], second[0]["server_time_ns"]) == (250_000, 250_000)
    assert {(r["flow_type"], r["event_type"], r["traffic_direction"]) for r in first + second} == {("L7", 129,
                                                                                                    "INGRESS")}
    assert (first[0]["trace_point"], second[0]["trace_point"]) == ("FROM_NETWORK", "TO_NETWORK")
    assert (first[0]["is_reply"], second[0]["is_reply"]) == (False, True)
    assert first[0]["community_id"] == second[0]["community_id"]


def test_pipelined_requests_in_one_segment_get_distinct_ids() -> None:
    data = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
    rows = rows_of(assembler().assemble(capture(l7=l7_events([REQ | {"ts_ns": 5, "data": data}])), {}))
    assert [r["http_url"] for r in rows] == ["http://a/1", "http://a/2"]
    assert len({r["uuid"] for r in rows}) == 2


def test_non_http_payload_gives_no_row_but_is_counted() -> None:
    metrics = Metrics()
    rows = rows_of(assembler(metrics).assemble(capture(l7=l7_events([REQ | {"ts_ns": 5, "data": b"\x16\x03\x01"}])),
                                               {}))
    assert rows == []
    assert metrics.value("flowship_agent_l7_total", protocol="http", event="parse_error") == 1


def test_dns_query_and_response() -> None:
    query = bytes.fromhex("abcd01000001000000000000") + b"\x02db\x04prod\x03svc\x00" + bytes.fromhex("00010001")
    answer = (bytes.fromhex("abcd81800001000100000000") + b"\x02db\x04prod\x03svc\x00" + bytes.fromhex("00010001")
              + bytes.fromhex("c00c000100010000001e00040a00001e"))
    dns = {"l4_proto": 17, "flow_first_ns": 1}
    l7 = l7_events([
        {"src_addr": "10.0.0.1", "dst_addr": "10.0.0.53", "src_port": 5000, "dst_port": 53, "is_reply": 0,
         "hook": 2, "l7_kind": ev.L7Kind.DNS_QUERY, "ts_ns": 100, "data": query} | dns,
        {"src_addr": "10.0.0.53", "dst_addr": "10.0.0.1", "src_port": 53, "dst_port": 5000, "is_reply": 1,
         "hook": 1, "l7_kind": ev.L7Kind.DNS_RESPONSE, "ts_ns": 900, "data": answer} | dns,
    ])
    rows = rows_of(assembler().assemble(capture(l7=l7), {}))
    assert [(r["l7_type"], r["dns_query"], r["dns_rcode"], r["dns_ips"], r["l7_latency_ns"]) for r in rows] == [
        ("REQUEST", "db.prod.svc.", None, None, None), ("RESPONSE", "db.prod.svc.", 0, ["10.0.0.30"], 800)]
    assert {r["traffic_direction"] for r in rows} == {"EGRESS"}


def test_losses_are_counted_never_silent() -> None:
    metrics = Metrics()
    asm = assembler(metrics)
    asm.assemble(capture(lost={"drop_ring": 3, "l7_ring": 2, "untracked": 1, "flow_ring": 7}), {})
    assert metrics.value("flowship_lost_events_total", source="agent", lost_source="PERF_EVENT_RING_BUFFER") == 6
    assert metrics.value("hubble_lost_events_total", source="PERF_EVENT_RING_BUFFER") == 6
    assert metrics.value("flowship_agent_lost_total", kind="flow_ring") == 7
    assert metrics.value("flowship_agent_lost_total", kind="drop_ring") == 3
    asm.record_reader_losses({"flow_discarded": 0, "flow_malformed": 2})
    assert metrics.value("flowship_agent_ring_skipped_total", kind="flow_malformed") == 2
    assert metrics.value("flowship_lost_events_total", source="agent") == 8
