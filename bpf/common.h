/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Maps, configuration and small helpers shared by every feature header. */
#ifndef FLOWSHIP_COMMON_H
#define FLOWSHIP_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "flowship_abi.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define TC_ACT_UNSPEC (-1)

#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_ICMPV6 58
#define IPPROTO_SCTP 132

/* Written by the loader before load; defaults mirror agent/capture.py CaptureConfig. */
const volatile struct fs_config fs_cfg = {
	.report_interval_ns = 5000000000ULL,
	.aggregation = FS_AGG_FLOW,
	.l7_snap_len = 256,
	.l7_flags = FS_L7F_HTTP | FS_L7F_DNS,
	.dns_port = 53,
	.l7_ports = {
		[80 / 64] = 1ULL << (80 % 64),
		[3000 / 64] = 1ULL << (3000 % 64),
		[5000 / 64] = 1ULL << (5000 % 64),
		[8000 / 64] = 1ULL << (8000 % 64),
		[8080 / 64] = 1ULL << (8080 % 64),
		[9090 / 64] = 1ULL << (9090 % 64),
	},
};

/* Connection key: the (address, port) pair that sorts lower is side "a". */
struct fs_flow_key {
	__u8 addr_a[16];
	__u8 addr_b[16];
	__u16 port_a;
	__u16 port_b;
	__u32 ifindex;
	__u8 proto;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 ip_version;
	__u16 icmp_id;
	__u16 _pad0;
};

/*
 * Flow-table value. Counters are updated with atomic adds by every CPU and taken with atomic
 * exchanges by whoever emits an event, so each packet is counted in exactly one event without a lock.
 * Index 0 is the a->b direction, 1 is b->a.
 */
struct fs_flow_state {
	__u64 first_ns;
	__u64 last_ns;
	__u64 last_report_ns; /* time of the previous event of this entry */
	__u64 syn_ns;
	__u64 synack_ns;
	__u64 bytes[2];
	__u64 packets[2];
	__u32 flags[2];       /* TCP flags since the previous event */
	__u32 ctl;            /* FS_CTL_* seen so far (cumulative) */
	__u8 initiator;       /* 0: side a initiated, 1: side b */
	__u8 ab_hook;         /* hook on which a->b packets pass */
	__u8 eflags;          /* FS_EF_* fixed at creation */
	__u8 _pad0;
};

/* Control flags seen per side (fs_flow_state.ctl); the _B variants are the _A ones shifted by 8. */
#define FS_CTL_SYN 0x01
#define FS_CTL_SYNACK 0x02
#define FS_CTL_FIN 0x04
#define FS_CTL_RST 0x08
#define FS_CTL_ENDED 0x10000

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536); /* resized by the loader */
	__type(key, struct fs_flow_key);
	__type(value, struct fs_flow_state);
} fs_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20); /* resized by the loader */
} fs_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20); /* resized by the loader */
} fs_l7_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fs_stats);
} fs_stats SEC(".maps");

static __always_inline void fs_stat_inc(enum fs_stat idx)
{
	__u32 zero = 0;
	struct fs_stats *s = bpf_map_lookup_elem(&fs_stats, &zero);

	if (s && idx < FS_STAT_MAX)
		__sync_fetch_and_add(&s->counters[idx], 1);
}

static __always_inline void fs_copy16(__u8 *dst, const __u8 *src)
{
	__builtin_memcpy(dst, src, 16);
}

#endif /* FLOWSHIP_COMMON_H */
