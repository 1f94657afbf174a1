"""The filter stage and its Hubble FlowFilter compiler.

The tables follow Hubble's own filter tests (cilium pkg/hubble/filters/*_test.go)
and the `hubble observe` examples of the Cilium docs: same inputs, same answers.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from stage_helpers import dropped, make_flows

from flowship.config import ConfigError, load_text
from flowship.model.flowfilter import FilterError, compile_filter_set, parse_label_selector
from flowship.proto.flow import flow_pb2
from flowship.stages.filter import FilterConfig, FilterStage


def matches(allow: list, rows: list[dict], deny: list | None = None) -> list[bool]:
    return compile_filter_set(allow, deny)(make_flows(rows)).to_pylist()


LABEL_CASES = [
    ("label filter without value", [{"source_label": ["label1", "label2"]}],
     [{"src_labels": ["label1"]}, {"src_labels": ["label1=val1"]},
      {"src_labels": ["label2", "label3", "label4=val4"]}, {"src_labels": ["label3"]}],
     [True, True, True, False]),
    ("label filter with value", [{"source_label": ["label1=val1", "label2=val2"]}],
     [{"src_labels": ["label1"]}, {"src_labels": ["label1=val1"]},
      {"src_labels": ["label1=val2", "label2=val1", "label3"]}, {"src_labels": ["label2=val2", "label3"]},
      {"src_labels": ["label3=val1"]}, {"src_labels": [""]}, {"src_labels": None},
      {"src_labels": ["label1=val1=toomuch"]}],
     [False, True, False, True, False, False, False, False]),
    ("complex label filter", [{"source_label": ["label1 in (val1, val2), label3 notin ()"]}],
     [{"src_labels": ["label1"]}, {"src_labels": ["label1=val1"]},
      {"src_labels": ["label1=val2", "label2=val1", "label3=val3"]}, {"src_labels": ["label2=val2", "label3"]},
      {"src_labels": ["label1=val1", "label3=val3"]}],
     [False, True, True, False, True]),
    ("source and destination", [{"source_label": ["src1, src2=val2"], "destination_label": ["dst1, dst2=val2"]}],
     [{"src_labels": ["src1", "src2=val2"], "dst_labels": ["dst1", "dst2=val2"]},
      {"src_labels": ["label1=val1"]}, {"dst_labels": ["dst1", "dst2=val2"]},
      {"src_labels": ["dst1", "dst2=val2"], "dst_labels": ["src1", "src2=val2"]},
      {"src_labels": ["src1"], "dst_labels": ["dst1"]}],
     [True, False, False, False, False]),
    ("match all", [{"source_label": [""]}],
     [{"src_labels": ["src1", "src2=val2"]}, {"src_labels": None}, {"src_labels": [""]}],
     [True, True, True]),
    ("cilium fixed prefix", [{"source_label": ["k8s:app=bar", "foo", "reserved:host"]}],
     [{"src_labels": ["k8s:app=bar"]}, {"src_labels": ["k8s:foo=baz"]}, {"src_labels": ["k8s.app=bar"]},
      {"src_labels": ["container:foo=bar", "reserved:host"]}],
     [True, True, False, True]),
    ("cilium any prefix", [{"source_label": ["any:key"]}],
     [{"src_labels": ["key"]}, {"src_labels": ["reserved:key"]}, {"src_labels": ["any.key"]}],
     [True, True, False]),
    ("negations", [{"source_label": ["!k8s:app", "k8s:tier!=web"]}],
     [{"src_labels": ["k8s:app=x"]}, {"src_labels": ["k8s:tier=db"]}, {"src_labels": ["k8s:tier=web"]},
      {"src_labels": ["k8s:tier=web", "k8s:app=y"]}],
     [True, True, True, False]),
    ("negations in one selector", [{"source_label": ["!k8s:app, k8s:tier!=web"]}],
     [{"src_labels": ["k8s:app=x"]}, {"src_labels": ["k8s:tier=db"]}, {"src_labels": ["k8s:tier=web"]}, {}],
     [False, True, False, True]),
    ("namespace label with slash and dots", [{"source_label": ["k8s:io.kubernetes.pod.namespace=kube-system"]}],
     [{"src_labels": ["k8s:io.kubernetes.pod.namespace=kube-system"]},
      {"src_labels": ["k8s:io.kubernetes.pod.namespace=default"]}],
     [True, False]),
]


@pytest.mark.parametrize(("name", "allow", "rows", "want"), LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_label_selectors(name, allow, rows, want):
    assert matches(allow, rows) == want


@pytest.mark.parametrize("selector", ["()", "=", "any:k8s:bla", "app in (a b", "app >> 3"])
def test_invalid_label_selectors(selector):
    with pytest.raises(FilterError) as err:
        compile_filter_set([{"destination_label": [selector]}])
    assert err.value.problems[0].startswith("allow[0].destination_label[0]: ")


def test_label_selector_parse():
    reqs = parse_label_selector("bar=baz,k8s:app=hubble,reserved:world")
    assert [(r.source, r.key, r.op, sorted(r.values)) for r in reqs] == [
        ("any", "bar", "in", ["baz"]), ("k8s", "app", "in", ["hubble"]), ("reserved", "world", "exists", [])]
    reqs = parse_label_selector("any:dash-label.com,k8s:io.cilium in (is-awesome,rocks)")
    assert [(r.source, r.key, r.op, sorted(r.values)) for r in reqs] == [
        ("any", "dash-label.com", "exists", []), ("k8s", "io.cilium", "in", ["is-awesome", "rocks"])]


NODE_CASES = [
    (["/"], {"default/k8s1": True, "k8s1": True, "": False}),
    (["cluster-name/"], {"cluster-name/k8s1": True, "cluster-name/k8s2": True, "default/k8s1": False, "k8s1": False}),
    (["k8s1"], {"default/k8s1": True, "default/k8s2": False, "k8s1": True}),
    (["k8s1", "runtime1"], {"default/k8s1": True, "default/k8s2": False, "default/runtime1": True, "k8s1": True}),
    (["k8s*"], {"default/k8s1": True, "default/runtime1": False, "k8s1": True}),
    (["cluster-*/k8s1"], {"cluster-1/k8s1": True, "cluster-1/k8s2": False, "default/k8s1": False, "k8s1": False}),
    (["cluster-name/*.com"], {"cluster-name/foo.com": True, "cluster-name/foo.bar.com": True,
                              "cluster-name/foo.com.org": False, "default/foo.com": False, "k8s1": False}),
]


@pytest.mark.parametrize(("patterns", "want"), NODE_CASES)
def test_node_name_patterns(patterns, want):
    names = list(want)
    assert matches([{"node_name": patterns}], [{"node_name": n or None} for n in names]) == list(want.values())


@pytest.mark.parametrize(("pattern", "message"), [
    ("", "empty pattern"), ("cluster|name/", "invalid rune in pattern"),
    ("cluster-name/node|name", "invalid rune in pattern"), ("cluster-name/node-name/more", "too many slashes"),
])
def test_node_name_errors(pattern, message):
    with pytest.raises(FilterError, match=message):
        compile_filter_set([{"node_name": [pattern]}])


def test_fqdn_patterns():
    src = [{"src_names": ["cilium.io"]}, {"src_names": ["ebpf.io"]}, {"dst_names": ["cilium.io"]},
           {"dst_names": ["ebpf.io"]}]
    assert matches([{"source_fqdn": ["cilium.io", "ebpf.io"]}], src) == [True, True, False, False]
    assert matches([{"destination_fqdn": ["cilium.io", "ebpf.io"]}], src) == [False, False, True, True]
    both = [{"src_names": ["cilium.io"], "dst_names": ["ebpf.io"]},
            {"src_names": ["ebpf.io"], "dst_names": ["cilium.io"]},
            {"src_names": ["deathstar.empire.svc.cluster.local", "docs.cilium.io"], "dst_names": ["ebpf.io"]}]
    assert matches([{"source_fqdn": ["cilium.io", "docs.cilium.io"], "destination_fqdn": ["ebpf.io"]}],
                   both) == [True, False, True]
    wild = [{"src_names": ["www.cilium.io"]}, {"src_names": ["multiple.domains.org"]}, {"src_names": ["cilium.io"]},
            {"src_names": ["tiefighter", "empire.org"]}, {"dst_names": []}, {"dst_names": ["anything.really"]},
            {"dst_names": [""]}]
    assert matches([{"source_fqdn": ["*.cilium.io", "*.org."]}, {"destination_fqdn": ["*"]}], wild) == [
        True, True, False, True, False, True, True]
    trailing = [{}, {"src_names": ["cilium.io."]}, {"src_names": ["www.cilium.io"]}, {"src_names": [""]}]
    assert matches([{"source_fqdn": ["cilium.io."]}], trailing) == [False, False, False, False]
    for bad in ("", "."):
        with pytest.raises(FilterError):
            compile_filter_set([{"destination_fqdn": [bad]}])


def test_dns_query_regex():
    rows = [{}, {"dns_query": "cilium.io"}, {"dns_query": "example.com"}, {"dns_query": "example.net"}]
    assert matches([{"dns_query": [r".*\.com$", r".*\.io"]}], rows) == [False, True, True, False]
    with pytest.raises(FilterError, match=r"allow\[0\]\.dns_query\[0\]: invalid regular expression"):
        compile_filter_set([{"dns_query": ["*"]}])


def test_ip_exact_and_cidr():
    rows = [{"ip_src": "1.1.1.1", "ip_dst": "10.0.0.5"}, {"ip_src": "10.1.2.3", "ip_dst": "1.1.1.1"},
            {"ip_src": "2001:db8::1", "ip_dst": "fd00::2"}, {"ip_src": None}]
    assert matches([{"source_ip": ["1.1.1.1"]}], rows) == [True, False, False, False]
    assert matches([{"source_ip": ["10.0.0.0/8"]}], rows) == [False, True, False, False]
    assert matches([{"source_ip": ["2001:db8::/32"]}], rows) == [False, False, True, False]
    assert matches([{"destination_ip": ["fd00::/8", "10.0.0.1/24"]}], rows) == [True, False, True, False]
    # a v4 CIDR never contains a v6 address and the other way round
    assert matches([{"source_ip": ["::/0"]}], rows) == [False, False, True, False]
    with pytest.raises(FilterError) as err:
        compile_filter_set([{"source_ip": ["1.1.1.1/33", "not-an-ip"]}])
    assert err.value.problems == ["allow[0].source_ip[0]: invalid CIDR '1.1.1.1/33'",
                                  "allow[0].source_ip[1]: invalid IP address 'not-an-ip'"]


def test_pod_filters():
    rows = [{"src_namespace": "production", "src_pod": "frontend-5c7"},
            {"src_namespace": "default", "src_pod": "frontend-abc"},
            {"src_namespace": "kube-system", "src_pod": "coredns-1"},
            {"src_namespace": "production", "src_pod": None},
            {}]
    assert matches([{"source_pod": ["production/"]}], rows) == [True, False, False, True, False]
    assert matches([{"source_pod": ["production/front"]}], rows) == [True, False, False, False, False]
    # a bare name is a pod prefix in namespace "default", as in Hubble
    assert matches([{"source_pod": ["frontend"]}], rows) == [False, True, False, False, False]
    assert matches([{"source_pod": ["kube-system/", "production/frontend"]}], rows) == [
        True, False, True, False, False]
    with pytest.raises(FilterError, match="must be"):
        compile_filter_set([{"source_pod": [""]}])


def test_service_and_workload():
    rows = [{"dst_service": "api", "dst_service_namespace": "shop", "dst_workload": "api", "dst_workload_kind": "Deployment"},
            {"dst_service": "api-internal", "dst_service_namespace": "shop", "dst_workload": "api",
             "dst_workload_kind": "StatefulSet"},
            {"dst_service": "api", "dst_service_namespace": "other"}]
    assert matches([{"destination_service": ["shop/api"]}], rows) == [True, True, False]
    assert matches([{"destination_workload": [{"name": "api"}]}], rows) == [True, True, False]
    assert matches([{"destination_workload": [{"kind": "StatefulSet"}]}], rows) == [False, True, False]
    assert matches([{"destination_workload": [{}]}], rows) == [True, True, False]
    with pytest.raises(FilterError, match=r"allow\[0\]\.destination_workload\[0\]\.namespace: unknown key"):
        compile_filter_set([{"destination_workload": [{"namespace": "x"}]}])


def test_ports_and_protocols():
    rows = [{"l4_protocol": "TCP", "src_port": 40000, "dst_port": 80},
            {"l4_protocol": "UDP", "src_port": 5353, "dst_port": 53, "dns_query": "x.io."},
            {"l4_protocol": "ICMPv4", "icmp_type": 8},
            {"l4_protocol": "ICMPv6", "icmp_type": 128},
            {"l4_protocol": "SCTP", "src_port": 1, "dst_port": 80},
            {"l4_protocol": "TCP", "dst_port": 8080, "http_method": "GET", "http_url": "/"}]
    assert matches([{"destination_port": ["80"]}], rows) == [True, False, False, False, True, False]
    assert matches([{"destination_port": [53, 8080]}], rows) == [False, True, False, False, False, True]
    assert matches([{"protocol": ["icmp"]}], rows) == [False, False, True, True, False, False]
    assert matches([{"protocol": ["ICMPv6", "sctp"]}], rows) == [False, False, False, True, True, False]
    assert matches([{"protocol": ["tcp"]}], rows) == [True, False, False, False, False, True]
    assert matches([{"protocol": ["http"]}], rows) == [False, False, False, False, False, True]
    assert matches([{"protocol": ["dns"]}], rows) == [False, True, False, False, False, False]
    # AND within one filter, OR across filters
    assert matches([{"protocol": ["udp"], "destination_port": ["80"]}], rows) == [False] * 6
    assert matches([{"protocol": ["udp"]}, {"destination_port": ["80"]}], rows) == [
        True, True, False, False, True, False]
    with pytest.raises(FilterError) as err:
        compile_filter_set([{"protocol": ["quic"], "source_port": ["70000"]}])
    assert err.value.problems[0].startswith("allow[0].protocol[0]: unknown protocol 'quic'")
    assert err.value.problems[1] == "allow[0].source_port[0]: expected an integer 0..65535, got '70000'"


def test_verdict_drop_reason_direction_reply():
    rows = [{"verdict": "FORWARDED", "traffic_direction": "EGRESS", "is_reply": False},
            {"verdict": "DROPPED", "drop_reason": "POLICY_DENIED", "drop_reason_code": 133,
             "traffic_direction": "INGRESS"},
            {"verdict": "REDIRECTED", "is_reply": True},
            {"verdict": "FORWARDED"}]
    assert matches([{"verdict": ["DROPPED", "REDIRECTED"]}], rows) == [False, True, True, False]
    assert matches([{"drop_reason_desc": ["POLICY_DENIED"]}], rows) == [False, True, False, False]
    assert matches([{"drop_reason_desc": [133]}], rows) == [False, True, False, False]
    assert matches([{"traffic_direction": ["INGRESS"]}], rows) == [False, True, False, False]
    # is_reply unknown: no match, except for dropped flows where it counts as false (Hubble compat)
    assert matches([{"reply": [True]}], rows) == [False, False, True, False]
    assert matches([{"reply": [False]}], rows) == [True, True, False, False]
    with pytest.raises(FilterError, match=r"allow\[0\]\.verdict\[0\]: unknown verdict 'DENIED'"):
        compile_filter_set([{"verdict": ["DENIED"]}])


def test_http_fields():
    rows = [{"http_code": 200, "http_method": "GET", "http_url": "http://10.0.0.1:8080/api/v1/items?id=3"},
            {"http_code": 503, "http_method": "post", "http_url": "/api/v2/items"},
            {"http_code": 404, "http_method": "GET", "http_url": "/healthz"},
            {"http_method": "GET", "http_url": "/api/v1/x", "http_headers": [{"key": "X-Env", "value": "prod"}]},
            {}]
    assert matches([{"http_status_code": ["5+"]}], rows) == [False, True, False, False, False]
    assert matches([{"http_status_code": ["200", "4+"]}], rows) == [True, False, True, False, False]
    assert matches([{"http_status_code": ["40+"]}], rows) == [False, False, True, False, False]
    assert matches([{"http_method": ["POST"]}], rows) == [False, True, False, False, False]
    assert matches([{"http_path": ["^/api/v1/"]}], rows) == [True, False, False, True, False]
    assert matches([{"http_path": ["items$"]}], rows) == [True, True, False, False, False]
    assert matches([{"http_url": [r"id=\d"]}], rows) == [True, False, False, False, False]
    assert matches([{"http_header": [{"key": "X-Env", "value": "prod"}]}], rows) == [False, False, False, True, False]
    for bad in ("600", "5", "+", "5xx"):
        with pytest.raises(FilterError, match="invalid status code"):
            compile_filter_set([{"http_status_code": [bad]}])


def test_tcp_flags_identity_ipversion_uuid_interface_event_type():
    syn, synack, ack, fin_ack = 0x002, 0x012, 0x010, 0x011
    rows = [{"tcp_flags": syn, "src_identity": 1, "ip_version": 4, "uuid": "u-1",
             "interface_index": 10, "interface_name": "lxc_health", "event_type": 4, "event_subtype": 3},
            {"tcp_flags": synack, "src_identity": 16781, "ip_version": 6, "uuid": "u-2", "event_type": 129},
            {"tcp_flags": ack, "dst_identity": 4, "ip_version": 4, "uuid": "u-3", "interface_index": 6,
             "interface_name": "cilium_vxlan", "event_type": 4},
            {"tcp_flags": fin_ack, "uuid": "u-4"},
            {"uuid": "u-5"}]
    assert matches([{"tcp_flags": [{"SYN": True}]}], rows) == [True, True, False, False, False]
    assert matches([{"tcp_flags": [{"SYN": True, "ACK": True}]}], rows) == [False, True, False, False, False]
    assert matches([{"tcp_flags": [{"FIN": True}, {"SYN": True, "ACK": True}]}], rows) == [
        False, True, False, True, False]
    assert matches([{"tcp_flags": ["SYN,ACK"]}], rows) == [False, True, False, False, False]
    assert matches([{"source_identity": [1, 16781]}], rows) == [True, True, False, False, False]
    assert matches([{"destination_identity": [4]}], rows) == [False, False, True, False, False]
    assert matches([{"ip_version": ["IPv6"]}], rows) == [False, True, False, False, False]
    assert matches([{"ip_version": ["IP_NOT_USED"]}], rows) == [False, False, False, True, True]
    assert matches([{"uuid": ["u-2", "u-5"]}], rows) == [False, True, False, False, True]
    assert matches([{"interface": [{"name": "lxc_health"}]}], rows) == [True, False, False, False, False]
    assert matches([{"interface": [{"index": 6}]}], rows) == [False, False, True, False, False]
    assert matches([{"event_type": [{"type": 4}]}], rows) == [True, False, True, False, False]
    assert matches([{"event_type": [{"type": 4, "match_sub_type": True, "sub_type": 3}]}], rows) == [
        True, False, False, False, False]
    assert matches([{"event_type": [{"type": "l7"}]}], rows) == [False, True, False, False, False]
    with pytest.raises(FilterError, match="unknown TCP flag 'SYNACK'"):
        compile_filter_set([{"tcp_flags": [{"SYNACK": True}]}])


def test_http_fields_need_l7_event_type_when_event_type_is_set():
    rows = [{"http_code": 503, "event_type": 129}, {"http_code": 503, "event_type": 4}]
    assert matches([{"http_status_code": ["5+"], "event_type": [{"type": 129}]}], rows) == [True, False]
    with pytest.raises(FilterError, match=r"allow\[0\]\.http_method: filtering by HTTP fields requires"):
        compile_filter_set([{"http_method": ["GET"], "event_type": [{"type": 4}]}])


def test_trace_id_matches_nothing_and_empty_fields_are_unset():
    rows = [{"verdict": "FORWARDED"}, {"verdict": "DROPPED"}]
    assert matches([{"trace_id": ["abc"]}], rows) == [False, False]
    assert matches([{"verdict": [], "source_ip": []}], rows) == [True, True]
    assert matches([{}], rows) == [True, True]


def test_allow_and_deny_combination():
    rows = [{"verdict": "DROPPED", "src_namespace": "production", "src_pod": "a"},
            {"verdict": "DROPPED", "src_namespace": "kube-system", "src_pod": "b"},
            {"verdict": "FORWARDED", "src_namespace": "production", "src_pod": "c"}]
    assert matches([], rows, deny=[]) == [True, True, True]
    assert matches([{"verdict": ["DROPPED"]}], rows) == [True, True, False]
    assert matches([{"verdict": ["DROPPED"]}], rows, deny=[{"source_pod": ["kube-system/"]}]) == [True, False, False]
    assert matches([], rows, deny=[{"source_pod": ["kube-system/"]}, {"verdict": ["FORWARDED"]}]) == [
        True, False, False]


def test_proto_messages_and_camel_case():
    batch = make_flows([{"verdict": "DROPPED", "dst_port": 80, "l4_protocol": "TCP"},
                        {"verdict": "FORWARDED", "dst_port": 80, "l4_protocol": "TCP"},
                        {"verdict": "DROPPED", "dst_port": 443, "l4_protocol": "TCP"}])
    allow = [flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED], destination_port=["80"])]
    deny = [flow_pb2.FlowFilter(tcp_flags=[flow_pb2.TCPFlags(SYN=True)])]
    assert compile_filter_set(allow, deny)(batch).to_pylist() == [True, False, False]
    assert compile_filter_set([{"destinationPort": ["443"]}])(batch).to_pylist() == [False, False, True]


def test_unknown_fields_are_errors():
    with pytest.raises(FilterError) as err:
        compile_filter_set([{"verdict": ["DROPPED"]}], [{"source_cluster": ["x"]}, "DROPPED"])
    assert err.value.problems[0].startswith("deny[0].source_cluster: unknown filter field")
    assert err.value.problems[1].startswith("deny[1]: expected a filter mapping")


def test_config_errors_name_the_key_path():
    text = """
stages:
  - type: filter
    allow:
      - {verdict: [DROPPED], source_ip: ["10.0.0.0/33"]}
    deny:
      - {http_path: ["(unclosed"]}
"""
    with pytest.raises(ConfigError) as err:
        load_text(text, "flowship.yaml")
    problems = err.value.problems
    assert "flowship.yaml: stages[0].allow[0].source_ip[0]: invalid CIDR '10.0.0.0/33'" in problems
    assert any(p.startswith("flowship.yaml: stages[0].deny[0].http_path[0]: invalid regular expression")
               for p in problems)


def test_stage_counts_by_reason(ctx):
    stage = FilterStage(FilterConfig(allow=[{"protocol": ["tcp", "udp"]}], deny=[{"destination_port": ["53"]}]), ctx)
    batch = make_flows([{"l4_protocol": "TCP", "dst_port": 80}, {"l4_protocol": "UDP", "dst_port": 53},
                        {"l4_protocol": "ICMPv4", "icmp_type": 8}, {"l4_protocol": "UDP", "dst_port": 123}])
    out = stage.transform(batch)
    assert out.column("dst_port").to_pylist() == [80, 123]
    assert dropped(ctx, "not_allowed") == 1
    assert dropped(ctx, "denied") == 1
    assert stage.transform(out).num_rows == 2  # nothing more to drop


# --- the recorded Hubble flows -------------------------------------------------------------

FIXTURE_COUNTS = [
    ([{"verdict": ["DROPPED"]}], 2),
    ([{"verdict": ["REDIRECTED"]}], 427),
    ([{"http_status_code": ["5+"]}], 153),
    ([{"http_status_code": ["200"]}], 54),
    ([{"http_path": ["^/metrics$"]}], 283),
    ([{"source_pod": ["istio-system/"]}], 155),
    ([{"source_label": ["k8s:app=prometheus"]}], 143),
    ([{"destination_label": ["reserved:health"]}], 12),
    ([{"source_label": ["reserved:health"]}, {"destination_label": ["reserved:health"]}], 19),
    ([{"protocol": ["dns"]}], 335),
    ([{"protocol": ["icmpv4"]}], 18),
    ([{"ip_version": ["IPv6"]}], 1),
    ([{"source_ip": ["fe80::/10"]}], 1),
    ([{"drop_reason_desc": ["POLICY_DENIED"]}], 1),
    ([{"node_name": ["kind-kind/"]}], 2),
    ([{"interface": [{"name": "lxc_health"}]}], 7),
]


@pytest.mark.parametrize(("allow", "count"), FIXTURE_COUNTS)
def test_fixture_counts(all_fixture_flows, allow, count):
    assert int(compile_filter_set(allow).mask(all_fixture_flows).sum()) == count


def test_fixture_counts_agree_with_plain_column_logic(all_fixture_flows):
    """Cross-check the compiler against straightforward Arrow expressions on the same batch."""
    b = all_fixture_flows
    dns_nxdomain = compile_filter_set([{"dns_rcode_nonzero": True}]).mask(b).sum()
    rcodes = b.column("dns_rcode").drop_null().to_pylist()
    assert dns_nxdomain == sum(1 for r in rcodes if r != 0) == 104
    syn_only = compile_filter_set([{"tcp_flags": [{"SYN": True}]}]).mask(b).sum()
    flags = b.column("tcp_flags").fill_null(0).to_numpy(zero_copy_only=False)
    assert syn_only == int(((flags & 2) == 2).sum())
    egress_not_dns = compile_filter_set([{"traffic_direction": ["EGRESS"]}], [{"protocol": ["dns"]}]).mask(b)
    expected = pc.and_(pc.equal(b.column("traffic_direction"), "EGRESS").fill_null(False),
                       pc.invert(pc.or_(pc.is_valid(b.column("dns_query")), pc.is_valid(b.column("dns_rcode")))))
    assert egress_not_dns.tolist() == expected.to_pylist()


def test_filter_set_returns_boolean_array(all_fixture_flows):
    result = compile_filter_set([{"verdict": ["DROPPED"]}])(all_fixture_flows)
    assert isinstance(result, pa.BooleanArray)
    assert len(result) == all_fixture_flows.num_rows and result.null_count == 0
