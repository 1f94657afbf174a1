"""The namespace scenario straight from the capture: lean enough to run in every VM of the kernel matrix.

flowship.agent.topology's frontend → product-api → database chain (HTTP 200, slow 200 and 503 responses on
keep-alive and fresh connections, a kube-probe, DNS, and a connection to a port that nftables drops)
with KernelCapture attached to the node's veths. No pipeline or pyarrow, so that an emulated VM (tests/vm)
spends its time on the kernel, not on imports. Checked against what the client itself saw: its ports,
statuses and the denied connection's timeout.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any

import netns
import numpy as np
import pytest

from flowship.agent import events as ev
from flowship.agent import topology as topo
from flowship.agent.capture import CaptureBatch, CaptureConfig, KernelCapture
from flowship.agent.kernel_drops import DropReasons

pytestmark = pytest.mark.kernel

FE = topo.PODS[0].ip
API = next(p.ip for p in topo.PODS if p.name == "product-api")
DB = next(p.ip for p in topo.PODS if p.name == "database")


@dataclass
class Run:
    batch: CaptureBatch
    traffic: dict[str, Any]
    ifindex: dict[str, int]  # node-side interface name -> ifindex
    reasons: DropReasons


@pytest.fixture(scope="module")
def run() -> Run:
    netns.require_machine()
    with topo.Topology() as t:
        t.start_services()
        links = json.loads(subprocess.run(["ip", "-n", t.node, "-j", "link", "show"], check=True,
                                          capture_output=True, text=True).stdout)
        cfg = CaptureConfig(netns=t.node, sweep_interval_s=None, http_ports=(topo.API_PORT, topo.DB_PORT))
        with KernelCapture().start(["v-*"], cfg) as cap:
            traffic = t.run_frontend()
            batch = cap.finish()
    return Run(batch, traffic, {link["ifname"]: link["ifindex"] for link in links}, DropReasons.from_kernel())


def _conn(rows: np.ndarray, src: str, sport: int, dst: str, dport: int) -> np.ndarray:
    m = (ev.match_address(rows["src_addr"], src) & ev.match_address(rows["dst_addr"], dst)
         & (rows["src_port"] == sport) & (rows["dst_port"] == dport))
    out = rows[m]
    return out[np.argsort(out["ts_ns"], kind="stable")]


def test_client_saw_the_scripted_outcomes(run: Run) -> None:
    expect = [["/products/fast", 200], ["/products/slow", 200], ["/products/fail", 503]]
    assert run.traffic["keepalive"] == expect
    assert [s[:2] for s in run.traffic["single"]] == expect
    assert run.traffic["denied"][1] in ("TimeoutError", "timeout")


def test_every_frontend_connection_is_a_flow_with_its_handshake(run: Run) -> None:
    ports = [run.traffic["keepalive_port"], *(s[2] for s in run.traffic["single"]), run.traffic["probe"][2]]
    api_if = run.ifindex["v-api"]
    for port in ports:
        rows = _conn(run.batch.flows, FE, port, API, topo.API_PORT)
        rows = rows[rows["ifindex"] == api_if]
        assert len(rows), f"no flow for {FE}:{port} -> {API}:{topo.API_PORT} on v-api"
        flags = np.bitwise_or.reduce(rows["tcp_flags"])
        reply = np.bitwise_or.reduce(rows["reply_tcp_flags"])
        assert flags & ev.TcpFlags.SYN and not flags & ev.TcpFlags.RST, (port, flags)
        assert reply & ev.TcpFlags.SYN and reply & ev.TcpFlags.ACK, (port, reply)  # SYN-ACK from the server
        assert rows["packets"].sum() > 0 and rows["reply_packets"].sum() > 0
        assert rows[0]["syn_ns"] <= rows[-1]["synack_ns"]
    # product-api called the database for each /products request
    db = run.batch.flows[ev.match_address(run.batch.flows["dst_addr"], DB)
                         & (run.batch.flows["dst_port"] == topo.DB_PORT)]
    assert len(np.unique(db["src_port"])) >= 1


def test_http_statuses_and_the_slow_response(run: Run) -> None:
    l7 = run.batch.l7[run.batch.l7["ifindex"] == run.ifindex["v-api"]]
    for path, status, port in run.traffic["single"]:
        req = _conn(l7, FE, port, API, topo.API_PORT)
        resp = _conn(l7, API, topo.API_PORT, FE, port)
        assert req["l7_kind"].tolist() == [ev.L7Kind.HTTP_REQUEST], path
        assert resp["l7_kind"].tolist() == [ev.L7Kind.HTTP_RESPONSE], path
        assert ev.l7_payloads(req)[0].startswith(f"GET {path} HTTP/1.1".encode())
        assert ev.l7_payloads(resp)[0].startswith(f"HTTP/1.1 {status} ".encode()), ev.l7_payloads(resp)[0][:20]
        took = int(resp[0]["ts_ns"]) - int(req[0]["ts_ns"])
        if path == "/products/slow":
            assert took >= topo.SLOW_SECONDS * 1e9, took
        assert took > 0


def test_denied_port_is_a_netfilter_drop_and_the_only_one(run: Run) -> None:
    drops = run.batch.drops
    names = run.reasons.names(drops["drop_reason"])
    dport = run.traffic["denied"][0]
    denied = (ev.match_address(drops["src_addr"], FE) & ev.match_address(drops["dst_addr"], DB)
              & (drops["src_port"] == dport) & (drops["dst_port"] == topo.DENIED_PORT))
    assert denied.sum() >= 1, "the SYN to the denied port was not reported as a kernel drop"
    assert set(names[denied]) == {"NETFILTER_DROP"}
    assert np.all(drops[denied]["tcp_flags"] & ev.TcpFlags.SYN)
    scenario = ev.match_address(drops["src_addr"], FE) | ev.match_address(drops["dst_addr"], FE) | \
        ev.match_address(drops["src_addr"], API) | ev.match_address(drops["dst_addr"], API)
    nf = names == "NETFILTER_DROP"
    assert not np.any(nf & scenario & ~denied), "netfilter drops of traffic that no rule denies"
    # the denied connection never got an answer
    rows = _conn(run.batch.flows, FE, dport, DB, topo.DENIED_PORT)
    assert len(rows) and not np.bitwise_or.reduce(rows["reply_tcp_flags"]) & ev.TcpFlags.SYN
