"""Flow batches as Elastic Common Schema (ECS) documents.

One mapping table (:data:`FLOW_FIELDS`) says, for every ECS field, which flow
columns it comes from and how. Three renderers read that table:

* :func:`to_documents` — one nested ``dict`` per row (tests, slow paths);
* :func:`encode_ndjson` / :func:`ndjson_array` — the fast path: each document
  is assembled as JSON text column by column with Arrow kernels, so the cost
  per row stays in C++ (the Elasticsearch sink and the file sink's
  ``format: ecs`` use it);
* :func:`documents_to_flows` / :func:`decode_ndjson` — back from ECS to flow
  columns for the fields the mapping can restore (the Kafka source reads
  ``ecs-json`` messages with it).

Aggregate rows (``kind="aggregates"``) go through :func:`aggregate_documents`:
the same table is applied to whichever flow columns the aggregate carries and
every other column lands under ``flowship.aggregate.*``.

docs/ecs.md lists every field with its source column.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from exporter.model.ids import IANA_PROTO
from exporter.model.schema import FLOW_SCHEMA, TCP_FLAG_BITS, TIMESTAMP

ECS_VERSION = "8.11.0"
FLOWS_DATASET = "flowship.flows"
AGGREGATES_DATASET = "flowship.aggregates"

Kind = Literal["str", "int", "bool", "list"]

# Lowercase IANA protocol keywords (network.transport) per l4_protocol value.
TRANSPORT_NAMES: dict[str, str] = {
    "TCP": "tcp",
    "UDP": "udp",
    "ICMPv4": "icmp",
    "ICMPv6": "ipv6-icmp",
    "SCTP": "sctp",
    "VRRP": "vrrp",
    "IGMP": "igmp",
}
_TRANSPORT_BACK = {v: k for k, v in TRANSPORT_NAMES.items()}

# DNS RCODE names (IANA DNS parameters registry).
DNS_RCODES: dict[int, str] = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
    6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE", 11: "DSOTYPENI",
    16: "BADVERS", 17: "BADKEY", 18: "BADTIME", 19: "BADMODE", 20: "BADNAME", 21: "BADALG",
    22: "BADTRUNC", 23: "BADCOOKIE",
}

_ALLOWED = ("FORWARDED", "REDIRECTED", "TRANSLATED", "TRACED", "AUDIT")
_START_EVENTS = ("open", "start", "new", "opened")
_END_EVENTS = ("close", "closed", "end", "expired", "timeout")
_URL_RE = (r"^(?:(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*):)?(?://(?P<authority>[^/?#]*))?"
           r"(?P<path>[^?#]*)(?:\?(?P<query>[^#]*))?(?:#(?P<fragment>.*))?$")
_NEEDS_ESCAPE = r'["\\\x00-\x1f]'


# ---------------------------------------------------------------------------------------------
# Column helpers (all columnar)
# ---------------------------------------------------------------------------------------------

class _Cols:
    """A batch plus a per-call cache of intermediate columns shared by several fields."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.batch = batch
        self.n = batch.num_rows
        self._cache: dict[str, pa.Array] = {}

    def __call__(self, name: str) -> pa.Array:
        return self.batch.column(name)

    def cached(self, key: str, fn: Callable[[], pa.Array]) -> pa.Array:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def const(self, value: object, tp: pa.DataType | None = None) -> pa.Array:
        tp = tp or pa.string()
        return pa.array([value] * self.n, tp) if self.n else pa.array([], tp)


def rfc3339(ts: pa.Array) -> pa.Array:
    """Timestamps as RFC 3339 text with nanoseconds and a Z (UTC)."""
    if not pa.types.is_timestamp(ts.type):
        return pc.cast(ts, pa.string())
    if ts.type != TIMESTAMP:
        ts = pc.cast(ts, TIMESTAMP)
    # strftime costs microseconds per value: format each distinct second once,
    # then append the nanoseconds as nine zero-padded digits.
    ns = ts.cast(pa.int64())
    valid = ns.is_valid()
    values = ns.fill_null(0).to_numpy(zero_copy_only=False)
    seconds = values // 1_000_000_000
    distinct, inverse = np.unique(seconds, return_inverse=True)
    as_ts = pa.array(distinct * 1_000_000_000, pa.int64()).cast(TIMESTAMP)
    text = pc.strftime(as_ts.cast(pa.timestamp("s", tz="UTC")), format="%Y-%m-%dT%H:%M:%S")
    sec_text = text.take(pa.array(inverse.reshape(-1), pa.int64()))
    frac = pc.utf8_lpad(pa.array(values - seconds * 1_000_000_000, pa.int64()).cast(pa.string()), 9, "0")
    out = pc.binary_join_element_wise(sec_text, ".", frac, "Z", "")
    return out if ns.null_count == 0 else pc.if_else(valid, out, pa.scalar(None, pa.string()))


def _nonempty(arr: pa.Array) -> pa.Array:
    """Empty strings become null (an empty value is an absent value in ECS)."""
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)


def _nonzero(arr: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(arr, 0), pa.scalar(None, arr.type), arr)


def _map_values(arr: pa.Array, table: dict, out: pa.DataType | None = None) -> pa.Array:
    """Look each value up in ``table`` (values absent from it become null)."""
    out = out or pa.string()
    keys = list(table)
    if not keys:
        return pa.nulls(len(arr), out)
    idx = pc.index_in(arr, value_set=pa.array(keys, type=arr.type))
    return pa.array(list(table.values()), type=out).take(idx)


def _first(lists: pa.Array) -> pa.Array:
    """First element of each list (null when the list is null or empty)."""
    n = len(lists)
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False)
    has = lengths > 0
    if not has.any():
        return pa.nulls(n, lists.type.value_type)
    offsets = lists.offsets.to_numpy()[:-1]
    flat = lists.values
    idx = np.where(has, offsets, 0)
    first = flat.take(pa.array(idx, pa.int64()))
    return pc.if_else(pa.array(has), first, pa.scalar(None, first.type))


def _row_lists(columns: Sequence[pa.Array], n: int) -> pa.Array:
    """Per-row lists of the non-null values of ``columns`` (in column order)."""
    k = len(columns)
    if n == 0:
        return pa.array([], pa.list_(pa.string()))
    stacked = pa.concat_arrays([c.cast(pa.string()) for c in columns])
    order = (np.arange(k)[None, :] * n + np.arange(n)[:, None]).ravel()
    taken = stacked.take(pa.array(order, pa.int64()))
    valid = taken.is_valid()
    values = taken.filter(valid)
    counts = valid.to_numpy(zero_copy_only=False).reshape(n, k).sum(axis=1)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _per_distinct(arr: pa.Array, fn: Callable[[pa.Array], pa.Array]) -> pa.Array:
    """``fn`` applied to each distinct value once, gathered back to every row."""
    encoded = pc.dictionary_encode(arr)
    return fn(encoded.dictionary).take(encoded.indices)


def _when(mask: pa.Array, value: pa.Array | str) -> pa.Array:
    """``value`` where ``mask`` is true, null elsewhere (null mask = false)."""
    mask = mask.fill_null(False)
    if isinstance(value, str):
        return pc.if_else(mask, pa.scalar(value), pa.scalar(None, pa.string()))
    return pc.if_else(mask, value, pa.scalar(None, value.type))


def _sum_nullable(a: pa.Array, b: pa.Array) -> pa.Array:
    """a + b where either is present; null when both are null."""
    both_null = pc.and_(pc.is_null(a), pc.is_null(b))
    total = pc.add(a.fill_null(0), b.fill_null(0))
    return pc.if_else(both_null, pa.scalar(None, total.type), total)


# --- derived columns shared by several fields -----------------------------------------------

def _reply(c: _Cols) -> pa.Array:
    return c.cached("reply", lambda: pc.coalesce(c("is_reply"), c("reply"), pa.scalar(False)))


def _local_is_dst(c: _Cols) -> pa.Array:
    """True where the node-local endpoint of the flow is the destination.

    Ingress connections terminate at the local endpoint, egress ones start
    there; reply packets swap the sides. With no direction, the side that has
    a pod is taken (source first).
    """
    def compute() -> pa.Array:
        direction = c("traffic_direction")
        ingress = pc.equal(direction, "INGRESS").fill_null(False)
        egress = pc.equal(direction, "EGRESS").fill_null(False)
        reply = _reply(c)
        by_direction = pc.xor(ingress, reply)
        fallback = pc.and_(pc.is_null(c("src_pod")), pc.is_valid(c("dst_pod")))
        return pc.if_else(pc.or_(ingress, egress), by_direction, fallback)
    return c.cached("local_is_dst", compute)


def _local(c: _Cols, suffix: str) -> pa.Array:
    return pc.if_else(_local_is_dst(c), c(f"dst_{suffix}"), c(f"src_{suffix}"))


def _verdict_type(c: _Cols) -> pa.Array:
    v = c("verdict")
    allowed = pc.is_in(v, value_set=pa.array(_ALLOWED))
    return pc.if_else(allowed, pa.scalar("allowed"),
                      pc.if_else(pc.equal(v, "DROPPED"), pa.scalar("denied"),
                                 pc.if_else(pc.equal(v, "ERROR"), pa.scalar("error"),
                                            pa.scalar(None, pa.string()))))


def _flag_set(c: _Cols, name: str) -> pa.Array:
    return pc.not_equal(pc.bit_wise_and(c("tcp_flags"), pa.scalar(TCP_FLAG_BITS[name], pa.uint16())), 0)


def _protocol(c: _Cols) -> pa.Array:
    def compute() -> pa.Array:
        is_http = pc.or_(pc.or_(pc.is_valid(c("http_method")), pc.is_valid(c("http_url"))),
                         pc.is_valid(_nonzero(c("http_code"))))
        is_dns = pc.is_valid(c("dns_query"))
        return pc.if_else(is_http, pa.scalar("http"),
                          pc.if_else(is_dns, pa.scalar("dns"), pa.scalar(None, pa.string())))
    return c.cached("protocol", compute)


def _l7_kind(c: _Cols) -> pa.Array:
    """'request' / 'response' from l7_type (REQUEST / RESPONSE), else null."""
    t = pc.utf8_lower(c("l7_type"))
    return pc.if_else(pc.is_in(t, value_set=pa.array(["request", "response"])), t, pa.scalar(None, pa.string()))


def _event_type(c: _Cols) -> pa.Array:
    n = c.n
    flow_event = pc.utf8_lower(c("flow_event"))
    syn_only = pc.and_(_flag_set(c, "SYN"), pc.invert(_flag_set(c, "ACK")))
    fin_rst = pc.or_(_flag_set(c, "FIN"), _flag_set(c, "RST"))
    starts = pc.or_(pc.is_in(flow_event, value_set=pa.array(_START_EVENTS)).fill_null(False),
                    syn_only.fill_null(False))
    ends = pc.or_(pc.is_in(flow_event, value_set=pa.array(_END_EVENTS)).fill_null(False),
                  fin_rst.fill_null(False))
    return _row_lists([
        c.const("connection"),
        _verdict_type(c),
        _when(starts, "start"),
        _when(ends, "end"),
        _when(pc.is_valid(_protocol(c)), "protocol"),
    ], n)


def _event_action(c: _Cols) -> pa.Array:
    protocol = _protocol(c)
    kind = _l7_kind(c)
    l7 = pc.binary_join_element_wise(protocol, pc.coalesce(kind, pa.scalar("event")), "_")
    l7 = pc.if_else(pc.equal(l7, "dns_request").fill_null(False), pa.scalar("dns_query"), l7)
    verdict = c("verdict")
    return pc.if_else(pc.equal(verdict, "DROPPED").fill_null(False), pa.scalar("flow_dropped"),
                      pc.if_else(pc.equal(verdict, "ERROR").fill_null(False), pa.scalar("flow_error"),
                                 pc.coalesce(l7, pa.scalar("network_flow"))))


def _event_outcome(c: _Cols) -> pa.Array:
    verdict = c("verdict")
    failed = pc.is_in(verdict, value_set=pa.array(["DROPPED", "ERROR"])).fill_null(False)
    http_failed = pc.greater_equal(c("http_code"), 400).fill_null(False)
    dns_failed = pc.and_(pc.equal(_l7_kind(c), "response"),
                         pc.not_equal(c("dns_rcode"), 0)).fill_null(False)
    unknown = pc.or_(pc.is_null(verdict), pc.equal(verdict, "VERDICT_UNKNOWN")).fill_null(True)
    return pc.if_else(pc.or_(failed, pc.or_(http_failed, dns_failed)), pa.scalar("failure"),
                      pc.if_else(unknown, pa.scalar("unknown"), pa.scalar("success")))


def _duration(c: _Cols) -> pa.Array:
    start = c("start_time").cast(pa.int64())
    end = c("time").cast(pa.int64())
    return pc.subtract(end, start)


def _mac(arr: pa.Array) -> pa.Array:
    return pc.replace_substring(pc.utf8_upper(_nonempty(arr)), ":", "-")


def _url(c: _Cols, part: str) -> pa.Array:
    parsed = c.cached("url", lambda: _per_distinct(c("http_url"), lambda d: pc.extract_regex(d, _URL_RE)))
    value = _nonempty(pc.struct_field(parsed, part))
    if part == "authority":
        return _per_distinct(value, lambda d: pc.extract_regex(
            d, r"^(?:[^@]*@)?(?P<host>\[[^\]]*\]|[^:]*)(?::(?P<port>[0-9]+))?$"))
    return value


def _url_domain(c: _Cols) -> pa.Array:
    host = pc.struct_field(_url(c, "authority"), "host")
    return _nonempty(pc.utf8_trim(host, characters="[]"))


def _url_port(c: _Cols) -> pa.Array:
    port = _nonempty(pc.struct_field(_url(c, "authority"), "port"))
    return pc.cast(port, pa.int64())


def _cluster(c: _Cols) -> pa.Array:
    node = c("node_name")
    has_prefix = pc.match_substring(node, "/").fill_null(False)
    prefix = pc.struct_field(pc.extract_regex(node, r"^(?P<cluster>[^/]+)/"), "cluster")
    local = _local(c, "cluster")
    other = pc.if_else(_local_is_dst(c), c("src_cluster"), c("dst_cluster"))
    return pc.if_else(has_prefix, prefix, pc.coalesce(_nonempty(local), _nonempty(other)))


def _related_ips(c: _Cols) -> pa.Array:
    src, dst, xl = _nonempty(c("ip_src")), _nonempty(c("ip_dst")), _nonempty(c("ip_src_xlated"))
    dst = pc.if_else(pc.equal(dst, src).fill_null(False), pa.scalar(None, pa.string()), dst)
    same = pc.or_(pc.equal(xl, src).fill_null(False), pc.equal(xl, dst).fill_null(False))
    xl = pc.if_else(same, pa.scalar(None, pa.string()), xl)
    return _row_lists([src, dst, xl], c.n)


def _tcp_flag_names(c: _Cols) -> pa.Array:
    flags = c("tcp_flags")
    cols = [_when(_flag_set(c, name), name) for name in TCP_FLAG_BITS]
    lists = _row_lists(cols, c.n)
    return pc.if_else(pc.is_null(flags), pa.scalar(None, lists.type), lists)


def _dns_name(c: _Cols) -> pa.Array:
    q = _nonempty(c("dns_query"))
    trimmed = pc.utf8_rtrim(q, characters=".")
    return pc.if_else(pc.equal(trimmed, "").fill_null(False), q, trimmed)


def _dns_rcode_name(c: _Cols) -> pa.Array:
    names = _map_values(c("dns_rcode").cast(pa.int64()), DNS_RCODES)
    is_request = pc.equal(_l7_kind(c), "request").fill_null(False)
    return pc.if_else(is_request, pa.scalar(None, pa.string()), names)


def _dns_type(c: _Cols) -> pa.Array:
    kind = _l7_kind(c)
    value = pc.if_else(pc.equal(kind, "request"), pa.scalar("query"),
                       pc.if_else(pc.equal(kind, "response"), pa.scalar("answer"), pa.scalar(None, pa.string())))
    return _when(pc.is_valid(c("dns_query")), value)


def _http_version(c: _Cols) -> pa.Array:
    proto = _nonempty(c("http_protocol"))
    return pc.if_else(pc.starts_with(proto, "HTTP/").fill_null(False), pc.utf8_slice_codeunits(proto, 5), proto)


def _network_type(c: _Cols) -> pa.Array:
    return _map_values(c("ip_version").cast(pa.int64()), {4: "ipv4", 6: "ipv6"})


def _direction(c: _Cols) -> pa.Array:
    d = c("traffic_direction")
    lower = pc.utf8_lower(d)
    known = pc.is_in(lower, value_set=pa.array(["ingress", "egress"]))
    return pc.if_else(known, lower, pc.if_else(pc.is_valid(d), pa.scalar("unknown"), pa.scalar(None, pa.string())))


def _resource_type(c: _Cols) -> pa.Array:
    return _when(pc.is_valid(_nonempty(_local(c, "pod"))), "pod")


def _orchestrator_type(c: _Cols) -> pa.Array:
    present = pc.or_(pc.is_valid(_nonempty(_local(c, "namespace"))), pc.is_valid(_nonempty(_local(c, "pod"))))
    return _when(present, "kubernetes")


# ---------------------------------------------------------------------------------------------
# The mapping table
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One ECS field: where it comes from, how it is typed, how to restore it."""

    path: str
    kind: Kind
    needs: tuple[str, ...]
    compute: Callable[[_Cols], pa.Array]
    source: str  # human description for docs/ecs.md
    es_type: str = "keyword"
    inverse: str | None = None  # the flow column this field restores when decoding
    decode: Callable[[Any], Any] | None = None
    flow_only: bool = False  # per-flow classification, not applied to aggregate rows
    per_row: bool = False  # values differ from row to row (ids, times, counters, addresses)


def _col_field(path: str, column: str, kind: Kind = "str", es_type: str | None = None,
               transform: Callable[[pa.Array], pa.Array] | None = None, restore: bool = True,
               decode: Callable[[Any], Any] | None = None) -> Field:
    """A field copied from one column (optionally transformed columnarly)."""
    if es_type is None:
        es_type = {"str": "keyword", "int": "long", "bool": "boolean", "list": "keyword"}[kind]

    def compute(c: _Cols) -> pa.Array:
        arr = c(column)
        if kind in ("str",) and pa.types.is_string(arr.type):
            arr = _nonempty(arr)
        return transform(arr) if transform else arr

    return Field(path, kind, (column,), compute, f"`{column}`", es_type,
                 inverse=column if restore else None, decode=decode)


def _parse_ts(value: str) -> int:
    """RFC 3339 text (nanosecond precision kept) → ns since the epoch."""
    if not isinstance(value, str):
        raise ValueError(f"expected an RFC 3339 time, got {value!r}")
    text = value.rstrip("Z")
    if text.endswith("+00:00"):
        text = text[:-6]
    main, _, frac = text.partition(".")
    seconds = int(datetime.fromisoformat(main).replace(tzinfo=UTC).timestamp())
    return seconds * 1_000_000_000 + int((frac + "000000000")[:9] or 0)


def _endpoint_fields(side: str, prefix: str) -> list[Field]:
    base = f"flowship.{side}"
    return [
        _col_field(f"{base}.id", f"{prefix}_id", "int"),
        _col_field(f"{base}.identity", f"{prefix}_identity", "int"),
        _col_field(f"{base}.cluster", f"{prefix}_cluster"),
        _col_field(f"{base}.namespace", f"{prefix}_namespace"),
        _col_field(f"{base}.pod", f"{prefix}_pod"),
        _col_field(f"{base}.labels", f"{prefix}_labels", "list"),
        _col_field(f"{base}.workload", f"{prefix}_workload"),
        _col_field(f"{base}.workload_kind", f"{prefix}_workload_kind"),
        _col_field(f"{base}.service", f"{prefix}_service"),
        _col_field(f"{base}.service_namespace", f"{prefix}_service_namespace"),
        _col_field(f"{base}.names", f"{prefix}_names", "list"),
    ]


def _const(path: str, value: object, kind: Kind = "str", flow_only: bool = True) -> Field:
    tp = pa.list_(pa.string()) if kind == "list" else pa.string()
    return Field(path, kind, (), lambda c: c.const(value, tp), f"constant `{orjson.dumps(value).decode()}`",
                 flow_only=flow_only)


# Fields whose values change from flow to flow. Everything else (endpoint metadata,
# verdicts, node, protocol names) repeats across a batch and is rendered once per
# distinct combination of its input columns.
_PER_ROW = frozenset({
    "@timestamp", "event.id", "event.start", "event.end", "event.duration",
    "source.ip", "source.port", "source.bytes", "source.packets", "source.nat.ip",
    "destination.ip", "destination.port", "destination.bytes", "destination.packets",
    "network.community_id", "network.bytes", "network.packets", "related.ip",
    "url.original", "url.scheme", "url.domain", "url.port", "url.path", "url.query",
    "dns.question.name", "dns.resolved_ip", "flowship.dns.query", "flowship.dns.ttl", "flowship.dns.cnames",
    "flowship.socket_cookie", "flowship.cgroup_id", "flowship.l7.latency_ns", "flowship.tcp.handshake_ns",
    "flowship.server_time_ns", "flowship.summary", "flowship.hubble_aggregate.ingress_count",
    "flowship.hubble_aggregate.egress_count", "flowship.hubble_aggregate.unknown_count",
})


def _build_flow_fields() -> tuple[Field, ...]:
    F = Field  # noqa: N806 - short alias for the table below
    fields: list[Field] = [
        F("@timestamp", "str", ("time",), lambda c: rfc3339(c("time")),
          "`time` (RFC 3339, nanoseconds, UTC)", "date_nanos", inverse="time", decode=_parse_ts),
        _const("ecs.version", ECS_VERSION),
        _const("event.kind", "event"),
        _const("event.category", ["network"], "list"),
        F("event.type", "list", ("verdict", "flow_event", "tcp_flags", "http_method", "http_url", "http_code",
                                 "dns_query"), _event_type,
          '`["connection"]` + `allowed`/`denied`/`error` from `verdict` + `start` (flow_event open, or SYN '
          'without ACK) + `end` (flow_event close, or FIN/RST) + `protocol` for HTTP/DNS flows',
          flow_only=True),
        F("event.action", "str", ("verdict", "l7_type", "http_method", "http_url", "http_code", "dns_query"),
          _event_action,
          "`flow_dropped` (verdict DROPPED), `flow_error` (ERROR), `http_request`/`http_response`/"
          "`dns_query`/`dns_response` for L7 flows, else `network_flow`", flow_only=True),
        F("event.outcome", "str", ("verdict", "http_code", "dns_rcode", "l7_type"), _event_outcome,
          "`failure` for DROPPED/ERROR, HTTP status ≥ 400 or a DNS response with rcode ≠ 0; `unknown` "
          "without a verdict; else `success`", flow_only=True),
        _col_field("event.id", "uuid", restore=True),
        _const("event.dataset", FLOWS_DATASET),
        _const("event.module", "flowship"),
        F("event.start", "str", ("start_time",), lambda c: rfc3339(c("start_time")),
          "`start_time` (RFC 3339)", "date_nanos", inverse="start_time", decode=_parse_ts),
        F("event.end", "str", ("time", "start_time"),
          lambda c: _when(pc.is_valid(c("start_time")), rfc3339(c("time"))),
          "`time`, when `start_time` is set (the flow covers start..end)", "date_nanos"),
        F("event.duration", "int", ("time", "start_time"), _duration, "`time − start_time` in ns", "long"),
        # source / destination
        _col_field("source.ip", "ip_src", es_type="ip"),
        _col_field("source.port", "src_port", "int"),
        _col_field("source.mac", "eth_src", transform=_mac,
                   decode=lambda v: v.lower().replace("-", ":")),
        F("source.domain", "str", ("src_names",), lambda c: _first(c("src_names")), "first of `src_names`"),
        _col_field("source.bytes", "bytes", "int"),
        _col_field("source.packets", "packets", "int"),
        _col_field("source.nat.ip", "ip_src_xlated", es_type="ip"),
        _col_field("destination.ip", "ip_dst", es_type="ip"),
        _col_field("destination.port", "dst_port", "int"),
        _col_field("destination.mac", "eth_dst", transform=_mac,
                   decode=lambda v: v.lower().replace("-", ":")),
        F("destination.domain", "str", ("dst_names",), lambda c: _first(c("dst_names")), "first of `dst_names`"),
        _col_field("destination.bytes", "reply_bytes", "int"),
        _col_field("destination.packets", "reply_packets", "int"),
        # network
        F("network.transport", "str", ("l4_protocol",), lambda c: _map_values(c("l4_protocol"), TRANSPORT_NAMES),
          "`l4_protocol` as the lowercase IANA keyword (tcp, udp, icmp, ipv6-icmp, sctp, vrrp, igmp)",
          inverse="l4_protocol", decode=lambda v: _TRANSPORT_BACK.get(v, v.upper())),
        F("network.iana_number", "str", ("l4_protocol",),
          lambda c: _map_values(c("l4_protocol"), {k: str(v) for k, v in IANA_PROTO.items()}),
          "IANA protocol number of `l4_protocol`, as text (ECS keyword)"),
        F("network.type", "str", ("ip_version",), _network_type, "`ip_version` 4 → `ipv4`, 6 → `ipv6`",
          inverse="ip_version", decode=lambda v: {"ipv4": 4, "ipv6": 6}.get(v)),
        F("network.protocol", "str", ("http_method", "http_url", "http_code", "dns_query"), _protocol,
          "`http` when an HTTP field is set, `dns` when `dns_query` is set"),
        F("network.direction", "str", ("traffic_direction",), _direction,
          "`traffic_direction` INGRESS → `ingress`, EGRESS → `egress`, other → `unknown`",
          inverse="traffic_direction",
          decode=lambda v: {"ingress": "INGRESS", "egress": "EGRESS"}.get(v, "TRAFFIC_DIRECTION_UNKNOWN")),
        _col_field("network.community_id", "community_id"),
        F("network.bytes", "int", ("bytes", "reply_bytes"), lambda c: _sum_nullable(c("bytes"), c("reply_bytes")),
          "`bytes + reply_bytes`", "long"),
        F("network.packets", "int", ("packets", "reply_packets"),
          lambda c: _sum_nullable(c("packets"), c("reply_packets")), "`packets + reply_packets`", "long"),
        # host and orchestrator
        _col_field("host.name", "node_name"),
        F("orchestrator.type", "str", ("traffic_direction", "is_reply", "reply", "src_namespace", "dst_namespace",
                                       "src_pod", "dst_pod"), _orchestrator_type,
          "`kubernetes` when the node-local endpoint has a namespace or pod"),
        F("orchestrator.cluster.name", "str", ("node_name", "src_cluster", "dst_cluster", "traffic_direction",
                                               "is_reply", "reply", "src_pod", "dst_pod"), _cluster,
          "cluster prefix of `node_name` (`cluster/node`), else `src_cluster`/`dst_cluster` of the local endpoint"),
        F("orchestrator.namespace", "str", ("src_namespace", "dst_namespace", "traffic_direction", "is_reply",
                                            "reply", "src_pod", "dst_pod"),
          lambda c: _nonempty(_local(c, "namespace")),
          "namespace of the node-local endpoint: `dst_namespace` for ingress, `src_namespace` for egress "
          "(swapped for replies)"),
        F("orchestrator.resource.type", "str", ("src_pod", "dst_pod", "traffic_direction", "is_reply", "reply"),
          _resource_type, "`pod` when the local endpoint has a pod"),
        F("orchestrator.resource.name", "str", ("src_pod", "dst_pod", "traffic_direction", "is_reply", "reply"),
          lambda c: _nonempty(_local(c, "pod")), "pod of the node-local endpoint (`src_pod` / `dst_pod`)"),
        # L7
        _col_field("http.request.method", "http_method"),
        F("http.response.status_code", "int", ("http_code",), lambda c: _nonzero(c("http_code")),
          "`http_code` (0 = absent)", "long", inverse="http_code"),
        F("http.version", "str", ("http_protocol",), _http_version, "`http_protocol` without `HTTP/`",
          inverse="http_protocol", decode=lambda v: v if v.startswith("HTTP") else f"HTTP/{v}"),
        _col_field("url.original", "http_url"),
        F("url.scheme", "str", ("http_url",), lambda c: _url(c, "scheme"), "scheme of `http_url`"),
        F("url.domain", "str", ("http_url",), _url_domain, "host of `http_url`"),
        F("url.port", "int", ("http_url",), _url_port, "port of `http_url`", "long"),
        F("url.path", "str", ("http_url",), lambda c: _url(c, "path"), "path of `http_url`"),
        F("url.query", "str", ("http_url",), lambda c: _url(c, "query"), "query of `http_url` (without `?`)"),
        _col_field("user_agent.original", "http_user_agent"),
        F("dns.type", "str", ("dns_query", "l7_type"), _dns_type, "`query` (l7_type REQUEST) / `answer` (RESPONSE)"),
        F("dns.question.name", "str", ("dns_query",), _dns_name, "`dns_query` without the trailing dot"),
        F("dns.question.type", "str", ("dns_qtypes",), lambda c: _first(c("dns_qtypes")), "first of `dns_qtypes`"),
        F("dns.response_code", "str", ("dns_rcode", "l7_type"), _dns_rcode_name,
          "`dns_rcode` as its name (NOERROR, NXDOMAIN, SERVFAIL…), not on requests"),
        _col_field("dns.resolved_ip", "dns_ips", "list", es_type="ip"),
        F("related.ip", "list", ("ip_src", "ip_dst", "ip_src_xlated"), _related_ips,
          "distinct of `ip_src`, `ip_dst`, `ip_src_xlated`", "ip"),
        # flowship.* — what ECS has no field for
        _col_field("flowship.verdict", "verdict"),
        _col_field("flowship.drop_reason", "drop_reason"),
        _col_field("flowship.drop_reason_code", "drop_reason_code", "int"),
        _col_field("flowship.kernel_drop_reason", "kernel_drop_reason"),
        _col_field("flowship.flow_type", "flow_type"),
        _col_field("flowship.flow_event", "flow_event"),
        _col_field("flowship.event_type", "event_type", "int"),
        _col_field("flowship.event_subtype", "event_subtype", "int"),
        _col_field("flowship.trace_point", "trace_point"),
        _col_field("flowship.trace_reason", "trace_reason"),
        _col_field("flowship.is_reply", "is_reply", "bool"),
        _col_field("flowship.reply", "reply", "bool"),
        _col_field("flowship.policy_match_type", "policy_match_type", "int"),
        _col_field("flowship.interface.index", "interface_index", "int"),
        _col_field("flowship.interface.name", "interface_name"),
        _col_field("flowship.proxy_port", "proxy_port", "int"),
        _col_field("flowship.socket_cookie", "socket_cookie", "int", es_type="unsigned_long"),
        _col_field("flowship.cgroup_id", "cgroup_id", "int", es_type="unsigned_long"),
        _col_field("flowship.ip_encrypted", "ip_encrypted", "bool"),
        _col_field("flowship.icmp.type", "icmp_type", "int"),
        _col_field("flowship.icmp.code", "icmp_code", "int"),
        _col_field("flowship.tcp.flags_raw", "tcp_flags", "int"),
        F("flowship.tcp.flags", "list", ("tcp_flags",), _tcp_flag_names, "names of the bits set in `tcp_flags`"),
        _col_field("flowship.tcp.handshake_ns", "tcp_handshake_ns", "int"),
        _col_field("flowship.server_time_ns", "server_time_ns", "int"),
        *_endpoint_fields("source", "src"),
        *_endpoint_fields("destination", "dst"),
        _col_field("flowship.l7.type", "l7_type"),
        _col_field("flowship.l7.latency_ns", "l7_latency_ns", "int"),
        _col_field("flowship.dns.query", "dns_query"),
        _col_field("flowship.dns.rcode", "dns_rcode", "int"),
        _col_field("flowship.dns.qtypes", "dns_qtypes", "list"),
        _col_field("flowship.dns.rrtypes", "dns_rrtypes", "list"),
        _col_field("flowship.dns.cnames", "dns_cnames", "list"),
        _col_field("flowship.dns.ttl", "dns_ttl", "int"),
        _col_field("flowship.dns.observation_source", "dns_observation_source"),
        _col_field("flowship.node_labels", "node_labels", "list"),
        _col_field("flowship.sample_rate", "sample_rate", "int"),
        _col_field("flowship.summary", "summary"),
        _col_field("flowship.hubble_aggregate.ingress_count", "aggregate_ingress_count", "int"),
        _col_field("flowship.hubble_aggregate.egress_count", "aggregate_egress_count", "int"),
        _col_field("flowship.hubble_aggregate.unknown_count", "aggregate_unknown_count", "int"),
    ]
    return tuple(replace(f, per_row=f.path in _PER_ROW) for f in fields)


FLOW_FIELDS: tuple[Field, ...] = _build_flow_fields()

# Flow columns deliberately not exported to ECS (privacy or no useful meaning in a SIEM).
NOT_EXPORTED: tuple[str, ...] = ("http_headers",)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def _applicable(batch: pa.RecordBatch, fields: Iterable[Field], aggregates: bool = False) -> list[Field]:
    names = set(batch.schema.names)
    return [f for f in fields if all(n in names for n in f.needs) and not (aggregates and f.flow_only)]


def _field_arrays(batch: pa.RecordBatch, fields: Sequence[Field]) -> list[pa.Array]:
    cols = _Cols(batch)
    out = []
    for f in fields:
        arr = f.compute(cols)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        out.append(arr)
    return out


def _set_path(doc: dict, path: tuple[str, ...], value: Any) -> None:
    node = doc
    for key in path[:-1]:
        nxt = node.get(key)
        if nxt is None:
            nxt = node[key] = {}
        node = nxt
    node[path[-1]] = value


def _documents(fields: Sequence[Field], arrays: Sequence[pa.Array], n: int) -> list[dict]:
    docs: list[dict] = [{} for _ in range(n)]
    for f, arr in zip(fields, arrays, strict=True):
        path = tuple(f.path.split("."))
        values = arr.to_pylist()
        skip_empty = f.kind == "list"
        if len(path) == 1:
            key = path[0]
            for doc, v in zip(docs, values, strict=True):
                if v is None or (skip_empty and not v):
                    continue
                doc[key] = v
        else:
            for doc, v in zip(docs, values, strict=True):
                if v is None or (skip_empty and not v):
                    continue
                _set_path(doc, path, v)
    return docs


def to_documents(batch: pa.RecordBatch) -> list[dict]:
    """One nested ECS document (dict) per flow row; absent values are left out."""
    fields = _applicable(batch, FLOW_FIELDS)
    return _documents(fields, _field_arrays(batch, fields), batch.num_rows)


def _needs_escape(arr: pa.Array) -> bool:
    """Whether any value holds a quote, a backslash or a control character."""
    if len(arr) == 0 or arr.null_count == len(arr):
        return False
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=width, count=len(arr) + 1,
                            offset=arr.offset * np.dtype(width).itemsize)
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi <= lo:
        return False
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8, count=hi - lo, offset=lo)
    return bool(np.any((data < 0x20) | (data == 0x22) | (data == 0x5C)))


def _json_strings(arr: pa.Array, distinct: bool = False) -> pa.Array:
    """String values as JSON string literals (quoted, escaped); null stays null.

    ``distinct`` quotes each distinct value once and gathers (cheaper for
    repetitive values such as labels).
    """
    if distinct or _needs_escape(arr):
        encoded = pc.dictionary_encode(arr)
        values = encoded.dictionary
        if _needs_escape(values):
            literals = pa.array([orjson.dumps(v).decode() for v in values.to_pylist()], pa.string())
        else:
            literals = pc.binary_join_element_wise('"', values, '"', "")
        return literals.take(encoded.indices)
    return pc.binary_join_element_wise('"', arr, '"', "")


def _json_values(f: Field, arr: pa.Array) -> pa.Array:
    """JSON text of each value (null where the field is absent)."""
    if f.kind == "str":
        if not pa.types.is_string(arr.type):
            arr = arr.cast(pa.string())
        return _json_strings(arr)
    if f.kind == "int":
        return arr.cast(pa.string())
    if f.kind == "bool":
        return pc.if_else(arr, pa.scalar("true"), pa.scalar("false"))
    # list of strings: quote the flattened values, rebuild the lists, join
    if pa.types.is_large_list(arr.type):
        arr = arr.cast(pa.list_(pa.string()))
    nonempty = pc.greater(pc.list_value_length(arr), 0)
    flat = arr.values
    if not pa.types.is_string(flat.type):
        flat = flat.cast(pa.string())
    offsets = arr.offsets
    start = offsets[0].as_py()
    end = offsets[-1].as_py()
    literals = _json_strings(flat.slice(start, end - start), distinct=True)
    rebased = pc.subtract(offsets, pa.scalar(start, offsets.type)) if start else offsets
    rebuilt = pa.ListArray.from_arrays(rebased, literals)
    joined = pc.binary_join(rebuilt, ",")
    text = pc.binary_join_element_wise("[", joined, "]", "")
    return pc.if_else(pc.and_(nonempty, pc.is_valid(arr)).fill_null(False), text, pa.scalar(None, pa.string()))


def _is_low(node: Field | dict) -> bool:
    if isinstance(node, Field):
        return not node.per_row
    return all(_is_low(child) for child in node.values())


def _needs_of(node: Field | dict) -> set[str]:
    if isinstance(node, Field):
        return set(node.needs)
    return set().union(*(_needs_of(child) for child in node.values())) if node else set()


class _Renderer:
    """Builds ECS JSON text column by column.

    Members of an object are emitted as text pieces; a comma goes before a
    member only where an earlier sibling is present, so nothing is trimmed
    afterwards and each document is concatenated once. Consecutive members
    that do not vary per row (a run) are rendered once per distinct
    combination of their input columns and gathered, which keeps repetitive
    content (pod labels, namespaces, verdicts) off the per-row path.
    """

    def __init__(self, batch: pa.RecordBatch, fields: Sequence[Field]) -> None:
        self.batch = batch
        self.n = batch.num_rows
        self.cols = _Cols(batch)
        self.tree: dict = {}
        for f in fields:
            node = self.tree
            path = f.path.split(".")
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = f
        self._codes: dict[str, tuple[np.ndarray, int]] = {}

    def render(self) -> pa.Array:
        pieces: list[pa.Array] = []
        self._members(self.tree, pieces, self.cols, runs=True)
        parts = [p.fill_null("") for p in pieces if p is not None and p.null_count < len(p)]
        return pc.binary_join_element_wise("{", *parts, "}", "")

    # -- members ---------------------------------------------------------------------------
    def _members(self, tree: dict, out: list, cols: _Cols, runs: bool) -> pa.Array:
        """Append the pieces of an object's members to ``out``; return its presence mask."""
        before: pa.Array | None = None
        items = list(tree.items())
        i = 0
        while i < len(items):
            if runs and _is_low(items[i][1]):
                j = i
                while j < len(items) and _is_low(items[j][1]):
                    j += 1
                text = self._run(dict(items[i:j]))
                present = pc.not_equal(text, "")
                piece = text
                i = j
            else:
                key, node = items[i]
                i += 1
                key_json = orjson.dumps(key).decode()
                if isinstance(node, dict):
                    inner: list = []
                    present = self._members(node, inner, cols, runs)
                    piece = [_when(present, f"{key_json}:{{"), *inner, _when(present, "}")]
                else:
                    values = _json_values(node, self._compute(node, cols))
                    present = pc.is_valid(values)
                    piece = pc.binary_join_element_wise(f"{key_json}:", values, "")
            if before is None:
                before = present
            else:
                out.append(_when(pc.and_(before, present), ","))
                before = pc.or_(before, present)
            if isinstance(piece, list):
                out.extend(piece)
            else:
                out.append(piece)
        return before if before is not None else pa.array([False] * cols.n, pa.bool_())

    @staticmethod
    def _compute(f: Field, cols: _Cols) -> pa.Array:
        arr = f.compute(cols)
        return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr

    def _text(self, tree: dict, cols: _Cols) -> pa.Array:
        """Members of ``tree`` as one text column (no braces; '' when none is present)."""
        pieces: list = []
        self._members(tree, pieces, cols, runs=False)
        parts = [p.fill_null("") for p in pieces if p is not None]
        if not parts:
            return pa.array([""] * cols.n, pa.string())
        if len(parts) == 1:
            return parts[0]
        return pc.binary_join_element_wise(*parts, "")

    # -- runs of members that repeat across rows -------------------------------------------
    def _run(self, tree: dict) -> pa.Array:
        needs = sorted(_needs_of(tree))
        key = np.zeros(self.n, dtype=np.int64)
        for name in needs:
            codes, card = self._column_codes(name)
            if card > 1:
                key = key * card + codes
                if card and key.max(initial=0) > (1 << 40):
                    _, key = np.unique(key, return_inverse=True)
                    key = key.reshape(-1).astype(np.int64)
        distinct, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        if len(distinct) * 2 > self.n:
            return self._text(tree, self.cols)
        sub = self.batch.take(pa.array(first, pa.int64()))
        text = self._text(tree, _Cols(sub))
        return text.take(pa.array(inverse.reshape(-1), pa.int64()))

    def _column_codes(self, name: str) -> tuple[np.ndarray, int]:
        if name not in self._codes:
            arr = self.batch.column(name)
            if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                if pa.types.is_string(arr.type.value_type):
                    arr = pc.binary_join(arr, "\x1f")
                else:
                    arr = pa.array([None if v is None else orjson.dumps(v).decode() for v in arr.to_pylist()],
                                   pa.string())
            encoded = pc.dictionary_encode(arr, null_encoding="encode")
            codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            self._codes[name] = (codes, len(encoded.dictionary))
        return self._codes[name]


def ndjson_array(batch: pa.RecordBatch) -> pa.Array:
    """Every flow as one ECS JSON document (no newline), as an Arrow string array."""
    if batch.num_rows == 0:
        return pa.array([], pa.string())
    return _Renderer(batch, _applicable(batch, FLOW_FIELDS)).render()


def encode_documents(batch: pa.RecordBatch, kind: str = "flows") -> list[bytes]:
    """Each row as one ECS JSON document (UTF-8 bytes, no newline).

    ``kind`` is the envelope kind: ``"flows"`` or ``"aggregates"``.
    """
    if batch.num_rows == 0:
        return []
    if kind != "flows":
        return [orjson.dumps(doc) for doc in aggregate_documents(batch)]
    return ndjson_array(batch).cast(pa.binary()).to_pylist()


def encode_ndjson(batch: pa.RecordBatch, kind: str = "flows") -> list[bytes]:
    """Each row as one ECS JSON line (UTF-8 bytes ending in a newline)."""
    if batch.num_rows == 0:
        return []
    if kind != "flows":
        return [orjson.dumps(doc) + b"\n" for doc in aggregate_documents(batch)]
    lines = pc.binary_join_element_wise(ndjson_array(batch), "\n", "")
    return lines.cast(pa.binary()).to_pylist()


# ---------------------------------------------------------------------------------------------
# Aggregate rows
# ---------------------------------------------------------------------------------------------

_WINDOW_START = ("window_start", "start_time", "start", "time")
_WINDOW_END = ("window_end", "end_time", "end")


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def aggregate_documents(batch: pa.RecordBatch) -> list[dict]:
    """ECS documents for aggregate rows (``kind="aggregates"``), whatever their columns.

    Window bounds become ``@timestamp`` (the window start), ``event.start`` and
    ``event.end``; flow columns the aggregate kept as group keys are mapped as
    for flows (``src_namespace`` → ``flowship.source.namespace``...); every
    other column (counts, sums, percentiles) goes under ``flowship.aggregate``.
    """
    n = batch.num_rows
    names = batch.schema.names
    start_col = next((c for c in _WINDOW_START if c in names), None)
    end_col = next((c for c in _WINDOW_END if c in names), None)
    fields = [f for f in _applicable(batch, FLOW_FIELDS, aggregates=True)
              if f.path not in ("@timestamp", "event.start", "event.end", "event.duration")]
    docs = _documents(fields, _field_arrays(batch, fields), n)
    used = {col for f in fields for col in f.needs}
    used.update(c for c in (start_col, end_col) if c)
    # the aggregate stage's direction-independent service port is the destination port of requests
    server_ports = batch.column("server_port").to_pylist() if "server_port" in names and "dst_port" not in names \
        else None
    if server_ports is not None:
        used.add("server_port")
    starts = rfc3339(batch.column(start_col)).to_pylist() if start_col else [None] * n
    ends = rfc3339(batch.column(end_col)).to_pylist() if end_col else [None] * n
    extra = [(name, rfc3339(batch.column(name)).to_pylist() if pa.types.is_timestamp(batch.schema.field(name).type)
              else batch.column(name).to_pylist()) for name in names if name not in used]
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    out = []
    for i, doc in enumerate(docs):
        head: dict[str, Any] = {"@timestamp": starts[i] or ends[i] or now, "ecs": {"version": ECS_VERSION}}
        event: dict[str, Any] = {"kind": "metric", "category": ["network"], "type": ["info"],
                                 "dataset": AGGREGATES_DATASET, "module": "flowship"}
        if starts[i]:
            event["start"] = starts[i]
        if ends[i]:
            event["end"] = ends[i]
        head["event"] = event
        aggregate = {name: _plain(values[i]) for name, values in extra if values[i] is not None}
        for key, value in doc.items():
            if key in head and isinstance(value, dict):
                head[key].update(value)
            else:
                head[key] = value
        if server_ports is not None and server_ports[i] is not None:
            head.setdefault("destination", {})["port"] = server_ports[i]
        if aggregate:
            head.setdefault("flowship", {})["aggregate"] = aggregate
        out.append(head)
    return out


# ---------------------------------------------------------------------------------------------
# Back from ECS to flow columns
# ---------------------------------------------------------------------------------------------

def _get_path(doc: dict, path: tuple[str, ...]) -> Any:
    node: Any = doc
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
        if node is None:
            # tolerate flattened keys ("source.ip") written by other producers
            return None
    return node


def _lookup(doc: dict, dotted: str, path: tuple[str, ...]) -> Any:
    value = _get_path(doc, path)
    if value is None and dotted in doc:
        value = doc[dotted]
    return value


_RESTORABLE = tuple((f, tuple(f.path.split(".")), f.inverse) for f in FLOW_FIELDS if f.inverse)


def _document_row(doc: dict) -> dict:
    """Flow columns of one ECS document (times as ns integers)."""
    row: dict[str, Any] = {}
    for f, path, column in _RESTORABLE:
        value = _lookup(doc, f.path, path)
        if value is None:
            continue
        row[column] = f.decode(value) if f.decode else value
    if row.get("time") is None:
        raise ValueError("document has no @timestamp")
    return row


def documents_to_flows(docs: Sequence[dict]) -> pa.RecordBatch:
    """Flow rows from ECS documents, for every column the mapping can restore.

    Raises ValueError when a document lacks ``@timestamp``, and Arrow errors
    when a value has the wrong type.
    """
    return _rows_to_batch([_document_row(doc) for doc in docs])


def _rows_to_batch(rows: list[dict]) -> pa.RecordBatch:
    """Flat rows (times as ns integers) → a complete FLOW_SCHEMA batch."""
    from exporter.model.ids import complete

    arrays = []
    for field in FLOW_SCHEMA:
        values = [row.get(field.name) for row in rows]
        if field.name == "uuid":
            values = [v if v is not None else "" for v in values]
        if pa.types.is_timestamp(field.type):
            arrays.append(pa.array(values, pa.int64()).cast(field.type))
        else:
            arrays.append(pa.array(values, type=field.type))
    return complete(pa.RecordBatch.from_arrays(arrays, schema=FLOW_SCHEMA))


_DECODE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, OverflowError, pa.ArrowException)


def decode_ndjson(lines: Sequence[bytes | str]) -> tuple[pa.RecordBatch, list[tuple[int, str]]]:
    """Parse ECS JSON documents back into a flow batch.

    Returns the batch of the decodable documents and ``(index, reason)`` for
    every line that could not be decoded.
    """
    rows: list[dict] = []
    indexes: list[int] = []
    bad: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        try:
            doc = orjson.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            rows.append(_document_row(doc))
            indexes.append(i)
        except orjson.JSONDecodeError as exc:
            bad.append((i, f"invalid JSON: {exc}"))
        except _DECODE_ERRORS as exc:
            bad.append((i, f"{type(exc).__name__}: {exc}"))
    try:
        return _rows_to_batch(rows), bad
    except _DECODE_ERRORS:
        good = []
        for i, row in zip(indexes, rows, strict=True):
            try:
                _rows_to_batch([row])
                good.append(row)
            except _DECODE_ERRORS as exc:
                bad.append((i, f"wrong value type: {exc}"))
        bad.sort()
        return _rows_to_batch(good), bad


# ---------------------------------------------------------------------------------------------
# Index template mapping and documentation
# ---------------------------------------------------------------------------------------------

def es_properties(aggregates: bool = False) -> dict:
    """Elasticsearch/OpenSearch ``mappings.properties`` for the documents this module writes."""
    props: dict = {}
    for f in FLOW_FIELDS:
        node = props
        path = f.path.split(".")
        for key in path[:-1]:
            node = node.setdefault(key, {"properties": {}})["properties"]
        mapping: dict[str, Any] = {"type": f.es_type}
        if f.es_type == "keyword":
            mapping["ignore_above"] = 1024
        node[path[-1]] = mapping
    props["url"]["properties"]["original"] = {"type": "keyword", "ignore_above": 8191}
    if aggregates:
        props["flowship"]["properties"]["aggregate"] = {"type": "object", "dynamic": True}
    return props


def field_table() -> list[tuple[str, str, str]]:
    """(ECS field, type, source) rows for docs/ecs.md."""
    return [(f.path, f.es_type, f.source) for f in FLOW_FIELDS]
