"""hubble_* series as Cilium writes them, checked as exact scrape lines for recorded Hubble flows.

Every expected line is worked out by hand from the fixture flows (shown in the comments) and Cilium's handlers
(pkg/hubble/metrics/<handler>/handler.go, api/context.go), not by running the code under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flowship.config import ConfigError, load_text
from flowship.hubble_metrics import HubbleMetrics, icmp_type_name
from flowship.hubble_metrics_config import HubbleMetricsConfig, parse_metric
from flowship.metrics import Metrics
from flowship.model.hubble_decode import decode_lines


def _scrape(fixture_files: list[Path], name: str, metrics: list[str]) -> str:
    path = next(p for p in fixture_files if p.name == name)
    registry = Metrics()
    HubbleMetrics(registry, HubbleMetricsConfig(metrics=metrics)).observe(decode_lines(path.read_bytes()).batch)
    return registry.exposition().decode()


def _samples(text: str, family: str) -> set[str]:
    return {line for line in text.splitlines()
            if line.startswith((family + "{", family + " "))}


def test_trace_flows_flow_tcp_and_port_distribution(fixture_files):
    # 10 TCP trace flows (event_type 4): sub_type 3 (to-stack) on flows 0,3,4,7,9, no sub_type (0, to-endpoint)
    # on 1,2,5,6,8. Flags: 0,1 ACK+FIN; 8 SYN; 9 SYN+ACK; the rest ACK or ACK+PSH, which Cilium does not count.
    text = _scrape(fixture_files, "hubble-otel-basic-sample-10-flows.jsonl",
                   ["flow", "tcp", "port-distribution", "drop", "icmp"])
    assert _samples(text, "hubble_flows_processed_total") == {
        'hubble_flows_processed_total{protocol="TCP",subtype="to-stack",type="Trace",verdict="FORWARDED"} 5.0',
        'hubble_flows_processed_total{protocol="TCP",subtype="to-endpoint",type="Trace",verdict="FORWARDED"} 5.0',
    }
    assert _samples(text, "hubble_tcp_flags_total") == {
        'hubble_tcp_flags_total{family="IPv4",flag="FIN"} 2.0',
        'hubble_tcp_flags_total{family="IPv4",flag="SYN"} 1.0',
        'hubble_tcp_flags_total{family="IPv4",flag="SYN-ACK"} 1.0',
    }
    # None of these flows says whether it is a reply (no is_reply): port-distribution leaves them out.
    assert _samples(text, "hubble_port_distribution_total") == set()
    assert _samples(text, "hubble_drop_total") == set()
    assert _samples(text, "hubble_icmp_total") == set()
    assert "_created" not in text


def test_context_options_app_reserved_identity_pod_short(fixture_files):
    # sourceContext=app|reserved-identity: the first app label (app / k8s-app), else the reserved: label.
    # destinationContext=pod-short: namespace/ + the pod name without its last one or two -suffixes.
    text = _scrape(fixture_files, "hubble-otel-basic-sample-10-flows.jsonl",
                   ["flow:sourceContext=app|reserved-identity;destinationContext=pod-short"])
    series = 'hubble_flows_processed_total{{destination="{d}",protocol="TCP",source="{s}",subtype="{t}",' \
             'type="Trace",verdict="FORWARDED"}} 1.0'
    expected = [  # (source, destination, subtype) of flows 0..9
        ("reviews", "", "to-stack"),                                    # reviews pod → host
        ("reserved:host", "bookinfo/reviews-v1", "to-endpoint"),       # host → reviews-v1-545db77b95-s6jb8
        ("prometheus", "bookinfo/reviews-v1", "to-endpoint"),
        ("reviews", "istio-system/prometheus", "to-stack"),            # → prometheus-6655946b9f-hx9ln
        ("galley", "istio-system/istio-telemetry", "to-stack"),        # → istio-telemetry-85cf8ddf5f-kw64q
        ("telemetry", "istio-system/istio-galley", "to-endpoint"),
        ("reserved:world", "kube-system/event-exporter-gke", "to-endpoint"),  # → event-exporter-gke-67986489c8-svnrf
        ("event-exporter", "", "to-stack"),                             # k8s:k8s-app=event-exporter → world
        ("reserved:host", "kube-system/kube-dns", "to-endpoint"),      # → kube-dns-6c7b8dc9f9-gnxh2
        ("kube-dns", "", "to-stack"),
    ]
    assert _samples(text, "hubble_flows_processed_total") == {series.format(s=s, d=d, t=t) for s, d, t in expected}


def test_drops_with_pod_context_and_icmp(fixture_files):
    # Two field-masked drops without event_type (typed Drop from their verdict): an ICMPv6 router solicitation
    # (type 133) from a link-local address with empty endpoints, and TCP SYN default/xwing → deathstar.
    text = _scrape(fixture_files, "cilium-docs-exporter-fieldmask-2-drops.jsonl",
                   ["flow", "drop:sourceContext=pod;destinationContext=pod", "tcp", "icmp", "port-distribution"])
    assert _samples(text, "hubble_drop_total") == {
        'hubble_drop_total{destination="",protocol="ICMPv6",reason="INVALID_SOURCE_IP",source=""} 1.0',
        'hubble_drop_total{destination="default/deathstar-7848d6c4d5-th9v2",protocol="TCP",reason="POLICY_DENIED",'
        'source="default/xwing"} 1.0',
    }
    assert _samples(text, "hubble_flows_processed_total") == {
        'hubble_flows_processed_total{protocol="ICMPv6",subtype="",type="Drop",verdict="DROPPED"} 1.0',
        'hubble_flows_processed_total{protocol="TCP",subtype="",type="Drop",verdict="DROPPED"} 1.0',
    }
    # Cilium's icmp handler writes family="IPv4" for ICMPv6 messages too.
    assert _samples(text, "hubble_icmp_total") == {'hubble_icmp_total{family="IPv4",type="RouterSolicitation"} 1.0'}
    # tcp and port-distribution count forwarded/redirected flows only.
    assert _samples(text, "hubble_tcp_flags_total") == set()
    assert _samples(text, "hubble_port_distribution_total") == set()


def test_dns_queries_responses_and_ports(fixture_files):
    # Flows 0,2,4: requests (is_reply false) from node-local-dns to kube-dns port 53 over TCP, qtypes [A];
    # flows 1,3: NXDOMAIN (rcode 3) responses, no IPs, no answer records.
    text = _scrape(fixture_files, "hubble-otel-basic-sample-5-dns-flows.jsonl",
                   ["dns:query;ignoreAAAA;sourceContext=namespace", "flow", "port-distribution"])
    query = 'hubble_dns_queries_total{{ips_returned="0",qtypes="A",query="{q}",rcode="",source="kube-system"}} 1.0'
    answer = 'hubble_dns_responses_total{{ips_returned="0",qtypes="A",query="{q}",rcode="Non-Existent Domain",' \
             'source="kube-system"}} 1.0'
    assert _samples(text, "hubble_dns_queries_total") == {query.format(q=q) for q in (
        "istiod-istio-1611.istio-system.svc.istio-system.svc.cluster.local.",
        "istiod-istio-1611.istio-system.svc.svc.cluster.local.",
        "istiod-istio-1611.istio-system.svc.cluster.local.")}
    assert _samples(text, "hubble_dns_responses_total") == {answer.format(q=q) for q in (
        "istiod-istio-1611.istio-system.svc.istio-system.svc.cluster.local.",
        "istiod-istio-1611.istio-system.svc.svc.cluster.local.")}
    assert _samples(text, "hubble_dns_response_types_total") == set()
    assert _samples(text, "hubble_flows_processed_total") == {
        'hubble_flows_processed_total{protocol="DNS",subtype="DNS",type="L7",verdict="FORWARDED"} 5.0'}
    assert _samples(text, "hubble_port_distribution_total") == {
        'hubble_port_distribution_total{port="53",protocol="TCP"} 3.0'}


def test_dns_response_types_and_ignore_aaaa(fixture_files):
    # The 330-flow recording has A answers with IPs; ignoreAAAA drops queries asking for AAAA only.
    lines = next(p for p in fixture_files if p.name == "hubble-otel-basic-sample-330-dns-flows.jsonl").read_bytes()
    import orjson
    flows = [orjson.loads(line)["flow"] for line in lines.splitlines() if line.strip()]
    dns = [f for f in flows if "dns" in f.get("l7", {})]
    answered = [f for f in dns if f.get("is_reply") and f["verdict"] != "DROPPED"]
    a_records = sum(f["l7"]["dns"].get("rrtypes", []).count("A") for f in answered)
    not_aaaa_only = [f for f in dns if f["l7"]["dns"].get("qtypes") != ["AAAA"]]
    registry = Metrics()
    HubbleMetrics(registry, HubbleMetricsConfig(metrics=["dns:ignoreAAAA"])).observe(decode_lines(lines).batch)
    assert registry.value("hubble_dns_response_types_total", type="A", qtypes="A") == a_records > 0
    assert (registry.value("hubble_dns_queries_total") + registry.value("hubble_dns_responses_total")
            == len(not_aaaa_only) < len(dns))


def test_http_v1_and_v2(fixture_files):
    # Flows 0-2: GET requests (EGRESS: reporter client); flows 3,4: 503 responses with latency 0.999958359 s and
    # 4.13818364 s, from node-local-dns-r99x7 / -6jnx9 (label reserved:world, no app) to prometheus (app=prometheus).
    v1 = _scrape(fixture_files, "hubble-otel-basic-sample-5-http-flows.jsonl", ["http"])
    assert _samples(v1, "hubble_http_requests_total") == {
        'hubble_http_requests_total{method="GET",protocol="HTTP/1.1",reporter="client"} 3.0'}
    assert _samples(v1, "hubble_http_responses_total") == {
        'hubble_http_responses_total{method="GET",protocol="HTTP/1.1",reporter="client",status="503"} 2.0'}
    assert _samples(v1, "hubble_http_request_duration_seconds_count") == {
        'hubble_http_request_duration_seconds_count{method="GET",reporter="client"} 2.0'}
    assert 'hubble_http_request_duration_seconds_bucket{le="1.0",method="GET",reporter="client"} 1.0' in v1
    assert 'hubble_http_request_duration_seconds_bucket{le="2.5",method="GET",reporter="client"} 1.0' in v1
    assert 'hubble_http_request_duration_seconds_bucket{le="5.0",method="GET",reporter="client"} 2.0' in v1

    # httpV2 counts responses, with source and destination swapped back to the request's direction: the source
    # label is the destination context of the response's destination (prometheus), and the other way round.
    v2 = _scrape(fixture_files, "hubble-otel-basic-sample-5-http-flows.jsonl",
                 ["httpV2:sourceContext=app|pod-name;destinationContext=pod-name;"
                  "labelsContext=source_namespace,traffic_direction"])
    line = ('hubble_http_requests_total{{destination="{pod}",method="GET",protocol="HTTP/1.1",reporter="client",'
            'source="prometheus-6655946b9f-6xcpf",source_namespace="istio-system",status="503",'
            'traffic_direction="egress"}} 1.0')
    assert _samples(v2, "hubble_http_requests_total") == {line.format(pod="node-local-dns-r99x7"),
                                                          line.format(pod="node-local-dns-6jnx9")}
    assert _samples(v2, "hubble_http_responses_total") == set()
    assert _samples(v2, "hubble_http_request_duration_seconds_sum") == {
        'hubble_http_request_duration_seconds_sum{destination="node-local-dns-r99x7",method="GET",reporter="client",'
        'source="prometheus-6655946b9f-6xcpf",source_namespace="istio-system",traffic_direction="egress"} '
        '0.999958359',
        'hubble_http_request_duration_seconds_sum{destination="node-local-dns-6jnx9",method="GET",reporter="client",'
        'source="prometheus-6655946b9f-6xcpf",source_namespace="istio-system",traffic_direction="egress"} '
        '4.13818364'}


def test_icmp_type_names():
    assert icmp_type_name("ICMPv4", 8, 0) == "EchoRequest"
    assert icmp_type_name("ICMPv4", 3, 3) == "DestinationUnreachable(Port)"
    assert icmp_type_name("ICMPv4", 3, 99) == "DestinationUnreachable(Code: 99)"
    assert icmp_type_name("ICMPv4", 8, 1) == "EchoRequest(Code: 1)"
    assert icmp_type_name("ICMPv6", 1, 4) == "DestinationUnreachable(PortUnreachable)"
    assert icmp_type_name("ICMPv6", 250, 2) == "250(2)"


def test_metric_option_syntax():
    spec = parse_metric("drop:sourceContext=pod|ip;destinationContext=namespace")
    assert spec.handler == "drop" and spec.options == {"sourcecontext": "pod|ip", "destinationcontext": "namespace"}
    assert parse_metric("dns:query;ignoreAAAA").options == {"query": "", "ignoreaaaa": ""}
    for text, message in (("flows", "unknown metric 'flows'"), ("drop:sourceContext=pods", "unknown context 'pods'"),
                          ("httpV2:labelsContext=source_pod,owner", "invalid labelsContext value: 'owner'"),
                          ("tcp:query", "unknown option 'query'")):
        with pytest.raises(ValueError, match=message):
            parse_metric(text)


def test_config_rejects_bad_metrics(tmp_path):
    text = (f"data_dir: {tmp_path}\nsources: [{{type: file, paths: [{tmp_path}/f.jsonl]}}]\n"
            f"sinks: [{{type: file, path: {tmp_path}/o.jsonl}}]\n"
            "hubble_metrics: {metrics: [http, 'httpV2:sourceContext=pod', 'icmp:destinationContext=nope', tcp, tcp]}\n")
    with pytest.raises(ConfigError) as caught:
        load_text(text, "m.yaml")
    problems = caught.value.problems
    assert any("hubble_metrics.metrics[1]: 'httpV2' and 'http' (metrics[0]) write the same series" in p
               for p in problems), problems
    assert any("hubble_metrics.metrics[4]: 'tcp' given twice (also metrics[3])" in p for p in problems), problems
    assert any("hubble_metrics.metrics[2]: unknown context 'nope'" in p for p in problems), problems
