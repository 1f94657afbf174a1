"""The ECS mapping table: which ECS field comes from which flow columns, and how.

:data:`FLOW_FIELDS` is read by :mod:`flowship.model.ecs_encode` (documents out),
:mod:`flowship.model.ecs_decode` (documents back to flow columns), the
Elasticsearch index template (:func:`es_properties`) and docs/ecs.md
(:func:`field_table`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from flowship.model.columns import nonempty, nonzero
from flowship.model.ids import IANA_PROTO
from flowship.model.schema import TCP_FLAG_BITS
from flowship.model.times import nanos_times

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


class Cols:
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


def when(mask: pa.Array, value: pa.Array | str) -> pa.Array:
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

def _reply(c: Cols) -> pa.Array:
    return c.cached("reply", lambda: pc.coalesce(c("is_reply"), c("reply"), pa.scalar(False)))


def _local_is_dst(c: Cols) -> pa.Array:
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


def _local(c: Cols, suffix: str) -> pa.Array:
    return pc.if_else(_local_is_dst(c), c(f"dst_{suffix}"), c(f"src_{suffix}"))


def _verdict_type(c: Cols) -> pa.Array:
    v = c("verdict")
    allowed = pc.is_in(v, value_set=pa.array(_ALLOWED))
    return pc.if_else(allowed, pa.scalar("allowed"),
                      pc.if_else(pc.equal(v, "DROPPED"), pa.scalar("denied"),
                                 pc.if_else(pc.equal(v, "ERROR"), pa.scalar("error"),
                                            pa.scalar(None, pa.string()))))


def _flag_set(c: Cols, name: str) -> pa.Array:
    return pc.not_equal(pc.bit_wise_and(c("tcp_flags"), pa.scalar(TCP_FLAG_BITS[name], pa.uint16())), 0)


def _protocol(c: Cols) -> pa.Array:
    def compute() -> pa.Array:
        is_http = pc.or_(pc.or_(pc.is_valid(c("http_method")), pc.is_valid(c("http_url"))),
                         pc.is_valid(nonzero(c("http_code"))))
        is_dns = pc.is_valid(c("dns_query"))
        return pc.if_else(is_http, pa.scalar("http"),
                          pc.if_else(is_dns, pa.scalar("dns"), pa.scalar(None, pa.string())))
    return c.cached("protocol", compute)


def _l7_kind(c: Cols) -> pa.Array:
    """'request' / 'response' from l7_type (REQUEST / RESPONSE), else null."""
    t = pc.utf8_lower(c("l7_type"))
    return pc.if_else(pc.is_in(t, value_set=pa.array(["request", "response"])), t, pa.scalar(None, pa.string()))


def _event_type(c: Cols) -> pa.Array:
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
        when(starts, "start"),
        when(ends, "end"),
        when(pc.is_valid(_protocol(c)), "protocol"),
    ], n)


def _event_action(c: Cols) -> pa.Array:
    protocol = _protocol(c)
    kind = _l7_kind(c)
    l7 = pc.binary_join_element_wise(protocol, pc.coalesce(kind, pa.scalar("event")), "_")
    l7 = pc.if_else(pc.equal(l7, "dns_request").fill_null(False), pa.scalar("dns_query"), l7)
    verdict = c("verdict")
    return pc.if_else(pc.equal(verdict, "DROPPED").fill_null(False), pa.scalar("flow_dropped"),
                      pc.if_else(pc.equal(verdict, "ERROR").fill_null(False), pa.scalar("flow_error"),
                                 pc.coalesce(l7, pa.scalar("network_flow"))))


def _event_outcome(c: Cols) -> pa.Array:
    verdict = c("verdict")
    failed = pc.is_in(verdict, value_set=pa.array(["DROPPED", "ERROR"])).fill_null(False)
    http_failed = pc.greater_equal(c("http_code"), 400).fill_null(False)
    dns_failed = pc.and_(pc.equal(_l7_kind(c), "response"),
                         pc.not_equal(c("dns_rcode"), 0)).fill_null(False)
    unknown = pc.or_(pc.is_null(verdict), pc.equal(verdict, "VERDICT_UNKNOWN")).fill_null(True)
    return pc.if_else(pc.or_(failed, pc.or_(http_failed, dns_failed)), pa.scalar("failure"),
                      pc.if_else(unknown, pa.scalar("unknown"), pa.scalar("success")))


def _duration(c: Cols) -> pa.Array:
    start = c("start_time").cast(pa.int64())
    end = c("time").cast(pa.int64())
    return pc.subtract(end, start)


def _mac(arr: pa.Array) -> pa.Array:
    return pc.replace_substring(pc.utf8_upper(nonempty(arr)), ":", "-")


def _url(c: Cols, part: str) -> pa.Array:
    parsed = c.cached("url", lambda: _per_distinct(c("http_url"), lambda d: pc.extract_regex(d, _URL_RE)))
    value = nonempty(pc.struct_field(parsed, part))
    if part == "authority":
        return _per_distinct(value, lambda d: pc.extract_regex(
            d, r"^(?:[^@]*@)?(?P<host>\[[^\]]*\]|[^:]*)(?::(?P<port>[0-9]+))?$"))
    return value


def _url_domain(c: Cols) -> pa.Array:
    host = pc.struct_field(_url(c, "authority"), "host")
    return nonempty(pc.utf8_trim(host, characters="[]"))


def _url_port(c: Cols) -> pa.Array:
    port = nonempty(pc.struct_field(_url(c, "authority"), "port"))
    return pc.cast(port, pa.int64())


def _cluster(c: Cols) -> pa.Array:
    node = c("node_name")
    has_prefix = pc.match_substring(node, "/").fill_null(False)
    prefix = pc.struct_field(pc.extract_regex(node, r"^(?P<cluster>[^/]+)/"), "cluster")
    local = _local(c, "cluster")
    other = pc.if_else(_local_is_dst(c), c("src_cluster"), c("dst_cluster"))
    return pc.if_else(has_prefix, prefix, pc.coalesce(nonempty(local), nonempty(other)))


def _related_ips(c: Cols) -> pa.Array:
    src, dst, xl = nonempty(c("ip_src")), nonempty(c("ip_dst")), nonempty(c("ip_src_xlated"))
    dst = pc.if_else(pc.equal(dst, src).fill_null(False), pa.scalar(None, pa.string()), dst)
    same = pc.or_(pc.equal(xl, src).fill_null(False), pc.equal(xl, dst).fill_null(False))
    xl = pc.if_else(same, pa.scalar(None, pa.string()), xl)
    return _row_lists([src, dst, xl], c.n)


def _tcp_flag_names(c: Cols) -> pa.Array:
    flags = c("tcp_flags")
    cols = [when(_flag_set(c, name), name) for name in TCP_FLAG_BITS]
    lists = _row_lists(cols, c.n)
    return pc.if_else(pc.is_null(flags), pa.scalar(None, lists.type), lists)


def _dns_name(c: Cols) -> pa.Array:
    q = nonempty(c("dns_query"))
    trimmed = pc.utf8_rtrim(q, characters=".")
    return pc.if_else(pc.equal(trimmed, "").fill_null(False), q, trimmed)


def _dns_rcode_name(c: Cols) -> pa.Array:
    names = _map_values(c("dns_rcode").cast(pa.int64()), DNS_RCODES)
    is_request = pc.equal(_l7_kind(c), "request").fill_null(False)
    return pc.if_else(is_request, pa.scalar(None, pa.string()), names)


def _dns_type(c: Cols) -> pa.Array:
    kind = _l7_kind(c)
    value = pc.if_else(pc.equal(kind, "request"), pa.scalar("query"),
                       pc.if_else(pc.equal(kind, "response"), pa.scalar("answer"), pa.scalar(None, pa.string())))
    return when(pc.is_valid(c("dns_query")), value)


def _http_version(c: Cols) -> pa.Array:
    proto = nonempty(c("http_protocol"))
    return pc.if_else(pc.starts_with(proto, "HTTP/").fill_null(False), pc.utf8_slice_codeunits(proto, 5), proto)


def _network_type(c: Cols) -> pa.Array:
    return _map_values(c("ip_version").cast(pa.int64()), {4: "ipv4", 6: "ipv6"})


def _direction(c: Cols) -> pa.Array:
    d = c("traffic_direction")
    lower = pc.utf8_lower(d)
    known = pc.is_in(lower, value_set=pa.array(["ingress", "egress"]))
    return pc.if_else(known, lower, pc.if_else(pc.is_valid(d), pa.scalar("unknown"), pa.scalar(None, pa.string())))


def _resource_type(c: Cols) -> pa.Array:
    return when(pc.is_valid(nonempty(_local(c, "pod"))), "pod")


def _orchestrator_type(c: Cols) -> pa.Array:
    present = pc.or_(pc.is_valid(nonempty(_local(c, "namespace"))), pc.is_valid(nonempty(_local(c, "pod"))))
    return when(present, "kubernetes")


# ---------------------------------------------------------------------------------------------
# The mapping table
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One ECS field: where it comes from, how it is typed, how to restore it."""

    path: str
    kind: Kind
    needs: tuple[str, ...]
    compute: Callable[[Cols], pa.Array]
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

    def compute(c: Cols) -> pa.Array:
        arr = c(column)
        if kind in ("str",) and pa.types.is_string(arr.type):
            arr = nonempty(arr)
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


def _address_fields(side: str, prefix: str, bytes_column: str, packets_column: str) -> list[Field]:
    """ECS ``source.*`` / ``destination.*``: address, port, MAC, first name and what that side sent."""
    names = f"{prefix}_names"
    return [
        _col_field(f"{side}.ip", f"ip_{prefix}", es_type="ip"),
        _col_field(f"{side}.port", f"{prefix}_port", "int"),
        _col_field(f"{side}.mac", f"eth_{prefix}", transform=_mac, decode=lambda v: v.lower().replace("-", ":")),
        Field(f"{side}.domain", "str", (names,), lambda c: _first(c(names)), f"first of `{names}`"),
        _col_field(f"{side}.bytes", bytes_column, "int"),
        _col_field(f"{side}.packets", packets_column, "int"),
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
        F("@timestamp", "str", ("time",), lambda c: nanos_times(c("time")),
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
        F("event.start", "str", ("start_time",), lambda c: nanos_times(c("start_time")),
          "`start_time` (RFC 3339)", "date_nanos", inverse="start_time", decode=_parse_ts),
        F("event.end", "str", ("time", "start_time"),
          lambda c: when(pc.is_valid(c("start_time")), nanos_times(c("time"))),
          "`time`, when `start_time` is set (the flow covers start..end)", "date_nanos"),
        F("event.duration", "int", ("time", "start_time"), _duration, "`time − start_time` in ns", "long"),
        # source / destination
        *_address_fields("source", "src", "bytes", "packets"),
        _col_field("source.nat.ip", "ip_src_xlated", es_type="ip"),
        *_address_fields("destination", "dst", "reply_bytes", "reply_packets"),
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
          lambda c: nonempty(_local(c, "namespace")),
          "namespace of the node-local endpoint: `dst_namespace` for ingress, `src_namespace` for egress "
          "(swapped for replies)"),
        F("orchestrator.resource.type", "str", ("src_pod", "dst_pod", "traffic_direction", "is_reply", "reply"),
          _resource_type, "`pod` when the local endpoint has a pod"),
        F("orchestrator.resource.name", "str", ("src_pod", "dst_pod", "traffic_direction", "is_reply", "reply"),
          lambda c: nonempty(_local(c, "pod")), "pod of the node-local endpoint (`src_pod` / `dst_pod`)"),
        # L7
        _col_field("http.request.method", "http_method"),
        F("http.response.status_code", "int", ("http_code",), lambda c: nonzero(c("http_code")),
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
