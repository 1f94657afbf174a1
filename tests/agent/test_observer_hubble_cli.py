"""The real ``hubble`` CLI against flowship's Observer server.

The CLI is built from the Go module proxy by ``deploy/dev/build-hubble-cli``
(cached under ~/.cache/flowship; the first build takes a few minutes).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
from gotools import go_tool

from flowship.agent.observer import ObserverConfig, ObserverServer
from flowship.metrics import Metrics
from flowship.model.hubble_decode import decode_lines

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hubble_cli() -> str:
    return go_tool("build-hubble-cli")


@pytest.fixture(scope="module")
def server(fixture_files):
    batches = [decode_lines(p.read_bytes()).batch for p in fixture_files]
    flows = pa.Table.from_batches(batches).sort_by("time").combine_chunks().to_batches()[0]
    srv = ObserverServer(ObserverConfig(address="127.0.0.1:0"), Metrics(), node_name="node-1")
    srv.start()
    srv.publish(flows)
    yield srv, flows
    srv.stop(0)


def _hubble(cli: str, port: int, *args: str) -> str:
    proc = subprocess.run([cli, *args, "--server", f"127.0.0.1:{port}"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_observe_last_jsonpb(hubble_cli, server) -> None:
    srv, flows = server
    out = _hubble(hubble_cli, srv.port, "observe", "-o", "jsonpb", "--last", "10")
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(lines) == 10
    assert [obj["flow"]["uuid"] for obj in lines] == flows.column("uuid").to_pylist()[-10:]
    # Hubble's JSON shape: proto field names, enum names, the envelope's node_name and time
    last = lines[-1]
    assert last["time"] == last["flow"]["time"]
    assert last["node_name"] == last["flow"]["node_name"]
    assert last["flow"]["verdict"] in ("FORWARDED", "DROPPED", "REDIRECTED")


def test_observe_filters_the_way_the_cli_sends_them(hubble_cli, server) -> None:
    srv, flows = server
    out = _hubble(hubble_cli, srv.port, "observe", "-o", "jsonpb", "--all", "--verdict", "DROPPED")
    dropped = [json.loads(line)["flow"] for line in out.splitlines() if line.strip()]
    assert [f["drop_reason_desc"] for f in dropped] == ["INVALID_SOURCE_IP", "POLICY_DENIED"]
    out = _hubble(hubble_cli, srv.port, "observe", "-o", "jsonpb", "--all", "--http-status", "503",
                  "--namespace", "istio-system")
    got = [json.loads(line)["flow"] for line in out.splitlines() if line.strip()]
    codes = flows.column("http_code").to_pylist()
    src_ns = flows.column("src_namespace").to_pylist()
    dst_ns = flows.column("dst_namespace").to_pylist()
    expected = sum(1 for c, s, d in zip(codes, src_ns, dst_ns, strict=True)
                   if c == 503 and "istio-system" in (s, d))
    assert len(got) == expected > 0
    assert all(f["l7"]["http"]["code"] == 503 for f in got)
    # the compact output asks for a field mask with fields newer than this proto: still served
    compact = _hubble(hubble_cli, srv.port, "observe", "--last", "2", "--verdict", "DROPPED")
    assert "DROPPED" in compact and "xwing" in compact


def test_status_and_lists(hubble_cli, server) -> None:
    srv, flows = server
    status = _hubble(hubble_cli, srv.port, "status")
    assert "Healthcheck" in status and "Ok" in status
    assert f"{flows.num_rows:,}/4,095" in status
    nodes = _hubble(hubble_cli, srv.port, "list", "nodes")
    assert "node-1" in nodes and "Connected" in nodes
    namespaces = _hubble(hubble_cli, srv.port, "list", "namespaces").split()
    assert {"kube-system", "istio-system", "bookinfo", "default"} <= set(namespaces)


def test_observe_follow_sees_new_flows(hubble_cli, server) -> None:
    _, flows = server
    srv = ObserverServer(ObserverConfig(address="127.0.0.1:0", follow_poll=0.05), Metrics(), node_name="node-1")
    srv.start()
    srv.publish(flows)
    proc = subprocess.Popen([hubble_cli, "observe", "--server", f"127.0.0.1:{srv.port}", "-o", "jsonpb", "-f",
                             "--last", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())  # the stored flow asked for with --last 1
        assert first["flow"]["uuid"] == flows.column("uuid").to_pylist()[-1]
        fresh = flows.slice(0, 25)
        srv.publish(fresh)
        got = [json.loads(proc.stdout.readline())["flow"]["uuid"] for _ in range(25)]
        assert got == fresh.column("uuid").to_pylist()
    finally:
        proc.terminate()
        proc.wait(10)
        srv.stop(0)


def test_observe_over_the_default_unix_socket(hubble_cli, server, tmp_path) -> None:
    """The private default (a unix socket, as Hubble's own local default) with the CLI's unix:// form."""
    _, flows = server
    sock = tmp_path / "flowship" / "hubble.sock"
    srv = ObserverServer(ObserverConfig(address=f"unix://{sock}"), Metrics(), node_name="node-1")
    srv.start()
    srv.publish(flows)
    try:
        proc = subprocess.run([hubble_cli, "observe", "--server", f"unix://{sock}", "-o", "jsonpb", "--last", "5"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        uuids = [json.loads(line)["flow"]["uuid"] for line in proc.stdout.splitlines() if line.strip()]
        assert uuids == flows.column("uuid").to_pylist()[-5:]
        status = subprocess.run([hubble_cli, "status", "--server", f"unix://{sock}"], capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0 and "Healthcheck" in status.stdout, status.stderr
    finally:
        srv.stop(0)


def test_observe_with_client_certificates(hubble_cli, server, tmp_path) -> None:
    """Exposed with mTLS: the CLI's --tls flags with a client certificate read it; without one they cannot."""
    from certs import make_pki

    from flowship.agent.observer import ObserverTLSConfig

    _, flows = server
    pki = make_pki(tmp_path, server_names="IP:127.0.0.1,DNS:hubble.local")  # the CLI checks hubble.local
    srv = ObserverServer(ObserverConfig(address="127.0.0.1:0", tls=ObserverTLSConfig(
        str(pki["server.crt"]), str(pki["server.key"]), str(pki["ca.crt"]))), Metrics(), node_name="node-1")
    srv.start()
    srv.publish(flows)
    tls = ["--tls", "--tls-ca-cert-files", str(pki["ca.crt"]), "--tls-server-name", "hubble.local"]
    client = ["--tls-client-cert-file", str(pki["client.crt"]), "--tls-client-key-file", str(pki["client.key"])]
    try:
        out = _hubble(hubble_cli, srv.port, "observe", "-o", "jsonpb", "--last", "3", *tls, *client)
        assert [json.loads(line)["flow"]["uuid"] for line in out.splitlines() if line.strip()] == \
            flows.column("uuid").to_pylist()[-3:]
        refused = subprocess.run([hubble_cli, "observe", "--last", "3", "--server", f"127.0.0.1:{srv.port}", *tls,
                                  "--request-timeout", "5s", "--timeout", "5s"],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and not refused.stdout.strip()
        assert "code = Unavailable" in refused.stderr, refused.stderr  # the handshake was refused
    finally:
        srv.stop(0)


@pytest.mark.kernel
def test_agent_flows_read_like_hubble(hubble_cli, tmp_path) -> None:
    """Flows the agent captured (demo topology) end with a Hubble-style summary in ``hubble observe``, not ``()``."""
    import os
    import re
    import threading
    import time

    from flowship.agent import demo
    from flowship.agent import topology as topo
    from flowship.agent.source import AgentSource
    from flowship.config import load_text
    from flowship.pipeline.runtime import Pipeline

    if os.geteuid() != 0:
        pytest.fail("capturing with the agent needs root (network namespaces, eBPF): run the tests as root")
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    with topo.Topology() as t:
        t.start_services()
        text = demo.CONFIG.format(out=tmp_path, node_ns=t.node, api_port=topo.API_PORT, db_port=topo.DB_PORT,
                                  static=demo._static_map())
        text = text.replace("observer:\n      enabled: false", "observer:\n      address: 127.0.0.1:0")
        pipeline = Pipeline(load_text(text, "<test>"), Metrics())
        source = next(s for s in pipeline.sources if isinstance(s, AgentSource))
        runner = threading.Thread(target=pipeline.run, daemon=True)
        runner.start()
        try:
            assert source.started.wait(30), "the agent did not start"
            t.run_frontend()
            time.sleep(2.0)
            port = source.observer.port
            compact = _hubble(hubble_cli, port, "observe", "--last", "500")
            jsonpb = _hubble(hubble_cli, port, "observe", "-o", "jsonpb", "--last", "500")
        finally:
            pipeline.stop()
            runner.join(60)
    lines = [line for line in compact.splitlines() if line.strip()]
    assert len(lines) > 20, compact
    assert not [line for line in lines if line.rstrip().endswith("()")], compact
    summaries = [json.loads(line)["flow"].get("Summary", "") for line in jsonpb.splitlines() if line.strip()]
    assert all(summaries), [s for s in summaries if not s]
    assert any(re.fullmatch(r"TCP Flags: SYN", s) for s in summaries)
    assert any(s.startswith("TCP Flags: SYN, ACK") for s in summaries)
    assert any(re.fullmatch(r"HTTP/1\.1 GET http://\S+", s) for s in summaries), summaries
    assert any(re.fullmatch(r"HTTP/1\.1 \d{3} \d+ms \(GET http://\S+\)", s) for s in summaries), summaries
    assert any(s.startswith("DNS Query ") for s in summaries) and any(s.startswith("DNS Answer ") for s in summaries)
    left = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()) - before
    assert not [n for n in left if n.startswith(("fs-node-", "fs-frontend-"))], left
