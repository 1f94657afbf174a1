"""Hubble JSON in and out, exactly as Hubble writes it.

Input: one JSON object per line shaped like observer.GetFlowsResponse /
ExportEvent (``{"flow": {...}, "node_name": "...", "time": "..."}``) as
``hubble observe -o jsonpb`` and Hubble's file exporter write; also bare Flow
objects (older CLIs), camelCase keys (protojson's other spelling), a JSON
array of either, ``lost_events`` lines, and fields this version does not know
(ignored, never an error). Each line is decoded on its own, so a malformed
line is reported with its number and reason and nothing else is lost.

Output: protojson with proto field names, enums as names, RFC 3339
timestamps trimmed like protojson (0, 3, 6 or 9 fractional digits), 64-bit
integers as strings, zero values omitted, ``is_reply`` printed even when
false. Values a Hubble Flow has no field for (the agent's byte counters, a
sample rate other than 1...) travel in a top-level ``"flowship"`` object that
Hubble tooling ignores and this decoder reads back.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from exporter.model.ids import complete, digest_uuid
from exporter.model.schema import FLOW_SCHEMA, TCP_FLAG_BITS

# flowship-only columns carried in the "flowship" extension object
EXTENSION_COLUMNS: tuple[str, ...] = (
    "start_time", "flow_event", "kernel_drop_reason", "bytes", "packets", "reply_bytes",
    "reply_packets", "tcp_handshake_ns", "server_time_ns", "sample_rate",
)
_EXT_TIME = frozenset({"start_time"})
_EXT_INT = frozenset({"bytes", "packets", "reply_bytes", "reply_packets", "tcp_handshake_ns",
                      "server_time_ns", "sample_rate"})

_L4_PORTED = ("TCP", "UDP", "SCTP")
_IP_VERSION_IN = {"IPv4": 4, "IPv6": 6, "IP_NOT_USED": None, 1: 4, 2: 6, 0: None}
_IP_VERSION_OUT = {4: "IPv4", 6: "IPv6"}

# protojson enum numbers, for input that writes enums as numbers
_ENUMS: dict[str, dict[int, str]] = {}


def _enum_tables() -> dict[str, dict[int, str]]:
    if not _ENUMS:
        from exporter.proto.flow import flow_pb2

        for key, enum in (("verdict", flow_pb2.Verdict), ("Type", flow_pb2.FlowType),
                          ("drop_reason_desc", flow_pb2.DropReason),
                          ("traffic_direction", flow_pb2.TrafficDirection),
                          ("trace_observation_point", flow_pb2.TraceObservationPoint),
                          ("trace_reason", flow_pb2.TraceReason), ("l7type", flow_pb2.L7FlowType),
                          ("lost_source", flow_pb2.LostEventSource)):
            _ENUMS[key] = {v.number: v.name for v in enum.DESCRIPTOR.values}
    return _ENUMS


def _enum(table: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return _enum_tables()[table].get(value, str(value))
    if isinstance(value, str):
        return value
    raise ValueError(f"enum value must be a name or number, got {value!r}")


# ------------------------------------------------------------------------------------------
# time
# ------------------------------------------------------------------------------------------
_TIME_RE = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|z|[+-]\d\d:\d\d)$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time(value: Any) -> int:
    """RFC 3339 text (or a protojson ``{seconds, nanos}`` object) → ns since the epoch."""
    if isinstance(value, dict):
        return int(value.get("seconds", 0)) * 1_000_000_000 + int(value.get("nanos", 0))
    if not isinstance(value, str):
        raise ValueError(f"timestamp must be RFC 3339 text, got {value!r}")
    m = _TIME_RE.match(value)
    if not m:
        raise ValueError(f"timestamp is not RFC 3339: {value!r}")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    seconds = _seconds(y, mo, d, h, mi, s)
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        seconds -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    nanos = int((frac or "0").ljust(9, "0"))
    return seconds * 1_000_000_000 + nanos


@functools.lru_cache(maxsize=4096)
def _seconds(y: str, mo: str, d: str, h: str, mi: str, s: str) -> int:
    return int((datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=UTC) - _EPOCH).total_seconds())


@functools.lru_cache(maxsize=4096)
def _second_text(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def format_time(ns: int) -> str:
    """ns since the epoch → RFC 3339 as protojson prints it (0/3/6/9 fraction digits)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    base = _second_text(seconds)
    if nanos == 0:
        return base + "Z"
    if nanos % 1_000_000 == 0:
        return f"{base}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{base}.{nanos // 1_000:06d}Z"
    return f"{base}.{nanos:09d}Z"


# ------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------
_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")
# Keys whose proto name itself contains capitals: never rewrite these.
_PROTO_NAMES_WITH_CAPS = frozenset({
    "IP", "Type", "TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6", "VRRP", "IGMP", "ID", "Summary",
    "FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS", "ipVersion",
})


def _snake_keys(obj: Any) -> Any:
    """protojson's camelCase spelling → proto field names (recursively)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k not in _PROTO_NAMES_WITH_CAPS and any(c.isupper() for c in k):
                k = _CAMEL.sub(r"_\1", k).lower()
                if k == "ip_version":
                    k = "ipVersion"
            out[k] = _snake_keys(v)
        return out
    if isinstance(obj, list):
        return [_snake_keys(v) for v in obj]
    return obj


# Keys only protojson's camelCase spelling has; one regex scan per chunk finds them.
_CAMEL_HINTS = re.compile(rb'"(?:nodeName|podName|sourcePort|destinationPort|isReply|trafficDirection|'
                          rb'dropReasonDesc|eventType|latencyNs|lostEvents|sourceNames|traceObservationPoint)"')


def _u64(value: Any) -> int | None:
    """64-bit integers arrive as strings in protojson; accept numbers too."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def _endpoint(prefix: str, ep: dict, row: dict) -> None:
    if not ep:
        return
    if (v := ep.get("ID")) is not None:
        row[prefix + "_id"] = int(v)
    if (v := ep.get("identity")) is not None:
        row[prefix + "_identity"] = int(v)
    if v := ep.get("cluster_name"):
        row[prefix + "_cluster"] = v
    if v := ep.get("namespace"):
        row[prefix + "_namespace"] = v
    if v := ep.get("pod_name"):
        row[prefix + "_pod"] = v
    if v := ep.get("labels"):
        row[prefix + "_labels"] = v
    if v := ep.get("workloads"):
        row[prefix + "_workload"] = v[0].get("name")
        row[prefix + "_workload_kind"] = v[0].get("kind")


def flatten_flow(f: dict, row: dict) -> None:
    """One Flow object (proto field names) → flat columns in ``row``."""
    if (v := f.get("time")) is not None:
        row["time"] = parse_time(v)
    if v := f.get("uuid"):
        row["uuid"] = v
    if (v := f.get("verdict")) is not None:
        row["verdict"] = _enum("verdict", v)
    if v := f.get("drop_reason"):
        row["drop_reason_code"] = int(v)
    if (v := f.get("drop_reason_desc")) is not None:
        row["drop_reason"] = _enum("drop_reason_desc", v)
    if v := f.get("ethernet"):
        row["eth_src"] = v.get("source")
        row["eth_dst"] = v.get("destination")
    if ip := f.get("IP"):
        row["ip_src"] = ip.get("source")
        row["ip_dst"] = ip.get("destination")
        if v := ip.get("source_xlated"):
            row["ip_src_xlated"] = v
        row["ip_version"] = _IP_VERSION_IN.get(ip.get("ipVersion"))
        if ip.get("encrypted"):
            row["ip_encrypted"] = True
    if l4 := f.get("l4"):
        for proto, body in l4.items():
            body = body or {}
            row["l4_protocol"] = proto
            if proto in _L4_PORTED:
                row["src_port"] = body.get("source_port")
                row["dst_port"] = body.get("destination_port")
                if flags := body.get("flags"):
                    mask = 0
                    for name, bit in TCP_FLAG_BITS.items():
                        if flags.get(name):
                            mask |= bit
                    row["tcp_flags"] = mask
            elif proto in ("ICMPv4", "ICMPv6"):
                row["icmp_type"] = body.get("type", 0)
                row["icmp_code"] = body.get("code", 0)
            break
    if src := f.get("source"):
        _endpoint("src", src, row)
    if dst := f.get("destination"):
        _endpoint("dst", dst, row)
    if (v := f.get("Type")) is not None:
        row["flow_type"] = _enum("Type", v)
    if v := f.get("node_name"):
        row["node_name"] = v
    if v := f.get("node_labels"):
        row["node_labels"] = v
    if v := f.get("source_names"):
        row["src_names"] = v
    if v := f.get("destination_names"):
        row["dst_names"] = v
    if l7 := f.get("l7"):
        if (v := l7.get("type")) is not None:
            row["l7_type"] = _enum("l7type", v)
        if v := l7.get("latency_ns"):
            row["l7_latency_ns"] = _u64(v)
        if (http := l7.get("http")) is not None:
            row["http_code"] = http.get("code")
            row["http_method"] = http.get("method")
            row["http_url"] = http.get("url")
            row["http_protocol"] = http.get("protocol")
            if headers := http.get("headers"):
                row["http_headers"] = headers
                for h in headers:
                    if h.get("key", "").lower() == "user-agent":
                        row["http_user_agent"] = h.get("value")
                        break
        if (dns := l7.get("dns")) is not None:
            row["dns_query"] = dns.get("query")
            row["dns_ips"] = dns.get("ips")
            row["dns_ttl"] = dns.get("ttl")
            row["dns_cnames"] = dns.get("cnames")
            row["dns_observation_source"] = dns.get("observation_source")
            row["dns_rcode"] = dns.get("rcode")
            row["dns_qtypes"] = dns.get("qtypes")
            row["dns_rrtypes"] = dns.get("rrtypes")
    if f.get("reply"):
        row["reply"] = True
    if et := f.get("event_type"):
        row["event_type"] = et.get("type", 0)
        if v := et.get("sub_type"):
            row["event_subtype"] = v
    if s := f.get("source_service"):
        row["src_service"] = s.get("name")
        row["src_service_namespace"] = s.get("namespace")
    if s := f.get("destination_service"):
        row["dst_service"] = s.get("name")
        row["dst_service_namespace"] = s.get("namespace")
    if (v := f.get("traffic_direction")) is not None:
        row["traffic_direction"] = _enum("traffic_direction", v)
    if v := f.get("policy_match_type"):
        row["policy_match_type"] = v
    if (v := f.get("trace_observation_point")) is not None:
        row["trace_point"] = _enum("trace_observation_point", v)
    if (v := f.get("trace_reason")) is not None:
        row["trace_reason"] = _enum("trace_reason", v)
    if (v := f.get("is_reply")) is not None:
        row["is_reply"] = v["value"] if isinstance(v, dict) else bool(v)
    if iface := f.get("interface"):
        row["interface_index"] = iface.get("index")
        row["interface_name"] = iface.get("name")
    if v := f.get("proxy_port"):
        row["proxy_port"] = v
    if v := f.get("socket_cookie"):
        row["socket_cookie"] = _u64(v)
    if v := f.get("cgroup_id"):
        row["cgroup_id"] = _u64(v)
    if v := f.get("Summary"):
        row["summary"] = v
    if agg := f.get("aggregate"):
        row["aggregate_ingress_count"] = agg.get("ingress_flow_count")
        row["aggregate_egress_count"] = agg.get("egress_flow_count")
        row["aggregate_unknown_count"] = agg.get("unknown_direction_flow_count")


def _extension(ext: dict, row: dict) -> None:
    for key in EXTENSION_COLUMNS:
        if (v := ext.get(key)) is None:
            continue
        if key in _EXT_TIME:
            row[key] = parse_time(v)
        elif key in _EXT_INT:
            row[key] = _u64(v)
        else:
            row[key] = str(v)
    if v := ext.get("community_id"):
        row["community_id"] = v


@dataclass
class DecodeResult:
    """What one chunk of lines decoded to."""

    batch: pa.RecordBatch
    lost_events: list[dict] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    other_events: int = 0  # node status, agent or debug events: not flows, skipped


def _row_from_object(obj: Any, raw: bytes) -> tuple[dict | None, dict | None]:
    """(flow row, lost event) from one decoded JSON value."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    row: dict[str, Any] = {}
    if "flow" in obj:
        f = obj["flow"]
        if not isinstance(f, dict):
            raise ValueError("'flow' is not an object")
        flatten_flow(f, row)
        if "time" not in row and obj.get("time") is not None:
            row["time"] = parse_time(obj["time"])
        if "node_name" not in row and obj.get("node_name"):
            row["node_name"] = obj["node_name"]
        if ext := obj.get("flowship"):
            _extension(ext, row)
    elif "lost_events" in obj:
        lost = dict(obj["lost_events"] or {})
        lost["source"] = _enum("lost_source", lost.get("source", 0))
        lost["num_events_lost"] = _u64(lost.get("num_events_lost", 0)) or 0
        lost["node_name"] = obj.get("node_name")
        lost["time"] = obj.get("time")
        return None, lost
    elif any(k in obj for k in ("node_status", "agent_event", "debug_event")):
        return None, None
    elif "IP" in obj or "verdict" in obj or "l4" in obj or "time" in obj and "Type" in obj:
        flatten_flow(obj, row)  # a bare Flow, as older CLIs print
    else:
        raise ValueError("neither a flow, a lost_events record nor a known Hubble event")
    if "time" not in row:
        raise ValueError("flow has no time")
    if "uuid" not in row:
        # Same input line, same id: re-reading a file never creates new identities.
        row["uuid"] = digest_uuid(hashlib.blake2b(raw, digest_size=16).hexdigest())
    return row, None


def rows_to_batch(rows: list[dict]) -> pa.RecordBatch:
    """Flat row dicts (times as ns integers) → a complete FLOW_SCHEMA batch."""
    for row in rows:
        row.setdefault("uuid", "")
    return complete(pa.RecordBatch.from_pylist(rows, schema=FLOW_SCHEMA))


def decode_lines(data: bytes, first_line: int = 1, fast: bool = True) -> DecodeResult:
    """Decode a chunk of complete lines (or one JSON array) into a flow batch.

    ``first_line`` is the 1-based number of the chunk's first line in its
    file, so errors point at the right place. Ordinary chunks take the
    columnar fast path (:mod:`exporter.model.hubble_arrow`); anything it
    declines is decoded line by line here, with the same result.
    """
    camel = _CAMEL_HINTS.search(data) is not None
    stripped = data.lstrip()
    if fast and not camel and not stripped.startswith(b"["):
        from exporter.model.hubble_arrow import decode_fast

        batch = decode_fast(data)
        if batch is not None:
            return DecodeResult(batch=batch)
    rows: list[dict] = []
    numbers: list[int] = []  # the line of each row, for errors found when building the batch
    result = DecodeResult(batch=None)  # type: ignore[arg-type]
    if stripped.startswith(b"["):
        items: list[tuple[int, Any, bytes]] = []
        try:
            values = orjson.loads(stripped)
        except orjson.JSONDecodeError as exc:
            result.errors.append((first_line, f"invalid JSON array: {exc}"))
            values = []
        for v in values:
            items.append((first_line, v, orjson.dumps(v)))
        iterator = ((n, v, raw, None) for n, v, raw in items)
    else:
        iterator = _iter_lines(data, first_line)
    loads = orjson.loads
    for number, value, raw, error in iterator:
        if error is not None:
            result.errors.append((number, error))
            continue
        try:
            if value is None:
                value = loads(raw)
            if camel:
                value = _snake_keys(value)
            row, lost = _row_from_object(value, raw)
        except orjson.JSONDecodeError as exc:
            result.errors.append((number, f"invalid JSON: {exc}"))
            continue
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            result.errors.append((number, str(exc) or type(exc).__name__))
            continue
        if row is not None:
            rows.append(row)
            numbers.append(number)
        elif lost is not None:
            result.lost_events.append(lost)
        else:
            result.other_events += 1
    try:
        result.batch = rows_to_batch(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
        # A value of the wrong type somewhere: find the culprits row by row.
        good = []
        for number, row in zip(numbers, rows, strict=True):
            try:
                rows_to_batch([row])
                good.append(row)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as exc:
                result.errors.append((number, f"flow {row.get('uuid')}: value out of range or wrong type: {exc}"))
        result.errors.sort(key=lambda e: e[0])
        result.batch = rows_to_batch(good)
    return result


def _iter_lines(data: bytes, first_line: int):
    number = first_line - 1
    for line in data.split(b"\n"):
        number += 1
        if not line.strip():
            continue
        yield number, None, line, None


# ------------------------------------------------------------------------------------------
# encode
# ------------------------------------------------------------------------------------------
_ENDPOINT_KEYS = (("ID", "_id"), ("identity", "_identity"), ("cluster_name", "_cluster"),
                  ("namespace", "_namespace"), ("labels", "_labels"), ("pod_name", "_pod"))
_ZERO_ENUMS = {"VERDICT_UNKNOWN", "UNKNOWN_TYPE", "TRAFFIC_DIRECTION_UNKNOWN", "UNKNOWN_POINT",
               "DROP_REASON_UNKNOWN", "UNKNOWN_L7_TYPE", "TRACE_REASON_UNKNOWN"}


def _set(d: dict, key: str, value: Any) -> None:
    if not value or (value.__class__ is str and value in _ZERO_ENUMS):
        return
    d[key] = value


def _endpoint_out(col: dict, prefix: str, i: int) -> dict:
    ep: dict[str, Any] = {}
    for key, suffix in _ENDPOINT_KEYS:
        _set(ep, key, col[prefix + suffix][i])
    if name := col[prefix + "_workload"][i]:
        wl = {"name": name}
        _set(wl, "kind", col[prefix + "_workload_kind"][i])
        ep["workloads"] = [wl]
    return ep


def flow_dicts(batch: pa.RecordBatch) -> list[tuple[dict, dict]]:
    """Each row as (Flow object with proto field names, flowship extension object)."""
    col = {name: _column_values(batch, name) for name in batch.schema.names}
    out = []
    flag_items = list(TCP_FLAG_BITS.items())
    for i in range(batch.num_rows):
        f: dict[str, Any] = {"time": format_time(col["time"][i])}
        _set(f, "uuid", col["uuid"][i])
        _set(f, "verdict", col["verdict"][i])
        _set(f, "drop_reason", col["drop_reason_code"][i])
        if col["eth_src"][i] or col["eth_dst"][i]:
            eth: dict[str, Any] = {}
            _set(eth, "source", col["eth_src"][i])
            _set(eth, "destination", col["eth_dst"][i])
            f["ethernet"] = eth
        if col["ip_src"][i] or col["ip_dst"][i]:
            ip: dict[str, Any] = {}
            _set(ip, "source", col["ip_src"][i])
            _set(ip, "source_xlated", col["ip_src_xlated"][i])
            _set(ip, "destination", col["ip_dst"][i])
            _set(ip, "ipVersion", _IP_VERSION_OUT.get(col["ip_version"][i]))
            if col["ip_encrypted"][i]:
                ip["encrypted"] = True
            f["IP"] = ip
        proto = col["l4_protocol"][i]
        if proto:
            body: dict[str, Any] = {}
            if proto in _L4_PORTED:
                _set(body, "source_port", col["src_port"][i])
                _set(body, "destination_port", col["dst_port"][i])
                flags = col["tcp_flags"][i]
                if flags:
                    body["flags"] = {name: True for name, bit in flag_items if flags & bit}
            elif proto in ("ICMPv4", "ICMPv6"):
                _set(body, "type", col["icmp_type"][i])
                _set(body, "code", col["icmp_code"][i])
            f["l4"] = {proto: body}
        f["source"] = _endpoint_out(col, "src", i)
        f["destination"] = _endpoint_out(col, "dst", i)
        _set(f, "Type", col["flow_type"][i])
        _set(f, "node_name", col["node_name"][i])
        _set(f, "node_labels", col["node_labels"][i])
        _set(f, "source_names", col["src_names"][i])
        _set(f, "destination_names", col["dst_names"][i])
        l7_type = col["l7_type"][i]
        has_http = col["http_method"][i] or col["http_code"][i] or col["http_url"][i]
        has_dns = col["dns_query"][i] is not None or col["dns_rcode"][i] is not None
        if l7_type or has_http or has_dns:
            l7: dict[str, Any] = {}
            _set(l7, "type", l7_type)
            if lat := col["l7_latency_ns"][i]:
                l7["latency_ns"] = str(lat)
            if has_dns:
                dns: dict[str, Any] = {}
                for key, name in (("query", "dns_query"), ("ips", "dns_ips"), ("ttl", "dns_ttl"),
                                  ("cnames", "dns_cnames"), ("observation_source", "dns_observation_source"),
                                  ("rcode", "dns_rcode"), ("qtypes", "dns_qtypes"), ("rrtypes", "dns_rrtypes")):
                    _set(dns, key, col[name][i])
                l7["dns"] = dns
            elif has_http:
                http: dict[str, Any] = {}
                for key, name in (("code", "http_code"), ("method", "http_method"), ("url", "http_url"),
                                  ("protocol", "http_protocol"), ("headers", "http_headers")):
                    _set(http, key, col[name][i])
                l7["http"] = http
            f["l7"] = l7
        if col["reply"][i]:
            f["reply"] = True
        et = col["event_type"][i]
        if et is not None:
            event: dict[str, Any] = {}
            _set(event, "type", et)
            _set(event, "sub_type", col["event_subtype"][i])
            f["event_type"] = event
        for prefix, key in (("src", "source_service"), ("dst", "destination_service")):
            if col[prefix + "_service"][i]:
                svc: dict[str, Any] = {}
                _set(svc, "name", col[prefix + "_service"][i])
                _set(svc, "namespace", col[prefix + "_service_namespace"][i])
                f[key] = svc
        _set(f, "traffic_direction", col["traffic_direction"][i])
        _set(f, "policy_match_type", col["policy_match_type"][i])
        _set(f, "trace_observation_point", col["trace_point"][i])
        _set(f, "trace_reason", col["trace_reason"][i])
        _set(f, "drop_reason_desc", col["drop_reason"][i])
        if (reply := col["is_reply"][i]) is not None:
            f["is_reply"] = reply
        if col["interface_index"][i] is not None or col["interface_name"][i]:
            iface: dict[str, Any] = {}
            _set(iface, "index", col["interface_index"][i])
            _set(iface, "name", col["interface_name"][i])
            f["interface"] = iface
        _set(f, "proxy_port", col["proxy_port"][i])
        if v := col["socket_cookie"][i]:
            f["socket_cookie"] = str(v)
        if v := col["cgroup_id"][i]:
            f["cgroup_id"] = str(v)
        _set(f, "Summary", col["summary"][i])
        if any(col[k][i] for k in ("aggregate_ingress_count", "aggregate_egress_count", "aggregate_unknown_count")):
            agg: dict[str, Any] = {}
            _set(agg, "ingress_flow_count", col["aggregate_ingress_count"][i])
            _set(agg, "egress_flow_count", col["aggregate_egress_count"][i])
            _set(agg, "unknown_direction_flow_count", col["aggregate_unknown_count"][i])
            f["aggregate"] = agg
        ext: dict[str, Any] = {}
        for key in EXTENSION_COLUMNS:
            v = col[key][i]
            if v is None or (key == "sample_rate" and v == 1):
                continue
            if key in _EXT_TIME:
                ext[key] = format_time(v)
            elif key in _EXT_INT and key != "sample_rate":
                ext[key] = str(v)
            else:
                ext[key] = v
        out.append((f, ext))
    return out


def _column_values(batch: pa.RecordBatch, name: str) -> list:
    column = batch.column(name)
    if pa.types.is_timestamp(column.type):
        return column.cast(pa.int64()).to_pylist()
    return column.to_pylist()


def encode_lines_slow(batch: pa.RecordBatch, extensions: bool = True) -> list[bytes]:
    """Each flow as one ExportEvent JSON line, one Python dict per row (the reference encoder)."""
    lines = []
    dumps = orjson.dumps
    for f, ext in flow_dicts(batch):
        event: dict[str, Any] = {"flow": f, "node_name": f.get("node_name", ""), "time": f["time"]}
        if extensions and ext:
            event["flowship"] = ext
        lines.append(dumps(event) + b"\n")
    return lines


def encode_lost_event(source: str, count: int, node_name: str, time_ns: int,
                      cpu: int | None = None) -> bytes:
    """A ``lost_events`` line as Hubble writes it."""
    lost: dict[str, Any] = {"source": source, "num_events_lost": str(count)}
    if cpu is not None:
        lost["cpu"] = cpu
    return dumps_line({"lost_events": lost, "node_name": node_name, "time": format_time(time_ns)})


def dumps_line(obj: Any) -> bytes:
    return orjson.dumps(obj) + b"\n"


def as_numpy_time(batch: pa.RecordBatch) -> np.ndarray:
    """The ``time`` column as int64 ns (a convenience for sinks and stages)."""
    return batch.column("time").cast(pa.int64()).to_numpy()


# ------------------------------------------------------------------------------------------
# columnar encode
# ------------------------------------------------------------------------------------------
def encode_text_column(batch: pa.RecordBatch, extensions: bool = True) -> pa.Array:
    """Every row's ExportEvent JSON (without newline) as one Arrow string column.

    The same text :func:`encode_lines_slow` produces (up to key order), built
    with Arrow string kernels; rows with unusual control characters in a string
    are encoded with orjson instead.
    """
    import pyarrow.compute as pc

    from exporter.model import json_columns as jc

    n = batch.num_rows
    c = batch.column

    def s(name: str) -> pa.Array:
        return jc.string(jc.nonzero(c(name)))

    def enum(name: str) -> pa.Array:
        col = c(name)
        zero = pc.is_in(col, pa.array(sorted(_ZERO_ENUMS)))
        return jc.string(pc.if_else(pc.fill_null(zero, False), pa.scalar(None, pa.string()), jc.nonzero(col)))

    def num(name: str) -> pa.Array:
        return jc.number(jc.nonzero(c(name)))

    def q64(name: str) -> pa.Array:
        return jc.quoted_number(jc.nonzero(c(name)))

    def lst(name: str) -> pa.Array:
        return jc.string_list(c(name))

    m = jc.member
    ip_version = pc.if_else(pc.equal(c("ip_version"), 4), "IPv4",
                            pc.if_else(pc.equal(c("ip_version"), 6), "IPv6", pa.scalar(None, pa.string())))
    ip = jc.obj([m("source", s("ip_src")), m("source_xlated", s("ip_src_xlated")), m("destination", s("ip_dst")),
                 m("ipVersion", jc.string(ip_version)), m("encrypted", jc.boolean(jc.nonzero(c("ip_encrypted"))))], n)
    ip = pc.if_else(pc.or_(pc.is_valid(jc.nonzero(c("ip_src"))), pc.is_valid(jc.nonzero(c("ip_dst")))), ip,
                    pa.scalar(None, pa.string()))
    eth = jc.obj([m("source", s("eth_src")), m("destination", s("eth_dst"))], n)

    proto = c("l4_protocol")
    flags_int = c("tcp_flags")
    flag_members = []
    for name, bit in TCP_FLAG_BITS.items():
        has = pc.not_equal(pc.bit_wise_and(pc.fill_null(flags_int, 0), bit), 0)
        flag_members.append(m(name, pc.if_else(has, "true", pa.scalar(None, pa.string()))))
    flags = jc.obj(flag_members, n)
    ported = jc.obj([m("source_port", num("src_port")), m("destination_port", num("dst_port")),
                     m("flags", flags)], n, keep_empty=True)
    ported_no_flags = jc.obj([m("source_port", num("src_port")), m("destination_port", num("dst_port"))], n,
                             keep_empty=True)
    icmp = jc.obj([m("type", num("icmp_type")), m("code", num("icmp_code"))], n, keep_empty=True)
    is_tcp = pc.equal(proto, "TCP")
    is_ported = pc.is_in(proto, pa.array(["TCP", "UDP", "SCTP"]))
    is_icmp = pc.is_in(proto, pa.array(["ICMPv4", "ICMPv6"]))
    body = pc.if_else(is_tcp, ported, pc.if_else(is_ported, ported_no_flags,
                                                   pc.if_else(is_icmp, icmp, "{}")))
    l4 = pc.binary_join_element_wise('{"', proto, '":', body, "}", "")

    def endpoint(prefix: str) -> pa.Array:
        workload = jc.obj([m("name", s(f"{prefix}_workload")), m("kind", s(f"{prefix}_workload_kind"))], n)
        workloads = pc.binary_join_element_wise("[", workload, "]", "")
        return jc.obj([m("ID", num(f"{prefix}_id")), m("identity", num(f"{prefix}_identity")),
                       m("cluster_name", s(f"{prefix}_cluster")), m("namespace", s(f"{prefix}_namespace")),
                       m("labels", lst(f"{prefix}_labels")), m("pod_name", s(f"{prefix}_pod")),
                       m("workloads", pc.if_else(pc.is_valid(jc.nonzero(c(f"{prefix}_workload"))), workloads,
                                                 pa.scalar(None, pa.string())))], n, keep_empty=True)

    def service(prefix: str) -> pa.Array:
        svc = jc.obj([m("name", s(f"{prefix}_service")), m("namespace", s(f"{prefix}_service_namespace"))], n)
        return pc.if_else(pc.is_valid(jc.nonzero(c(f"{prefix}_service"))), svc, pa.scalar(None, pa.string()))

    headers = jc.object_list(c("http_headers"), lambda st: jc.obj(
        [m("key", jc.string(jc.nonzero(pc.struct_field(st, "key")))),
         m("value", jc.string(jc.nonzero(pc.struct_field(st, "value"))))], len(st), keep_empty=True))
    http = jc.obj([m("code", num("http_code")), m("method", s("http_method")), m("url", s("http_url")),
                   m("protocol", s("http_protocol")), m("headers", headers)], n, keep_empty=True)
    dns = jc.obj([m("query", s("dns_query")), m("ips", lst("dns_ips")), m("ttl", num("dns_ttl")),
                  m("cnames", lst("dns_cnames")), m("observation_source", s("dns_observation_source")),
                  m("rcode", num("dns_rcode")), m("qtypes", lst("dns_qtypes")), m("rrtypes", lst("dns_rrtypes"))],
                 n, keep_empty=True)
    has_dns = pc.or_(pc.is_valid(c("dns_query")), pc.is_valid(c("dns_rcode")))
    has_http = pc.or_(pc.or_(pc.is_valid(jc.nonzero(c("http_method"))), pc.is_valid(jc.nonzero(c("http_code")))),
                      pc.is_valid(jc.nonzero(c("http_url"))))
    record = pc.if_else(has_dns, m("dns", dns), pc.if_else(has_http, m("http", http), pa.scalar(None, pa.string())))
    l7 = jc.obj([m("type", enum("l7_type")), m("latency_ns", q64("l7_latency_ns")), record], n)

    event = jc.obj([m("type", jc.number(c("event_type"))), m("sub_type", num("event_subtype"))], n, keep_empty=True)
    event = pc.if_else(pc.is_valid(c("event_type")), event, pa.scalar(None, pa.string()))
    iface = jc.obj([m("index", num("interface_index")), m("name", s("interface_name"))], n, keep_empty=True)
    iface = pc.if_else(pc.or_(pc.is_valid(c("interface_index")), pc.is_valid(jc.nonzero(c("interface_name")))),
                       iface, pa.scalar(None, pa.string()))
    agg = jc.obj([m("ingress_flow_count", num("aggregate_ingress_count")),
                  m("egress_flow_count", num("aggregate_egress_count")),
                  m("unknown_direction_flow_count", num("aggregate_unknown_count"))], n)
    time_text = jc.string(jc.rfc3339(c("time")))
    flow = jc.obj([
        m("time", time_text), m("uuid", s("uuid")), m("verdict", enum("verdict")),
        m("drop_reason", num("drop_reason_code")), m("ethernet", eth), m("IP", ip),
        m("l4", pc.if_else(pc.is_valid(jc.nonzero(proto)), l4, pa.scalar(None, pa.string()))),
        m("source", endpoint("src")), m("destination", endpoint("dst")), m("Type", enum("flow_type")),
        m("node_name", s("node_name")), m("node_labels", lst("node_labels")),
        m("source_names", lst("src_names")), m("destination_names", lst("dst_names")), m("l7", l7),
        m("reply", jc.boolean(jc.nonzero(c("reply")))), m("event_type", event),
        m("source_service", service("src")), m("destination_service", service("dst")),
        m("traffic_direction", enum("traffic_direction")), m("policy_match_type", num("policy_match_type")),
        m("trace_observation_point", enum("trace_point")), m("trace_reason", enum("trace_reason")),
        m("drop_reason_desc", enum("drop_reason")), m("is_reply", jc.boolean(c("is_reply"))),
        m("interface", iface), m("proxy_port", num("proxy_port")), m("socket_cookie", q64("socket_cookie")),
        m("cgroup_id", q64("cgroup_id")), m("Summary", s("summary")), m("aggregate", agg),
    ], n, keep_empty=True)
    members = [m("flow", flow), m("node_name", jc.string(pc.fill_null(c("node_name"), ""))), m("time", time_text)]
    if extensions:
        rate = c("sample_rate")
        ext_members = [m("start_time", jc.string(jc.rfc3339(c("start_time")))), m("flow_event", s("flow_event")),
                       m("kernel_drop_reason", s("kernel_drop_reason"))]
        for key in ("bytes", "packets", "reply_bytes", "reply_packets", "tcp_handshake_ns", "server_time_ns"):
            ext_members.append(m(key, jc.quoted_number(c(key))))
        ext_members.append(m("sample_rate", jc.number(pc.if_else(pc.equal(rate, 1), pa.scalar(None, rate.type), rate))))
        members.append(m("flowship", jc.obj(ext_members, n)))
    text = jc.finish(jc.obj(members, n, keep_empty=True))

    slow = np.zeros(n, dtype=bool)
    for name in batch.schema.names:
        col = c(name)
        if pa.types.is_string(col.type):
            slow |= jc.needs_slow_path(col)
        elif pa.types.is_list(col.type) and pa.types.is_string(col.type.value_type) and col.null_count < n:
            flat_slow = jc.needs_slow_path(col.flatten())
            if flat_slow.any():
                parents = pc.list_parent_indices(col).to_numpy()
                slow[parents[flat_slow]] = True
        elif name == "http_headers" and col.null_count < n:
            flat = col.flatten()
            for key in ("key", "value"):
                flat_slow = jc.needs_slow_path(pc.struct_field(flat, key))
                if flat_slow.any():
                    slow[pc.list_parent_indices(col).to_numpy()[flat_slow]] = True
    if slow.any():
        rows = np.flatnonzero(slow)
        replacement = encode_lines_slow(batch.take(pa.array(rows)), extensions)
        values = text.to_pylist()
        for row, line in zip(rows.tolist(), replacement, strict=True):
            values[row] = line.rstrip(b"\n").decode()
        text = pa.array(values, pa.string())
    return text


def _newline_terminated(batch: pa.RecordBatch, extensions: bool) -> pa.Array:
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(encode_text_column(batch, extensions), "\n", "").cast(pa.binary())


def encode_lines(batch: pa.RecordBatch, extensions: bool = True) -> list[bytes]:
    """Each flow as one ExportEvent JSON line (newline-terminated), as Hubble writes them."""
    if batch.num_rows == 0:
        return []
    return _newline_terminated(batch, extensions).to_pylist()


def encode_ndjson(batch: pa.RecordBatch, extensions: bool = True) -> bytes:
    """All flows of a batch as one NDJSON body, without a Python object per row."""
    if batch.num_rows == 0:
        return b""
    lines = _newline_terminated(batch, extensions)
    offsets = lines.offsets.to_numpy() if hasattr(lines, "offsets") else None
    if offsets is None:
        return b"".join(lines.to_pylist())
    data = lines.buffers()[2]
    return data.to_pybytes()[offsets[0]:offsets[-1]] if data is not None else b""
