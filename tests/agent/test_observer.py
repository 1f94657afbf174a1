"""The Observer gRPC server (agent/observer.py), called with a real gRPC stub."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from certs import make_pki
from google.protobuf import field_mask_pb2

from flowship.agent.observer import FlowRing, ObserverConfig, ObserverServer, ObserverTLSConfig
from flowship.config import ConfigError, parse
from flowship.metrics import Metrics
from flowship.model.hubble_decode import decode_lines
from flowship.proto.flow import flow_pb2
from flowship.proto.observer import observer_pb2, observer_pb2_grpc


@pytest.fixture(scope="module")
def flows(fixture_files) -> pa.RecordBatch:
    batches = [decode_lines(p.read_bytes()).batch for p in fixture_files]
    table = pa.Table.from_batches(batches).sort_by("time")
    return table.combine_chunks().to_batches()[0]


def _times(batch: pa.RecordBatch) -> np.ndarray:
    return batch.column("time").cast(pa.int64()).to_numpy()


def _start(flows: pa.RecordBatch | None = None, **kw) -> tuple[ObserverServer, observer_pb2_grpc.ObserverStub,
                                                                  grpc.Channel]:
    config = parse(ObserverConfig, {"address": "127.0.0.1:0", "lost_event_interval": "100ms",
                                    "follow_poll": "50ms", **kw}, "agent.yaml", "observer")
    server = ObserverServer(config, Metrics(), node_name="node-1")
    port = server.start()
    if flows is not None:
        # published in a few batches, as the agent would
        for start in range(0, flows.num_rows, 500):
            server.publish(flows.slice(start, 500))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return server, observer_pb2_grpc.ObserverStub(channel), channel


@pytest.fixture()
def served(flows):
    server, stub, channel = _start(flows)
    yield server, stub
    channel.close()
    server.stop(0)


def _get(stub, **kw) -> list[observer_pb2.GetFlowsResponse]:
    return list(stub.GetFlows(observer_pb2.GetFlowsRequest(**kw), timeout=30))


def test_number_first_and_all(served, flows) -> None:
    _, stub = served
    n = flows.num_rows
    uuids = flows.column("uuid").to_pylist()
    last = _get(stub, number=10)
    assert [r.flow.uuid for r in last] == uuids[-10:]
    assert all(r.HasField("flow") and r.node_name for r in last)
    assert last[0].time == last[0].flow.time
    first = _get(stub, number=5, first=True)
    assert [r.flow.uuid for r in first] == uuids[:5]
    everything = _get(stub)
    assert len(everything) == n
    assert [r.flow.uuid for r in everything] == uuids
    # the flow as Hubble recorded it comes back with its fields
    http = next(r.flow for r in everything if r.flow.l7.HasField("http") and r.flow.l7.http.code == 503)
    assert http.l7.type == flow_pb2.L7FlowType.Value("RESPONSE")
    assert http.l7.latency_ns > 0 and http.l7.http.method == "GET"


def test_since_until(served, flows) -> None:
    _, stub = served
    times = _times(flows)
    since, until = int(times[100]), int(times[900])
    req = observer_pb2.GetFlowsRequest()
    req.since.FromNanoseconds(since)
    req.until.FromNanoseconds(until)
    got = list(stub.GetFlows(req, timeout=30))
    assert len(got) == int(((times >= since) & (times <= until)).sum())
    assert all(since <= r.flow.time.ToNanoseconds() <= until for r in got)
    req.number = 3
    assert [r.flow.uuid for r in stub.GetFlows(req, timeout=30)] == [r.flow.uuid for r in got[-3:]]


def test_whitelist_blacklist(served, flows) -> None:
    _, stub = served
    verdict = flows.column("verdict")
    dropped = _get(stub, whitelist=[flow_pb2.FlowFilter(verdict=[flow_pb2.Verdict.Value("DROPPED")])])
    assert len(dropped) == pc.sum(pc.equal(verdict, "DROPPED")).as_py() == 2
    assert {r.flow.drop_reason_desc for r in dropped} == {flow_pb2.DropReason.Value("POLICY_DENIED"),
                                                         flow_pb2.DropReason.Value("INVALID_SOURCE_IP")}
    codes = flows.column("http_code")
    errors = _get(stub, whitelist=[flow_pb2.FlowFilter(http_status_code=["5+"])])
    assert len(errors) == pc.sum(pc.greater_equal(codes, 500)).as_py() > 0
    kube = _get(stub, whitelist=[flow_pb2.FlowFilter(source_pod=["kube-system/"])],
                blacklist=[flow_pb2.FlowFilter(protocol=["dns"])])
    expected = pc.and_(pc.equal(flows.column("src_namespace"), "kube-system").fill_null(False),
                       pc.is_null(flows.column("dns_query")))
    assert len(kube) == pc.sum(expected).as_py() > 0
    assert all(r.flow.source.namespace == "kube-system" and not r.flow.l7.HasField("dns") for r in kube)


def test_invalid_requests(served) -> None:
    _, stub = served
    with pytest.raises(grpc.RpcError) as err:
        _get(stub, whitelist=[flow_pb2.FlowFilter(http_path=["(unclosed"])])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        _get(stub, number=1, field_mask=field_mask_pb2.FieldMask(paths=["no_such_field"]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # paths of fields only newer Cilium versions have are ignored, as long as one is known
    got = _get(stub, number=1, field_mask=field_mask_pb2.FieldMask(paths=["verdict", "ingress_allowed_by"]))
    assert [f.name for f, _ in got[0].flow.ListFields()] == ["verdict"]


def test_grpc_health(served) -> None:
    server, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        assert check(b"\n\x10observer.Observer", timeout=10) == b"\x08\x01"


def test_field_mask(served, flows) -> None:
    _, stub = served
    got = _get(stub, number=20, field_mask=field_mask_pb2.FieldMask(paths=["time", "verdict", "source.pod_name"]))
    assert len(got) == 20
    for r in got:
        set_fields = {f.name for f, _ in r.flow.ListFields()}
        assert set_fields <= {"time", "verdict", "source"}
        assert {f.name for f, _ in r.flow.source.ListFields()} <= {"pod_name"}
    assert [r.flow.time.ToNanoseconds() for r in got] == _times(flows)[-20:].tolist()


def test_follow_receives_new_flows(flows) -> None:
    server, stub, channel = _start(flows.slice(0, 100))
    try:
        call = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True, number=2), timeout=60)
        received: list[observer_pb2.GetFlowsResponse] = []
        done = threading.Event()

        def reader() -> None:
            for resp in call:
                received.append(resp)
                if len(received) == 2 + 300:
                    done.set()
                    return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.publish(flows.slice(100, 200))
        server.publish(flows.slice(300, 100))
        assert done.wait(30), f"follower got {len(received)} of 302"
        call.cancel()
        uuids = flows.column("uuid").to_pylist()
        assert [r.flow.uuid for r in received] == uuids[98:100] + uuids[100:400]
        assert not any(r.HasField("lost_events") for r in received)
    finally:
        channel.close()
        server.stop(0)


class _Ctx:
    def is_active(self) -> bool:
        return True


def test_slow_follower_gets_lost_event(flows) -> None:
    """A follower that stops reading while the ring turns over is told how much it missed."""
    config = ObserverConfig(address="127.0.0.1:0", max_flows=15, lost_event_interval=0.0, follow_poll=0.05)
    server = ObserverServer(config, Metrics(), node_name="node-1")
    from flowship.agent.observer import _Query

    request = observer_pb2.GetFlowsRequest(follow=True)
    request.since.FromNanoseconds(0)  # everything stored, then follow
    server.publish(flows.slice(0, 10))
    raw = server._get_flows(request, _Query(request, "node-1"), _Ctx())
    stream = (observer_pb2.GetFlowsResponse.FromString(b) for b in raw)
    first = [next(stream) for _ in range(3)]  # reads 3, then sleeps while 200 more arrive
    assert [r.flow.uuid for r in first] == flows.column("uuid").to_pylist()[:3]
    for start in range(10, 210, 20):
        server.publish(flows.slice(start, 20))
    rest = [next(stream) for _ in range(7 + 1 + 15)]
    uuids = flows.column("uuid").to_pylist()
    # the batch being sent when the ring moved on is finished from the reader's copy
    assert [r.flow.uuid for r in rest[:7]] == uuids[3:10]
    lost = rest[7]
    assert lost.HasField("lost_events")
    assert lost.lost_events.source == flow_pb2.LostEventSource.Value("HUBBLE_RING_BUFFER")
    # 210 published, 10 delivered, the ring holds the last 15: 185 missed
    assert lost.lost_events.num_events_lost == 210 - 10 - 15 == 185
    assert [r.flow.uuid for r in rest[8:]] == uuids[195:210]
    assert server.metrics.value("flowship_observer_lost_events_total") == 185
    server.ring.close()


def test_slow_grpc_follower_accounts_for_every_flow(flows) -> None:
    """Over gRPC: received + reported lost == published, once the follower catches up."""
    server, stub, channel = _start(None, max_flows=63)
    try:
        call = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True), timeout=120)
        received = lost = 0
        published = 0
        big = pa.Table.from_batches([flows] * 8).combine_chunks().to_batches()[0]  # ~15k flows
        it = iter(call)
        deadline = time.monotonic() + 30
        while server.followers() < 1 and time.monotonic() < deadline:  # a flow published earlier is not followed
            time.sleep(0.01)
        assert server.followers() == 1
        server.publish(flows.slice(0, 1))
        published += 1
        assert next(it).HasField("flow")
        received += 1
        for start in range(0, big.num_rows, 1000):  # nobody reads meanwhile
            server.publish(big.slice(start, 1000))
            published += min(1000, big.num_rows - start)
        deadline = time.monotonic() + 60
        while received + lost < published and time.monotonic() < deadline:
            resp = next(it)
            if resp.HasField("lost_events"):
                lost += resp.lost_events.num_events_lost
            else:
                received += 1
        call.cancel()
        assert received + lost == published
        assert lost > 0 and received >= 63
    finally:
        channel.close()
        server.stop(0)


def test_server_status_nodes_namespaces(served, flows) -> None:
    server, stub = served
    status = stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
    assert (status.num_flows, status.max_flows, status.seen_flows) == (flows.num_rows, 4095, flows.num_rows)
    assert status.uptime_ns > 0 and status.version and status.flows_rate > 0
    nodes = stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=10).nodes
    assert [(n.name, n.state, n.num_flows) for n in nodes] == [
        ("node-1", observer_pb2.NodeState.Value("NODE_CONNECTED"), flows.num_rows)]
    namespaces = stub.GetNamespaces(observer_pb2.GetNamespacesRequest(), timeout=10).namespaces
    expected = set(pc.unique(flows.column("src_namespace")).to_pylist()) | set(
        pc.unique(flows.column("dst_namespace")).to_pylist())
    expected.discard(None)
    assert sorted(n.namespace for n in namespaces) == sorted(expected)
    assert {"kube-system", "bookinfo", "istio-system"} <= expected


def test_ring_capacity_and_memory(flows) -> None:
    ring = FlowRing(7)
    ring.publish(flows.slice(0, 5))
    ring.publish(flows.slice(5, 5))
    assert (ring.size, ring.next_seq, ring.oldest_seq) == (7, 10, 3)
    assert sum(e.batch.num_rows for e in ring.entries) == 7
    ring.publish(flows.slice(10, 100))  # bigger than the ring
    assert (ring.size, ring.next_seq) == (7, 110)
    assert [e.batch.num_rows for e in ring.entries] == [7]
    assert ring.entries[0].batch.column("uuid").to_pylist() == flows.column("uuid").to_pylist()[103:110]
    with pytest.raises(ConfigError, match="max_flows: expected 2\\^n-1"):
        parse(ObserverConfig, {"max_flows": 4096}, "agent.yaml", "observer")


def test_mtls(tmp_path, flows) -> None:
    pki = make_pki(tmp_path, server_names="IP:127.0.0.1,DNS:hubble.local")
    config = ObserverConfig(address="127.0.0.1:0", tls=ObserverTLSConfig(
        cert_file=str(pki["server.crt"]), key_file=str(pki["server.key"]), client_ca_file=str(pki["ca.crt"])))
    server = ObserverServer(config, Metrics(), node_name="node-1")
    port = server.start()
    server.publish(flows.slice(0, 50))
    try:
        good = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(
            pki["ca.crt"].read_bytes(), pki["client.key"].read_bytes(), pki["client.crt"].read_bytes()))
        stub = observer_pb2_grpc.ObserverStub(good)
        assert len(_get(stub, number=7)) == 7
        assert stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=10).nodes[0].tls.enabled
        good.close()
        anonymous = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(pki["ca.crt"].read_bytes()))
        with pytest.raises(grpc.RpcError) as err:
            observer_pb2_grpc.ObserverStub(anonymous).ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        anonymous.close()
        plain = grpc.insecure_channel(f"127.0.0.1:{port}")
        with pytest.raises(grpc.RpcError):
            observer_pb2_grpc.ObserverStub(plain).ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
        plain.close()
    finally:
        server.stop(0)
