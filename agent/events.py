"""numpy twins of the records in bpf/flowship_abi.h, and column helpers over them.

A ring buffer's consumed region is a regular array of records, so one structured dtype turns it
into columns without a Python loop. tests/agent/test_kernel_abi.py checks every dtype here against
the C header (sizes and offsets), so the two cannot drift apart silently.
"""

from __future__ import annotations

import ipaddress
from enum import IntEnum, IntFlag

import numpy as np

# ---- constants mirrored from flowship_abi.h ----


class Kind(IntEnum):
    """fs_flow_event.kind."""

    FLOW = 1
    DROP = 2


class Trigger(IntFlag):
    """fs_flow_event.trigger: why a flow event was emitted."""

    NEW = 0x01
    FLAGS = 0x02
    REPORT = 0x04
    END = 0x08
    EVICT = 0x10
    PACKET = 0x20
    UNTRACKED = 0x40


class Hook(IntEnum):
    """Where an event was observed."""

    NONE = 0
    INGRESS = 1
    EGRESS = 2
    KFREE_SKB = 3


class EventFlags(IntFlag):
    """fs_flow_event.eflags."""

    INITIATOR_GUESSED = 0x01
    ENDED = 0x02


class TcpFlags(IntFlag):
    """TCP flag bits, the flow model's numbering."""

    FIN = 0x001
    SYN = 0x002
    RST = 0x004
    PSH = 0x008
    ACK = 0x010
    URG = 0x020
    ECE = 0x040
    CWR = 0x080
    NS = 0x100


class L7Kind(IntEnum):
    """fs_l7_event.l7_kind."""

    HTTP_REQUEST = 1
    HTTP_RESPONSE = 2
    DNS_QUERY = 3
    DNS_RESPONSE = 4


class Aggregation(IntEnum):
    """fs_config.aggregation."""

    FLOW = 0
    PACKET = 1


class L7Flags(IntFlag):
    """fs_config.l7_flags."""

    HTTP = 0x1
    ALL_PORTS = 0x2
    DNS = 0x4


class Stat(IntEnum):
    """Index into struct fs_stats.counters (enum fs_stat)."""

    PACKETS = 0
    FLOW_EVENTS = 1
    DROP_EVENTS = 2
    L7_EVENTS = 3
    LOST_FLOW_RING = 4
    LOST_DROP_RING = 5
    LOST_L7_RING = 6
    LOST_FLOW_MAP = 7
    LOST_UNTRACKED = 8
    NON_IP = 9


STAT_COUNT = 10
L7_SNAP_MAX = 1024
L7_PORT_WORDS = 1024

# ---- record layouts ----

FLOW_EVENT_DTYPE = np.dtype(
    [
        ("ts_ns", "<u8"),
        ("first_ns", "<u8"),
        ("last_ns", "<u8"),
        ("syn_ns", "<u8"),
        ("synack_ns", "<u8"),
        ("bytes", "<u8"),
        ("reply_bytes", "<u8"),
        ("packets", "<u4"),
        ("reply_packets", "<u4"),
        ("src_addr", "u1", (16,)),
        ("dst_addr", "u1", (16,)),
        ("ifindex", "<u4"),
        ("drop_reason", "<u4"),
        ("netns_ino", "<u4"),
        ("src_port", "<u2"),
        ("dst_port", "<u2"),
        ("tcp_flags", "<u2"),
        ("reply_tcp_flags", "<u2"),
        ("icmp_id", "<u2"),
        ("kind", "u1"),
        ("trigger", "u1"),
        ("l4_proto", "u1"),
        ("ip_version", "u1"),
        ("icmp_type", "u1"),
        ("icmp_code", "u1"),
        ("hook", "u1"),
        ("init_hook", "u1"),
        ("eflags", "u1"),
        ("_pad0", "u1"),
    ]
)
"""struct fs_flow_event: every record of the flow ring (flows and drops)."""

L7_HEADER_DTYPE = np.dtype(
    [
        ("ts_ns", "<u8"),
        ("flow_first_ns", "<u8"),
        ("src_addr", "u1", (16,)),
        ("dst_addr", "u1", (16,)),
        ("ifindex", "<u4"),
        ("tcp_seq", "<u4"),
        ("payload_len", "<u4"),
        ("src_port", "<u2"),
        ("dst_port", "<u2"),
        ("captured_len", "<u2"),
        ("l4_proto", "u1"),
        ("ip_version", "u1"),
        ("hook", "u1"),
        ("l7_kind", "u1"),
        ("is_reply", "u1"),
        ("_pad0", "u1"),
    ]
)
"""struct fs_l7_event without its trailing payload bytes."""

CONFIG_DTYPE = np.dtype(
    [
        ("report_interval_ns", "<u8"),
        ("aggregation", "<u4"),
        ("l7_snap_len", "<u4"),
        ("l7_flags", "<u4"),
        ("drop_netns_ino", "<u4"),
        ("dns_port", "<u2"),
        ("_pad0", "<u2", (3,)),
        ("l7_ports", "<u8", (L7_PORT_WORDS,)),
    ]
)
"""struct fs_config: the object's .rodata, written before load."""

SWEEP_ARGS_DTYPE = np.dtype(
    [
        ("idle_ns", "<u8"),
        ("ended_ns", "<u8"),
        ("flush", "<u4"),
        ("_pad0", "<u4"),
        ("visited", "<u4"),
        ("reported", "<u4"),
        ("evicted", "<u4"),
        ("ring_full", "<u4"),
    ]
)
"""struct fs_sweep_args: context of the sweep program."""

STATS_DTYPE = np.dtype([("counters", "<u8", (STAT_COUNT,))])
"""struct fs_stats: one per CPU in the fs_stats map."""


def l7_event_dtype(snap_len: int) -> np.dtype:
    """struct fs_l7_event followed by snap_len payload bytes (the L7 ring's fixed record)."""
    if snap_len <= 0 or snap_len % 8 or snap_len > L7_SNAP_MAX:
        raise ValueError(f"l7 snap length must be a multiple of 8 in 8..{L7_SNAP_MAX}, got {snap_len}")
    header = L7_HEADER_DTYPE
    return np.dtype(
        {
            "names": [*header.names, "data"],
            "formats": [header.fields[n][0] for n in header.names] + [np.dtype(("u1", (snap_len,)))],
            "offsets": [header.fields[n][1] for n in header.names] + [header.itemsize],
            "itemsize": header.itemsize + snap_len,
        }
    )


# ---- column helpers (vectorised; no per-record Python in the data path) ----

_V4_PREFIX = np.array([0] * 10 + [0xFF, 0xFF], dtype=np.uint8)


def ipv4_column(addr: np.ndarray) -> np.ndarray:
    """uint32 (host order) of IPv4-mapped 16-byte addresses, for column filters and joins."""
    b = addr[:, 12:16].astype(np.uint32)
    return (b[:, 0] << 24) | (b[:, 1] << 16) | (b[:, 2] << 8) | b[:, 3]


def is_ipv4_mapped(addr: np.ndarray) -> np.ndarray:
    """True where a 16-byte address is ::ffff:a.b.c.d."""
    return np.all(addr[:, :12] == _V4_PREFIX, axis=1)


def address_bytes(addr: str) -> np.ndarray:
    """The 16-byte form the kernel uses for an address string (IPv4 mapped into IPv6)."""
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        ip = ipaddress.IPv6Address("::ffff:" + str(ip))
    return np.frombuffer(ip.packed, dtype=np.uint8)


def address_strings(addr: np.ndarray, ip_version: np.ndarray) -> list[str]:
    """Printable addresses; for display and tests, not for the data path."""
    out = []
    for raw, ver in zip(addr, ip_version, strict=True):
        packed = bytes(raw)
        out.append(str(ipaddress.IPv4Address(packed[12:])) if ver == 4 else str(ipaddress.IPv6Address(packed)))
    return out


def match_address(addr: np.ndarray, value: str) -> np.ndarray:
    """Boolean mask of rows whose 16-byte address equals value."""
    return np.all(addr == address_bytes(value), axis=1)


def l7_payloads(events: np.ndarray) -> list[bytes]:
    """Captured payload bytes of L7 records (captured_len of each)."""
    return [bytes(row["data"][: row["captured_len"]]) for row in events]
