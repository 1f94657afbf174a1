"""Hubble-named flow metrics, so existing Hubble Grafana dashboards work on flowship.

Computed per batch with Arrow group-bys (one counter update per distinct
label combination, not per flow) on the flows entering the pipeline — what
the node or Hubble observed, before sampling or filtering — and re-weighted
by ``sample_rate`` when flows arrive already sampled. Series and labels follow
Hubble's metric handlers: flows_processed_total{type,subtype,verdict,protocol},
drop_total{reason,protocol}, tcp_flags_total{flag,family},
dns_queries_total / dns_responses_total{rcode,qtypes,ips_returned},
http_requests_total{method,protocol,status,reporter},
http_request_duration_seconds{method,reporter}; lost_events_total{source} is
kept by :meth:`flowship.metrics.Metrics.record_lost`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowship.metrics import Metrics
from flowship.model.schema import TCP_FLAG_BITS

_DNS_RCODES = {0: "No Error", 1: "Format Error", 2: "Server Failure", 3: "Non-Existent Domain",
               4: "Not Implemented", 5: "Query Refused"}
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def _protocol(batch: pa.RecordBatch) -> pa.Array:
    """Hubble's protocol label: the L7 protocol when there is one, else the L4 one."""
    l4 = pc.fill_null(batch.column("l4_protocol"), "Unknown")
    http = pc.is_valid(batch.column("http_method")) if batch.num_rows else pa.array([], pa.bool_())
    http = pc.or_(http, pc.is_valid(batch.column("http_code")))
    dns = pc.or_(pc.is_valid(batch.column("dns_query")), pc.is_valid(batch.column("dns_rcode")))
    return pc.if_else(http, "HTTP", pc.if_else(dns, "DNS", l4))


def _grouped(table: pa.Table, keys: list[str]) -> list[tuple[tuple, float]]:
    if table.num_rows == 0:
        return []
    out = table.group_by(keys).aggregate([("weight", "sum")])
    cols = [out.column(k).to_pylist() for k in keys]
    weights = out.column("weight_sum").to_pylist()
    return [(tuple(c[i] for c in cols), weights[i]) for i in range(out.num_rows)]


@dataclass
class HubbleMetricsConfig:
    """``hubble_metrics:`` at the top level of a config."""

    enabled: bool = True  # hubble_* series of the flows entering the pipeline, before the shared stages


class HubbleMetrics:
    """Updates hubble_* series from flow batches."""

    def __init__(self, metrics: Metrics) -> None:
        m = metrics
        self.flows = m.counter("hubble_flows_processed_total", "Total number of flows processed",
                               ["type", "subtype", "verdict", "protocol"])
        self.drops = m.counter("hubble_drop_total", "Number of drops", ["reason", "protocol"])
        self.tcp_flags = m.counter("hubble_tcp_flags_total", "TCP flag occurrences", ["flag", "family"])
        self.dns_queries = m.counter("hubble_dns_queries_total", "Number of DNS queries observed",
                                     ["rcode", "qtypes", "ips_returned"])
        self.dns_responses = m.counter("hubble_dns_responses_total", "Number of DNS responses observed",
                                       ["rcode", "qtypes", "ips_returned"])
        self.http_requests = m.counter("hubble_http_requests_total", "Count of HTTP requests",
                                       ["method", "protocol", "status", "reporter"])
        self.http_duration = m.histogram("hubble_http_request_duration_seconds",
                                         "Quantiles of HTTP request duration", ["method", "reporter"],
                                         buckets=_LATENCY_BUCKETS)

    def observe(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        weight = pc.fill_null(batch.column("sample_rate"), 1).cast(pa.float64())
        proto = _protocol(batch)
        flow_type = pc.fill_null(batch.column("flow_type"), "Unknown")
        l7 = pc.equal(flow_type, "L7")
        subtype = pc.if_else(l7, pc.fill_null(pc.utf8_lower(proto), ""), pc.fill_null(batch.column("trace_point"), ""))
        base = pa.table({"type": flow_type, "subtype": subtype,
                         "verdict": pc.fill_null(batch.column("verdict"), "VERDICT_UNKNOWN"),
                         "protocol": proto, "weight": weight})
        for (t, s, v, p), w in _grouped(base, ["type", "subtype", "verdict", "protocol"]):
            self.flows.labels(t, s, v, p).inc(w)

        dropped = pc.equal(batch.column("verdict"), "DROPPED").fill_null(False)
        if pc.any(dropped).as_py():
            reason = pc.coalesce(batch.column("drop_reason"), batch.column("kernel_drop_reason"))
            drops = pa.table({"reason": pc.fill_null(reason, "DROP_REASON_UNKNOWN"), "protocol": proto,
                              "weight": weight}).filter(dropped)
            for (r, p), w in _grouped(drops, ["reason", "protocol"]):
                self.drops.labels(r, p).inc(w)

        flags = batch.column("tcp_flags").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        if flags.any():
            family = batch.column("ip_version").fill_null(0).to_numpy(zero_copy_only=False)
            w = weight.to_numpy()
            for fam_value, fam in ((4, "IPv4"), (6, "IPv6")):
                in_family = family == fam_value
                for name, bit in TCP_FLAG_BITS.items():
                    total = float(w[in_family & ((flags & bit) != 0)].sum())
                    if total:
                        self.tcp_flags.labels(name, fam).inc(total)

        has_dns = pc.is_valid(batch.column("dns_query"))
        if pc.any(has_dns).as_py():
            dns = batch.filter(has_dns)
            table = pa.table({
                "response": pc.equal(pc.fill_null(dns.column("l7_type"), ""), "RESPONSE"),
                "rcode": dns.column("dns_rcode").fill_null(0),
                "qtypes": pc.binary_join(pc.fill_null(dns.column("dns_qtypes"), pa.scalar([], pa.list_(pa.string()))), ","),
                "ips": pc.list_value_length(dns.column("dns_ips")).fill_null(0),
                "weight": pc.fill_null(dns.column("sample_rate"), 1).cast(pa.float64())})
            for (resp, rcode, qtypes, ips), w in _grouped(table, ["response", "rcode", "qtypes", "ips"]):
                if resp:
                    self.dns_responses.labels(_DNS_RCODES.get(rcode, str(rcode)), qtypes, str(ips)).inc(w)
                else:
                    self.dns_queries.labels("", qtypes, str(ips)).inc(w)

        has_http = pc.or_(pc.is_valid(batch.column("http_method")), pc.is_valid(batch.column("http_code")))
        responses = pc.and_(has_http, pc.equal(pc.fill_null(batch.column("l7_type"), ""), "RESPONSE"))
        if pc.any(responses).as_py():
            http = batch.filter(responses)
            reporter = pc.if_else(pc.equal(pc.fill_null(http.column("traffic_direction"), ""), "INGRESS"),
                                  "server", "client")
            table = pa.table({"method": pc.fill_null(http.column("http_method"), ""),
                              "protocol": pc.fill_null(http.column("http_protocol"), ""),
                              "status": pc.cast(http.column("http_code").fill_null(0), pa.string()),
                              "reporter": reporter,
                              "weight": pc.fill_null(http.column("sample_rate"), 1).cast(pa.float64())})
            for (m, p, s, r), w in _grouped(table, ["method", "protocol", "status", "reporter"]):
                self.http_requests.labels(m, p, s, r).inc(w)
            seconds = pc.divide(pc.cast(http.column("l7_latency_ns"), pa.float64()), 1e9)
            latency = pa.table({"method": table.column("method"), "reporter": reporter, "seconds": seconds})
            latency = latency.filter(pc.is_valid(seconds))
            if latency.num_rows:
                for (method, rep), values in _split(latency, ["method", "reporter"], "seconds"):
                    _observe_many(self.http_duration.labels(method, rep), values)


def _split(table: pa.Table, keys: list[str], value: str) -> list[tuple[tuple, np.ndarray]]:
    """Values of ``value`` per distinct key combination."""
    grouped = table.group_by(keys).aggregate([(value, "list")])
    out = []
    for i in range(grouped.num_rows):
        key = tuple(grouped.column(k)[i].as_py() for k in keys)
        out.append((key, np.asarray(grouped.column(f"{value}_list")[i].values.to_numpy(zero_copy_only=False))))
    return out


def _observe_many(histogram, values: np.ndarray) -> None:  # noqa: ANN001 - a prometheus_client child
    """Add many observations at once (prometheus_client has no bulk call; its per-value one is slow)."""
    upper = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if upper is None or buckets is None or total is None:
        for v in values.tolist():
            histogram.observe(v)
        return
    index = np.searchsorted(np.asarray(upper, dtype=np.float64), values, side="left")
    counts = np.bincount(index, minlength=len(upper))
    for i, count in enumerate(counts.tolist()):
        if count:
            buckets[i].inc(count)
    total.inc(float(values.sum()))
