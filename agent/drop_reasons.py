"""What a kernel drop means: every ``enum skb_drop_reason`` member classified, and the Hubble mapping.

The kernel calls ``kfree_skb_reason()`` both when it refuses or loses a packet someone sent (netfilter,
no socket, no route, bad checksum, a full queue) and when it frees packets as part of normal work: the
receive queue purged when a socket closes, duplicates of data already received, reordered old ACKs.
Exporting the second kind as DROPPED buried three denied connections under fifty closes, so every reason
is classified here from the kernel's own description (include/net/dropreason-core.h):

* ``DROP``: verdict DROPPED, Hubble ``drop_reason`` where the meaning matches;
* ``BENIGN``: counted per reason in ``flowship_agent_kernel_drops_total``, exported (verdict TRACED) only
  when the agent config lists the reason in ``drop_export_benign``;
* ``NOT_REPORTED``: not a drop (``SKB_CONSUMED``...), or never sent by the kernel program
  (``NOT_SPECIFIED``: plain ``kfree_skb()``, see docs/agent.md).

A reason missing from the table (a kernel newer than it) counts as ``DROP``: hiding an unknown drop is
worse than showing a benign one. The table is documented in docs/agent.md; tests check that every reason
of the running kernel's BTF is classified and that the documentation matches.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

DROP, BENIGN, NOT_REPORTED = "drop", "benign", "not_reported"
EXPORT_ALL = "ALL"

# kernel short name -> (Hubble DropReason name, its number in flow.proto)
HUBBLE_DROP_REASONS: dict[str, tuple[str, int]] = {
    "NETFILTER_DROP": ("POLICY_DENIED", 133),
    "NO_SOCKET": ("SOCKET_LOOKUP_FAILED", 178),
    "IP_RPFILTER": ("INVALID_SOURCE_IP", 132),
    "IP_OUTNOROUTES": ("FIB_LOOKUP_FAILED", 169),
    "IP_NOPROTO": ("UNKNOWN_L4_PROTOCOL", 142),
    "PKT_TOO_SMALL": ("INVALID_PACKET_DROPPED", 134),
    "IP_CSUM": ("INVALID_PACKET_DROPPED", 134),
    "TCP_CSUM": ("INVALID_PACKET_DROPPED", 134),
    "UDP_CSUM": ("INVALID_PACKET_DROPPED", 134),
}

# Reasons that are not refusals or losses, with why (the kernel's description first).
BENIGN_REASONS: dict[str, str] = {
    "QUEUE_PURGE": "bulk free: a socket's or device's queues freed when it closes",
    "SOCKET_CLOSE": "socket is close()d: its queued packets freed",
    "UNIX_DISCONNECT": "unix socket queue purged on re-connect or peer close (never IP)",
    "UNIX_SKIP_OOB": "unix socket out-of-band byte skipped by recv() (never IP)",
    "OTHERHOST": "packet for another host, seen because the interface is promiscuous",
    "TCP_OLD_DATA": "TCP data already received (spurious retransmission)",
    "TCP_OLD_SEQUENCE": "old SEQ field (duplicate packet)",
    "TCP_OFOMERGE": "data already in the out-of-order queue",
    "TCP_OFO_DROP": "data already in the receive queue",
    "TCP_OLD_ACK": "TCP ACK is old, but in window (reordered ACK)",
    "TCP_RFC7323_PAWS_ACK": "PAWS check, old ACK packet (common, no dupack sent)",
    "DUP_FRAG": "duplicate IP fragment",
    "IPV6_NDISC_NS_OTHERHOST": "neighbour solicitation for another host",
}

NOT_REPORTED_REASONS: dict[str, str] = {
    "SKB_NOT_DROPPED_YET": "not a drop",
    "SKB_CONSUMED": "packet consumed, not a drop (traced as consume_skb, not kfree_skb)",
    "NOT_SPECIFIED": "plain kfree_skb() without a reason: skipped by the kernel program",
    "MAX": "end marker of the enum, not a reason",
    "SUBSYS_MASK": "subsystem mask of the enum, not a reason",
}

# Every other reason the kernel documents refuses or loses a packet someone sent (TCP_FILTER: Linux 5.17's
# name of SOCKET_FILTER).
DROP_REASONS: tuple[str, ...] = (
    # sockets
    "NO_SOCKET", "SOCKET_FILTER", "TCP_FILTER", "SOCKET_RCVBUFF", "SOCKET_BACKLOG", "PROTO_MEM", "PKT_TOO_SMALL",
    # checksums and headers
    "TCP_CSUM", "UDP_CSUM", "IP_CSUM", "ICMP_CSUM", "SKB_CSUM", "IP_INHDR", "HDR_TRUNC", "DEV_HDR",
    "IPV6_BAD_EXTHDR", "IPV6_TOO_MANY_EXTHDRS", "INVALID_PROTO", "UNHANDLED_PROTO", "IP_NOPROTO", "PKT_TOO_BIG",
    "UNICAST_IN_L2_MULTICAST", "MAC_INVALID_SOURCE", "LOCAL_MAC", "MAC_IEEE_MAC_CONTROL",
    # policy and filters
    "NETFILTER_DROP", "XFRM_POLICY", "BPF_CGROUP_EGRESS", "TC_EGRESS", "TC_INGRESS", "XDP", "SECURITY_HOOK",
    "TAP_FILTER", "TAP_TXFILTER", "TC_COOKIE_ERROR", "TC_CHAIN_NOTFOUND", "TC_RECLASSIFY_LOOP",
    "BRIDGE_INGRESS_STP_STATE", "ARP_PVLAN_DISABLE", "PSP_INPUT", "PSP_OUTPUT",
    # routing and addresses
    "IP_RPFILTER", "IP_OUTNOROUTES", "IP_INADDRERRORS", "IP_INNOROUTES", "IP_LOCAL_SOURCE", "IP_INVALID_SOURCE",
    "IP_LOCALNET", "IP_INVALID_DEST", "IPV6DISABLED", "BLACKHOLE", "NO_TX_TARGET", "RECURSION_LIMIT",
    # neighbours
    "NEIGH_CREATEFAIL", "NEIGH_FAILED", "NEIGH_QUEUEFULL", "NEIGH_DEAD", "NEIGH_HH_FILLFAIL",
    # TCP segments refused
    "TCP_AUTH_HDR", "TCP_MD5NOTFOUND", "TCP_MD5UNEXPECTED", "TCP_MD5FAILURE", "TCP_AONOTFOUND",
    "TCP_AOUNEXPECTED", "TCP_AOKEYNOTFOUND", "TCP_AOFAILURE", "TCP_FLAGS", "TCP_ABORT_ON_DATA", "TCP_ZEROWINDOW",
    "TCP_OVERWINDOW", "TCP_RFC7323_PAWS", "TCP_RFC7323_TW_PAWS", "TCP_RFC7323_TSECR", "TCP_LISTEN_OVERFLOW",
    "TCP_INVALID_SEQUENCE", "TCP_INVALID_END_SEQUENCE", "TCP_INVALID_ACK_SEQUENCE", "TCP_RESET",
    "TCP_INVALID_SYN", "TCP_CLOSE", "TCP_FASTOPEN", "TCP_TOO_OLD_ACK", "TCP_ACK_UNSENT_DATA",
    "TCP_OFO_QUEUE_PRUNE", "TCP_MINTTL",
    # queues, memory, devices
    "QDISC_DROP", "QDISC_OVERLIMIT", "QDISC_CONGESTED", "CAKE_FLOOD", "FQ_BAND_LIMIT", "FQ_HORIZON_LIMIT",
    "FQ_FLOW_LIMIT", "DUALPI2_STEP_DROP", "CPU_BACKLOG", "FULL_RING", "NOMEM", "PFMEMALLOC", "SKB_GSO_SEG", "SKB_BAD_GSO",
    "SKB_UCOPY_FAULT", "SKB_RX_HEADROOM", "DEV_READY", "PACKET_SOCK_ERROR",
    # fragments
    "FRAG_REASM_TIMEOUT", "FRAG_TOO_FAR",
    # IPv6 neighbour discovery
    "IPV6_NDISC_FRAG", "IPV6_NDISC_HOP_LIMIT", "IPV6_NDISC_BAD_CODE", "IPV6_NDISC_BAD_OPTIONS",
    # tunnels
    "VXLAN_INVALID_HDR", "VXLAN_VNI_NOT_FOUND", "VXLAN_ENTRY_EXISTS", "IP_TUNNEL_ECN", "TUNNEL_TXINFO",
    # CAN (never IP, listed for completeness)
    "CAN_RX_INVALID_FRAME", "CANFD_RX_INVALID_FRAME", "CANXL_RX_INVALID_FRAME",
)

CLASSES: dict[str, str] = {
    **{name: DROP for name in DROP_REASONS},
    **{name: BENIGN for name in BENIGN_REASONS},
    **{name: NOT_REPORTED for name in NOT_REPORTED_REASONS},
}


def classify(name: str) -> str:
    """DROP, BENIGN or NOT_REPORTED; a reason this table does not know (newer kernel, bare number) is DROP."""
    return CLASSES.get(name, DROP)


def classes(kernel_names: np.ndarray) -> np.ndarray:
    """Vectorised :func:`classify`: one lookup per distinct name."""
    uniq, inverse = np.unique(np.asarray(kernel_names, dtype=object).astype(str), return_inverse=True)
    table = np.array([classify(u) for u in uniq.tolist()], dtype=object)
    return table[inverse.reshape(-1)] if len(uniq) else np.array([], dtype=object)


def export_set(names: list[str] | tuple[str, ...] | frozenset[str]) -> frozenset[str]:
    """The benign reasons a ``drop_export_benign`` list selects (``ALL``: every one)."""
    if EXPORT_ALL in names:
        return frozenset(BENIGN_REASONS)
    return frozenset(n.removeprefix("SKB_DROP_REASON_") for n in names)


def export_problems(names: list[str], key: str = "drop_export_benign") -> list[str]:
    """Config problems of a ``drop_export_benign`` list, as ``key[i]: message``."""
    problems = []
    for i, raw in enumerate(names):
        name = str(raw).removeprefix("SKB_DROP_REASON_")
        if name == EXPORT_ALL or CLASSES.get(name) == BENIGN:
            continue
        if name in NOT_REPORTED_REASONS:
            why = f"never reported ({NOT_REPORTED_REASONS[name]})"
        elif name in CLASSES:
            why = "a real drop, always exported with verdict DROPPED"
        else:
            why = "not a kernel drop reason flowship knows"
        problems.append(f"{key}[{i}]: {raw!r} is {why}; expected {EXPORT_ALL} or one of the benign reasons: "
                        + ", ".join(sorted(BENIGN_REASONS)))
    return problems


def hubble_columns(kernel_names: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """(drop_reason, drop_reason_code) columns for an array of kernel reason names."""
    uniq, inverse = np.unique(np.asarray(kernel_names, dtype=object).astype(str), return_inverse=True)
    names = [HUBBLE_DROP_REASONS.get(u, (None, None))[0] for u in uniq.tolist()]
    codes = [HUBBLE_DROP_REASONS.get(u, (None, None))[1] for u in uniq.tolist()]
    take = pa.array(inverse.reshape(-1).astype(np.int32))
    return (pa.array(names, type=pa.string()).take(take), pa.array(codes, type=pa.uint32()).take(take))
