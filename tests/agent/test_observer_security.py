"""The Observer is private by default, authenticated when exposed, fair between clients, and serves flows
after the pipeline's shared stages (so ``redact`` applies to it)."""

from __future__ import annotations

import socket
import stat
import subprocess
import threading
import time

import grpc
import pyarrow as pa
import pytest
from certs import make_pki
from tcp_relay import TcpRelay

from flowship.agent.observer import DEFAULT_ADDRESS, ObserverConfig, ObserverServer, ObserverTLSConfig, is_private
from flowship.agent.source import AgentSource
from flowship.config import ConfigError, load_text, parse
from flowship.metrics import Metrics
from flowship.model.hubble_decode import decode_lines
from flowship.pipeline.runtime import Pipeline
from flowship.proto.observer import observer_pb2, observer_pb2_grpc


@pytest.fixture(scope="module")
def flows(fixture_files) -> pa.RecordBatch:
    batches = [decode_lines(p.read_bytes()).batch for p in fixture_files]
    return pa.Table.from_batches(batches).sort_by("time").combine_chunks().to_batches()[0]


def test_default_is_a_private_unix_socket(tmp_path, flows) -> None:
    """No TCP port by default (nothing to collide with Cilium's 4244/4245); the socket is 0600 in a 0700
    directory, and gRPC clients read it as they read Hubble's own socket."""
    assert DEFAULT_ADDRESS.startswith("unix://") and is_private(DEFAULT_ADDRESS)
    assert parse(ObserverConfig, {}, "agent.yaml", "observer").address == DEFAULT_ADDRESS
    sock = tmp_path / "run" / "flowship" / "hubble.sock"
    server = ObserverServer(ObserverConfig(address=f"unix://{sock}"), Metrics(), node_name="node-1")
    server.start()
    try:
        server.publish(flows.slice(0, 9))
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        channel = grpc.insecure_channel(f"unix://{sock}")
        got = list(observer_pb2_grpc.ObserverStub(channel).GetFlows(observer_pb2.GetFlowsRequest(number=100),
                                                                     timeout=10))
        assert [r.flow.uuid for r in got] == flows.column("uuid").to_pylist()[:9]
        channel.close()
    finally:
        server.stop(0)


def test_unix_socket_in_use_is_refused_and_a_stale_one_replaced(tmp_path) -> None:
    """A second agent must not take over the first one's socket (gRPC would unlink it silently)."""
    path = tmp_path / "hubble.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # left behind by a process that died: nobody listens
    stale.close()
    first = ObserverServer(ObserverConfig(address=f"unix://{path}"), Metrics())
    assert first.start() == 0
    try:
        second = ObserverServer(ObserverConfig(address=f"unix://{path}"), Metrics(), config_key="sources[0].observer")
        with pytest.raises(OSError, match=rf"sources\[0\]\.observer\.address: cannot listen on unix://{path}: "
                                          "another process is serving this socket"):
            second.start()
        channel = grpc.insecure_channel(f"unix://{path}")  # the first one still serves
        assert observer_pb2_grpc.ObserverStub(channel).ServerStatus(observer_pb2.ServerStatusRequest(), timeout=5)
        channel.close()
    finally:
        first.stop(0)
    (tmp_path / "plain").write_text("")
    with pytest.raises(OSError, match="the path exists and is not a socket"):
        ObserverServer(ObserverConfig(address=f"unix://{tmp_path}/plain"), Metrics()).start()


@pytest.mark.parametrize("address", ["127.0.0.1:4246", "[::1]:4246", "localhost:4246", "unix:relative.sock"])
def test_loopback_needs_no_tls(address: str) -> None:
    assert parse(ObserverConfig, {"address": address}, "agent.yaml", "observer").address == address


def test_exposed_address_needs_client_certificates(tmp_path) -> None:
    for f in ("c.crt", "c.key", "ca.crt"):
        (tmp_path / f).write_text("x")
    server_tls = {"cert_file": str(tmp_path / "c.crt"), "key_file": str(tmp_path / "c.key")}
    for data in ({"address": ":4246"}, {"address": "0.0.0.0:4246"}, {"address": "10.1.2.3:4246"},
                 {"address": ":4246", "tls": server_tls}):  # TLS without client CA: anyone can still read
        with pytest.raises(ConfigError, match=r"sources\[0\]\.observer\.address: .* reachable from other machines"):
            parse(ObserverConfig, data, "agent.yaml", "sources[0].observer")
    mtls = {**server_tls, "client_ca_file": str(tmp_path / "ca.crt")}
    assert parse(ObserverConfig, {"address": ":4246", "tls": mtls}, "a.yaml", "observer").tls.client_ca_file
    assert parse(ObserverConfig, {"address": ":4246", "allow_unauthenticated": True}, "a.yaml", "observer")
    assert parse(ObserverConfig, {"address": ":4246", "enabled": False}, "a.yaml", "observer")


def test_bind_failure_names_the_config_key(tmp_path, flowship_cmd) -> None:
    """A taken port (Cilium's Hubble server on 4244, say) stops the start with the key and address."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        server = ObserverServer(ObserverConfig(address=f"127.0.0.1:{port}"), Metrics(),
                                config_key="sources[0].observer")
        with pytest.raises(OSError, match=rf"sources\[0\]\.observer\.address: cannot listen on 127\.0\.0\.1:{port}: "
                                          "the address is already in use"):
            server.start()
        # The whole command: the observer binds before the capture starts, and the run exits 1 saying why.
        cfg = tmp_path / "agent.yaml"
        cfg.write_text(f"data_dir: {tmp_path}/state\nsources:\n  - type: stdin\n  - type: agent\n"
                       f"    observer: {{address: \"127.0.0.1:{port}\"}}\nsinks: [{{type: stdout}}]\n")
        proc = subprocess.run([*flowship_cmd, "export", "--config", str(cfg)], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode == 1
        assert f"sources[1].observer.address: cannot listen on 127.0.0.1:{port}: the address is already in use" \
            in proc.stderr
    finally:
        taken.close()


def _follow(stub: observer_pb2_grpc.ObserverStub) -> tuple[grpc.Future, threading.Thread, list]:
    """An idle follower: a GetFlows(follow) stream kept open by a reader thread."""
    call = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True))
    errors: list[grpc.RpcError] = []

    def read() -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            errors.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return call, t, errors


def test_idle_followers_cannot_starve_other_clients(tmp_path, flows) -> None:
    """Per-client and total stream limits answer RESOURCE_EXHAUSTED at once, and short calls keep a thread."""
    pki = make_pki(tmp_path, clients=("alice", "bob", "carol"), ca_name="observer-test-ca")
    config = ObserverConfig(address="127.0.0.1:0", follow_poll=0.05, max_streams=4, max_streams_per_client=2,
                            max_workers=6, tls=ObserverTLSConfig(str(pki["server.crt"]), str(pki["server.key"]),
                                                                 str(pki["ca.crt"])))
    metrics = Metrics()
    server = ObserverServer(config, metrics, node_name="node-1")
    port = server.start()
    server.publish(flows.slice(0, 20))

    def stub(cn: str) -> observer_pb2_grpc.ObserverStub:
        creds = grpc.ssl_channel_credentials(pki["ca.crt"].read_bytes(), pki[f"{cn}.key"].read_bytes(),
                                             pki[f"{cn}.crt"].read_bytes())
        return observer_pb2_grpc.ObserverStub(grpc.secure_channel(f"127.0.0.1:{port}", creds))

    def wait_streams(n: int) -> None:
        deadline = time.monotonic() + 10
        while metrics.value("flowship_observer_clients") != n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metrics.value("flowship_observer_clients") == n

    alice, bob, carol = stub("alice"), stub("bob"), stub("carol")
    calls = []
    try:
        calls += [_follow(alice), _follow(alice)]
        wait_streams(2)
        # alice is at her limit; bob still reads and ServerStatus answers at once
        with pytest.raises(grpc.RpcError) as err:
            list(alice.GetFlows(observer_pb2.GetFlowsRequest(number=5), timeout=5))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_client = 2" in err.value.details() and "cn:alice" in err.value.details()
        assert len(list(bob.GetFlows(observer_pb2.GetFlowsRequest(number=5), timeout=5))) == 5
        calls += [_follow(bob), _follow(bob)]
        wait_streams(4)
        # every stream slot is held: a third client is refused at once, and unary calls still find a thread
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(carol.GetFlows(observer_pb2.GetFlowsRequest(number=5), timeout=5))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams = 4" in err.value.details()
        for _ in range(20):
            assert carol.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=2).num_flows == 20
        assert time.monotonic() - started < 5
        assert metrics.value("flowship_observer_refused_streams_total", limit="max_streams") == 1
        assert metrics.value("flowship_observer_refused_streams_total", limit="max_streams_per_client") == 1
        # a follower that goes away frees its slot
        calls[0][0].cancel()
        wait_streams(3)
        assert len(list(carol.GetFlows(observer_pb2.GetFlowsRequest(number=5), timeout=5))) == 5
    finally:
        for call, _, _ in calls:
            call.cancel()
        server.stop(0)
    for _, t, _ in calls:
        t.join(5)


class _PartitionProxy(TcpRelay):
    """A TCP relay that can stop forwarding without closing anything, as a network partition does."""

    def __init__(self, port: int) -> None:
        self.frozen = threading.Event()
        super().__init__(("127.0.0.1", port))

    def pump(self, src: socket.socket, dst: socket.socket, direction: int) -> None:
        try:
            while True:
                while self.frozen.is_set():
                    time.sleep(0.05)  # neither forward nor close: the peer hears nothing
                data = src.recv(65536)
                if not data or self.frozen.is_set():
                    if not data:
                        return
                    continue
                dst.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


def test_a_vanished_follower_frees_its_stream(flows) -> None:
    """A client gone without closing its connection is found by keepalive pings, and its slot freed."""
    metrics = Metrics()
    server = ObserverServer(ObserverConfig(address="127.0.0.1:0", follow_poll=0.05, keepalive=0.5,
                                           keepalive_timeout=0.5, max_streams=1, max_workers=3), metrics)
    port = server.start()
    proxy = _PartitionProxy(port)
    try:
        call, _, _ = _follow(observer_pb2_grpc.ObserverStub(grpc.insecure_channel(proxy.address)))
        deadline = time.monotonic() + 10
        while metrics.value("flowship_observer_clients") != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metrics.value("flowship_observer_clients") == 1
        direct = observer_pb2_grpc.ObserverStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        with pytest.raises(grpc.RpcError) as err:  # the only slot is held
            list(direct.GetFlows(observer_pb2.GetFlowsRequest(number=1), timeout=5))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        proxy.frozen.set()
        deadline = time.monotonic() + 15
        while metrics.value("flowship_observer_clients") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics.value("flowship_observer_clients") == 0, "the vanished follower still holds its stream"
        server.publish(flows.slice(0, 3))
        assert len(list(direct.GetFlows(observer_pb2.GetFlowsRequest(number=3), timeout=5))) == 3
        call.cancel()
    finally:
        proxy.close()
        server.stop(0)


def test_observer_serves_flows_after_the_shared_stages(tmp_path, flows, monkeypatch) -> None:
    """A redact stage applies to the Observer: it is a sink of the pipeline, not a tap on the capture."""
    assert len([p for p in flows.column("src_pod").to_pylist() if p]) > 0
    batch = flows.slice(0, 40)

    def run(self: AgentSource, emit, stop: threading.Event) -> None:  # noqa: ANN001 - Emit
        self.emit_batch(batch, emit)  # what the capture would emit, without the kernel
        self.started.set()
        stop.wait()

    monkeypatch.setattr(AgentSource, "run", run)
    config = load_text(f"""
data_dir: {tmp_path}/state
sources:
  - type: agent
    observer: {{address: "127.0.0.1:0"}}
stages:
  - type: redact
    fields: [src_pod, dst_pod, http_url]
sinks:
  - type: file
    path: {tmp_path}/out.jsonl
""", "redact.yaml")
    pipeline = Pipeline(config, Metrics())
    source = pipeline.sources[0]
    assert [b.name for b in pipeline.branches] == ["file", "agent.observer"]
    runner = threading.Thread(target=pipeline.run, daemon=True)
    runner.start()
    try:
        assert source.started.wait(30)
        deadline = time.monotonic() + 20
        while (source.observer.port is None or source.observer.ring.next_seq < 40) and time.monotonic() < deadline:
            time.sleep(0.05)
        stub = observer_pb2_grpc.ObserverStub(grpc.insecure_channel(f"127.0.0.1:{source.observer.port}"))
        got = [r.flow for r in stub.GetFlows(observer_pb2.GetFlowsRequest(number=100), timeout=10)]
        assert [f.uuid for f in got] == batch.column("uuid").to_pylist()
        assert not any(f.source.pod_name or f.destination.pod_name or f.l7.http.url for f in got)
    finally:
        pipeline.stop()
        runner.join(60)
    assert not runner.is_alive()
    assert source.observer._server is None  # closed with the other sinks
