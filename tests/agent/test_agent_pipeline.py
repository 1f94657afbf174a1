"""The agent end to end: the seed's topology in namespaces, the agent pipeline, Parquet and Hubble JSON out.

frontend → product-api → database (+ dnsmasq, + an nftables DROP) from :mod:`flowship.agent.topology`. The agent
source runs in-process in a Pipeline, attached to the host-side veths inside the node namespace, and
writes Parquet, a Hubble JSON file and a second Parquet sink behind the healthcheck stage. tcpdump
records the product-api and database veths at the same time; every count, flag and time asserted
below is compared with what tshark reads from those recordings.

Needs root, the built eBPF object, tcpdump/tshark, nftables and dnsmasq; anything missing FAILS.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netns
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from flowship.agent import topology as topo
from flowship.agent.source import AgentSource
from flowship.config import load_text
from flowship.metrics import Metrics
from flowship.pipeline.runtime import Pipeline, RunSummary

pytestmark = pytest.mark.kernel

MS = 1_000_000

CONFIG = """
node_name: test-node
data_dir: {tmp}/state
shutdown_timeout: 30s
sources:
  - type: agent
    netns: {node_ns}
    interfaces: ["v-*"]
    http_ports: [8080, 5000]
    http_headers: [X-Request-Id]
    batch_interval: 60s
    observer:
      enabled: false
    enrich:
      static:
        - {{cidr: 10.99.0.10/32, namespace: production, pod: frontend-7d9f, labels: {{app: frontend}},
            workload: frontend, workload_kind: Deployment}}
        - {{cidr: 10.99.0.20/32, namespace: production, pod: product-api-5c4b, labels: {{app: product-api}},
            workload: product-api, workload_kind: Deployment}}
        - {{cidr: 10.99.0.30/32, namespace: production, pod: database-0, labels: {{app: database}},
            workload: database, workload_kind: StatefulSet}}
sinks:
  - type: parquet
    path: {tmp}/flows
  - type: file
    path: {tmp}/hubble.jsonl
    format: hubble
  - type: parquet
    name: without-probes
    path: {tmp}/filtered
    stages:
      - type: healthcheck
"""


@dataclass
class Scenario:
    rows: list[dict[str, Any]]
    filtered: list[dict[str, Any]]
    hubble_lines: list[dict[str, Any]]
    pcaps: dict[str, list[netns.Pkt]]
    traffic: dict[str, Any]
    summary: RunSummary
    source: AgentSource
    metrics: Metrics


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    """Rows as dicts; timestamps as integer nanoseconds since the epoch."""
    table = ds.dataset(str(path), format="parquet", partitioning="hive").to_table()
    for i, f in enumerate(table.schema):
        if pa.types.is_timestamp(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(pa.int64()))
    return table.to_pylist()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    netns.require_machine()
    tmp = tmp_path_factory.mktemp("agent-pipeline")
    with topo.Topology() as t:
        t.start_services()
        config = load_text(CONFIG.format(tmp=tmp, node_ns=t.node), "test-agent.yaml")
        metrics = Metrics()
        pipeline = Pipeline(config, metrics)
        source = pipeline.sources[0]
        assert isinstance(source, AgentSource)
        box: dict[str, Any] = {}
        runner = threading.Thread(target=lambda: box.setdefault("summary", pipeline.run()), daemon=True)
        with netns.tcpdump(t.node, ["v-api", "v-db"], tmp) as pcaps:
            runner.start()
            try:
                if not source.started.wait(30):
                    pytest.fail(f"the agent source did not start: {box.get('summary')}")
                traffic = t.run_frontend()
                time.sleep(1.0)  # last ACKs and FINs of the servers' side
            finally:
                pipeline.stop()  # also on failure: the capture detaches before the namespaces go
                runner.join(60)
            assert not runner.is_alive(), "pipeline did not stop"
        summary: RunSummary = box["summary"]
        assert summary.errors == [], summary.errors
    lines = [json.loads(line) for line in (tmp / "hubble.jsonl").read_text().splitlines() if line.strip()]
    return Scenario(rows=_read_parquet(tmp / "flows" / "flows"), filtered=_read_parquet(tmp / "filtered" / "flows"),
                    hubble_lines=lines, pcaps={k: netns.read_pcap(v) for k, v in pcaps.items()}, traffic=traffic,
                    summary=summary, source=source, metrics=metrics)


FE = next(p.ip for p in topo.PODS if p.name == "frontend")
API = next(p.ip for p in topo.PODS if p.name == "product-api")
DB = next(p.ip for p in topo.PODS if p.name == "database")
DNS = next(p.ip for p in topo.PODS if p.name == "dns")


def l34(rows: list[dict[str, Any]], iface: str, client: str, cport: int, server: str, sport: int
        ) -> list[dict[str, Any]]:
    """L3/L4 forwarded rows of one connection on one interface, both directions, in time order."""
    out = []
    for r in rows:
        if r["flow_type"] != "L3_L4" or r["verdict"] != "FORWARDED" or r["interface_name"] != iface:
            continue
        tup = (r["ip_src"], r["src_port"], r["ip_dst"], r["dst_port"])
        if tup in ((client, cport, server, sport), (server, sport, client, cport)):
            out.append(r)
    return sorted(out, key=lambda r: r["time"])


def frontend_connections(s: Scenario) -> list[tuple[int, list[str]]]:
    """(client port, paths requested on it) of every frontend → product-api connection."""
    conns = [(s.traffic["keepalive_port"], [p for p, _ in s.traffic["keepalive"]])]
    conns += [(port, [path]) for path, _, port in s.traffic["single"]]
    conns.append((s.traffic["probe"][2], ["/healthz"]))
    return conns


def db_connections(s: Scenario) -> list[int]:
    """Client ports of product-api → database connections, from the database veth's recording."""
    return sorted({p.sport for p in s.pcaps["v-db"] if p.dport == topo.DB_PORT and p.flags & 0x12 == 0x02})


# ---------------------------------------------------------------- the traffic itself


def test_traffic_went_as_scripted(scenario: Scenario) -> None:
    t = scenario.traffic
    assert t["keepalive"] == [["/products/fast", 200], ["/products/slow", 200], ["/products/fail", 503]]
    assert [x[:2] for x in t["single"]] == [["/products/fast", 200], ["/products/slow", 200], ["/products/fail", 503]]
    assert t["probe"][:2] == ["/healthz", 200]
    assert [x[2] for x in t["dns"]] == [0, 3]
    assert t["denied"][1] == "TimeoutError"
    assert len(db_connections(scenario)) == 6  # one database call per /products request


# ---------------------------------------------------------------- L3/L4


@pytest.mark.parametrize("iface", ["v-api"])
def test_frontend_connections_match_tshark(scenario: Scenario, iface: str) -> None:
    pkts = scenario.pcaps[iface]
    for cport, _ in frontend_connections(scenario):
        rows = l34(scenario.rows, iface, FE, cport, API, topo.API_PORT)
        fwd = [r for r in rows if not r["is_reply"]]
        rev = [r for r in rows if r["is_reply"]]
        assert fwd and rev
        assert all((r["ip_src"], r["src_port"], r["ip_dst"], r["dst_port"]) == (FE, cport, API, topo.API_PORT)
                   for r in fwd)
        assert all((r["ip_src"], r["src_port"], r["ip_dst"], r["dst_port"]) == (API, topo.API_PORT, FE, cport)
                   for r in rev)
        want_fwd, want_rev = netns.directions(pkts, FE, cport, API, topo.API_PORT)
        assert sum(r["packets"] for r in fwd) == want_fwd.packets
        assert sum(r["bytes"] for r in fwd) == want_fwd.bytes
        assert sum(r["packets"] for r in rev) == want_rev.packets
        assert sum(r["bytes"] for r in rev) == want_rev.bytes
        or_flags = 0
        for r in fwd:
            or_flags |= r["tcp_flags"]
        assert or_flags == want_fwd.flags
        or_flags = 0
        for r in rev:
            or_flags |= r["tcp_flags"]
        assert or_flags == want_rev.flags
        # The node hands the SYN to the pod: tc egress of the pod's host-side veth.
        assert {r["traffic_direction"] for r in rows} == {"EGRESS"}
        assert {r["trace_point"] for r in fwd} == {"TO_NETWORK"}
        assert {r["trace_point"] for r in rev} == {"FROM_NETWORK"}
        assert {r["l4_protocol"] for r in rows} == {"TCP"}
        assert {(r["event_type"], r["ip_version"], r["node_name"]) for r in rows} == {(4, 4, "test-node")}
        assert rows[0]["flow_event"] == "new" and rows[0]["tcp_flags"] == 0x02
        assert {r["src_pod"] for r in fwd} == {"frontend-7d9f"} and {r["dst_pod"] for r in fwd} == {"product-api-5c4b"}
        assert len({r["community_id"] for r in rows}) == 1
        assert len({r["uuid"] for r in rows}) == len(rows)


def test_tcp_flag_sequence_follows_tshark(scenario: Scenario) -> None:
    pkts = scenario.pcaps["v-api"]
    for cport, _ in frontend_connections(scenario):
        truth = netns.control_order(pkts, FE, cport, API, topo.API_PORT)
        rows = l34(scenario.rows, "v-api", FE, cport, API, topo.API_PORT)
        first: dict[str, Any] = {}
        for r in rows:
            side = "s" if r["is_reply"] else "c"
            for bit, name in netns.CTL:
                if r["tcp_flags"] & bit:
                    label = f"{side}:{'SYN-ACK' if bit == 0x02 and r['tcp_flags'] & 0x10 else name}"
                    first.setdefault(label, r["time"])
        assert set(first) == {label for label, _ in truth}
        times = [first[label] for label, _ in truth]
        assert times == sorted(times), f"flag order {truth} vs rows {first}"
        assert [label for label, _ in truth][:2] == ["c:SYN", "s:SYN-ACK"]


def test_database_connections_match_tshark(scenario: Scenario) -> None:
    pkts = scenario.pcaps["v-db"]
    ports = db_connections(scenario)
    for cport in ports:
        rows = l34(scenario.rows, "v-db", API, cport, DB, topo.DB_PORT)
        want_fwd, want_rev = netns.directions(pkts, API, cport, DB, topo.DB_PORT)
        got_fwd = [r for r in rows if not r["is_reply"]]
        got_rev = [r for r in rows if r["is_reply"]]
        assert (sum(r["packets"] for r in got_fwd), sum(r["bytes"] for r in got_fwd)) == (want_fwd.packets,
                                                                                            want_fwd.bytes)
        assert (sum(r["packets"] for r in got_rev), sum(r["bytes"] for r in got_rev)) == (want_rev.packets,
                                                                                            want_rev.bytes)
        assert {r["dst_workload_kind"] for r in got_fwd} == {"StatefulSet"}


def test_handshake_time_matches_tshark(scenario: Scenario) -> None:
    cases = [("v-api", FE, cport, API, topo.API_PORT) for cport, _ in frontend_connections(scenario)]
    cases += [("v-db", API, cport, DB, topo.DB_PORT) for cport in db_connections(scenario)]
    for iface, client, cport, server, sport in cases:
        rows = l34(scenario.rows, iface, client, cport, server, sport)
        with_hs = [r for r in rows if r["tcp_handshake_ns"] is not None]
        assert len(with_hs) == 1 and with_hs[0]["is_reply"] and with_hs[0]["tcp_flags"] & 0x12 == 0x12
        truth = netns.handshake_ns(scenario.pcaps[iface], client, cport, server, sport)
        assert abs(with_hs[0]["tcp_handshake_ns"] - truth) < MS, (with_hs[0]["tcp_handshake_ns"], truth)


def test_connection_is_seen_on_both_node_interfaces(scenario: Scenario) -> None:
    cport = scenario.traffic["keepalive_port"]
    on_fe = l34(scenario.rows, "v-frontend", FE, cport, API, topo.API_PORT)
    on_api = l34(scenario.rows, "v-api", FE, cport, API, topo.API_PORT)
    # Packets leave the frontend pod into the node: tc ingress of its host-side veth.
    assert {r["traffic_direction"] for r in on_fe} == {"INGRESS"}
    assert {r["trace_point"] for r in on_fe if not r["is_reply"]} == {"FROM_NETWORK"}
    for reply in (False, True):
        assert sum(r["packets"] for r in on_fe if r["is_reply"] is reply) == sum(
            r["packets"] for r in on_api if r["is_reply"] is reply)


# ---------------------------------------------------------------- L7


def http_rows(rows: list[dict[str, Any]], iface: str, cport: int) -> list[dict[str, Any]]:
    out = [r for r in rows if r["flow_type"] == "L7" and r["http_method"] is not None and r["interface_name"] == iface
           and cport in (r["src_port"], r["dst_port"])]
    return sorted(out, key=lambda r: r["time"])


def test_http_requests_and_responses(scenario: Scenario) -> None:
    pkts = scenario.pcaps["v-api"]
    statuses = {"/products/fast": 200, "/products/slow": 200, "/products/fail": 503, "/healthz": 200}
    for cport, paths in frontend_connections(scenario):
        rows = http_rows(scenario.rows, "v-api", cport)
        reqs = [r for r in rows if r["l7_type"] == "REQUEST"]
        resps = [r for r in rows if r["l7_type"] == "RESPONSE"]
        url = f"http://{API}:{topo.API_PORT}"
        assert [(r["http_method"], r["http_url"]) for r in reqs] == [("GET", url + p) for p in paths]
        assert [(r["http_url"], r["http_code"]) for r in resps] == [(url + p, statuses[p]) for p in paths]
        assert all((r["ip_src"], r["src_port"], r["is_reply"]) == (FE, cport, False) for r in reqs)
        assert all((r["ip_src"], r["dst_port"], r["is_reply"]) == (API, cport, True) for r in resps)
        assert {r["event_type"] for r in rows} == {129}
        assert {r["traffic_direction"] for r in rows} == {"EGRESS"}
        assert {r["http_protocol"] for r in rows} == {"HTTP/1.1"}
        req_times = netns.message_starts(pkts, (FE, cport, API, topo.API_PORT), b"GET ")
        resp_times = netns.message_starts(pkts, (API, topo.API_PORT, FE, cport), b"HTTP/1.1 ")
        assert len(req_times) == len(resp_times) == len(paths)
        for resp, t_req, t_resp in zip(resps, req_times, resp_times, strict=True):
            assert abs(resp["l7_latency_ns"] - (t_resp - t_req)) < MS, (resp["l7_latency_ns"], t_resp - t_req)
            assert resp["server_time_ns"] == resp["l7_latency_ns"]
            if resp["http_url"].endswith("/slow"):
                assert resp["l7_latency_ns"] >= topo.SLOW_SECONDS * 1e9
        assert all(r["l7_latency_ns"] is None for r in reqs)


def test_http_headers_and_user_agent(scenario: Scenario) -> None:
    rows = http_rows(scenario.rows, "v-api", scenario.traffic["keepalive_port"])
    reqs = [r for r in rows if r["l7_type"] == "REQUEST"]
    assert [r["http_headers"] for r in reqs] == [
        [{"key": "User-Agent", "value": "frontend/1.0"}, {"key": "X-Request-Id", "value": f"req-products-{p}"}]
        for p in ("fast", "slow", "fail")
    ]
    probe = http_rows(scenario.rows, "v-api", scenario.traffic["probe"][2])
    assert {r["http_user_agent"] for r in probe} == {"kube-probe/1.29"}


def test_database_calls_show_where_the_time_goes(scenario: Scenario) -> None:
    """Scenario 1 of the seed: frontend→api latency = api processing + its database call."""
    rows = [r for r in scenario.rows if r["flow_type"] == "L7" and r["l7_type"] == "RESPONSE"
            and r["interface_name"] == "v-db" and r["http_url"] is not None]
    assert len(rows) == 6
    assert {r["http_code"] for r in rows} == {200}
    assert all(r["http_url"].startswith(f"http://{DB}:{topo.DB_PORT}/query?for=") for r in rows)
    assert all(r["l7_latency_ns"] >= topo.DB_SECONDS * 1e9 for r in rows)
    api = [r for r in scenario.rows if r["flow_type"] == "L7" and r["l7_type"] == "RESPONSE"
           and r["interface_name"] == "v-api" and (r["http_url"] or "").endswith("/products/slow")]
    slowest_db = max(r["l7_latency_ns"] for r in rows)
    assert all(r["l7_latency_ns"] > slowest_db for r in api)


def test_dns_queries_and_responses(scenario: Scenario) -> None:
    rows = [r for r in scenario.rows if r["flow_type"] == "L7" and r["dns_query"] is not None
            and r["interface_name"] == "v-dns"]
    by_name = {}
    for name, port, _ in scenario.traffic["dns"]:
        mine = sorted((r for r in rows if port in (r["src_port"], r["dst_port"])), key=lambda r: r["time"])
        by_name[name] = mine
        assert [r["l7_type"] for r in mine] == ["REQUEST", "RESPONSE"]
        q, a = mine
        assert (q["ip_src"], q["src_port"], q["ip_dst"], q["dst_port"], q["is_reply"]) == (FE, port, DNS, 53, False)
        assert (a["ip_src"], a["src_port"], a["ip_dst"], a["dst_port"], a["is_reply"]) == (DNS, 53, FE, port, True)
        assert q["dns_query"] == a["dns_query"] == name + "."
        assert q["dns_qtypes"] == ["A"] and q["l4_protocol"] == "UDP"
        assert a["l7_latency_ns"] is not None and a["l7_latency_ns"] > 0
        assert {q["traffic_direction"], a["traffic_direction"]} == {"EGRESS"}
    ok = by_name[topo.DNS_NAME][1]
    assert (ok["dns_rcode"], ok["dns_ips"], ok["dns_rrtypes"]) == (0, [DB], ["A"])
    missing = by_name[topo.DNS_MISSING][1]
    assert missing["dns_rcode"] == 3 and not missing["dns_ips"]


# ---------------------------------------------------------------- drops


def test_denied_connection_is_a_policy_drop(scenario: Scenario) -> None:
    """Scenario 2 of the seed: who tried what and was denied."""
    cport = scenario.traffic["denied"][0]
    drops = [r for r in scenario.rows if r["verdict"] == "DROPPED" and r["dst_port"] == topo.DENIED_PORT]
    syns = [p for p in scenario.pcaps["v-db"] if p.dport == topo.DENIED_PORT and p.flags & 0x12 == 0x02]
    assert len(syns) >= 1
    assert len(drops) == len(syns)
    for r in drops:
        assert (r["ip_src"], r["src_port"], r["ip_dst"], r["dst_port"]) == (FE, cport, DB, topo.DENIED_PORT)
        assert (r["kernel_drop_reason"], r["drop_reason"], r["drop_reason_code"]) == ("NETFILTER_DROP",
                                                                                       "POLICY_DENIED", 133)
        assert (r["event_type"], r["flow_event"], r["packets"], r["tcp_flags"]) == (1, "drop", 1, 0x02)
        assert r["src_pod"] == "frontend-7d9f" and r["dst_pod"] == "database-0"


# ---------------------------------------------------------------- stages and other sinks


def test_healthcheck_stage_removes_the_probe_connection(scenario: Scenario) -> None:
    probe_port = scenario.traffic["probe"][2]

    def is_probe(r: dict[str, Any]) -> bool:
        return {r["ip_src"], r["ip_dst"]} == {FE, API} and probe_port in (r["src_port"], r["dst_port"])

    assert any(r["http_user_agent"] == "kube-probe/1.29" for r in scenario.rows)
    kept = {r["uuid"] for r in scenario.filtered}
    expected = {r["uuid"] for r in scenario.rows if not is_probe(r)}
    assert kept == expected
    assert not any(r["http_user_agent"] == "kube-probe/1.29" for r in scenario.filtered)


def test_hubble_json_file_has_every_flow(scenario: Scenario) -> None:
    lines = scenario.hubble_lines
    assert len(lines) == len(scenario.rows)
    assert {line["flow"]["uuid"] for line in lines} == {r["uuid"] for r in scenario.rows}
    drop = next(line["flow"] for line in lines if line["flow"].get("verdict") == "DROPPED"
                and line["flow"].get("l4", {}).get("TCP", {}).get("destination_port") == topo.DENIED_PORT)
    assert drop["drop_reason_desc"] == "POLICY_DENIED"
    http = [line["flow"] for line in lines if line["flow"].get("l7", {}).get("http", {}).get("code") == 503]
    assert http and all(f["Type"] == "L7" for f in http)


def test_no_loss_and_every_batch_acknowledged(scenario: Scenario) -> None:
    src = scenario.source
    assert src.counts["rows"] == src.counts["acked_rows"] == len(scenario.rows)
    assert scenario.metrics.value("flowship_agent_unacked_rows", source="agent") == 0
    assert scenario.summary.sources["agent"]["lost"] == 0
    assert scenario.metrics.value("flowship_agent_events_total", kind="flow") > 0
    assert src.counts["emitted_packets"] == sum(r["packets"] for r in scenario.rows
                                                if r["flow_type"] == "L3_L4" and r["verdict"] == "FORWARDED")
