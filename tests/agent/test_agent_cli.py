"""``flowship agent`` as a process: starts, captures, stops on SIGTERM/--duration leaving nothing attached.

Runs the real command against the namespace topology (node namespace, host-side veths), reads its
Parquet output, and inspects the node namespace with bpftool and tc afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import netns
import pyarrow.dataset as ds
import pytest

from flowship.agent import loader
from flowship.agent import topology as topo
from flowship.agent.attach import call_in_netns
from flowship.agent.cli import with_agent_source
from flowship.config import load_text

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
API = next(p.ip for p in topo.PODS if p.name == "product-api")
FE = next(p.ip for p in topo.PODS if p.name == "frontend")


@pytest.fixture(scope="module")
def net() -> Iterator[topo.Topology]:
    netns.require_machine()
    t = topo.Topology(tag=f"c{os.getpid() % 10000:04d}")
    with t:
        yield t


def write_config(tmp: Path, t: topo.Topology, attach_mode: str = "auto") -> Path:
    cfg = tmp / "agent.yaml"
    cfg.write_text(f"""
node_name: cli-node
data_dir: {tmp}/state
sources:
  - type: agent
    netns: {t.node}
    interfaces: ["v-*"]
    attach_mode: {attach_mode}
    observer: {{enabled: false}}
sinks:
  - type: parquet
    path: {tmp}/flows
""")
    return cfg


def start_agent(cfg: Path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "flowship.cli", "--log-format", "json", "agent", "--config",
                             str(cfg), "--no-progress", *extra], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        if '"agent capturing"' in line:
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"flowship agent did not start capturing: {err}")


def attachments(t: topo.Topology) -> dict[str, list]:
    """tcx programs, tc filters and clsact qdiscs on the node namespace's pod veths."""
    links = json.loads(topo.sh("ip", "-n", t.node, "-j", "link", "show").stdout)
    ifindexes = {link["ifname"]: link["ifindex"] for link in links if link["ifname"].startswith("v-")}
    tcx = call_in_netns(t.node, lambda: [(name, pid) for name, ix in ifindexes.items()
                                     for kind in (loader.BPF_TCX_INGRESS, loader.BPF_TCX_EGRESS)
                                     for pid in loader.prog_query(ix, kind)])
    filters = [(name, d) for name in ifindexes for d in ("ingress", "egress")
               if topo.sh("tc", "-n", t.node, "filter", "show", "dev", name, d, check=False).stdout.strip()]
    qdiscs = [q for q in json.loads(topo.sh("tc", "-n", t.node, "-j", "qdisc", "show").stdout)
              if q.get("kind") == "clsact"]
    return {"programs": tcx + filters, "clsact": qdiscs}


def ping(t: topo.Topology, count: int) -> None:
    topo.sh("ip", "netns", "exec", t.ns("frontend"), "ping", "-c", str(count), "-i", "0.2", "-W", "1", API)


def icmp_rows(path: Path) -> list[dict]:
    table = ds.dataset(str(path / "flows"), format="parquet", partitioning="hive").to_table(
        columns=["l4_protocol", "ip_src", "ip_dst", "interface_name", "packets", "is_reply", "node_name"])
    return [r for r in table.to_pylist() if r["l4_protocol"] == "ICMPv4" and r["interface_name"] == "v-api"]


@pytest.mark.parametrize("attach_mode", ["tcx", "tc"])
def test_sigterm_flushes_and_leaves_nothing_attached(net: topo.Topology, tmp_path: Path, attach_mode: str) -> None:
    proc = start_agent(write_config(tmp_path, net, attach_mode))
    try:
        assert attachments(net)["programs"], "the agent attached nothing"
        ping(net, 3)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert attachments(net) == {"programs": [], "clsact": []}
    rows = icmp_rows(tmp_path / "flows")
    fwd = [r for r in rows if not r["is_reply"]]
    rev = [r for r in rows if r["is_reply"]]
    assert (sum(r["packets"] for r in fwd), sum(r["packets"] for r in rev)) == (3, 3)
    assert {(r["ip_src"], r["ip_dst"], r["node_name"]) for r in fwd} == {(FE, API, "cli-node")}


def test_duration_stops_by_itself(net: topo.Topology, tmp_path: Path) -> None:
    proc = start_agent(write_config(tmp_path, net), "--duration", "3")
    try:
        ping(net, 2)
    finally:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopping: flushing sinks" in err
    assert attachments(net) == {"programs": [], "clsact": []}
    assert sum(r["packets"] for r in icmp_rows(tmp_path / "flows") if not r["is_reply"]) == 2


def test_sigkill_leaves_no_tcx_link(net: topo.Topology, tmp_path: Path) -> None:
    """tcx links belong to the process: an agent killed outright detaches with it (tc filters would stay)."""
    proc = start_agent(write_config(tmp_path, net, "tcx"))
    try:
        assert attachments(net)["programs"]
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while attachments(net)["programs"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert attachments(net) == {"programs": [], "clsact": []}


def test_missing_capabilities_are_named(tmp_path: Path) -> None:
    netns.require_machine()
    cfg = tmp_path / "a.yaml"
    cfg.write_text(f"data_dir: {tmp_path}/state\nsources: [{{type: agent, observer: {{enabled: false}}}}]\n"
                   f"sinks: [{{type: parquet, path: {tmp_path}/flows}}]\n")
    res = subprocess.run(["setpriv", "--bounding-set", "-bpf,-perfmon,-net_admin,-sys_admin", sys.executable, "-m",
                          "flowship.cli", "agent", "--config", str(cfg)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1
    assert "flowship agent cannot start" in res.stderr
    for cap in ("CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"):
        assert f"missing {cap}" in res.stderr


def test_a_config_without_agent_source_gets_one() -> None:
    config = load_text("sources: [{type: stdin}]\nsinks: [{type: parquet, path: /tmp/x}]\n", "t.yaml")
    added = with_agent_source(config)
    assert [(s.type, s.name) for s in added.sources] == [("stdin", "stdin"), ("agent", "agent")]
    assert with_agent_source(added) is added


def test_observer_serves_the_agents_flows(net: topo.Topology, tmp_path: Path) -> None:
    """The flows the agent emits are also what `hubble observe` gets from its Observer server."""
    import grpc

    from flowship.metrics import Metrics
    from flowship.pipeline.runtime import Pipeline
    from flowship.proto.observer import observer_pb2, observer_pb2_grpc

    config = load_text(f"""
node_name: obs-node
data_dir: {tmp_path}/state
sources:
  - type: agent
    netns: {net.node}
    interfaces: ["v-*"]
    aggregation: packet
    batch_interval: 200ms
    observer: {{address: "127.0.0.1:0"}}
sinks:
  - type: parquet
    path: {tmp_path}/flows
""", "observer-test.yaml")
    pipeline = Pipeline(config, Metrics())
    source = pipeline.sources[0]
    runner = threading.Thread(target=pipeline.run, daemon=True)
    runner.start()
    try:
        assert source.started.wait(30), "agent did not start"
        ping(net, 3)
        deadline = time.monotonic() + 20
        while source.counts["rows"] < 12 and time.monotonic() < deadline:  # 6 packets on each of 2 veths
            time.sleep(0.1)
        assert source.observer is not None and source.observer.port
        stub = observer_pb2_grpc.ObserverStub(grpc.insecure_channel(f"127.0.0.1:{source.observer.port}"))
        echo: list = []
        while len(echo) < 3 and time.monotonic() < deadline + 10:  # the Observer is fed after the stages
            flows = [r.flow for r in stub.GetFlows(observer_pb2.GetFlowsRequest(number=4095), timeout=10)
                     if r.HasField("flow")]
            echo = [f for f in flows if f.IP.source == FE and f.IP.destination == API and f.l4.HasField("ICMPv4")
                    and f.interface.name == "v-api"]
            time.sleep(0.1)
        assert len(echo) == 3
        assert {(f.verdict, f.node_name, f.l4.ICMPv4.type, f.is_reply.value) for f in echo} == {(1, "obs-node", 8,
                                                                                                 False)}
        assert len(echo) <= len(flows) <= source.counts["rows"]  # rows are counted before the pipeline has them
    finally:
        pipeline.stop()
        runner.join(60)
