"""Answers to the two questions flow history exists for, computed from flowship's Parquet output.

1. *Where does the latency of a call chain go?* Per hop (client → server:port):
   the TCP handshake time (SYN → SYN-ACK as seen on the node: network RTT plus
   the server's TCP stack) and the server time (request → response: the
   server's processing, including its own downstream calls), with request and
   error counts. Agent flows carry both measures (``tcp_handshake_ns``,
   ``server_time_ns`` / ``l7_latency_ns``); for Hubble flows the handshake is
   recovered the way one would by hand, from the times of each connection's
   SYN and SYN-ACK flows.
2. *Who tried what and was denied?* Every DROPPED flow grouped by source,
   destination, port, protocol and reason (Hubble's and the kernel's), counted
   as calls (distinct connections: a SYN and its retransmissions are one call)
   with the dropped packets beside them.

``flowship report latency|drops|all --parquet PATH`` prints them (``--since``,
``--until`` and ``--namespace`` choose the flows, ``--limit`` the rows shown);
``flowship demo`` prints both for the traffic it generates.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from flowship.model.schema import TCP_FLAG_BITS

SYN, ACK = TCP_FLAG_BITS["SYN"], TCP_FLAG_BITS["ACK"]


def load_flows(path: str | Path, columns: list[str] | None = None, *, since: datetime | None = None,
               until: datetime | None = None, namespace: str | None = None, s3: Any = None) -> pa.Table:
    """The flows under a parquet sink's ``path`` (the ``flows/`` dataset), optionally only some of them.

    ``path`` is a directory or ``s3://bucket/prefix`` (``s3``: its :class:`S3Config`, credentials from the AWS
    chain). ``since`` (inclusive) and ``until`` (exclusive) bound the flows' time; ``namespace`` keeps flows with
    it on either side. The filter is pushed down to the Parquet scan, so a narrow window reads little.
    """
    filesystem = None
    if str(path).startswith("s3://"):
        from flowship.history import Archive

        archive = Archive(str(path), s3)
        archive.check()
        files = [f.path for f in archive.list_files()]
        filesystem = archive.fs
    else:
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"{path}: no such directory (give the parquet sink's path with --parquet)")
        if (root / "flows").is_dir():
            root = root / "flows"
        files = [str(p) for p in root.rglob("*.parquet") if not p.name.startswith(".")]
    if not files:
        raise FileNotFoundError(f"no Parquet flow files under {path}")
    where = None
    time_type = pa.timestamp("ns", tz="UTC")
    for bound, keep in ((since, lambda f, v: f >= v), (until, lambda f, v: f < v)):
        if bound is not None:
            expr = keep(ds.field("time"), pa.scalar(bound, type=time_type))
            where = expr if where is None else where & expr
    if namespace:
        expr = (ds.field("src_namespace") == namespace) | (ds.field("dst_namespace") == namespace)
        where = expr if where is None else where & expr
    return ds.dataset(files, format="parquet", filesystem=filesystem).to_table(columns=columns, filter=where)


def _endpoint_name(table: pa.Table, side: str) -> pa.Array:
    """workload, else pod, else IP — the most meaningful name a flow has for one side."""
    ip = table.column(f"ip_{side}")
    ns = table.column(f"{side}_namespace")
    workload = pc.coalesce(table.column(f"{side}_workload"), table.column(f"{side}_pod"))
    named = pc.binary_join_element_wise(pc.fill_null(ns, ""), workload, "/")
    named = pc.if_else(pc.equal(pc.fill_null(ns, ""), ""), workload, named)
    return pc.coalesce(named, ip)


def _ms(values: np.ndarray) -> str:
    return f"{values / 1e6:.2f}"


@dataclass
class HopLatency:
    client: str
    server: str
    port: int
    connections: int
    handshake_p50_ms: float | None
    handshake_p95_ms: float | None
    handshake_max_ms: float | None
    requests: int
    server_p50_ms: float | None
    server_p95_ms: float | None
    server_max_ms: float | None
    errors_5xx: int


def _quantiles(values: np.ndarray) -> tuple[float | None, float | None, float | None]:
    if not len(values):
        return None, None, None
    p50, p95 = np.percentile(values, [50, 95])
    return float(p50) / 1e6, float(p95) / 1e6, float(values.max()) / 1e6


def one_interface_per_connection(flows: pa.Table) -> pa.Table:
    """Keep each connection's rows from one interface only.

    A node's agent sees a pod-to-pod connection on the client's and the server's
    interface; counting both would double every request. The interface kept is
    the one nearest the server: where the server's replies enter the node
    (reply rows at tc ingress, trace point FROM_NETWORK), else the first by name.
    """
    if flows.num_rows == 0 or flows.column("interface_name").null_count == flows.num_rows:
        return flows
    cid = flows.column("community_id").to_pylist()
    iface = flows.column("interface_name").to_pylist()
    reply = pc.fill_null(flows.column("is_reply"), False).to_pylist()
    point = flows.column("trace_point").to_pylist()
    seen: dict[str, set] = {}
    server_side: dict[str, str] = {}
    for i in range(flows.num_rows):
        if cid[i] is None or iface[i] is None:
            continue
        seen.setdefault(cid[i], set()).add(iface[i])
        if reply[i] and point[i] == "FROM_NETWORK":
            server_side.setdefault(cid[i], iface[i])
    chosen = {c: server_side.get(c, min(names)) for c, names in seen.items() if len(names) > 1}
    if not chosen:
        return flows
    keep = [cid[i] not in chosen or iface[i] == chosen[cid[i]] for i in range(flows.num_rows)]
    return flows.filter(pa.array(keep))


def latency_by_hop(flows: pa.Table) -> list[HopLatency]:
    """Handshake and server time per (client, server, server port)."""
    flows = one_interface_per_connection(flows)
    client = _endpoint_name(flows, "src")
    server = _endpoint_name(flows, "dst")
    reply = pc.fill_null(flows.column("is_reply"), False)
    # Orient every row client → server: reply rows (and L7 responses) run the other way.
    c = pc.if_else(reply, server, client).to_pylist()
    s = pc.if_else(reply, client, server).to_pylist()
    port = pc.if_else(reply, flows.column("src_port"), flows.column("dst_port")).to_pylist()
    cid = flows.column("community_id").to_pylist()
    times = flows.column("time").cast(pa.int64()).to_numpy(zero_copy_only=False)
    flags = flows.column("tcp_flags").fill_null(0).to_numpy(zero_copy_only=False)
    handshake = flows.column("tcp_handshake_ns").to_pylist()
    flow_type = flows.column("flow_type").to_pylist()
    l7_type = flows.column("l7_type").to_pylist()
    server_time = pc.coalesce(flows.column("server_time_ns"), flows.column("l7_latency_ns")).to_pylist()
    code = flows.column("http_code").to_pylist()
    has_http = pc.or_(pc.is_valid(flows.column("http_method")), pc.is_valid(flows.column("http_code"))).to_pylist()

    hops: dict[tuple, dict] = {}
    syn_time: dict[str, int] = {}
    synack_time: dict[str, int] = {}
    for i in range(flows.num_rows):
        if port[i] is None:
            continue
        key = (c[i], s[i], port[i])
        hop = hops.setdefault(key, {"conns": set(), "handshake": {}, "server": [], "requests": 0, "errors": 0})
        if cid[i]:
            hop["conns"].add(cid[i])
        if handshake[i] is not None and cid[i]:
            hop["handshake"][cid[i]] = handshake[i]
        elif cid[i] and flow_type[i] == "L3_L4":
            f = int(flags[i])
            if f & SYN and not f & ACK:
                syn_time[cid[i]] = min(syn_time.get(cid[i], times[i]), times[i])
            elif f & SYN and f & ACK:
                synack_time[cid[i]] = min(synack_time.get(cid[i], times[i]), times[i])
        if l7_type[i] == "RESPONSE" and has_http[i]:
            hop["requests"] += 1
            if server_time[i] is not None:
                hop["server"].append(server_time[i])
            if code[i] is not None and code[i] >= 500:
                hop["errors"] += 1
    out = []
    for (cl, sv, pt), hop in hops.items():
        for conn in hop["conns"]:
            if conn not in hop["handshake"] and conn in syn_time and conn in synack_time:
                delta = synack_time[conn] - syn_time[conn]
                if delta >= 0:
                    hop["handshake"][conn] = delta
        hs = np.array(list(hop["handshake"].values()), dtype=np.float64)
        st = np.array(hop["server"], dtype=np.float64)
        if not len(hs) and not hop["requests"]:
            continue
        h50, h95, hmax = _quantiles(hs)
        s50, s95, smax = _quantiles(st)
        out.append(HopLatency(cl, sv, int(pt), len(hop["conns"]), h50, h95, hmax, hop["requests"], s50, s95, smax,
                              hop["errors"]))
    out.sort(key=lambda h: (-(h.server_p95_ms or 0), -(h.handshake_p95_ms or 0)))
    return out


@dataclass
class DroppedCalls:
    source: str
    destination: str
    port: int | None
    protocol: str | None
    reason: str
    calls: int  # distinct connections (Community ID, else the 5-tuple)
    packets: int
    first: str
    last: str


def dropped_calls(flows: pa.Table) -> list[DroppedCalls]:
    """DROPPED flows grouped by who, to what, and why; calls are distinct connections, not packets.

    A refused connection is several dropped packets (the SYN and its retransmissions): counting rows
    would report 6 calls for 3 denied attempts.
    """
    dropped = flows.filter(pc.fill_null(pc.equal(flows.column("verdict"), "DROPPED"), False))
    if dropped.num_rows == 0:
        return []
    reason = pc.coalesce(
        pc.binary_join_element_wise(dropped.column("drop_reason"), dropped.column("kernel_drop_reason"), " / "),
        dropped.column("drop_reason"), dropped.column("kernel_drop_reason"), pa.scalar("unknown"))
    tuple_key = pc.binary_join_element_wise(
        *[pc.fill_null(dropped.column(c).cast(pa.string()), "") for c in
          ("ip_src", "ip_dst", "l4_protocol", "src_port", "dst_port", "icmp_type", "icmp_code")], "|")
    table = pa.table({
        "source": _endpoint_name(dropped, "src"), "destination": _endpoint_name(dropped, "dst"),
        "port": pc.coalesce(dropped.column("dst_port").cast(pa.int64()), dropped.column("icmp_type").cast(pa.int64())),
        "protocol": dropped.column("l4_protocol"), "reason": reason,
        "connection": pc.coalesce(dropped.column("community_id"), tuple_key),
        "packets": pc.fill_null(dropped.column("packets").cast(pa.int64()), 1),
        "time": dropped.column("time").cast(pa.int64()),
    })
    grouped = table.group_by(["source", "destination", "port", "protocol", "reason"], use_threads=False).aggregate(
        [("connection", "count_distinct"), ("packets", "sum"), ("time", "min"), ("time", "max")])
    from flowship.model.times import format_time

    out = [DroppedCalls(r["source"], r["destination"], r["port"], r["protocol"], r["reason"],
                        r["connection_count_distinct"], r["packets_sum"], format_time(r["time_min"]),
                        format_time(r["time_max"])) for r in grouped.to_pylist()]
    out.sort(key=lambda d: (-d.calls, -d.packets))
    return out


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    body = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def _top(rows: list[list[str]], limit: int) -> tuple[list[list[str]], str]:
    """The first ``limit`` rows (all when 0) and a line saying how many were left out."""
    if not limit or len(rows) <= limit:
        return rows, ""
    more = len(rows) - limit
    return rows[:limit], f"\n... {more:,} more row{'s' if more > 1 else ''} (--limit 0 shows all)"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_latency(hops: list[HopLatency], limit: int = 0) -> str:
    """The latency table, slowest hops first; ``limit`` rows at most (0: all)."""
    if not hops:
        return "no connections with handshake or HTTP timing found"
    rows = [[h.client, f"{h.server}:{h.port}", str(h.connections), _f(h.handshake_p50_ms), _f(h.handshake_p95_ms),
             str(h.requests), _f(h.server_p50_ms), _f(h.server_p95_ms), _f(h.server_max_ms), str(h.errors_5xx)]
            for h in hops]
    rows, more = _top(rows, limit)
    return _table(["client", "server", "conns", "handshake p50 ms", "p95", "requests", "server time p50 ms", "p95",
                   "max", "5xx"], rows) + more


def format_drops(drops: list[DroppedCalls], limit: int = 0) -> str:
    """The dropped-calls table, most calls first; ``limit`` rows at most (0: all)."""
    if not drops:
        return "no dropped flows"
    rows = [[d.source, d.destination, str(d.port if d.port is not None else "-"), d.protocol or "-", d.reason,
             str(d.calls), str(d.packets), d.first, d.last] for d in drops]
    rows, more = _top(rows, limit)
    return _table(["source", "destination", "port", "proto", "reason", "calls", "packets", "first", "last"],
                  rows) + more
