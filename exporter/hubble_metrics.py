"""Hubble's flow metrics with Cilium's series, label names and label values, so Hubble dashboards work on flowship.

The handlers are the ones of Cilium's ``pkg/hubble/metrics`` (``flow``, ``drop``, ``tcp``, ``dns``, ``http``,
``httpV2``, ``icmp``, ``port-distribution``), configured with Cilium's option syntax
(``drop:sourceContext=pod;destinationContext=namespace``) under ``hubble_metrics.metrics``; docs/metrics.md lists
every series. They are computed per batch with Arrow group-bys (one counter update per distinct label combination,
not per flow) on the flows entering the pipeline — what the node or Hubble observed, before sampling or filtering —
and re-weighted by ``sample_rate`` when flows arrive already sampled. ``hubble_lost_events_total{source}`` is kept
by :meth:`flowship.metrics.Metrics.record_lost`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# The configuration (HubbleMetricsConfig, parse_metric) lives apart, so that loading a config needs no Arrow.
from flowship.hubble_metrics_config import HubbleMetricsConfig, MetricSpec, parse_context
from flowship.metrics import Metrics
from flowship.model.schema import TCP_FLAG_BITS

# Cilium's monitor message types (pkg/monitor/api/types.go): the flow's event_type.type.
MSG_DROP, MSG_CAPTURE, MSG_TRACE, MSG_POLICY_VERDICT, MSG_ACCESS_LOG = 1, 3, 4, 5, 129
# TraceObservationPoints: the label Cilium writes for a Trace flow's event_type.sub_type.
TRACE_SUBTYPES = {0: "to-endpoint", 1: "to-proxy", 2: "to-host", 3: "to-stack", 4: "to-overlay",
                  5: "from-endpoint", 6: "from-proxy", 7: "from-host", 8: "from-stack", 9: "from-overlay",
                  10: "from-network", 11: "to-network", 12: "from-crypto", 13: "to-crypto"}
# The flow's trace_observation_point name → the sub_type, for flows that carry no event_type (field-masked exports).
_TRACE_POINT_SUBTYPES = {"TO_ENDPOINT": 0, "TO_PROXY": 1, "TO_HOST": 2, "TO_STACK": 3, "TO_OVERLAY": 4,
                         "FROM_ENDPOINT": 5, "FROM_PROXY": 6, "FROM_HOST": 7, "FROM_STACK": 8, "FROM_OVERLAY": 9,
                         "FROM_NETWORK": 10, "TO_NETWORK": 11, "FROM_CRYPTO": 12, "TO_CRYPTO": 13}
# pkg/hubble/metrics/dns/rcode.go
DNS_RCODES = {0: "No Error", 1: "Format Error", 2: "Server Failure", 3: "Non-Existent Domain", 4: "Not Implemented",
              5: "Query Refused", 6: "Name Exists when it should not", 7: "RR Set Exists when it should not",
              8: "RR Set that should exist does not", 9: "Not Authorized", 10: "Name not contained in zone",
              11: "DSO-TYPE Not Implemented", 16: "Bad OPT Version", 17: "Key not recognized",
              18: "Signature out of time window", 19: "Bad TKEY Mode", 20: "Duplicate key name",
              21: "Algorithm not supported", 22: "Bad Truncation", 23: "Bad/missing Server Cookie"}
# client_golang's DefBuckets, which Cilium's http_request_duration_seconds uses.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_APP_LABELS = ("k8s:app.kubernetes.io/name=", "k8s:k8s-app=", "k8s:app=")
_SHORT_POD = r"^(.+?)(-[a-z0-9]+){1,2}$"


# -- per-batch columns ----------------------------------------------------------------------------------------------

class _Rows:
    """One batch with the derived columns the handlers share, each computed once and only when asked for."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.batch = batch
        self.n = batch.num_rows
        self._cache: dict[str, object] = {}

    def _cached(self, key: str, make: Callable[[], object]):  # noqa: ANN202 - arrays or Python lists
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def col(self, name: str) -> pa.Array:
        column = self.batch.column(name)
        return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column

    def text(self, name: str) -> pa.Array:
        """A string column with "" for null, as Go's getters read an unset field."""
        return self._cached(f"text:{name}", lambda: pc.fill_null(self.col(name), ""))

    def values(self, name: str) -> list:
        return self._cached(f"py:{name}", lambda: self.col(name).to_pylist())

    def joined(self, name: str) -> pa.Array:
        """A list column joined with "," ("" for null or empty)."""
        return self._cached(f"join:{name}", lambda: pc.fill_null(pc.binary_join(self.col(name), ","), ""))

    def valid(self, *names: str) -> pa.Array:
        mask = pc.is_valid(self.col(names[0]))
        for name in names[1:]:
            mask = pc.or_(mask, pc.is_valid(self.col(name)))
        return mask

    @property
    def weight(self) -> pa.Array:
        return self._cached("weight", lambda: pc.fill_null(self.col("sample_rate"), 1).cast(pa.float64()))

    @property
    def verdict(self) -> pa.Array:
        return self._cached("verdict", lambda: pc.fill_null(self.col("verdict"), "VERDICT_UNKNOWN"))

    def verdict_is(self, *names: str) -> pa.Array:
        return pc.is_in(self.verdict, value_set=pa.array(names))

    @property
    def has_dns(self) -> pa.Array:
        return self._cached("has_dns", lambda: self.valid("dns_query", "dns_rcode", "dns_qtypes", "dns_ips",
                                                          "dns_rrtypes"))

    @property
    def has_http(self) -> pa.Array:
        return self._cached("has_http", lambda: pc.and_(pc.invert(self.has_dns), self.valid(
            "http_method", "http_code", "http_url", "http_protocol")))

    @property
    def event_type(self) -> np.ndarray:
        """event_type.type; a flow without one (field-masked) is typed from its Type and verdict."""
        def make() -> np.ndarray:
            given = self.col("event_type").to_numpy(zero_copy_only=False)
            flow_type = np.asarray(self.text("flow_type").to_numpy(zero_copy_only=False), dtype=object)
            verdict = np.asarray(self.verdict.to_numpy(zero_copy_only=False), dtype=object)
            inferred = np.where(flow_type == "L7", MSG_ACCESS_LOG,
                                np.where(verdict == "DROPPED", MSG_DROP,
                                         np.where(flow_type == "L3_L4", MSG_TRACE, 0)))
            missing = pc.is_null(self.col("event_type")).to_numpy(zero_copy_only=False)
            return np.where(missing, inferred, np.nan_to_num(given.astype(np.float64))).astype(np.int64)
        return self._cached("event_type", make)

    @property
    def event_subtype(self) -> np.ndarray:
        def make() -> np.ndarray:
            given = self.col("event_subtype")
            points = self.values("trace_point")
            fallback = np.array([_TRACE_POINT_SUBTYPES.get(p, -1) if p else -1 for p in points], dtype=np.int64)
            no_type = pc.is_null(self.col("event_type")).to_numpy(zero_copy_only=False)
            values = pc.fill_null(given, 0).to_numpy(zero_copy_only=False).astype(np.int64)
            return np.where(no_type & pc.is_null(given).to_numpy(zero_copy_only=False), fallback, values)
        return self._cached("event_subtype", make)

    @property
    def protocol(self) -> pa.Array:
        """v1.FlowProtocol: the L7 protocol of an access-log flow, the L4 one of drop/trace/verdict/capture flows."""
        def make() -> pa.Array:
            et = self.event_type
            l7 = np.where(self.has_dns.to_numpy(zero_copy_only=False), "DNS",
                          np.where(self.has_http.to_numpy(zero_copy_only=False), "HTTP", "Unknown L7"))
            l4 = np.asarray(pc.fill_null(self.col("l4_protocol"), "Unknown L4").to_numpy(zero_copy_only=False),
                            dtype=object)
            l4_kind = np.isin(et, (MSG_DROP, MSG_TRACE, MSG_POLICY_VERDICT, MSG_CAPTURE))
            out = np.where(et == MSG_ACCESS_LOG, l7, np.where(l4_kind, l4, "Unknown flow"))
            return pa.array(out.tolist(), pa.string())
        return self._cached("protocol", make)

    def endpoint(self, side: str, invert: bool) -> str:
        """Column prefix of the flow's source ("src") or destination ("dst"), swapped when ``invert``."""
        if invert:
            return "dst" if side == "src" else "src"
        return side


def _reserved_identity(labels: list[str] | None) -> str:
    """reserved:kube-apiserver when present, else the first reserved: label."""
    labels = labels or []
    if "reserved:kube-apiserver" in labels:
        return "reserved:kube-apiserver"
    return next((label for label in labels if label.startswith("reserved:")), "")


def _k8s_app(labels: list[str] | None) -> str:
    """The value of the first app.kubernetes.io/name, k8s-app or app label (in the flow's label order)."""
    for label in labels or []:
        for prefix in _APP_LABELS:
            if label.startswith(prefix) and len(label) > len(prefix):
                return label[len(prefix):]
    return ""


def _per_row(rows: _Rows, column: str, fn: Callable[[list[str] | None], str]) -> pa.Array:
    cache: dict[tuple, str] = {}
    out = []
    for labels in rows.values(column):
        key = tuple(labels) if labels else ()
        if key not in cache:
            cache[key] = fn(labels)
        out.append(cache[key])
    return pa.array(out, pa.string())


def _with_namespace(namespace: pa.Array, name: pa.Array) -> pa.Array:
    """``namespace/name``, or ``name`` when the namespace is empty (Cilium's pod context)."""
    return pc.if_else(pc.equal(namespace, ""), name, pc.binary_join_element_wise(namespace, name, "/"))


def _context_value(rows: _Rows, identifier: str, prefix: str, ip_column: str) -> pa.Array:
    """The label value of one context identifier for one endpoint."""
    if identifier == "namespace":
        return rows.text(f"{prefix}_namespace")
    if identifier == "identity":
        return rows.joined(f"{prefix}_labels")
    if identifier == "pod":
        return _with_namespace(rows.text(f"{prefix}_namespace"), rows.text(f"{prefix}_pod"))
    if identifier == "pod-short":
        short = pc.replace_substring_regex(rows.text(f"{prefix}_pod"), pattern=_SHORT_POD, replacement=r"\1")
        return _with_namespace(rows.text(f"{prefix}_namespace"), short)
    if identifier == "pod-name":
        return rows.text(f"{prefix}_pod")
    if identifier == "dns":
        return rows.joined(f"{prefix}_names")
    if identifier == "ip":
        return rows.text(ip_column)
    if identifier == "reserved-identity":
        return _per_row(rows, f"{prefix}_labels", _reserved_identity)
    if identifier == "workload-name":
        return rows.text(f"{prefix}_workload")
    if identifier == "app":
        return _per_row(rows, f"{prefix}_labels", _k8s_app)
    raise ValueError(f"unknown context {identifier!r}")


class ContextOptions:
    """sourceContext / destinationContext / labelsContext of one handler (pkg/hubble/metrics/api/context.go)."""

    def __init__(self, options: dict[str, str]) -> None:
        sides, self.labels = parse_context(options)
        self.source = sides["source"]
        self.source_egress = sides["source_egress"]
        self.source_ingress = sides["source_ingress"]
        self.destination = sides["destination"]
        self.destination_egress = sides["destination_egress"]
        self.destination_ingress = sides["destination_ingress"]

    def label_names(self) -> list[str]:
        names = list(self.labels)
        if self.source:
            names.append("source")
        if self.destination:
            names.append("destination")
        return names

    def _side(self, rows: _Rows, side: str, default: list[str] | None, egress: list[str] | None,
              ingress: list[str] | None) -> pa.Array:
        prefix, ip_column = ("src", "ip_src") if side == "source" else ("dst", "ip_dst")

        def first_non_empty(identifiers: list[str] | None) -> pa.Array:
            value = pa.repeat(pa.scalar("", pa.string()), rows.n)
            for identifier in reversed(identifiers or []):
                candidate = _context_value(rows, identifier, prefix, ip_column)
                value = pc.if_else(pc.equal(candidate, ""), value, candidate)
            return value

        value = first_non_empty(default)
        direction = rows.text("traffic_direction")
        if ingress is not None:
            value = pc.if_else(pc.equal(direction, "INGRESS"), first_non_empty(ingress), value)
        if egress is not None:
            value = pc.if_else(pc.equal(direction, "EGRESS"), first_non_empty(egress), value)
        return value

    def label_values(self, rows: _Rows, invert: bool = False) -> dict[str, pa.Array]:
        """Label name → per-row values; ``invert`` swaps source and destination (httpV2 counts responses).

        Computed once per batch for handlers that share the same options.
        """
        key = repr((self.source, self.source_egress, self.source_ingress, self.destination, self.destination_egress,
                    self.destination_ingress, self.labels, invert))
        return rows._cached(f"context:{key}", lambda: self._label_values(rows, invert))

    def _label_values(self, rows: _Rows, invert: bool) -> dict[str, pa.Array]:
        out: dict[str, pa.Array] = {}
        for label in self.labels:
            if label == "traffic_direction":
                direction = rows.text("traffic_direction")
                out[label] = pc.if_else(pc.is_in(direction, value_set=pa.array(["", "TRAFFIC_DIRECTION_UNKNOWN"])),
                                        "unknown", pc.utf8_lower(direction))
                continue
            side, _, what = label.partition("_")
            prefix = rows.endpoint("src" if side == "source" else "dst", invert)
            if what == "ip":
                out[label] = rows.text("ip_src" if prefix == "src" else "ip_dst")
            elif what == "app":
                out[label] = _per_row(rows, f"{prefix}_labels", _k8s_app)
            else:
                out[label] = rows.text(f"{prefix}_{what}")
        source = self._side(rows, "source", self.source, self.source_egress, self.source_ingress)
        destination = self._side(rows, "destination", self.destination, self.destination_egress,
                                 self.destination_ingress)
        if invert:
            source, destination = destination, source
        if self.source:
            out["source"] = source
        if self.destination:
            out["destination"] = destination
        return out


# -- handlers -------------------------------------------------------------------------------------------------------

def _count(counter, labels: dict[str, pa.Array], weight: pa.Array, mask: pa.Array | None = None) -> None:  # noqa: ANN001
    """Add ``weight`` per distinct label combination; labels are given in the counter's (sorted) label order."""
    names = sorted(labels)
    table = pa.table({**{f"l{i}": labels[name] for i, name in enumerate(names)}, "w": weight})
    if mask is not None:
        table = table.filter(mask)
    if table.num_rows == 0:
        return
    keys = [f"l{i}" for i in range(len(names))]
    if not keys:
        counter.inc(float(pc.sum(table.column("w")).as_py()))
        return
    out = table.group_by(keys).aggregate([("w", "sum")])
    columns = [out.column(k).to_pylist() for k in keys]
    for i, total in enumerate(out.column("w_sum").to_pylist()):
        counter.labels(*(c[i] for c in columns)).inc(total)


def _const(value: str, n: int) -> pa.Array:
    return pa.array([value] * n, pa.string())


class _Handler:
    """One Cilium metrics handler: its context options and series."""

    def __init__(self, metrics: Metrics, spec: MetricSpec) -> None:
        self.spec = spec
        self.context = ContextOptions(spec.options)
        self.metrics = metrics

    def counter(self, name: str, doc: str, own_labels: list[str]):  # noqa: ANN201 - a prometheus_client Counter
        return self.metrics.counter(name, doc, sorted(own_labels + self.context.label_names()))

    def process(self, rows: _Rows) -> None:
        raise NotImplementedError


class _FlowHandler(_Handler):
    def __init__(self, metrics: Metrics, spec: MetricSpec) -> None:
        super().__init__(metrics, spec)
        self.flows = self.counter("hubble_flows_processed_total", "Total number of flows processed",
                                  ["protocol", "type", "subtype", "verdict"])

    def process(self, rows: _Rows) -> None:
        et, sub = rows.event_type, rows.event_subtype
        l7_sub = np.where(rows.has_dns.to_numpy(zero_copy_only=False), "DNS",
                          np.where(rows.has_http.to_numpy(zero_copy_only=False), "HTTP", ""))
        names = {MSG_ACCESS_LOG: "L7", MSG_DROP: "Drop", MSG_CAPTURE: "Capture", MSG_TRACE: "Trace",
                 MSG_POLICY_VERDICT: "PolicyVerdict"}
        types = [names.get(int(t), "Unknown") for t in et]
        subtypes = [l7_sub[i] if t == MSG_ACCESS_LOG else TRACE_SUBTYPES.get(int(sub[i]), "") if t == MSG_TRACE
                    else "" if t in names else str(int(t)) for i, t in enumerate(et.tolist())]
        labels = {"protocol": rows.protocol, "type": pa.array(types, pa.string()),
                  "subtype": pa.array(subtypes, pa.string()), "verdict": rows.verdict,
                  **self.context.label_values(rows)}
        _count(self.flows, labels, rows.weight)


class _DropHandler(_Handler):
    def __init__(self, metrics: Metrics, spec: MetricSpec) -> None:
        super().__init__(metrics, spec)
        self.drops = self.counter("hubble_drop_total", "Number of drops", ["reason", "protocol"])

    def process(self, rows: _Rows) -> None:
        dropped = pc.equal(rows.verdict, "DROPPED")
        if not pc.any(dropped).as_py():
            return
        labels = {"reason": pc.fill_null(rows.col("drop_reason"), "DROP_REASON_UNKNOWN"), "protocol": rows.protocol,
                  **self.context.label_values(rows)}
        _count(self.drops, labels, rows.weight, dropped)


class _TcpHandler(_Handler):
    def __init__(self, metrics: Metrics, spec: MetricSpec) -> None:
        super().__init__(metrics, spec)
        self.flags = self.counter("hubble_tcp_flags_total", "TCP flag occurrences", ["flag", "family"])

    def process(self, rows: _Rows) -> None:
        tcp = pc.and_(pc.equal(pc.fill_null(rows.col("l4_protocol"), ""), "TCP"), pc.is_valid(rows.col("tcp_flags")))
        tcp = pc.and_(pc.and_(tcp, rows.verdict_is("FORWARDED", "REDIRECTED")), pc.is_valid(rows.col("ip_version")))
        if not pc.any(tcp).as_py():
            return
        bits = rows.col("tcp_flags").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        version = rows.col("ip_version").fill_null(0).to_numpy(zero_copy_only=False)
        family = pa.array(np.where(version == 4, "IPv4", np.where(version == 6, "IPv6", "IP_NOT_USED_ERROR")).tolist(),
                          pa.string())
        context = self.context.label_values(rows)
        tcp_np = tcp.to_numpy(zero_copy_only=False)
        syn, ack = (bits & TCP_FLAG_BITS["SYN"]) != 0, (bits & TCP_FLAG_BITS["ACK"]) != 0
        for flag, has in (("FIN", (bits & TCP_FLAG_BITS["FIN"]) != 0), ("SYN-ACK", syn & ack), ("SYN", syn & ~ack),
                          ("RST", (bits & TCP_FLAG_BITS["RST"]) != 0)):
            mask = tcp_np & has
            if mask.any():
                _count(self.flags, {"flag": _const(flag, rows.n), "family": family, **context}, rows.weight,
                       pa.array(mask))


class _DnsHandler(_Handler):
    def __init__(self, metrics: Metrics, spec: MetricSpec) -> None:
        super().__init__(metrics, spec)
        self.include_query = "query" in spec.options
        self.ignore_aaaa = "ignoreaaaa" in spec.options
        query = ["query"] if self.include_query else []
        self.queries = self.counter("hubble_dns_queries_total", "Number of DNS queries observed",
                                    ["rcode", "qtypes", "ips_returned", *query])
        self.responses = self.counter("hubble_dns_responses_total", "Number of DNS queries observed",
                                      ["rcode", "qtypes", "ips_returned", *query])
        self.response_types = self.counter("hubble_dns_response_types_total", "Number of DNS queries observed",
                                           ["type", "qtypes", *query])

    def process(self, rows: _Rows) -> None:
        dns = rows.has_dns
        if self.ignore_aaaa:
            only_aaaa = pc.equal(rows.joined("dns_qtypes"), "AAAA")
            dns = pc.and_(dns, pc.invert(only_aaaa))
        if not pc.any(dns).as_py():
            return
        dropped = pc.equal(rows.verdict, "DROPPED")
        reply = pc.fill_null(rows.col("is_reply"), False)
        query = pc.and_(dns, pc.or_(dropped, pc.invert(reply)))
        response = pc.and_(pc.and_(dns, pc.invert(dropped)), reply)
        rcode_numbers = rows.col("dns_rcode").fill_null(0).to_pylist()
        rcode = pc.if_else(dropped, "Policy denied",
                           pc.if_else(reply, pa.array([DNS_RCODES.get(c, "") for c in rcode_numbers], pa.string()),
                                      ""))
        ips = pc.cast(pc.fill_null(pc.list_value_length(rows.col("dns_ips")), 0), pa.string())
        context = self.context.label_values(rows)
        common = {"qtypes": rows.joined("dns_qtypes"), **context}
        if self.include_query:
            common["query"] = rows.text("dns_query")
        labels = {"rcode": rcode, "ips_returned": ips, **common}
        _count(self.queries, labels, rows.weight, query)
        _count(self.responses, labels, rows.weight, response)
        # one response_types increment per answer record type
        responded = np.flatnonzero(response.to_numpy(zero_copy_only=False))
        answers = rows.col("dns_rrtypes").take(pa.array(responded, pa.int64()))
        flat = pc.list_flatten(answers)
        if len(flat):
            parents = pa.array(responded[pc.list_parent_indices(answers).to_numpy()], pa.int64())
            taken = {k: v.take(parents) for k, v in common.items()}
            _count(self.response_types, {"type": flat, **taken}, rows.weight.take(parents))


class _HttpHandler(_Handler):
    """``http`` (v1: requests and responses apart) or ``httpV2`` (responses only, with status, context inverted)."""

    def __init__(self, metrics: Metrics, spec: MetricSpec) -> None:
        super().__init__(metrics, spec)
        self.v2 = spec.handler == "httpV2"
        if self.v2:
            self.requests = self.counter("hubble_http_requests_total", "Count of HTTP requests",
                                         ["method", "protocol", "status", "reporter"])
        else:
            self.requests = self.counter("hubble_http_requests_total", "Count of HTTP requests",
                                         ["method", "protocol", "reporter"])
            self.responses = self.counter("hubble_http_responses_total", "Count of HTTP responses",
                                          ["method", "protocol", "status", "reporter"])
        self.duration = self.metrics.histogram(
            "hubble_http_request_duration_seconds", "Quantiles of HTTP request duration in seconds",
            sorted(["method", "reporter", *self.context.label_names()]), buckets=LATENCY_BUCKETS)

    def process(self, rows: _Rows) -> None:
        http = rows.has_http
        if not pc.any(http).as_py():
            return
        l7_type = rows.text("l7_type")
        requests = pc.and_(http, pc.equal(l7_type, "REQUEST"))
        responses = pc.and_(http, pc.equal(l7_type, "RESPONSE"))
        direction = rows.text("traffic_direction")
        reporter = pc.if_else(pc.equal(direction, "EGRESS"), "client",
                              pc.if_else(pc.equal(direction, "INGRESS"), "server", "unknown"))
        method, protocol = rows.text("http_method"), rows.text("http_protocol")
        status = pc.cast(pc.fill_null(rows.col("http_code"), 0), pa.string())
        context = self.context.label_values(rows, invert=self.v2)
        response_labels = {"method": method, "protocol": protocol, "status": status, "reporter": reporter, **context}
        if self.v2:
            _count(self.requests, response_labels, rows.weight, responses)
        else:
            _count(self.requests, {"method": method, "protocol": protocol, "reporter": reporter, **context},
                   rows.weight, requests)
            _count(self.responses, response_labels, rows.weight, responses)
        if not pc.any(responses).as_py():
            return
        seconds = pc.divide(pc.cast(pc.fill_null(rows.col("l7_latency_ns"), 0), pa.float64()), 1e9)
        duration_labels = {"method": method, "reporter": reporter, **context}
        names = sorted(duration_labels)
        table = pa.table({**{f"l{i}": duration_labels[n] for i, n in enumerate(names)}, "seconds": seconds,
                          "w": rows.weight}).filter(responses)
        for key, values, weights in _split(table, [f"l{i}" for i in range(len(names))]):
            _observe_many(self.duration.labels(*key), values, weights)


class _IcmpHandler(_Handler):
    def __init__(self, metrics: Metrics, spec: MetricSpec) -> None:
        super().__init__(metrics, spec)
        self.icmp = self.counter("hubble_icmp_total", "Number of ICMP messages", ["family", "type"])

    def process(self, rows: _Rows) -> None:
        l4 = rows.text("l4_protocol")
        icmp = pc.is_in(l4, value_set=pa.array(["ICMPv4", "ICMPv6"]))
        if not pc.any(icmp).as_py():
            return
        kinds = l4.to_pylist()
        types = rows.col("icmp_type").fill_null(0).to_pylist()
        codes = rows.col("icmp_code").fill_null(0).to_pylist()
        names = [icmp_type_name(k, t, c) if k in ("ICMPv4", "ICMPv6") else "" for k, t, c in zip(kinds, types, codes, strict=True)]
        # Cilium's handler labels ICMPv6 messages family="IPv4" as well (pkg/hubble/metrics/icmp/handler.go).
        labels = {"family": _const("IPv4", rows.n), "type": pa.array(names, pa.string()),
                  **self.context.label_values(rows)}
        _count(self.icmp, labels, rows.weight, icmp)


class _PortDistributionHandler(_Handler):
    def __init__(self, metrics: Metrics, spec: MetricSpec) -> None:
        super().__init__(metrics, spec)
        self.ports = self.counter("hubble_port_distribution_total",
                                  "Numbers of packets distributed by destination port", ["protocol", "port"])

    def process(self, rows: _Rows) -> None:
        # Only flows known not to be replies: an unknown is_reply is left out too.
        not_reply = pc.equal(rows.col("is_reply"), False).fill_null(False)
        l4 = rows.text("l4_protocol")
        counted = ("TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6", "VRRP", "IGMP")
        mask = pc.and_(pc.and_(rows.verdict_is("FORWARDED", "REDIRECTED"), not_reply), pc.is_in(l4, value_set=pa.array(counted)))
        if not pc.any(mask).as_py():
            return
        ported = pc.is_in(l4, value_set=pa.array(["TCP", "UDP", "SCTP"]))
        port = pc.if_else(ported, pc.cast(pc.fill_null(rows.col("dst_port"), 0), pa.string()), "0")
        # Cilium's handler has the ICMPv6 case twice, so an ICMPv6 flow adds 2 (port-distribution/handler.go).
        weight = pc.if_else(pc.equal(l4, "ICMPv6"), pc.multiply(rows.weight, 2.0), rows.weight)
        _count(self.ports, {"protocol": l4, "port": port, **self.context.label_values(rows)}, weight, mask)


_HANDLER_CLASSES: dict[str, type[_Handler]] = {
    "flow": _FlowHandler, "drop": _DropHandler, "tcp": _TcpHandler, "dns": _DnsHandler, "http": _HttpHandler,
    "httpV2": _HttpHandler, "icmp": _IcmpHandler, "port-distribution": _PortDistributionHandler}


class HubbleMetrics:
    """Updates the hubble_* series of the configured handlers from flow batches."""

    def __init__(self, metrics: Metrics, config: HubbleMetricsConfig | None = None) -> None:
        config = config or HubbleMetricsConfig()
        self.handlers = [_HANDLER_CLASSES[spec.handler](metrics, spec) for spec in config.specs()]

    def observe(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        rows = _Rows(batch)
        for handler in self.handlers:
            handler.process(rows)


# -- ICMP type names (gopacket's ICMPv4TypeCode / ICMPv6TypeCode String()) -----------------------------------------

_ICMP4 = {0: ("EchoReply", None), 3: ("DestinationUnreachable", {
    0: "Net", 1: "Host", 2: "Protocol", 3: "Port", 4: "FragmentationNeeded", 5: "SourceRoutingFailed",
    6: "NetUnknown", 7: "HostUnknown", 8: "SourceIsolated", 9: "NetAdminProhibited", 10: "HostAdminProhibited",
    11: "NetTOS", 12: "HostTOS", 13: "CommAdminProhibited", 14: "HostPrecedence", 15: "PrecedenceCutoff"}),
    4: ("SourceQuench", None), 5: ("Redirect", {0: "Net", 1: "Host", 2: "TOS+Net", 3: "TOS+Host"}),
    8: ("EchoRequest", None), 9: ("RouterAdvertisement", None), 10: ("RouterSolicitation", None),
    11: ("TimeExceeded", {0: "TTLExceeded", 1: "FragmentReassemblyTimeExceeded"}),
    12: ("ParameterProblem", {0: "PointerIndicatesError", 1: "MissingOption", 2: "BadLength"}),
    13: ("TimestampRequest", None), 14: ("TimestampReply", None), 15: ("InfoRequest", None), 16: ("InfoReply", None),
    17: ("AddressMaskRequest", None), 18: ("AddressMaskReply", None)}
_ICMP6 = {1: ("DestinationUnreachable", {
    0: "NoRouteToDst", 1: "AdminProhibited", 2: "BeyondScopeOfSrc", 3: "AddressUnreachable", 4: "PortUnreachable",
    5: "SrcAddressFailedPolicy", 6: "RejectRouteToDst"}), 2: ("PacketTooBig", None),
    3: ("TimeExceeded", {0: "HopLimitExceeded", 1: "FragmentReassemblyTimeExceeded"}),
    4: ("ParameterProblem", {0: "ErroneousHeaderField", 1: "UnrecognizedNextHeader", 2: "UnrecognizedIPv6Option"}),
    128: ("EchoRequest", None), 129: ("EchoReply", None), 133: ("RouterSolicitation", None),
    134: ("RouterAdvertisement", None), 135: ("NeighborSolicitation", None), 136: ("NeighborAdvertisement", None),
    137: ("Redirect", None)}


def icmp_type_name(family: str, icmp_type: int, code: int) -> str:
    """``EchoRequest``, ``DestinationUnreachable(Port)``, ``TimeExceeded(Code: 9)``, ``42(0)``: as Hubble spells them."""
    info = (_ICMP4 if family == "ICMPv4" else _ICMP6).get(icmp_type)
    if info is None:
        return f"{icmp_type}({code})"
    name, codes = info
    if codes is None:
        return name if code == 0 else f"{name}(Code: {code})"
    return f"{name}({codes[code]})" if code in codes else f"{name}(Code: {code})"


# -- histogram helpers ----------------------------------------------------------------------------------------------

def _split(table: pa.Table, keys: list[str]) -> list[tuple[tuple, np.ndarray, np.ndarray]]:
    """(key, seconds, weights) per distinct key combination."""
    grouped = table.group_by(keys).aggregate([("seconds", "list"), ("w", "list")])
    out = []
    for i in range(grouped.num_rows):
        key = tuple(grouped.column(k)[i].as_py() for k in keys)
        seconds = np.asarray(grouped.column("seconds_list")[i].values.to_numpy(zero_copy_only=False))
        weights = np.asarray(grouped.column("w_list")[i].values.to_numpy(zero_copy_only=False))
        out.append((key, seconds, weights))
    return out


def _observe_many(histogram, values: np.ndarray, weights: np.ndarray) -> None:  # noqa: ANN001 - a prometheus_client child
    """Add many weighted observations at once (prometheus_client has no bulk call; its per-value one is slow)."""
    upper = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if upper is None or buckets is None or total is None:
        for v, w in zip(values.tolist(), weights.tolist(), strict=True):
            for _ in range(max(1, round(w))):
                histogram.observe(v)
        return
    index = np.searchsorted(np.asarray(upper, dtype=np.float64), values, side="left")
    counts = np.bincount(index, weights=weights, minlength=len(upper))
    for i, count in enumerate(counts.tolist()):
        if count:
            buckets[i].inc(count)
    total.inc(float((values * weights).sum()))
