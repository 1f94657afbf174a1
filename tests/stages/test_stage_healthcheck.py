"""The healthcheck stage on recorded Hubble flows and on built probe exchanges."""

from __future__ import annotations

import numpy as np
import pytest
from stage_helpers import T0, dropped, make_flows

from flowship.config import ConfigError, load_text
from flowship.stages.healthcheck import HealthcheckConfig, HealthcheckStage, RecentConnections

KUBELET = {"ip_src": "10.0.0.1", "src_identity": 1, "src_labels": ["reserved:host"]}
POD = {"ip_dst": "10.1.0.5", "dst_identity": 16001, "dst_namespace": "shop", "dst_pod": "api-1",
       "dst_labels": ["k8s:app=api"]}


def reverse(row: dict) -> dict:
    """The same flow seen in the other direction."""
    out = {}
    for key, value in row.items():
        if key.startswith("src_"):
            out["dst_" + key[4:]] = value
        elif key.startswith("dst_"):
            out["src_" + key[4:]] = value
        elif key == "ip_src":
            out["ip_dst"] = value
        elif key == "ip_dst":
            out["ip_src"] = value
        else:
            out[key] = value
    return out


def probe_exchange(src_port: int, path: str, user_agent: str | None) -> list[dict]:
    """SYN, SYN-ACK, HTTP request, HTTP response, FIN of one kubelet→pod connection."""
    fwd = {**KUBELET, **POD, "l4_protocol": "TCP", "src_port": src_port, "dst_port": 8080}
    request = {**fwd, "flow_type": "L7", "l7_type": "REQUEST", "http_method": "GET",
               "http_url": f"http://10.1.0.5:8080{path}", "http_protocol": "HTTP/1.1"}
    if user_agent:
        request["http_user_agent"] = user_agent
        request["http_headers"] = [{"key": "User-Agent", "value": user_agent}]
    response = reverse({**fwd, "flow_type": "L7", "l7_type": "RESPONSE", "http_code": 200, "http_method": "GET",
                        "http_url": f"http://10.1.0.5:8080{path}", "l7_latency_ns": 1_200_000,
                        "is_reply": True})
    return [
        {**fwd, "flow_type": "L3_L4", "tcp_flags": 0x002, "is_reply": False},
        reverse({**fwd, "flow_type": "L3_L4", "tcp_flags": 0x012, "is_reply": True}),
        request,
        response,
        {**fwd, "flow_type": "L3_L4", "tcp_flags": 0x011, "is_reply": False},
    ]


def stage(ctx, **options) -> HealthcheckStage:
    return HealthcheckStage(HealthcheckConfig(**options), ctx)


def test_kube_probe_exchange_removed_whole(ctx):
    rows = probe_exchange(50000, "/ready-check", "kube-probe/1.29") + probe_exchange(50001, "/orders", "curl/8.0")
    out = stage(ctx).transform(make_flows(rows))
    assert out.column("src_port").to_pylist() == [50001, 8080, 50001, 8080, 50001]
    assert dropped(ctx, "kube_probe") == 1
    assert dropped(ctx, "same_connection") == 4
    assert dropped(ctx) == 5


def test_pairing_reaches_later_batches_not_earlier_ones(ctx):
    hc = stage(ctx)
    rows = probe_exchange(50010, "/startup", "kube-probe/1.30")
    first = hc.transform(make_flows(rows[:2]))  # SYN, SYN-ACK: nothing known yet
    assert first.num_rows == 2
    second = hc.transform(make_flows(rows[2:]))  # request, response, FIN
    assert second.num_rows == 0
    later = hc.transform(make_flows([rows[4]]))  # a retransmitted FIN, much later in the stream
    assert later.num_rows == 0
    assert dropped(ctx, "kube_probe") == 1 and dropped(ctx, "same_connection") == 3


def test_pairing_expires_after_ttl(ctx):
    hc = stage(ctx, connection_ttl=10.0)
    rows = probe_exchange(50020, "/startup", "kube-probe/1.30")
    assert hc.transform(make_flows(rows[:3])).num_rows == 0  # SYN, SYN-ACK and the request
    fin = make_flows([rows[4]], time=T0 + 11_000_000_000 + 5_000_000)
    # refreshed when the request was seen (at T0 + 2ms): 11s later it is forgotten
    assert hc.transform(fin).num_rows == 1


def test_health_paths_on_full_urls_and_request_paths(ctx):
    rows = [
        {**KUBELET, **POD, "l4_protocol": "TCP", "src_port": 1, "dst_port": 80, "http_method": "GET",
         "http_url": "http://10.0.0.1:8080/healthz?verbose=1"},
        {**KUBELET, **POD, "l4_protocol": "TCP", "src_port": 2, "dst_port": 80, "http_method": "GET",
         "http_url": "/livez"},
        {**KUBELET, **POD, "l4_protocol": "TCP", "src_port": 3, "dst_port": 80, "http_method": "GET",
         "http_url": "/healthzz"},
        {**KUBELET, **POD, "l4_protocol": "TCP", "src_port": 4, "dst_port": 80, "http_method": "GET",
         "http_url": "https://api.example.com/api/ping"},
        {**KUBELET, **POD, "l4_protocol": "TCP", "src_port": 5, "dst_port": 80, "http_method": "GET",
         "http_url": "https://api.example.com/ping#top"},
    ]
    out = stage(ctx).transform(make_flows(rows))
    assert out.column("src_port").to_pylist() == [3, 4]
    assert dropped(ctx, "health_path") == 3
    ctx2 = type(ctx)(name="custom", metrics=ctx.metrics, node_name="n", data_dir=ctx.data_dir)
    out = stage(ctx2, paths=["/healthzz"]).transform(make_flows(rows))
    assert out.column("src_port").to_pylist() == [1, 2, 4, 5]


def test_rules_switch_off(ctx):
    rows = probe_exchange(50030, "/healthz", "kube-probe/1.29")
    out = stage(ctx, kube_probe=False, health_paths=False).transform(make_flows(rows))
    assert out.num_rows == 5 and dropped(ctx) == 0
    out = stage(ctx, kube_probe=False).transform(make_flows(rows))
    assert out.num_rows == 0
    assert dropped(ctx, "health_path") == 2 and dropped(ctx, "same_connection") == 3


def test_user_agent_from_headers_when_column_empty(ctx):
    row = {**KUBELET, **POD, "l4_protocol": "TCP", "src_port": 7, "dst_port": 9090, "http_method": "GET",
           "http_url": "/metrics", "http_headers": [{"key": "user-agent", "value": "Prometheus/2.53.0"}]}
    assert stage(ctx).transform(make_flows([row])).num_rows == 1  # prometheus rule is off by default
    assert stage(ctx, prometheus=True).transform(make_flows([row])).num_rows == 0
    assert dropped(ctx, "prometheus") == 1


def test_node_health(ctx):
    host = {"src_identity": 1, "src_labels": ["reserved:host"], "ip_src": "192.168.0.10"}
    remote = {"dst_identity": 6, "dst_labels": ["reserved:remote-node"], "ip_dst": "192.168.0.11"}
    pod_a = {"src_identity": 16001, "src_labels": ["k8s:app=a"], "ip_src": "10.1.0.7"}
    pod_b = {"dst_identity": 16002, "dst_labels": ["k8s:app=b"], "ip_dst": "10.1.0.8"}
    rows = [
        {**host, **remote, "l4_protocol": "ICMPv4", "icmp_type": 8},
        reverse({**host, **remote, "l4_protocol": "ICMPv4", "icmp_type": 0}),
        {**host, **remote, "l4_protocol": "TCP", "src_port": 40000, "dst_port": 4240},
        {**host, **remote, "l4_protocol": "ICMPv4", "icmp_type": 3},  # unreachable: not a probe
        {**pod_a, **pod_b, "l4_protocol": "TCP", "src_port": 40001, "dst_port": 4240},  # app on 4240
        {**pod_a, **pod_b, "l4_protocol": "ICMPv6", "icmp_type": 128},
        # identity unknown, labels say host / remote-node
        {"src_labels": ["reserved:host"], "dst_labels": ["reserved:remote-node"], "ip_src": "1.1.1.1",
         "ip_dst": "2.2.2.2", "l4_protocol": "ICMPv6", "icmp_type": 129},
    ]
    out = stage(ctx).transform(make_flows(rows))
    assert out.column("icmp_type").to_pylist() == [3, None, 128]
    assert dropped(ctx, "node_health") == 4
    assert stage(ctx, node_health=False).transform(make_flows(rows)).num_rows == 7


def test_fixtures_health_icmp(ctx, all_fixture_flows):
    out = stage(ctx).transform(all_fixture_flows)
    assert all_fixture_flows.num_rows == 1518
    assert out.num_rows == 1518 - 19
    assert dropped(ctx, "cilium_health") == 19
    assert dropped(ctx) == 19
    ids = np.concatenate([out.column("src_identity").fill_null(0).to_numpy(),
                          out.column("dst_identity").fill_null(0).to_numpy()])
    assert 4 not in ids


def test_fixtures_prometheus_scrapes(ctx, fixture_batches):
    http = fixture_batches["hubble-otel-basic-sample-348-http-flows.jsonl"]
    out = stage(ctx, prometheus=True).transform(http)
    # every request and response of a /metrics scrape goes (Cilium repeats request headers on responses)
    assert dropped(ctx, "prometheus") == 278
    assert out.num_rows == 348 - 278
    assert sorted(set(out.column("http_url").to_pylist())) == [
        "http://productpage:9080/productpage", "http://reviews:9080/reviews/0"]


def test_recent_connections_bounds():
    recent = RecentConnections(capacity=3, ttl_ns=100)
    recent.add(np.array([5, 1, 9], dtype=np.uint64), now_ns=0)
    assert recent.contains(np.array([1, 2, 5, 9, 10], dtype=np.uint64)).tolist() == [True, False, True, True, False]
    recent.add(np.array([7], dtype=np.uint64), now_ns=50)  # over capacity: the oldest goes (one of 1/5/9)
    assert len(recent) == 3 and recent.contains(np.array([7], dtype=np.uint64)).all()
    recent.add(np.array([1], dtype=np.uint64), now_ns=120)  # entries seen at 0 expire
    assert sorted(recent.keys.tolist()) == [1, 7]


def test_config_validation():
    with pytest.raises(ConfigError) as err:
        load_text("stages:\n  - type: healthcheck\n    paths: [healthz]\n    health_port: 0\n    probes: true\n", "f.yaml")
    problems = err.value.problems
    assert "f.yaml: stages[0].paths[0]: expected a path starting with '/', got 'healthz'" in problems
    assert "f.yaml: stages[0].health_port: expected a port 1..65535, got 0" in problems
    assert any(p.startswith("f.yaml: stages[0].probes: unknown key") for p in problems)
