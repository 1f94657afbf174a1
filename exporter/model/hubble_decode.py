"""Hubble JSON in: ExportEvent / GetFlowsResponse lines (and their variants) → flow batches.

Accepts what ``hubble observe -o jsonpb`` and Hubble's file exporter write:
ExportEvent-shaped objects, bare Flow objects (older CLIs), camelCase keys
(protojson's other spelling), a JSON array of either, ``lost_events`` lines,
and fields this version does not know (ignored, never an error). Each line is
decoded on its own, so a malformed line is reported with its number and
reason and nothing else is lost. :mod:`flowship.model.hubble_arrow` is the
columnar fast path it tries first.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa

from flowship.model.hubble_fields import (
    EXT_INT,
    EXT_TIME,
    EXTENSION_COLUMNS,
    IP_VERSION_IN,
    L4_PORTED,
    enum_name,
)
from flowship.model.ids import complete, digest_uuid
from flowship.model.schema import FLOW_SCHEMA, TCP_FLAG_BITS
from flowship.model.times import parse_time

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


_DNS_COLUMNS = {f"dns_{key}": key for key in ("query", "ips", "ttl", "cnames", "observation_source", "rcode",
                                                "qtypes", "rrtypes")}


def _copy(obj: dict, row: dict, columns: dict[str, str]) -> None:
    """``row[column] = obj.get(key)`` for each column → key of ``columns`` (absent keys become None)."""
    for column, key in columns.items():
        row[column] = obj.get(key)


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
        row["verdict"] = enum_name("verdict", v)
    if v := f.get("drop_reason"):
        row["drop_reason_code"] = int(v)
    if (v := f.get("drop_reason_desc")) is not None:
        row["drop_reason"] = enum_name("drop_reason_desc", v)
    if v := f.get("ethernet"):
        _copy(v, row, {"eth_src": "source", "eth_dst": "destination"})
    if ip := f.get("IP"):
        _copy(ip, row, {"ip_src": "source", "ip_dst": "destination"})
        if v := ip.get("source_xlated"):
            row["ip_src_xlated"] = v
        row["ip_version"] = IP_VERSION_IN.get(ip.get("ipVersion"))
        if ip.get("encrypted"):
            row["ip_encrypted"] = True
    if l4 := f.get("l4"):
        for proto, body in l4.items():
            body = body or {}
            row["l4_protocol"] = proto
            if proto in L4_PORTED:
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
        row["flow_type"] = enum_name("Type", v)
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
            row["l7_type"] = enum_name("l7type", v)
        if v := l7.get("latency_ns"):
            row["l7_latency_ns"] = _u64(v)
        if (http := l7.get("http")) is not None:
            _copy(http, row, {"http_code": "code", "http_method": "method", "http_url": "url",
                              "http_protocol": "protocol"})
            if headers := http.get("headers"):
                row["http_headers"] = headers
                for h in headers:
                    if h.get("key", "").lower() == "user-agent":
                        row["http_user_agent"] = h.get("value")
                        break
        if (dns := l7.get("dns")) is not None:
            _copy(dns, row, _DNS_COLUMNS)
    if f.get("reply"):
        row["reply"] = True
    if et := f.get("event_type"):
        row["event_type"] = et.get("type", 0)
        if v := et.get("sub_type"):
            row["event_subtype"] = v
    if s := f.get("source_service"):
        _copy(s, row, {"src_service": "name", "src_service_namespace": "namespace"})
    if s := f.get("destination_service"):
        _copy(s, row, {"dst_service": "name", "dst_service_namespace": "namespace"})
    if (v := f.get("traffic_direction")) is not None:
        row["traffic_direction"] = enum_name("traffic_direction", v)
    if v := f.get("policy_match_type"):
        row["policy_match_type"] = v
    if (v := f.get("trace_observation_point")) is not None:
        row["trace_point"] = enum_name("trace_observation_point", v)
    if (v := f.get("trace_reason")) is not None:
        row["trace_reason"] = enum_name("trace_reason", v)
    if (v := f.get("is_reply")) is not None:
        row["is_reply"] = v["value"] if isinstance(v, dict) else bool(v)
    if iface := f.get("interface"):
        _copy(iface, row, {"interface_index": "index", "interface_name": "name"})
    if v := f.get("proxy_port"):
        row["proxy_port"] = v
    if v := f.get("socket_cookie"):
        row["socket_cookie"] = _u64(v)
    if v := f.get("cgroup_id"):
        row["cgroup_id"] = _u64(v)
    if v := f.get("Summary"):
        row["summary"] = v
    if agg := f.get("aggregate"):
        _copy(agg, row, {"aggregate_ingress_count": "ingress_flow_count", "aggregate_egress_count": "egress_flow_count",
                         "aggregate_unknown_count": "unknown_direction_flow_count"})


def read_extension(ext: dict, row: dict) -> None:
    for key in EXTENSION_COLUMNS:
        if (v := ext.get(key)) is None:
            continue
        if key in EXT_TIME:
            row[key] = parse_time(v)
        elif key in EXT_INT:
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
            read_extension(ext, row)
    elif "lost_events" in obj:
        lost = dict(obj["lost_events"] or {})
        lost["source"] = enum_name("lost_source", lost.get("source", 0))
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
    columnar fast path (:mod:`flowship.model.hubble_arrow`); anything it
    declines is decoded line by line here, with the same result.
    """
    camel = _CAMEL_HINTS.search(data) is not None
    stripped = data.lstrip()
    if fast and not camel and not stripped.startswith(b"["):
        from flowship.model.hubble_arrow import decode_fast

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
