/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * flowship_abi.h - the only contract between the eBPF programs and user space.
 *
 * Every struct here has a numpy twin in agent/events.py; tests/agent/test_kernel_abi.py
 * compiles this header and checks that sizes and offsets agree. Change both together.
 *
 * Rules that keep user-space decoding a single numpy view:
 *  - every record of the flow ring ("fs_events") is a struct fs_flow_event, whatever its kind
 *    (flow or drop), so the ring is a regular array of 8-byte header + 128-byte record;
 *  - every record of the L7 ring ("fs_l7_events") is a struct fs_l7_event followed by exactly
 *    fs_config.l7_snap_len bytes, fixed for the lifetime of a loaded object;
 *  - sizes are multiples of 8 so the ring never pads between records;
 *  - addresses are 16 bytes in network order, IPv4 mapped as ::ffff:a.b.c.d;
 *  - ports, ICMP ids and counters are host order;
 *  - times are bpf_ktime_get_ns() (CLOCK_MONOTONIC); user space adds a wall-clock offset.
 */
#ifndef FLOWSHIP_ABI_H
#define FLOWSHIP_ABI_H

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

/* fs_flow_event.kind */
#define FS_KIND_FLOW 1 /* counters of one connection since its previous event */
#define FS_KIND_DROP 2 /* one packet freed by the kernel with a drop reason */

/* fs_flow_event.trigger: why a flow event was emitted (bitmask, several may be set) */
#define FS_TRIG_NEW 0x01       /* first packet of a flow-table entry */
#define FS_TRIG_FLAGS 0x02     /* a TCP control flag (SYN, SYN-ACK, FIN, RST) seen for the first time */
#define FS_TRIG_REPORT 0x04    /* report interval elapsed since the previous event */
#define FS_TRIG_END 0x08       /* FIN seen both ways, or RST: the connection is over */
#define FS_TRIG_EVICT 0x10     /* entry removed by a sweep (idle, ended, or flush); last event of the entry */
#define FS_TRIG_PACKET 0x20    /* per-packet aggregation level (debugging) */
#define FS_TRIG_UNTRACKED 0x40 /* flow table full: this packet's counters only, no entry exists */

/* fs_flow_event.hook / init_hook, fs_l7_event.hook */
#define FS_HOOK_NONE 0      /* emitted by a sweep, not by a packet */
#define FS_HOOK_INGRESS 1   /* tc ingress */
#define FS_HOOK_EGRESS 2    /* tc egress */
#define FS_HOOK_KFREE_SKB 3 /* tp_btf/kfree_skb */

/* fs_flow_event.eflags */
#define FS_EF_INITIATOR_GUESSED 0x01 /* TCP entry created without SYN/SYN-ACK: src/dst may be swapped */
#define FS_EF_ENDED 0x02             /* FIN both ways or RST already seen on this entry */

/* TCP flag bits as used in every flags field (same numbering as the flow model) */
#define FS_TCP_FIN 0x001
#define FS_TCP_SYN 0x002
#define FS_TCP_RST 0x004
#define FS_TCP_PSH 0x008
#define FS_TCP_ACK 0x010
#define FS_TCP_URG 0x020
#define FS_TCP_ECE 0x040
#define FS_TCP_CWR 0x080
#define FS_TCP_NS 0x100

/*
 * One record of the flow ring. For FS_KIND_FLOW, src is the connection's initiator (client) and the
 * counters are those accumulated since the previous event of the same entry; an entry is identified
 * by (ifindex, addresses, ports, l4_proto, icmp_type/code/id, first_ns). For FS_KIND_DROP, src/dst are
 * the dropped packet's own, packets = 1 and bytes = skb->len.
 */
struct fs_flow_event {
	__u64 ts_ns;           /* when the event was emitted */
	__u64 first_ns;        /* first packet of the entry */
	__u64 last_ns;         /* latest packet of the entry */
	__u64 syn_ns;          /* first SYN from the initiator, 0 if not seen */
	__u64 synack_ns;       /* first SYN-ACK from the responder, 0 if not seen */
	__u64 bytes;           /* initiator -> responder bytes (skb->len, L2 frame) since previous event */
	__u64 reply_bytes;     /* responder -> initiator */
	__u32 packets;         /* initiator -> responder packets since previous event */
	__u32 reply_packets;   /* responder -> initiator */
	__u8 src_addr[16];     /* initiator address (drop: packet source) */
	__u8 dst_addr[16];     /* responder address (drop: packet destination) */
	__u32 ifindex;         /* interface of the hook (drop: skb->dev or skb_iif) */
	__u32 drop_reason;     /* enum skb_drop_reason value of this kernel (drop only) */
	__u32 netns_ino;       /* network namespace inode (drop only; 0 for flow events) */
	__u16 src_port;        /* TCP/UDP/SCTP source port of the initiator */
	__u16 dst_port;
	__u16 tcp_flags;       /* OR of initiator's TCP flags since previous event */
	__u16 reply_tcp_flags; /* OR of responder's TCP flags since previous event */
	__u16 icmp_id;         /* ICMP echo identifier (echo request/reply share one entry) */
	__u8 kind;             /* FS_KIND_* */
	__u8 trigger;          /* FS_TRIG_* bitmask */
	__u8 l4_proto;         /* IPPROTO_* */
	__u8 ip_version;       /* 4 or 6 */
	__u8 icmp_type;        /* ICMP(v6) type; echo entries use the request type */
	__u8 icmp_code;
	__u8 hook;             /* FS_HOOK_* of the packet that caused the event */
	__u8 init_hook;        /* FS_HOOK_* on which the initiator's packets pass this interface */
	__u8 eflags;           /* FS_EF_* */
	__u8 _pad0;
};

/* fs_l7_event.l7_kind */
#define FS_L7_HTTP_REQUEST 1
#define FS_L7_HTTP_RESPONSE 2
#define FS_L7_DNS_QUERY 3
#define FS_L7_DNS_RESPONSE 4

/* Largest snap length the programs accept (fs_config.l7_snap_len is clamped to it). */
#define FS_L7_SNAP_MAX 1024

/*
 * One record of the L7 ring: header below followed by l7_snap_len payload bytes (captured_len of them
 * valid). src/dst are the segment's own sender and receiver; is_reply says whether the sender is the
 * responder of the flow entry identified by (ifindex, addresses, ports, l4_proto, flow_first_ns).
 */
struct fs_l7_event {
	__u64 ts_ns;
	__u64 flow_first_ns; /* first_ns of the flow entry this segment belongs to (0 if untracked) */
	__u8 src_addr[16];
	__u8 dst_addr[16];
	__u32 ifindex;
	__u32 tcp_seq;       /* TCP sequence number of the segment (0 for UDP) */
	__u32 payload_len;   /* L4 payload bytes in this segment */
	__u16 src_port;
	__u16 dst_port;
	__u16 captured_len;  /* valid bytes at data[] (<= l7_snap_len) */
	__u8 l4_proto;
	__u8 ip_version;
	__u8 hook;           /* FS_HOOK_INGRESS or FS_HOOK_EGRESS */
	__u8 l7_kind;        /* FS_L7_* */
	__u8 is_reply;
	__u8 _pad0;
	/* __u8 data[l7_snap_len] follows */
};

/* fs_config.aggregation */
#define FS_AGG_FLOW 0   /* events on new flow, flag change, report interval, end, eviction */
#define FS_AGG_PACKET 1 /* one event per packet (debugging) */

/* fs_config.l7_flags */
#define FS_L7F_HTTP 0x1      /* HTTP/1.x snippets on l7_ports */
#define FS_L7F_ALL_PORTS 0x2 /* HTTP detection on every TCP port */
#define FS_L7F_DNS 0x4       /* DNS over UDP and TCP on dns_port */

#define FS_L7_PORT_WORDS 1024 /* 65536-bit port bitmap */

/* Set by the loader in .rodata before load; the verifier treats it as constants. */
struct fs_config {
	__u64 report_interval_ns; /* periodic report per active flow */
	__u32 aggregation;        /* FS_AGG_* */
	__u32 l7_snap_len;        /* payload bytes per L7 record, multiple of 8, <= FS_L7_SNAP_MAX */
	__u32 l7_flags;           /* FS_L7F_* */
	__u32 drop_netns_ino;     /* report drops only from this netns inode; 0 = all */
	__u16 dns_port;
	__u16 _pad0[3];
	__u64 l7_ports[FS_L7_PORT_WORDS]; /* bit p set: TCP port p carries HTTP */
};

/* Arguments of the sweep program (fs_sweep), passed as BPF_PROG_TEST_RUN context. */
struct fs_sweep_args {
	__u64 idle_ns;    /* evict entries without a packet for this long */
	__u64 ended_ns;   /* evict ended (FIN/FIN or RST) entries this long after their last packet */
	__u32 flush;      /* 1: evict every entry (shutdown) */
	__u32 _pad0;
	/* outputs */
	__u32 visited;
	__u32 reported;   /* entries that got an FS_TRIG_REPORT event */
	__u32 evicted;    /* entries removed with an FS_TRIG_EVICT event */
	__u32 ring_full;  /* events that could not be reserved (entries kept for the next sweep) */
};

/* Index into the per-CPU stats array value (struct fs_stats). */
enum fs_stat {
	FS_STAT_PACKETS = 0,          /* packets seen by the tc programs */
	FS_STAT_FLOW_EVENTS,          /* flow events written */
	FS_STAT_DROP_EVENTS,          /* drop events written */
	FS_STAT_L7_EVENTS,            /* L7 events written */
	FS_STAT_LOST_FLOW_RING,       /* flow event not written: ring full (counters kept in the entry) */
	FS_STAT_LOST_DROP_RING,       /* drop event lost: ring full */
	FS_STAT_LOST_L7_RING,         /* L7 event lost: ring full */
	FS_STAT_LOST_FLOW_MAP,        /* flow table insert failed (full): packet reported untracked */
	FS_STAT_LOST_UNTRACKED,       /* flow table full and ring full: packet not counted anywhere */
	FS_STAT_NON_IP,               /* packets that are not IPv4/IPv6 (not counted in flows) */
	FS_STAT_MAX,
};

struct fs_stats {
	__u64 counters[FS_STAT_MAX];
};

#endif /* FLOWSHIP_ABI_H */
