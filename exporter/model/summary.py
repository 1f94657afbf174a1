"""The flow ``summary`` (Hubble's ``Summary``), written the way Hubble's parsers write it.

``hubble observe`` prints it in parentheses at the end of each line, so a flow without one reads ``... ()``.
Hubble's threefour parser names the last packet layer it decoded (``TCP Flags: SYN, ACK``, ``UDP``,
``ICMPv4 EchoRequest``); its seven parser describes the L7 record (``DNS Query example.com. A``,
``HTTP/1.1 200 3ms (GET http://web/)``). :func:`fill_summary` adds it to rows that have none, so flows the
agent produces read like Hubble's on every sink and through the Observer.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from flowship.hubble_metrics import DNS_RCODES, icmp_type_name
from flowship.model.schema import TCP_FLAG_BITS

# getTCPFlags' order (pkg/hubble/parser/threefour/parser.go)
_FLAG_ORDER = ("SYN", "ACK", "RST", "FIN", "PSH", "URG", "ECE", "CWR", "NS")
_COLUMNS = ("l4_protocol", "tcp_flags", "icmp_type", "icmp_code", "ip_version", "l7_type", "l7_latency_ns",
            "http_method", "http_url", "http_code", "http_protocol", "dns_query", "dns_rcode", "dns_qtypes",
            "dns_ips", "dns_ttl", "dns_cnames", "dns_observation_source")
_L4_KEY = ("l4_protocol", "tcp_flags", "icmp_type", "icmp_code", "ip_version")


def tcp_flags_text(mask: int | None) -> str:
    """``SYN, ACK``: the set flags in Hubble's order."""
    mask = mask or 0
    return ", ".join(name for name in _FLAG_ORDER if mask & TCP_FLAG_BITS[name])


def _go_quote(text: str) -> str:
    """Go's %q for the plain strings DNS answers hold (IPs, names)."""
    return json.dumps(text, ensure_ascii=False)


def _dns(row: dict) -> str:
    qtypes = ",".join(row["dns_qtypes"] or [])
    query = row["dns_query"] or ""
    if row["l7_type"] == "REQUEST":
        return f"DNS Query {query} {qtypes}"
    if row["l7_type"] != "RESPONSE":
        return ""
    rcode = row["dns_rcode"] or 0
    if rcode != 0:
        answer = f"RCode: {DNS_RCODES.get(rcode, 'Unknown code')}"
    else:
        parts = []
        if row["dns_ips"]:
            parts.append(_go_quote(",".join(row["dns_ips"])))
        if row["dns_cnames"]:
            parts.append("CNAMEs: " + _go_quote(",".join(row["dns_cnames"])))
        answer = " ".join(parts)
    source = "Proxy" if row["dns_observation_source"] == "proxy" else "Query"
    return f"DNS Answer {answer} TTL: {row['dns_ttl'] or 0} ({source} {query} {qtypes})"


def _http(row: dict) -> str:
    request = f"{row['http_method'] or ''} {row['http_url'] or ''}"
    protocol = row["http_protocol"] or ""
    if row["l7_type"] == "REQUEST":
        return f"{protocol} {request}"
    if row["l7_type"] == "RESPONSE":
        return f"{protocol} {row['http_code'] or 0} {(row['l7_latency_ns'] or 0) // 1_000_000}ms ({request})"
    return ""


def summary_of(row: dict) -> str:
    """Hubble's Summary of one flow row (a dict of flow columns)."""
    if any(row[c] is not None for c in ("dns_query", "dns_rcode", "dns_qtypes", "dns_ips")):
        return _dns(row)
    if any(row[c] is not None for c in ("http_method", "http_code", "http_url", "http_protocol")):
        return _http(row)
    proto = row["l4_protocol"]
    if proto == "TCP":
        return "TCP Flags: " + tcp_flags_text(row["tcp_flags"])
    if proto in ("ICMPv4", "ICMPv6"):
        return f"{proto} {icmp_type_name(proto, row['icmp_type'] or 0, row['icmp_code'] or 0)}"
    if proto:
        return proto  # UDP, SCTP: the layer's name
    version = row["ip_version"]
    return {4: "IPv4", 6: "IPv6"}.get(version, "")


def summaries(batch: pa.RecordBatch) -> pa.Array:
    """Hubble's Summary of every row (L3/L4 rows computed once per distinct protocol, flags and ICMP type)."""
    columns = {name: batch.column(name).to_pylist() for name in _COLUMNS}
    l7 = pc.or_(pc.is_valid(batch.column("dns_query")), pc.is_valid(batch.column("dns_rcode")))
    for name in ("dns_qtypes", "dns_ips", "http_method", "http_code", "http_url", "http_protocol"):
        l7 = pc.or_(l7, pc.is_valid(batch.column(name)))
    cache: dict[tuple, str] = {}
    out = []
    for i, is_l7 in enumerate(l7.to_pylist()):
        if is_l7:
            out.append(summary_of({name: columns[name][i] for name in _COLUMNS}))
            continue
        key = tuple(columns[name][i] for name in _L4_KEY)
        if key not in cache:
            cache[key] = summary_of({**dict.fromkeys(_COLUMNS), **dict(zip(_L4_KEY, key, strict=True))})
        out.append(cache[key])
    return pa.array(out, pa.string())


def fill_summary(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with ``summary`` filled where it is null or empty (rows that came with one keep it)."""
    if batch.num_rows == 0:
        return batch
    index = batch.schema.get_field_index("summary")
    current = batch.column(index)
    missing = pc.fill_null(pc.equal(current, ""), True)
    if not pc.any(missing).as_py():
        return batch
    merged = pc.if_else(missing, summaries(batch), current)
    return batch.set_column(index, batch.schema.field(index), merged)
