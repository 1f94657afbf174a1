"""hubble_* series computed from the recorded flows match counts taken from the raw lines."""

from __future__ import annotations

import orjson

from flowship.hubble_metrics import HubbleMetrics
from flowship.metrics import Metrics
from flowship.model.hubble_decode import decode_lines


def test_hubble_series_from_fixtures(fixture_lines):
    metrics = Metrics()
    HubbleMetrics(metrics).observe(decode_lines(b"\n".join(fixture_lines)).batch)
    flows = [orjson.loads(line)["flow"] for line in fixture_lines]

    assert metrics.value("hubble_flows_processed_total") == len(flows)
    assert metrics.value("hubble_flows_processed_total", verdict="REDIRECTED") == \
        sum(f["verdict"] == "REDIRECTED" for f in flows)
    assert metrics.value("hubble_drop_total", reason="POLICY_DENIED", protocol="TCP") == 1
    assert metrics.value("hubble_drop_total", reason="INVALID_SOURCE_IP", protocol="ICMPv6") == 1

    responses = [f for f in flows if f.get("l7", {}).get("type") == "RESPONSE" and "http" in f["l7"]]
    for code in (200, 503):
        assert metrics.value("hubble_http_requests_total", status=str(code)) == \
            sum(f["l7"]["http"].get("code") == code for f in responses)
    with_latency = [f for f in responses if f["l7"].get("latency_ns")]
    assert metrics.value("hubble_http_request_duration_seconds_count") == len(with_latency)
    assert abs(metrics.value("hubble_http_request_duration_seconds_sum")
               - sum(int(f["l7"]["latency_ns"]) for f in with_latency) / 1e9) < 1e-6

    dns_responses = [f for f in flows if f.get("l7", {}).get("type") == "RESPONSE" and "dns" in f["l7"]]
    assert metrics.value("hubble_dns_responses_total", rcode="Non-Existent Domain") == \
        sum(f["l7"]["dns"].get("rcode") == 3 for f in dns_responses)
    syn = sum(1 for f in flows if f.get("l4", {}).get("TCP", {}).get("flags", {}).get("SYN"))
    assert metrics.value("hubble_tcp_flags_total", flag="SYN", family="IPv4") == syn
