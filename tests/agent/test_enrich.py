"""Enrichment without a cluster: static map, reserved identities, labels, workloads, DNS names."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess

import pyarrow as pa
import pytest

from flowship.agent.enrich import (
    RTM_NEWADDR,
    EndpointInfo,
    EnrichConfig,
    Enricher,
    detect_local_ips,
    hubble_labels,
    identity_for_labels,
    parse_addr_messages,
    workload_of,
)
from flowship.agent.netlink import NLMSG_DONE, NLMSG_ERROR
from flowship.config import ConfigError, parse
from flowship.model.schema import flows_from_rows

STATIC = {
    "detect_host_ips": False,
    "host_ips": ["192.168.50.10"],
    "health_ips": ["10.0.1.254"],
    "static": [
        {"cidr": "10.0.1.0/24", "namespace": "production", "labels": {"app": "web-pool"}},
        {"cidr": "10.0.1.10/32", "namespace": "production", "pod": "frontend-1", "labels": {"app": "frontend"},
         "workload": "frontend", "workload_kind": "Deployment"},
        {"cidr": "10.0.1.20", "namespace": "production", "pod": "product-api-1", "labels": {"app": "product-api"},
         "workload": "product-api", "service": "product-api"},
        {"cidr": "192.168.50.0/24", "reserved": "remote-node"},
        {"cidr": "fd00:10::/64", "namespace": "production", "labels": {"app": "database"}, "workload": "database",
         "workload_kind": "StatefulSet", "names": ["db.internal"]},
    ],
}


def _enricher(data: dict | None = None, **kw) -> Enricher:
    config = parse(EnrichConfig, data or STATIC, "agent.yaml", "enrich")
    return Enricher(config, node_name="node-1", **kw)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        parse(EnrichConfig, {"static": [{"cidr": "10.0.1.0/33"}, {"cidr": "10.0.0.0/8", "reserved": "moon"}],
                             "host_ips": ["nope"]}, "agent.yaml", "enrich")
    text = str(err.value)
    assert "agent.yaml: enrich.static[0].cidr: expected an IP network" in text
    assert "agent.yaml: enrich.static[1].reserved: expected one of" in text
    assert "agent.yaml: enrich.host_ips[0]: expected an IP address" in text


def test_static_longest_prefix_and_reserved() -> None:
    enricher = _enricher()
    frontend = enricher.lookup("10.0.1.10")
    assert frontend.namespace == "production" and frontend.pod == "frontend-1"
    assert frontend.labels == ("k8s:app=frontend", "k8s:io.cilium.k8s.policy.cluster=default",
                               "k8s:io.kubernetes.pod.namespace=production")
    assert frontend.identity == identity_for_labels(frontend.labels)
    assert (frontend.workload, frontend.workload_kind) == ("frontend", "Deployment")
    api = enricher.lookup("10.0.1.20")
    assert (api.service, api.service_namespace, api.workload_kind) == ("product-api", "production", "Deployment")
    pool = enricher.lookup("10.0.1.99")  # the /24 entry
    assert pool.pod is None and "k8s:app=web-pool" in pool.labels
    assert enricher.lookup("10.0.1.254") == EndpointInfo(identity=4, labels=("reserved:health",))
    assert enricher.lookup("192.168.50.10") == EndpointInfo(identity=1, labels=("reserved:host",))
    assert enricher.lookup("192.168.50.11") == EndpointInfo(identity=6, labels=("reserved:remote-node",))
    assert enricher.lookup("8.8.8.8") == EndpointInfo(identity=2, labels=("reserved:world",))
    db = enricher.lookup("fd00:10::5")
    assert (db.workload, db.workload_kind, db.names) == ("database", "StatefulSet", ("db.internal",))
    assert enricher.lookup("not-an-ip") is None
    no_world = _enricher({**STATIC, "unknown_as_world": False})
    assert no_world.lookup("8.8.8.8") is None


def test_identity_is_stable_and_label_order_free() -> None:
    a = identity_for_labels(["k8s:app=frontend", "k8s:io.kubernetes.pod.namespace=production"])
    b = identity_for_labels(["k8s:io.kubernetes.pod.namespace=production", "k8s:app=frontend"])
    assert a == b and 256 <= a < 2**24
    assert a != identity_for_labels(["k8s:app=frontend", "k8s:io.kubernetes.pod.namespace=staging"])
    # same value in every process: pinned
    assert identity_for_labels(["k8s:app=x"]) == 256 + int.from_bytes(
        __import__("hashlib").sha256(b"k8s:app=x").digest()[:8], "big") % ((1 << 24) - 256)


def test_hubble_labels_form() -> None:
    labels = hubble_labels({"app": "frontend", "pod-template-hash": "5d8f7c9b4"}, "production",
                           service_account="frontend", cluster="default", exclude=["pod-template-hash"])
    assert labels == ("k8s:app=frontend", "k8s:io.cilium.k8s.policy.cluster=default",
                      "k8s:io.cilium.k8s.policy.serviceaccount=frontend",
                      "k8s:io.kubernetes.pod.namespace=production")


@pytest.mark.parametrize(("owners", "labels", "expected"), [
    ([{"kind": "ReplicaSet", "name": "frontend-5d8f7c9b4", "controller": True}], {"pod-template-hash": "5d8f7c9b4"},
     ("frontend", "Deployment")),
    ([{"kind": "ReplicaSet", "name": "product-api-v2-7f9c6d", "controller": True}], {}, ("product-api-v2", "Deployment")),
    ([{"kind": "StatefulSet", "name": "database", "controller": True}], {}, ("database", "StatefulSet")),
    ([{"kind": "DaemonSet", "name": "cilium", "controller": True}], {}, ("cilium", "DaemonSet")),
    ([{"kind": "Job", "name": "report-28934520", "controller": True}], {}, ("report", "CronJob")),
    ([{"kind": "Job", "name": "migrate-db", "controller": True}], {}, ("migrate-db", "Job")),
    ([{"kind": "Rollout", "name": "checkout", "controller": True}], {}, ("checkout", "Rollout")),
    ([], {}, (None, None)),
    (None, {}, (None, None)),
])
def test_workload_of(owners, labels, expected) -> None:
    assert workload_of(owners, labels) == expected


def test_enrich_batch_fills_both_sides_per_distinct_ip() -> None:
    enricher = _enricher()
    rows = [
        {"time": 1, "ip_src": "10.0.1.10", "ip_dst": "10.0.1.20", "l4_protocol": "TCP", "src_port": 40000,
         "dst_port": 8080},
        {"time": 2, "ip_src": "10.0.1.20", "ip_dst": "10.0.1.10", "l4_protocol": "TCP", "src_port": 8080,
         "dst_port": 40000},
        {"time": 3, "ip_src": "10.0.1.10", "ip_dst": "8.8.8.8", "l4_protocol": "UDP", "src_port": 5353,
         "dst_port": 53},
        {"time": 4, "ip_src": None, "ip_dst": None},
        # a flow that already carries endpoint data (from Hubble) keeps it
        {"time": 5, "ip_src": "10.0.1.10", "ip_dst": "10.0.1.20", "src_namespace": "other", "src_identity": 77,
         "src_labels": ["k8s:app=kept"]},
    ]
    out = enricher.enrich(flows_from_rows(rows))
    assert out.schema == flows_from_rows(rows).schema
    assert out.column("src_pod").to_pylist() == ["frontend-1", "product-api-1", "frontend-1", None, "frontend-1"]
    assert out.column("dst_pod").to_pylist() == ["product-api-1", "frontend-1", None, None, "product-api-1"]
    assert out.column("dst_labels").to_pylist()[2] == ["reserved:world"]
    assert out.column("dst_identity").to_pylist()[2] == 2
    assert out.column("dst_service").to_pylist() == ["product-api", None, None, None, "product-api"]
    assert out.column("src_namespace").to_pylist() == ["production", "production", "production", None, "other"]
    assert out.column("src_identity").to_pylist()[4] == 77
    assert out.column("src_labels").to_pylist()[4] == ["k8s:app=kept"]
    assert out.column("src_workload_kind").to_pylist()[0] == "Deployment"
    assert out.column("src_cluster").to_pylist()[0] == "default"
    assert out.column("dst_names").to_pylist() == [None] * 5


def test_names_from_dns_answers() -> None:
    enricher = _enricher()
    t0 = 1_700_000_000_000_000_000
    dns = flows_from_rows([
        {"time": t0, "l7_type": "RESPONSE", "dns_query": "api.isovalent.com.", "dns_ips": ["203.0.113.7"],
         "dns_cnames": ["edge.isovalent.com."], "dns_ttl": 30},
        {"time": t0, "l7_type": "REQUEST", "dns_query": "ignored.example.", "dns_ips": None},
    ])
    assert enricher.learn_dns(dns) == 1
    assert enricher.lookup("203.0.113.7", now_ns=t0 + 10**9).names == ("api.isovalent.com", "edge.isovalent.com")
    # dns_min_ttl (3600 s by default) keeps it beyond the 30 s TTL, not beyond the hour
    assert enricher.lookup("203.0.113.7", now_ns=t0 + 3599 * 10**9).names is not None
    assert enricher.lookup("203.0.113.7", now_ns=t0 + 3601 * 10**9).names is None
    # names combine with what else is known (world, here)
    enricher.dns.learn("10.0.1.10", ["frontend.production.svc.cluster.local."], 5, t0)
    info = enricher.lookup("10.0.1.10", now_ns=t0)
    assert info.pod == "frontend-1" and info.names == ("frontend.production.svc.cluster.local",)


def test_dns_names_are_bounded() -> None:
    enricher = _enricher({**STATIC, "dns_max_ips": 3})
    for i in range(5):
        enricher.dns.learn(f"198.51.100.{i}", ["x.example."], 60, 0)
    assert [enricher.dns.names(f"198.51.100.{i}", 1) for i in range(5)] == [None, None, ("x.example",),
                                                                              ("x.example",), ("x.example",)]


def test_detect_host_ips_includes_loopback() -> None:
    enricher = _enricher({"detect_host_ips": True})
    assert "127.0.0.1" in enricher.host_ips
    assert enricher.lookup("127.0.0.1").labels == ("reserved:host",)


def test_detected_ips_are_every_address_iproute2_lists() -> None:
    if not shutil.which("ip"):
        pytest.fail("the ground truth needs `ip` (apt-get install iproute2)")
    listed = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True,
                                       check=True).stdout)
    expected = {a["local"] for link in listed for a in link.get("addr_info", []) if a.get("local")}
    assert set(detect_local_ips()) == expected


def _nlmsg(mtype: int, body: bytes) -> bytes:
    msg = struct.pack("=IHHII", 16 + len(body), mtype, 0, 1, 0) + body
    return msg + b"\0" * (-len(msg) % 4)


def _rta(atype: int, value: bytes) -> bytes:
    attr = struct.pack("=HH", 4 + len(value), atype) + value
    return attr + b"\0" * (-len(attr) % 4)


def test_address_dump_parsing_prefers_the_local_address() -> None:
    ptp = struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, 5) + _rta(1, socket.inet_aton("10.0.0.2")) + _rta(
        2, socket.inet_aton("10.0.0.1"))  # point-to-point: IFA_ADDRESS is the peer, IFA_LOCAL ours
    v6 = struct.pack("=BBBBI", socket.AF_INET6, 64, 0, 0, 2) + _rta(1, socket.inet_pton(socket.AF_INET6, "fd00::5"))
    data = _nlmsg(RTM_NEWADDR, ptp) + _nlmsg(RTM_NEWADDR, v6) + _nlmsg(NLMSG_DONE, struct.pack("=i", 0))
    assert parse_addr_messages(data) == (["10.0.0.1", "fd00::5"], True)
    with pytest.raises(OSError, match="RTM_GETADDR"):
        parse_addr_messages(_nlmsg(NLMSG_ERROR, struct.pack("=i", -13) + b"\0" * 16))


def test_enrich_many_rows_is_columnar() -> None:
    enricher = _enricher()
    n = 20000
    ips = [f"10.0.1.{i % 50}" for i in range(n)]
    batch = flows_from_rows([{"time": i, "ip_src": ips[i], "ip_dst": "10.0.1.20"} for i in range(n)])
    out = enricher.enrich(batch)
    assert out.num_rows == n
    assert pa.compute.count_distinct(out.column("src_identity")).as_py() == 3  # the /24 pool, frontend, api
    assert out.column("dst_pod").unique().to_pylist() == ["product-api-1"]
    assert len(enricher.index()._memo) == 50  # one lookup per distinct IP (10.0.1.20 is among them)
