"""Kernel events → flow rows: one CaptureBatch in, one FLOW_SCHEMA record batch out.

Column-wise throughout: the kernel's structured arrays are split, swapped and renamed with numpy,
addresses are formatted once per distinct address, uuids are hashed and hex-formatted as arrays.
Per-event Python appears only where the L7 pairers read payload bytes.

Rows produced (see docs/agent.md for the full semantics):

* L3/L4 (``flow_type`` L3_L4, ``event_type`` 4): one row per direction with activity per kernel flow
  event. The forward row (initiator → responder) when the event counted packets from the initiator,
  is the entry's first event, or counted no packet at all (an idle eviction: the row marks the end);
  the reply row (responder → initiator, ``is_reply`` true, src/dst swapped) when it counted reply
  packets. ``bytes``/``packets``/``tcp_flags`` are that direction's, so sums over rows are exact.
* Drops (``verdict`` DROPPED, ``event_type`` 1): one row per packet the kernel refused or lost. Frees that
  accompany normal operation (:mod:`flowship.agent.drop_reasons`: queue purges on close, duplicates) are only
  counted, unless ``drop_export_benign`` lists their reason: then they are rows with verdict TRACED.
* L7 (``flow_type`` L7, ``event_type`` 129): HTTP requests/responses and DNS queries/responses,
  paired by :mod:`flowship.agent.l7_http` and :mod:`flowship.agent.l7_dns`.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowship.agent import drop_reasons
from flowship.agent import events as ev
from flowship.agent.capture import LOSS_STATS, CaptureBatch
from flowship.agent.kernel_drops import DropReasons
from flowship.agent.l7_dns import DnsPairer
from flowship.agent.l7_http import DEFAULT_HEADER_ALLOW, HttpPairer
from flowship.metrics import Metrics
from flowship.model.ids import community_ids, complete, connection_hashes, mix64
from flowship.model.schema import FLOW_SCHEMA, TIMESTAMP, empty_flows
from flowship.model.summary import fill_summary

# Cilium monitor message types (pkg/monitor/api): drop, trace, access log (L7).
EVENT_DROP, EVENT_TRACE, EVENT_L7 = 1, 4, 129
# Cilium trace observation points / trace sub-types used here.
TRACE_POINTS = {ev.Hook.INGRESS: ("FROM_NETWORK", 10), ev.Hook.EGRESS: ("TO_NETWORK", 11)}
L4_NAMES = {6: "TCP", 17: "UDP", 1: "ICMPv4", 58: "ICMPv6", 132: "SCTP"}
# flow_event from the trigger bits, first match wins.
FLOW_EVENTS = (
    (ev.Trigger.END, "end"),
    (ev.Trigger.EVICT, "evicted"),
    (ev.Trigger.NEW, "new"),
    (ev.Trigger.FLAGS, "flags"),
    (ev.Trigger.REPORT, "report"),
    (ev.Trigger.PACKET, "packet"),
    (ev.Trigger.UNTRACKED, "untracked"),
)
REAL_LOSSES = ("drop_ring", "l7_ring", "untracked")
"""Kernel loss counters that mean events or packets nobody will ever see (flow_ring is a postponement:
the counters stay in the flow entry and arrive with a later event; flow_table_full packets arrive as
untracked events)."""
HUBBLE_LOST_SOURCE = "PERF_EVENT_RING_BUFFER"


@dataclass(frozen=True)
class AssembleConfig:
    """What assembly needs to know besides the events."""

    node_name: str
    http_headers: tuple[str, ...] = DEFAULT_HEADER_ALLOW
    http_max_pending: int = 64
    http_max_connections: int = 65536
    l7_ttl_ns: int = 120_000_000_000
    dns_ttl_ns: int = 30_000_000_000
    drop_export_benign: frozenset[str] = frozenset()  # benign kernel drop reasons exported as TRACED rows


# ---------------------------------------------------------------- column helpers


def ip_strings(addr: np.ndarray, ip_version: np.ndarray) -> pa.Array:
    """Text addresses of (n, 16) kernel addresses (IPv4 mapped), formatted once per distinct value.

    IPv4-mapped rows (the usual case) are de-duplicated on a 32-bit key, the rest on both 64-bit words.
    """
    n = len(addr)
    if n == 0:
        return pa.array([], type=pa.string())
    words = np.ascontiguousarray(addr, dtype=np.uint8).view("<u8").reshape(n, 2)
    v4 = (words[:, 0] == 0) & ((words[:, 1] & np.uint64(0xFFFFFFFF)) == np.uint64(0xFFFF0000)) & (
        np.asarray(ip_version) == 4)
    index = np.empty(n, dtype=np.int32)
    texts: list[str] = []
    if v4.any():
        key = (words[v4, 1] >> np.uint64(32)).astype(np.uint32)
        uniq, inverse = np.unique(key, return_inverse=True)
        octets = uniq.view(np.uint8).reshape(-1, 4).tolist()
        texts = [f"{a}.{b}.{c}.{d}" for a, b, c, d in octets]
        index[v4] = inverse.reshape(-1)
    if not v4.all():
        rest = ~v4
        uniq6, inverse6 = np.unique(words[rest], axis=0, return_inverse=True)
        index[rest] = len(texts) + inverse6.reshape(-1)
        texts += [str(ipaddress.IPv6Address(row.tobytes())) for row in uniq6]
    return pa.array(texts, type=pa.string()).take(pa.array(index))


def hash128(parts: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit lanes over the given uint64 columns (same values → same hash)."""
    with np.errstate(over="ignore"):
        a = np.full(n, 0x6A09E667F3BCC908, dtype=np.uint64)
        b = np.full(n, 0xBB67AE8584CAA73B, dtype=np.uint64)
        for p in parts:
            p = np.broadcast_to(np.asarray(p).astype(np.uint64), (n,))
            a = mix64(a ^ p)
            b = mix64((b + np.uint64(0x9E3779B97F4A7C15)) ^ p)
    return a, b


_HEX_PAIRS = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), dtype="<u2")
_VARIANT = np.frombuffer(b"89ab", dtype=np.uint8)


def uuid_strings(hi: np.ndarray, lo: np.ndarray) -> pa.Array:
    """Format 128-bit hashes as uuids, laid out exactly as flowship.model.ids.digest_uuid does."""
    n = len(hi)
    raw = np.empty((n, 16), dtype=np.uint8)
    raw[:, :8] = hi.astype(">u8").view(np.uint8).reshape(n, 8)
    raw[:, 8:] = lo.astype(">u8").view(np.uint8).reshape(n, 8)
    h = _HEX_PAIRS[raw].view(np.uint8).reshape(n, 32)  # two hex digits per byte
    out = np.empty((n, 36), dtype=np.uint8)
    out[:, 0:8] = h[:, 0:8]
    out[:, 9:13] = h[:, 8:12]
    out[:, 14] = ord("8")
    out[:, 15:18] = h[:, 13:16]
    out[:, 19] = _VARIANT[(raw[:, 8] >> 4) & 3]
    out[:, 20:23] = h[:, 17:20]
    out[:, 24:36] = h[:, 20:32]
    out[:, [8, 13, 18, 23]] = ord("-")
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(out.tobytes())])


def _addr_words(addr: np.ndarray) -> list[np.ndarray]:
    w = np.ascontiguousarray(addr, dtype=np.uint8).view(np.uint64).reshape(len(addr), 2)
    return [w[:, 0], w[:, 1]]


def _u(values: np.ndarray, type_: pa.DataType, null: np.ndarray | None = None) -> pa.Array:
    values = np.ascontiguousarray(values)
    if null is None or not null.any():
        return pa.array(values, type=type_)
    return pa.array(values, type=type_, mask=np.asarray(null, dtype=bool))


def _const(value: Any, n: int, type_: pa.DataType) -> pa.Array:
    return pa.array([value], type=type_).take(pa.array(np.zeros(n, dtype=np.int32))) if n else pa.array([], type_)


def _choice(index: np.ndarray, table: list[Any], type_: pa.DataType) -> pa.Array:
    """table[index] per row as an Arrow array (index -1: null)."""
    arr = pa.array(table, type=type_)
    return arr.take(pa.array(np.asarray(index, dtype=np.int32), mask=np.asarray(index) < 0))


def _wall(mono_ns: np.ndarray, offset: int) -> pa.Array:
    return pa.array(mono_ns.astype(np.int64) + np.int64(offset), type=TIMESTAMP)


def community_id_column(key: np.ndarray, columns: Mapping[str, pa.Array]) -> pa.Array:
    """Community IDs computed once per distinct connection key (flowship.model.ids.community_ids), then spread."""
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    pick = pa.array(first.astype(np.int64))
    names = ["ip_src", "ip_dst", "l4_protocol", "src_port", "dst_port", "icmp_type", "icmp_code"]
    small = pa.RecordBatch.from_arrays(
        [columns[c].take(pick) if c in columns else pa.nulls(len(first), FLOW_SCHEMA.field(c).type) for c in names],
        names=names)
    return community_ids(small).take(pa.array(inverse.reshape(-1).astype(np.int32)))


def to_batch(columns: Mapping[str, pa.Array], n: int, nulls: dict[pa.DataType, pa.Array] | None = None
             ) -> pa.RecordBatch:
    """A FLOW_SCHEMA batch from the given columns; every other column null (slices of ``nulls`` if given)."""
    arrays = []
    for field in FLOW_SCHEMA:
        col = columns.get(field.name)
        if col is None:
            if nulls is None:
                arrays.append(pa.nulls(n, type=field.type))
                continue
            cached = nulls.get(field.type)
            if cached is None or len(cached) < n:
                cached = nulls[field.type] = pa.nulls(max(n, 65536), type=field.type)
            arrays.append(cached.slice(0, n))
        else:
            arrays.append(col if col.type == field.type else col.cast(field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=FLOW_SCHEMA)


def _l4_names(proto: np.ndarray) -> pa.Array:
    table = np.full(256, -1, dtype=np.int32)
    names = list(L4_NAMES.values())
    for i, p in enumerate(L4_NAMES):
        table[p] = i
    return _choice(table[proto.astype(np.intp)], names, pa.string())


def _trace_points(hooks: np.ndarray) -> tuple[pa.Array, pa.Array]:
    idx = np.where(hooks == ev.Hook.INGRESS, 0, np.where(hooks == ev.Hook.EGRESS, 1, -1))
    names = [TRACE_POINTS[ev.Hook.INGRESS][0], TRACE_POINTS[ev.Hook.EGRESS][0]]
    codes = [TRACE_POINTS[ev.Hook.INGRESS][1], TRACE_POINTS[ev.Hook.EGRESS][1]]
    return _choice(idx, names, pa.string()), _choice(idx, codes, pa.int32())


def _directions(init_hooks: np.ndarray) -> pa.Array:
    """traffic_direction: the connection's direction on this node's interface (same on reply rows)."""
    idx = np.where(init_hooks == ev.Hook.INGRESS, 0, np.where(init_hooks == ev.Hook.EGRESS, 1, -1))
    return _choice(idx, ["INGRESS", "EGRESS"], pa.string())


def _other_hook(hooks: np.ndarray) -> np.ndarray:
    return np.where(hooks == ev.Hook.INGRESS, ev.Hook.EGRESS, np.where(hooks == ev.Hook.EGRESS, ev.Hook.INGRESS, 0))


def _interface_names(ifindex: np.ndarray, names: Mapping[int, str]) -> pa.Array:
    uniq, inverse = np.unique(ifindex, return_inverse=True)
    return pa.array([names.get(int(i)) for i in uniq], type=pa.string()).take(
        pa.array(inverse.reshape(-1).astype(np.int32))
    )


# ---------------------------------------------------------------- the assembler


class Assembler:
    """Turns CaptureBatches into flow batches; holds the L7 pairing state between batches."""

    def __init__(self, config: AssembleConfig, *, metrics: Metrics | None = None, source: str = "agent",
                 drop_names: DropReasons | None = None, enricher: Any = None) -> None:
        self.config = config
        self.metrics = metrics
        self.source = source
        self.drop_names = drop_names if drop_names is not None else DropReasons.from_kernel()
        self.enricher = enricher
        allow = tuple(dict.fromkeys(("User-Agent", *config.http_headers)))
        self.http = HttpPairer(max_pending=config.http_max_pending, max_connections=config.http_max_connections,
                               ttl_ns=config.l7_ttl_ns, header_allow=allow)
        self.dns = DnsPairer(ttl_ns=config.dns_ttl_ns, observation_source="ebpf")
        self._node_hash = int.from_bytes(config.node_name.encode()[:8].ljust(8, b"\0"), "little") ^ len(
            config.node_name)
        self._pairer_seen: dict[str, int] = {}
        self._nulls: dict[pa.DataType, pa.Array] = {}  # all-null columns, sliced per batch
        self.totals = {"flow_events": 0, "drop_events": 0, "benign_drops": 0, "l7_events": 0, "rows": 0}
        self.lost_totals: dict[str, int] = {k: 0 for k in LOSS_STATS}

    # -- public ---------------------------------------------------------------------------------

    def assemble(self, batch: CaptureBatch, interface_names: Mapping[int, str]) -> pa.RecordBatch:
        """One flow batch (L3/L4, drops, L7; enriched, with uuid and Community ID) for a capture batch."""
        self.account(batch)
        parts = []
        if len(batch.flows):
            parts.append(self.flow_rows(batch.flows, batch.wall_offset_ns, interface_names))
        if len(batch.drops):
            parts.append(self.drop_rows(batch.drops, batch.wall_offset_ns, interface_names))
        if len(batch.l7):
            parts.extend(self.l7_rows(batch.l7, batch.wall_offset_ns, interface_names))
        if len(batch.flows) and self.http.connections:
            ended = batch.flows[(batch.flows["trigger"] & (ev.Trigger.END | ev.Trigger.EVICT)) != 0]
            if len(ended):
                self.http.close(self._conn_keys(ended["src_addr"], ended["dst_addr"], ended["ip_version"],
                                                ended["l4_proto"], ended["src_port"], ended["dst_port"]))
        self._pairer_metrics()
        parts = [p for p in parts if p.num_rows]
        if not parts:
            return empty_flows()
        out = parts[0] if len(parts) == 1 else pa.Table.from_batches(parts).combine_chunks().to_batches()[0]
        if self.enricher is not None:
            self.enricher.learn_dns(out)
            out = self.enricher.enrich(out)
        out = fill_summary(complete(out))
        self.totals["rows"] += out.num_rows
        return out

    def account(self, batch: CaptureBatch) -> None:
        """Event and loss metrics of a capture batch; every loss is counted, none is silent."""
        self.totals["flow_events"] += len(batch.flows)
        self.totals["drop_events"] += len(batch.drops)
        self.totals["l7_events"] += len(batch.l7)
        for kind, n in batch.lost.items():
            self.lost_totals[kind] = self.lost_totals.get(kind, 0) + n
        if self.metrics is None:
            return
        events = self.metrics.counter("flowship_agent_events_total", "Kernel events read from the rings, by kind.",
                                      ["kind"])
        for kind, n in (("flow", len(batch.flows)), ("drop", len(batch.drops)), ("l7", len(batch.l7))):
            if n:
                events.labels(kind).inc(n)
        lost = self.metrics.counter(
            "flowship_agent_lost_total",
            "Kernel-side losses by kind: drop_ring/l7_ring (events not written, ring full), untracked (packets "
            "counted nowhere), flow_ring (a flow event postponed, its counters arrive later), flow_table_full "
            "(packets reported without a flow entry).", ["kind"])
        real = 0
        for kind, n in batch.lost.items():
            if n:
                lost.labels(kind).inc(n)
                if kind in REAL_LOSSES:
                    real += n
        if real:
            self.metrics.record_lost(self.source, HUBBLE_LOST_SOURCE, real)

    def record_reader_losses(self, delta: Mapping[str, int]) -> None:
        """Records the user-space ring reader skipped (discarded or malformed), counted as losses."""
        if self.metrics is None:
            return
        total = sum(delta.values())
        if not total:
            return
        lost = self.metrics.counter("flowship_agent_ring_skipped_total",
                                    "Ring records skipped by the reader (discarded by the kernel or malformed).",
                                    ["kind"])
        for kind, n in delta.items():
            if n:
                lost.labels(kind).inc(n)
        malformed = sum(n for k, n in delta.items() if k.endswith("malformed"))
        if malformed:
            self.metrics.record_lost(self.source, HUBBLE_LOST_SOURCE, malformed)

    # -- L3/L4 ----------------------------------------------------------------------------------

    def flow_rows(self, flows: np.ndarray, wall_offset: int, interface_names: Mapping[int, str]) -> pa.RecordBatch:
        # Per event: addresses as text, the connection's Community ID, the event's hash.
        m = len(flows)
        proto_ev = flows["l4_proto"]
        addr_text = pa.concat_arrays([ip_strings(flows["src_addr"], flows["ip_version"]),
                                      ip_strings(flows["dst_addr"], flows["ip_version"])])
        l4_ev = _l4_names(proto_ev)
        ev_cols = {"ip_src": addr_text.slice(0, m), "ip_dst": addr_text.slice(m, m), "l4_protocol": l4_ev,
                   "src_port": _u(flows["src_port"], pa.uint16()), "dst_port": _u(flows["dst_port"], pa.uint16()),
                   "icmp_type": _u(flows["icmp_type"], pa.uint8()), "icmp_code": _u(flows["icmp_code"], pa.uint8())}
        cid_ev = community_id_column(hi_conn(flows, proto_ev), ev_cols)
        ha, hb = hash128([np.uint64(self._node_hash), np.uint64(1), flows["ifindex"], *_addr_words(flows["src_addr"]),
                          *_addr_words(flows["dst_addr"]), flows["src_port"], flows["dst_port"], proto_ev,
                          flows["icmp_type"], flows["icmp_code"], flows["icmp_id"], flows["first_ns"],
                          flows["ts_ns"]], m)

        # Rows: a forward and/or a reply row per event, in time order.
        trig = flows["trigger"]
        fwd = (flows["packets"] > 0) | ((trig & ev.Trigger.NEW) != 0) | (flows["reply_packets"] == 0)
        rep = flows["reply_packets"] > 0
        fi, ri = np.flatnonzero(fwd), np.flatnonzero(rep)
        idx = np.concatenate([fi, ri])
        is_reply = np.concatenate([np.zeros(len(fi), bool), np.ones(len(ri), bool)])
        untracked_ev = flows["init_hook"] == ev.Hook.NONE
        sweep_ev = (flows["hook"] == ev.Hook.NONE) & ~untracked_ev
        t_ev = np.where(sweep_ev, flows["ts_ns"], flows["last_ns"])
        order = np.argsort(t_ev[idx], kind="stable")
        idx, is_reply = idx[order], is_reply[order]
        e = _Gather(flows, idx)  # per-field gathers: far cheaper than copying whole 128-byte records
        n = len(idx)
        proto = e["l4_proto"]
        tcp = proto == 6
        ported = np.isin(proto, (6, 17, 132))
        icmp = np.isin(proto, (1, 58))
        sport = np.where(is_reply, e["dst_port"], e["src_port"])
        dport = np.where(is_reply, e["src_port"], e["dst_port"])
        flags = np.where(is_reply, e["reply_tcp_flags"], e["tcp_flags"])
        nbytes = np.where(is_reply, e["reply_bytes"], e["bytes"])
        npkts = np.where(is_reply, e["reply_packets"], e["packets"]).astype(np.uint64)
        untracked = untracked_ev[idx]
        init_hook = np.where(untracked, e["hook"], e["init_hook"])
        row_hook = np.where(untracked, e["hook"], np.where(is_reply, _other_hook(e["init_hook"]), e["init_hook"]))
        hs_ok = (e["syn_ns"] > 0) & (e["synack_ns"] >= e["syn_ns"]) & is_reply & tcp & ((flags & ev.TcpFlags.SYN) != 0)
        handshake = np.where(hs_ok, e["synack_ns"] - e["syn_ns"], 0)

        event_idx = np.full(n, -1, dtype=np.int32)
        etrig = e["trigger"]
        for i, (bit, _) in enumerate(reversed(FLOW_EVENTS)):
            event_idx = np.where((etrig & bit) != 0, len(FLOW_EVENTS) - 1 - i, event_idx)
        reason_idx = np.where(is_reply, 2, np.where((etrig & ev.Trigger.NEW) != 0, 0, 1))
        trace_point, subtype = _trace_points(row_hook)
        is_reply_arr = pa.array(is_reply, type=pa.bool_())
        take = pa.array(idx.astype(np.int32))
        swapped = idx.astype(np.int32) + np.where(is_reply, m, 0).astype(np.int32)
        other = idx.astype(np.int32) + np.where(is_reply, 0, m).astype(np.int32)
        a = mix64(ha[idx] ^ is_reply.astype(np.uint64))
        b = mix64(hb[idx] ^ (is_reply.astype(np.uint64) + np.uint64(0x5BD1E995)))
        cols = {
            "time": _wall(t_ev[idx], wall_offset),
            "uuid": uuid_strings(a, b),
            "start_time": _wall(e["first_ns"], wall_offset),
            "node_name": _const(self.config.node_name, n, pa.string()),
            "verdict": _const("FORWARDED", n, pa.string()),
            "flow_type": _const("L3_L4", n, pa.string()),
            "flow_event": _choice(event_idx, [name for _, name in FLOW_EVENTS], pa.string()),
            "event_type": _const(EVENT_TRACE, n, pa.int32()),
            "event_subtype": subtype,
            "trace_point": trace_point,
            "trace_reason": _choice(reason_idx, ["NEW", "ESTABLISHED", "REPLY"], pa.string()),
            "traffic_direction": _directions(init_hook),
            "is_reply": is_reply_arr,
            "reply": is_reply_arr,
            "interface_index": _u(e["ifindex"], pa.uint32()),
            "interface_name": _interface_names(e["ifindex"], interface_names),
            "ip_src": addr_text.take(pa.array(swapped)),
            "ip_dst": addr_text.take(pa.array(other)),
            "ip_version": _u(e["ip_version"], pa.uint8()),
            "l4_protocol": l4_ev.take(take),
            "src_port": _u(sport, pa.uint16(), ~ported),
            "dst_port": _u(dport, pa.uint16(), ~ported),
            "icmp_type": _u(e["icmp_type"], pa.uint8(), ~icmp),
            "icmp_code": _u(e["icmp_code"], pa.uint8(), ~icmp),
            "tcp_flags": _u(flags, pa.uint16(), ~tcp),
            "bytes": _u(nbytes, pa.uint64()),
            "packets": _u(npkts, pa.uint64()),
            "tcp_handshake_ns": _u(handshake, pa.uint64(), ~hs_ok),
            "community_id": cid_ev.take(take),
        }
        return to_batch(cols, n, self._nulls)

    # -- drops ----------------------------------------------------------------------------------

    def drop_rows(self, drops: np.ndarray, wall_offset: int, interface_names: Mapping[int, str]) -> pa.RecordBatch:
        """DROPPED rows for refused or lost packets; benign frees counted, and exported only when listed."""
        kernel_names = self.drop_names.names(drops["drop_reason"])
        benign = drop_reasons.classes(kernel_names) != drop_reasons.DROP
        self._count_drops(kernel_names, benign)
        if benign.any():
            keep = ~benign | np.isin(kernel_names, list(self.config.drop_export_benign))
            self.totals["benign_drops"] += int((~keep).sum())
            drops, kernel_names, benign = drops[keep], kernel_names[keep], benign[keep]
        n = len(drops)
        if n == 0:
            return empty_flows()
        proto = drops["l4_proto"]
        ported = np.isin(proto, (6, 17, 132))
        icmp = np.isin(proto, (1, 58))
        reason, code = drop_reasons.hubble_columns(np.where(benign, "", kernel_names))
        cols = {
            "time": _wall(drops["ts_ns"], wall_offset),
            "node_name": _const(self.config.node_name, n, pa.string()),
            "verdict": _choice(benign.astype(np.int32), ["DROPPED", "TRACED"], pa.string()),
            "drop_reason": reason,
            "drop_reason_code": code,
            "kernel_drop_reason": pa.array(kernel_names.tolist(), type=pa.string()),
            "flow_type": _const("L3_L4", n, pa.string()),
            "flow_event": _const("drop", n, pa.string()),
            "event_type": _const(EVENT_DROP, n, pa.int32()),
            "event_subtype": code.cast(pa.int32()),
            "interface_index": _u(drops["ifindex"], pa.uint32(), drops["ifindex"] == 0),
            "interface_name": _interface_names(drops["ifindex"], interface_names),
            "ip_src": ip_strings(drops["src_addr"], drops["ip_version"]),
            "ip_dst": ip_strings(drops["dst_addr"], drops["ip_version"]),
            "ip_version": _u(drops["ip_version"], pa.uint8()),
            "l4_protocol": _l4_names(proto),
            "src_port": _u(drops["src_port"], pa.uint16(), ~ported),
            "dst_port": _u(drops["dst_port"], pa.uint16(), ~ported),
            "icmp_type": _u(drops["icmp_type"], pa.uint8(), ~icmp),
            "icmp_code": _u(drops["icmp_code"], pa.uint8(), ~icmp),
            "tcp_flags": _u(drops["tcp_flags"], pa.uint16(), proto != 6),
            "bytes": _u(drops["bytes"], pa.uint64()),
            "packets": _u(np.maximum(drops["packets"], 1).astype(np.uint64), pa.uint64()),
        }
        hi, lo = hash128([np.uint64(self._node_hash), np.uint64(2), drops["ifindex"], *_addr_words(drops["src_addr"]),
                          *_addr_words(drops["dst_addr"]), drops["src_port"], drops["dst_port"], proto,
                          drops["drop_reason"], drops["netns_ino"], drops["ts_ns"], drops["bytes"]], n)
        cols["uuid"] = uuid_strings(hi, lo)
        cols["community_id"] = community_id_column(hi_conn(drops, proto), cols)
        return to_batch(cols, n, self._nulls)

    def _count_drops(self, kernel_names: np.ndarray, benign: np.ndarray) -> None:
        if self.metrics is None or not len(kernel_names):
            return
        counter = self.metrics.counter(
            "flowship_agent_kernel_drops_total",
            "Packets the kernel freed with a drop reason, by reason and class: dropped (refused or lost, exported "
            "with verdict DROPPED) or benign (normal operation such as QUEUE_PURGE on close; exported, as TRACED, "
            "only if drop_export_benign lists the reason).", ["reason", "class"])
        keys, counts = np.unique(np.char.add(np.where(benign, "benign|", "dropped|").astype(str),
                                             np.asarray(kernel_names, dtype=str)), return_counts=True)
        for key, count in zip(keys.tolist(), counts.tolist(), strict=True):
            cls, _, reason = key.partition("|")
            counter.labels(reason, cls).inc(count)

    # -- L7 -------------------------------------------------------------------------------------

    def _conn_keys(self, src: np.ndarray, dst: np.ndarray, ver: np.ndarray, proto: np.ndarray,
                   sport: np.ndarray, dport: np.ndarray) -> np.ndarray:
        mini = pa.RecordBatch.from_arrays(
            [ip_strings(src, ver), ip_strings(dst, ver), _l4_names(proto), _u(sport, pa.uint16()),
             _u(dport, pa.uint16())],
            names=["ip_src", "ip_dst", "l4_protocol", "src_port", "dst_port"])
        return connection_hashes(mini)

    def l7_rows(self, l7: np.ndarray, wall_offset: int, interface_names: Mapping[int, str]) -> list[pa.RecordBatch]:
        l7 = l7[np.argsort(l7["ts_ns"], kind="stable")]
        kind = l7["l7_kind"]
        out = []
        http = l7[(kind == ev.L7Kind.HTTP_REQUEST) | (kind == ev.L7Kind.HTTP_RESPONSE)]
        dns = l7[(kind == ev.L7Kind.DNS_QUERY) | (kind == ev.L7Kind.DNS_RESPONSE)]
        if len(http):
            out.append(self._http_rows(http, wall_offset, interface_names))
        if len(dns):
            out.append(self._dns_rows(dns, wall_offset, interface_names))
        return out

    def _l7_base(self, rec: np.ndarray, wall_offset: int, interface_names: Mapping[int, str],
                 salt: int) -> tuple[dict[str, pa.Array], np.ndarray, pa.Array]:
        n = len(rec)
        is_reply = rec["is_reply"] != 0
        hook = rec["hook"]
        init_hook = np.where(is_reply, _other_hook(hook), hook)
        trace_point, _ = _trace_points(hook)
        ip_dst = ip_strings(rec["dst_addr"], rec["ip_version"])
        proto = rec["l4_proto"]
        cols = {
            "time": _wall(rec["ts_ns"], wall_offset),
            "node_name": _const(self.config.node_name, n, pa.string()),
            "verdict": _const("FORWARDED", n, pa.string()),
            "flow_type": _const("L7", n, pa.string()),
            "event_type": _const(EVENT_L7, n, pa.int32()),
            "trace_point": trace_point,
            "traffic_direction": _directions(init_hook),
            "is_reply": pa.array(is_reply, type=pa.bool_()),
            "reply": pa.array(is_reply, type=pa.bool_()),
            "interface_index": _u(rec["ifindex"], pa.uint32()),
            "interface_name": _interface_names(rec["ifindex"], interface_names),
            "ip_src": ip_strings(rec["src_addr"], rec["ip_version"]),
            "ip_dst": ip_dst,
            "ip_version": _u(rec["ip_version"], pa.uint8()),
            "l4_protocol": _l4_names(proto),
            "src_port": _u(rec["src_port"], pa.uint16()),
            "dst_port": _u(rec["dst_port"], pa.uint16()),
        }
        hi, lo = hash128([np.uint64(self._node_hash), np.uint64(salt), rec["ifindex"], *_addr_words(rec["src_addr"]),
                          *_addr_words(rec["dst_addr"]), rec["src_port"], rec["dst_port"], proto, rec["ts_ns"],
                          rec["tcp_seq"], rec["flow_first_ns"], rec["l7_kind"]], n)
        cols["uuid"] = uuid_strings(hi, lo)
        cols["community_id"] = community_id_column(hi_conn(rec, proto), cols)
        conn = self._conn_keys(rec["src_addr"], rec["dst_addr"], rec["ip_version"], proto, rec["src_port"],
                               rec["dst_port"])
        return cols, conn, ip_dst

    def _http_rows(self, rec: np.ndarray, wall_offset: int, interface_names: Mapping[int, str]) -> pa.RecordBatch:
        cols, conn, ip_dst = self._l7_base(rec, wall_offset, interface_names, 3)
        payloads = ev.l7_payloads(rec)
        res = self.http.process(conn, rec["ts_ns"], payloads, direction=(rec["is_reply"] != 0).astype(np.int64),
                                dst_ip=ip_dst.to_pylist(), dst_port=rec["dst_port"])
        base = to_batch(cols, len(rec), self._nulls)
        if res.expanded:
            base = base.take(pa.array(res.row, type=pa.int32()))
        out = _replace(base, res.arrays())
        if res.expanded:  # several messages in one segment: the k-th of them gets its own uuid
            rows = np.asarray(res.row)
            pos = np.arange(len(rows))
            starts = np.maximum.accumulate(np.where(np.r_[True, rows[1:] != rows[:-1]], pos, 0))
            r = rec[rows]
            hi, lo = hash128([np.uint64(self._node_hash), np.uint64(5), r["ifindex"], *_addr_words(r["src_addr"]),
                              *_addr_words(r["dst_addr"]), r["src_port"], r["dst_port"], r["ts_ns"], r["tcp_seq"],
                              pos - starts], len(rows))
            out = _replace(out, {"uuid": uuid_strings(hi, lo)})
        keep = pc.is_valid(out.column("l7_type"))
        return out.filter(keep)

    def _dns_rows(self, rec: np.ndarray, wall_offset: int, interface_names: Mapping[int, str]) -> pa.RecordBatch:
        cols, conn, _ = self._l7_base(rec, wall_offset, interface_names, 4)
        payloads = ev.l7_payloads(rec)
        res = self.dns.process(conn, rec["ts_ns"], payloads, tcp=rec["l4_proto"] == 6)
        out = _replace(to_batch(cols, len(rec), self._nulls), res.arrays())
        return out.filter(pc.is_valid(out.column("l7_type")))

    # -- metrics --------------------------------------------------------------------------------

    def _pairer_metrics(self) -> None:
        if self.metrics is None:
            return
        now: dict[str, int] = {}
        for proto, stats in (("http", self.http.stats), ("dns", self.dns.stats)):
            for key, value in asdict(stats).items():
                if isinstance(value, dict):
                    for reason, n in value.items():
                        now[f"{proto}|parse_error|{reason}"] = n
                else:
                    now[f"{proto}|{key}|"] = value
        counter = self.metrics.counter("flowship_agent_l7_total",
                                       "L7 parsing and pairing outcomes by protocol and event (requests, responses, "
                                       "matched, unmatched_responses, expired..., parse_error by reason).",
                                       ["protocol", "event", "reason"])
        for key, value in now.items():
            delta = value - self._pairer_seen.get(key, 0)
            if delta > 0:
                proto, event, reason = key.split("|")
                counter.labels(proto, event, reason).inc(delta)
            self._pairer_seen[key] = value
        pending = self.metrics.gauge("flowship_agent_l7_pending", "Requests/queries waiting for their answer.",
                                     ["protocol"])
        pending.labels("http").set(self.http.pending)
        pending.labels("dns").set(self.dns.pending)


class _Gather:
    """``rec[idx][field]`` computed per field on demand (and remembered)."""

    def __init__(self, rec: np.ndarray, idx: np.ndarray) -> None:
        self.rec, self.idx, self.cache = rec, idx, {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.cache:
            self.cache[name] = self.rec[name][self.idx]
        return self.cache[name]


def hi_conn(rec: np.ndarray, proto: np.ndarray) -> np.ndarray:
    """A 64-bit key of each record's 5-tuple (and ICMP type/code when the record has them)."""
    parts = [*_addr_words(rec["src_addr"]), *_addr_words(rec["dst_addr"]), rec["src_port"], rec["dst_port"], proto]
    if "icmp_type" in rec.dtype.names:
        parts += [rec["icmp_type"], rec["icmp_code"]]
    return hash128(parts, len(rec))[0]


def _replace(batch: pa.RecordBatch, columns: Mapping[str, pa.Array]) -> pa.RecordBatch:
    names = batch.schema.names
    arrays = list(batch.columns)
    for name, col in columns.items():
        arrays[names.index(name)] = col
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def monotonic_to_wall_offset() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC now (for tests that build events by hand)."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(time.CLOCK_MONOTONIC)
