"""`flowship report`: latency per hop and dropped calls, on flows with known timings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flowship.model.schema import flows_from_rows
from flowship.report import dropped_calls, latency_by_hop

MS = 1_000_000
T0 = 1_767_225_600_000_000_000


def _call_chain() -> list[dict]:
    """frontend → product-api (handshake 1 ms, server 250 ms) → database (handshake 0.2 ms, server 200 ms)."""
    rows = []

    def conn(client, server, cip, sip, sport, handshake, server_ns, t, code=200):
        base = {"ip_src": cip, "ip_dst": sip, "l4_protocol": "TCP", "src_port": sport, "dst_port": 8080,
                "src_namespace": "production", "dst_namespace": "production", "src_workload": client,
                "dst_workload": server, "node_name": "n"}
        rev = {**base, "ip_src": sip, "ip_dst": cip, "src_port": 8080, "dst_port": sport, "src_workload": server,
               "dst_workload": client, "is_reply": True}
        rows.append({**base, "time": t, "flow_type": "L3_L4", "tcp_flags": 2, "tcp_handshake_ns": handshake,
                     "is_reply": False})
        rows.append({**rev, "time": t + handshake, "flow_type": "L3_L4", "tcp_flags": 18,
                     "tcp_handshake_ns": handshake})
        rows.append({**base, "time": t + 2 * MS, "flow_type": "L7", "l7_type": "REQUEST", "http_method": "GET",
                     "is_reply": False})
        rows.append({**rev, "time": t + 2 * MS + server_ns, "flow_type": "L7", "l7_type": "RESPONSE",
                     "http_code": code, "l7_latency_ns": server_ns, "server_time_ns": server_ns})

    for i in range(10):
        t = T0 + i * 1000 * MS
        conn("frontend", "product-api", "10.0.1.1", "10.0.2.1", 40000 + i, 1 * MS, 250 * MS, t,
             code=503 if i == 9 else 200)
        conn("product-api", "database", "10.0.2.1", "10.0.3.1", 50000 + i, MS // 5, 200 * MS, t + 3 * MS)
    rows.append({"time": T0, "verdict": "DROPPED", "ip_src": "10.0.9.9", "ip_dst": "10.0.3.1", "l4_protocol": "TCP",
                 "src_port": 1234, "dst_port": 5432, "src_namespace": "support", "src_workload": "dashboard",
                 "dst_namespace": "production", "dst_workload": "database", "drop_reason": "POLICY_DENIED",
                 "kernel_drop_reason": "NETFILTER_DROP", "tcp_flags": 2})
    rows.append({**rows[-1], "time": T0 + 1000 * MS})  # the SYN's retransmission: same call
    rows.append({**rows[-1], "time": T0 + 3000 * MS, "src_port": 1235})  # a second denied call
    return rows


def test_latency_per_hop_and_drops(tmp_path):
    flows = flows_from_rows(_call_chain())
    hops = {(h.client, h.server, h.port): h for h in latency_by_hop(flows)}
    front = hops[("production/frontend", "production/product-api", 8080)]
    db = hops[("production/product-api", "production/database", 8080)]
    assert (front.connections, front.requests, front.errors_5xx) == (10, 10, 1)
    assert front.handshake_p50_ms == 1.0 and front.server_p50_ms == 250.0
    assert db.handshake_p50_ms == 0.2 and db.server_p95_ms == 200.0
    (drop,) = dropped_calls(flows)
    assert (drop.source, drop.destination, drop.port, drop.reason, drop.calls, drop.packets) == \
        ("support/dashboard", "production/database", 5432, "POLICY_DENIED / NETFILTER_DROP", 2, 3)


def test_dropped_calls_are_connections_by_community_id():
    rows = [r for r in _call_chain() if r.get("verdict") == "DROPPED"]
    # three packets of one connection (Community ID set), another connection without Community ID
    with_ids = [{**r, "community_id": "1:abc", "src_port": 1234} for r in rows] + [
        {**rows[0], "community_id": None, "src_port": 2000, "packets": 2}]
    (drop,) = dropped_calls(flows_from_rows(with_ids))
    assert (drop.calls, drop.packets) == (2, 5)


def test_handshake_recovered_from_syn_and_synack_times_for_hubble_flows(tmp_path):
    rows = [r for r in _call_chain() if r.get("flow_type") != "L7"]
    for r in rows:
        r.pop("tcp_handshake_ns", None)
    hops = {(h.client, h.server): h for h in latency_by_hop(flows_from_rows(rows))}
    assert hops[("production/frontend", "production/product-api")].handshake_p50_ms == 1.0


def test_report_cli(tmp_path):
    out = tmp_path / "flows" / "flows" / "dt=2026-01-01" / "hour=00"
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_batches([flows_from_rows(_call_chain())]), out / "a.parquet")
    proc = subprocess.run([sys.executable, "-m", "flowship.cli", "report", "all", "--parquet", str(tmp_path / "flows")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert "production/frontend" in proc.stdout and "production/product-api:8080" in proc.stdout
    assert "POLICY_DENIED / NETFILTER_DROP" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("source"))
    assert header.split()[5:7] == ["calls", "packets"]


def test_a_connection_seen_on_two_interfaces_counts_once():
    rows = _call_chain()
    doubled = []
    for r in rows:
        if r.get("verdict") == "DROPPED":
            doubled.append(r)
            continue
        reply = bool(r.get("is_reply"))
        doubled.append({**r, "interface_name": "v-server", "trace_point": "FROM_NETWORK" if reply else "TO_NETWORK"})
        doubled.append({**r, "interface_name": "v-client", "time": r["time"] + 50_000,
                        "trace_point": "TO_NETWORK" if reply else "FROM_NETWORK"})
    hops = {(h.client, h.server): h for h in latency_by_hop(flows_from_rows(doubled))}
    front = hops[("production/frontend", "production/product-api")]
    assert (front.connections, front.requests, front.errors_5xx) == (10, 10, 1)
