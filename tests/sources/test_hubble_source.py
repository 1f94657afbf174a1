"""The ``hubble`` source against flowship's own Observer server, in process."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest
import structlog.testing

from flowship.agent.observer import ObserverConfig, ObserverServer, ObserverTLSConfig
from flowship.components import Context
from flowship.config import ConfigError, parse
from flowship.metrics import Metrics
from flowship.model.hubble_decode import decode_lines
from flowship.model.schema import FLOW_SCHEMA
from flowship.pipeline.envelope import Receipt
from flowship.proto.flow import flow_pb2
from flowship.proto.observer import observer_pb2, observer_pb2_grpc
from flowship.sources.hubble import HubbleSource, HubbleSourceConfig, parse_since


@pytest.fixture(scope="module")
def flows(fixture_files) -> pa.RecordBatch:
    """The recorded flows in time order, re-timed 1 µs apart so times are unique and increasing."""
    batches = [decode_lines(p.read_bytes()).batch for p in fixture_files]
    batch = pa.Table.from_batches(batches).sort_by("time").combine_chunks().to_batches()[0]
    base = 1_764_000_000_000_000_000
    times = pa.array(base + np.arange(batch.num_rows, dtype=np.int64) * 1000).cast(FLOW_SCHEMA.field("time").type)
    return batch.set_column(batch.schema.get_field_index("time"), "time", times)


def _server(port: int = 0, capacity: int = 4095, tls: ObserverTLSConfig | None = None) -> ObserverServer:
    server = ObserverServer(ObserverConfig(address=f"127.0.0.1:{port}", max_flows=capacity, tls=tls,
                                           follow_poll=0.05, lost_event_interval=0.05), Metrics(), node_name="node-1")
    server.start()
    return server


class Collector:
    """An ``emit`` that keeps batches; acknowledges them at once unless told to hold."""

    def __init__(self, ack: bool = True) -> None:
        self.ack = ack
        self.batches: list[pa.RecordBatch] = []
        self.receipts: list[Receipt] = []
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: pa.RecordBatch, receipt: Receipt) -> None:
        self.gate.wait()
        with self.lock:
            self.batches.append(batch)
            self.receipts.append(receipt)
        if self.ack:
            receipt.release()

    @property
    def uuids(self) -> list[str]:
        with self.lock:
            return [u for b in self.batches for u in b.column("uuid").to_pylist()]

    def wait_rows(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.uuids) >= n:
                return
            time.sleep(0.02)
        raise AssertionError(f"got {len(self.uuids)} rows, expected {n}")


def _source(tmp_path: Path, name: str = "hubble", **config) -> HubbleSource:
    cfg = parse(HubbleSourceConfig, {"backoff_initial": "50ms", "backoff_max": "200ms",
                                     "batch_interval": "100ms", **config}, "flowship.yaml", "sources[0]")
    ctx = Context(name=name, metrics=Metrics(), node_name="test-node", data_dir=tmp_path)
    return HubbleSource(cfg, ctx)


def _run(source: HubbleSource, emit: Collector) -> tuple[threading.Thread, threading.Event, list]:
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            source.run(emit, stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, stop, errors


def test_config_errors() -> None:
    with pytest.raises(ConfigError) as err:
        parse(HubbleSourceConfig, {"whitelist": [{"verdict": ["NOPE"]}, "x"], "blacklist": [{"no_such": 1}],
                                   "since": "yesterday", "field_mask": ["nope"], "cert_file": "/nonexistent"},
              "flowship.yaml", "sources[0]")
    text = str(err.value)
    assert "flowship.yaml: sources[0].whitelist[0]: invalid FlowFilter" in text
    assert "sources[0].whitelist[1]: expected a FlowFilter mapping" in text
    assert "sources[0].blacklist[0]: invalid FlowFilter" in text
    assert "sources[0].since: expected an RFC 3339 time" in text
    assert "sources[0].field_mask: unknown Flow field path" in text
    assert "sources[0].cert_file: file not found" in text
    ok = parse(HubbleSourceConfig, {"whitelist": [{"verdict": ["DROPPED"], "source_pod": ["production/"]}],
                                    "since": "2026-11-20T10:00:00Z"}, "flowship.yaml", "sources[0]")
    assert ok.follow is True and ok.address == "localhost:4245"
    assert parse_since("10m", now_ns=1_000_000_000_000) == 1_000_000_000_000 - 600 * 10**9


def test_read_the_ring_once(tmp_path, flows) -> None:
    server = _server()
    server.publish(flows)
    try:
        source = _source(tmp_path, address=f"127.0.0.1:{server.port}", follow=False, batch_rows=500,
                         batch_interval="30s")
        emit = Collector()
        t, stop, errors = _run(source, emit)
        t.join(30)
        assert not t.is_alive() and not errors
        assert emit.uuids == flows.column("uuid").to_pylist()
        assert [b.num_rows for b in emit.batches] == [500, 500, 500, flows.num_rows - 1500]
        assert all(b.schema == FLOW_SCHEMA for b in emit.batches)
        got = pa.Table.from_batches(emit.batches)
        assert got.column("dns_query").to_pylist() == flows.column("dns_query").to_pylist()
        assert got.column("l7_latency_ns").to_pylist() == flows.column("l7_latency_ns").to_pylist()
        assert source.ctx.metrics.value("flowship_flows_in_total", source="hubble") == flows.num_rows
        # the newest delivered flow is the checkpoint
        state = source.store.load()
        assert state["time_ns"] == int(flows.column("time").cast(pa.int64())[-1].as_py())
    finally:
        server.stop(0)


def test_filters_are_passed_through(tmp_path, flows) -> None:
    server = _server()
    server.publish(flows)
    try:
        source = _source(tmp_path, address=f"127.0.0.1:{server.port}", follow=False, checkpoint=False,
                         whitelist=[{"verdict": ["DROPPED"]}, {"http_status_code": ["503"]}],
                         blacklist=[{"source_pod": ["kube-system/"]}])
        emit = Collector()
        t, _, errors = _run(source, emit)
        t.join(30)
        assert not errors
        rows = pa.Table.from_batches(emit.batches)
        verdicts = rows.column("verdict").to_pylist()
        codes = rows.column("http_code").to_pylist()
        assert all(v == "DROPPED" or c == 503 for v, c in zip(verdicts, codes, strict=True))
        assert "kube-system" not in rows.column("src_namespace").to_pylist()
        expected = sum(1 for v, c, ns in zip(flows.column("verdict").to_pylist(), flows.column("http_code").to_pylist(),
                                              flows.column("src_namespace").to_pylist(), strict=True)
                       if (v == "DROPPED" or c == 503) and ns != "kube-system")
        assert rows.num_rows == expected > 2
    finally:
        server.stop(0)


def test_follow_batches_by_rows_and_time(tmp_path, flows) -> None:
    server = _server()
    try:
        source = _source(tmp_path, address=f"127.0.0.1:{server.port}", batch_rows=100, batch_interval="200ms")
        emit = Collector()
        t, stop, errors = _run(source, emit)
        time.sleep(0.3)  # the stream is open (follow: only flows published from now on)
        server.publish(flows.slice(0, 250))
        emit.wait_rows(250)
        server.publish(flows.slice(250, 7))
        emit.wait_rows(257)
        stop.set()
        t.join(10)
        assert not errors and not t.is_alive()
        assert emit.uuids == flows.column("uuid").to_pylist()[:257]
        assert max(b.num_rows for b in emit.batches) == 100
        assert emit.batches[-1].num_rows == 7  # flushed by time, not size
    finally:
        server.stop(0)


def test_reconnect_and_resume_without_loss_or_duplicates(tmp_path, flows) -> None:
    server = _server()
    port = server.port
    server.publish(flows.slice(0, 1000))
    source = _source(tmp_path, address=f"127.0.0.1:{port}", since="2020-01-01T00:00:00Z", batch_rows=128)
    emit = Collector()
    t, stop, errors = _run(source, emit)
    try:
        emit.wait_rows(1000)
        server._server.stop(0).wait(5)  # the transport goes away mid-stream (not a clean end)
        server.stop(0)
        # Hubble restarted (or Relay failed over): its ring holds the tail of what we saw and more
        time.sleep(0.3)
        server = _server(port)
        server.publish(flows.slice(600, 900))
        emit.wait_rows(1500)
        time.sleep(0.5)  # nothing more should arrive
        stop.set()
        t.join(10)
        assert not errors
        uuids = emit.uuids
        assert uuids == flows.column("uuid").to_pylist()[:1500]
        assert source.reconnects >= 1
        assert source.skipped_duplicates == 1  # since is inclusive: the flow at exactly that time came again
        assert source.ctx.metrics.value("flowship_hubble_reconnects_total", source="hubble") >= 1
    finally:
        stop.set()
        server.stop(0)


def test_restart_resumes_from_the_checkpoint(tmp_path, flows) -> None:
    server = _server()
    server.publish(flows.slice(0, 1000))
    try:
        # first run: only the first 3 batches are acknowledged by the sinks
        source = _source(tmp_path, address=f"127.0.0.1:{server.port}", since="2020-01-01T00:00:00Z",
                         batch_rows=100)
        emit = Collector(ack=False)
        t, stop, errors = _run(source, emit)
        emit.wait_rows(1000)
        for receipt in emit.receipts[:3]:
            receipt.release()
        stop.set()
        t.join(10)
        assert not errors
        checkpoint = source.store.load()
        assert checkpoint["time_ns"] == int(flows.column("time").cast(pa.int64())[299].as_py())
        assert checkpoint["uuids"] == [flows.column("uuid")[299].as_py()]

        # second run, same data dir and name: since = the checkpoint, delivered flows skipped
        source2 = _source(tmp_path, address=f"127.0.0.1:{server.port}", since="2020-01-01T00:00:00Z",
                          batch_rows=100)
        emit2 = Collector()
        t2, stop2, errors2 = _run(source2, emit2)
        emit2.wait_rows(700)
        time.sleep(0.3)
        stop2.set()
        t2.join(10)
        assert not errors2
        assert emit2.uuids == flows.column("uuid").to_pylist()[300:1000]
        assert source2.skipped_duplicates == 1  # the flow at exactly the checkpoint time
    finally:
        server.stop(0)


def test_lost_events_are_counted(tmp_path, flows) -> None:
    server = _server(capacity=63)
    try:
        source = _source(tmp_path, address=f"127.0.0.1:{server.port}", batch_rows=50, checkpoint=False)
        emit = Collector()
        emit.gate.clear()  # the pipeline is stuck: emit blocks
        t, stop, errors = _run(source, emit)
        time.sleep(0.3)
        big = pa.Table.from_batches([flows] * 40).combine_chunks().to_batches()[0]
        for start in range(0, big.num_rows, 2000):
            server.publish(big.slice(start, 2000))
        emit.gate.set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(emit.uuids) + source.lost < big.num_rows:
            time.sleep(0.05)
        stop.set()
        t.join(10)
        assert not errors
        assert source.lost > 0
        assert len(emit.uuids) + source.lost == big.num_rows
        assert source.ctx.metrics.value("flowship_lost_events_total", source="hubble",
                                        lost_source="HUBBLE_RING_BUFFER") == source.lost
    finally:
        server.stop(0)


def test_unreachable_server_backs_off_then_connects(tmp_path, flows) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = _source(tmp_path, address=f"127.0.0.1:{port}", connect_timeout="200ms", since="2020-01-01T00:00:00Z")
    emit = Collector()
    t, stop, errors = _run(source, emit)
    try:
        time.sleep(1.0)
        assert source.reconnects >= 2 and not emit.uuids
        server = _server(port)
        server.publish(flows.slice(0, 10))
        emit.wait_rows(10)
    finally:
        stop.set()
        t.join(10)
        server.stop(0)
    assert not errors


def test_invalid_filter_on_the_server_is_fatal(tmp_path) -> None:
    server = _server()
    try:
        source = _source(tmp_path, address=f"127.0.0.1:{server.port}", whitelist=[{"http_path": ["(unclosed"]}])
        t, _, errors = _run(source, Collector())
        t.join(10)
        assert not t.is_alive()
        assert "INVALID_ARGUMENT" in str(errors[0])
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """Two CAs; a server certificate for the Hubble peer name, a client certificate, and a client
    certificate from the other CA (as a cluster's wrong secret would be)."""
    directory = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
            "-days", "2", "-subj", f"/CN={ca}")
    for name, ext, ca in (("server", "subjectAltName=DNS:node-1.default.hubble-grpc.cilium.io", "ca"),
                          ("client", "extendedKeyUsage=clientAuth", "ca"),
                          ("rogue", "extendedKeyUsage=clientAuth", "other-ca")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
            f"/CN={name}")
        (directory / f"{name}.ext").write_text(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {p.name: str(p) for p in directory.iterdir()}


PEER_NAME = "node-1.default.hubble-grpc.cilium.io"


@pytest.fixture()
def mtls_server(pki, flows):
    server = _server(tls=ObserverTLSConfig(cert_file=pki["server.crt"], key_file=pki["server.key"],
                                           client_ca_file=pki["ca.crt"]))
    server.publish(flows.slice(0, 20))
    yield server
    server.stop(0)


def test_mtls(tmp_path, pki, mtls_server) -> None:
    source = _source(tmp_path, address=f"127.0.0.1:{mtls_server.port}", follow=False, tls=True, checkpoint=False,
                     ca_file=pki["ca.crt"], cert_file=pki["client.crt"], key_file=pki["client.key"],
                     server_name=PEER_NAME)
    emit = Collector()
    t, _, errors = _run(source, emit)
    t.join(30)
    assert not errors and len(emit.uuids) == 20


TLS_FAILURES = {
    "wrong CA": ({"ca_file": "other-ca.crt", "cert_file": "client.crt", "key_file": "client.key"},
                 r"wrong CA: the server's certificate is not signed by ca_file .*other-ca\.crt"),
    "no client certificate": ({"ca_file": "ca.crt"},
                              r"client certificate missing: .* \(set cert_file and key_file\)"),
    "client certificate from another CA": (
        {"ca_file": "ca.crt", "cert_file": "rogue.crt", "key_file": "rogue.key"},
        r"client certificate refused: .*cert_file .*rogue\.crt"),
    "server name mismatch": ({"ca_file": "ca.crt", "cert_file": "client.crt", "key_file": "client.key",
                              "server_name": "node-2.default.hubble-grpc.cilium.io"},
                             r"server name mismatch: the server's certificate is not valid for "
                             r"'node-2\.default\.hubble-grpc\.cilium\.io'"),
}


@pytest.mark.parametrize("case", list(TLS_FAILURES))
def test_tls_failures_are_reported_and_end_a_finite_read(tmp_path, pki, mtls_server, case: str) -> None:
    """follow: false with a TLS or client-auth problem ends at once with the reason, not retries forever."""
    files, reason = TLS_FAILURES[case]
    config = {k: (pki[v] if k.endswith("_file") else v) for k, v in files.items()}
    config.setdefault("server_name", PEER_NAME)
    source = _source(tmp_path, address=f"127.0.0.1:{mtls_server.port}", follow=False, tls=True,
                     checkpoint=False, connect_timeout="5s", **config)
    emit = Collector()
    t, _, errors = _run(source, emit)
    t.join(20)
    assert not t.is_alive(), "a finite read with a TLS failure kept retrying"
    assert len(errors) == 1 and not emit.uuids
    assert re.search(rf"hubble source hubble: TLS with 127\.0\.0\.1:{mtls_server.port} failed: {reason}",
                     str(errors[0])), str(errors[0])


def test_tls_on_one_side_only_is_reported(tmp_path, pki, mtls_server) -> None:
    """tls: true against a plaintext server, and a plaintext source against a TLS server, say so."""
    plain = _server()
    try:
        source = _source(tmp_path, address=f"127.0.0.1:{plain.port}", follow=False, tls=True, checkpoint=False,
                         ca_file=pki["ca.crt"], connect_timeout="5s")
        t, _, errors = _run(source, Collector())
        t.join(20)
        assert not t.is_alive() and "the server does not speak TLS at this address" in str(errors[0])
    finally:
        plain.stop(0)
    source = _source(tmp_path, address=f"127.0.0.1:{mtls_server.port}", follow=False, checkpoint=False,
                     connect_timeout="5s")
    t, _, errors = _run(source, Collector())
    t.join(20)
    assert not t.is_alive() and "the server speaks TLS and this source does not: set tls: true" in str(errors[0])


def test_tls_failure_while_following_is_logged_with_its_reason_and_retried(tmp_path, pki, mtls_server) -> None:
    source = _source(tmp_path, address=f"127.0.0.1:{mtls_server.port}", tls=True, checkpoint=False,
                     ca_file=pki["other-ca.crt"], cert_file=pki["client.crt"], key_file=pki["client.key"],
                     server_name=PEER_NAME, connect_timeout="2s")
    emit = Collector()
    with structlog.testing.capture_logs() as logs:
        t, stop, errors = _run(source, emit)
        deadline = time.monotonic() + 20
        while source.reconnects < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        t.join(20)
    assert source.reconnects >= 2 and not errors  # still trying: certificates may be rotated
    failed = [e for e in logs if e["event"] == "hubble TLS handshake failed, retrying"]
    assert failed and all("wrong CA" in e["reason"] for e in failed)


def test_tls_failure_exit_status(tmp_path, pki, mtls_server, flowship_cmd) -> None:
    """The command: a finite hubble read with the wrong CA exits non-zero and says why."""
    cfg = tmp_path / "hubble.yaml"
    cfg.write_text(f"""data_dir: {tmp_path}/state
sources:
  - type: hubble
    address: 127.0.0.1:{mtls_server.port}
    follow: false
    tls: true
    ca_file: {pki["other-ca.crt"]}
    cert_file: {pki["client.crt"]}
    key_file: {pki["client.key"]}
    server_name: {PEER_NAME}
sinks: [{{type: file, path: {tmp_path}/out.jsonl}}]
""")
    proc = subprocess.run([*flowship_cmd, "export", "--config", str(cfg), "--no-progress"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "wrong CA: the server's certificate is not signed by ca_file" in proc.stderr


def test_reads_the_observer_over_its_unix_socket(tmp_path, flows) -> None:
    """The agent's private default (a unix socket) is readable by the hubble source as it is by the CLI."""
    sock = tmp_path / "run" / "hubble.sock"
    server = ObserverServer(ObserverConfig(address=f"unix://{sock}"), Metrics(), node_name="node-1")
    server.start()
    server.publish(flows.slice(0, 30))
    try:
        source = _source(tmp_path, address=f"unix://{sock}", follow=False, checkpoint=False)
        emit = Collector()
        t, _, errors = _run(source, emit)
        t.join(30)
        assert not errors and emit.uuids == flows.column("uuid").to_pylist()[:30]
    finally:
        server.stop(0)


class _RawObserver(observer_pb2_grpc.ObserverServicer):
    """A relay that sends exactly the given GetFlowsResponse messages, then ends the stream.

    A fake on purpose: flowship's own Observer never sends an invalid Timestamp, a third-party sender can.
    """

    def __init__(self, responses: list[observer_pb2.GetFlowsResponse]) -> None:
        self.responses = responses

    def GetFlows(self, request, context):  # noqa: N802 - the gRPC method name
        yield from self.responses


def test_a_flow_with_an_invalid_timestamp_does_not_stop_the_stream(tmp_path) -> None:
    def response(uuid: str, seconds: int, nanos: int) -> observer_pb2.GetFlowsResponse:
        flow = flow_pb2.Flow(uuid=uuid, verdict=flow_pb2.FORWARDED)
        flow.time.seconds, flow.time.nanos = seconds, nanos
        return observer_pb2.GetFlowsResponse(flow=flow, node_name="relay-node")

    base = 1_764_000_000
    sent = [response("a", base, 1), response("bad-nanos", base, -5), response("b", base + 1, 2)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    observer_pb2_grpc.add_ObserverServicer_to_server(_RawObserver(sent), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        source = _source(tmp_path, address=f"127.0.0.1:{port}", follow=False)
        emit = Collector()
        t, stop, errors = _run(source, emit)
        t.join(30)
        assert not t.is_alive() and not errors, errors
        got = pa.Table.from_batches(emit.batches) if emit.batches else None
        uuids = got.column("uuid").to_pylist() if got is not None else []
        assert "a" in uuids and "b" in uuids
        times = dict(zip(uuids, got.column("time").cast(pa.int64()).to_pylist(), strict=True))
        assert times["a"] == base * 1_000_000_000 + 1 and times["b"] == (base + 1) * 1_000_000_000 + 2
    finally:
        server.stop(0)
