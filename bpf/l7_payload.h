/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * L7 payload snippets: the first fs_cfg.l7_snap_len bytes of TCP segments that start an HTTP/1.x
 * request or response on the configured ports, and of DNS messages over UDP and TCP. Parsing is
 * left to user space; the kernel only recognises where a message starts.
 */
#ifndef FLOWSHIP_L7_PAYLOAD_H
#define FLOWSHIP_L7_PAYLOAD_H

#include "common.h"
#include "packet.h"

#define FS_STR4(a, b, c, d) ((__u32)(a) | ((__u32)(b) << 8) | ((__u32)(c) << 16) | ((__u32)(d) << 24))

static __always_inline bool fs_l7_port(__u16 port)
{
	return fs_cfg.l7_ports[(port >> 6) & (FS_L7_PORT_WORDS - 1)] & (1ULL << (port & 63));
}

/* FS_L7_HTTP_REQUEST / _RESPONSE when the 8 bytes start an HTTP/1.x message, else 0. */
static __always_inline __u8 fs_http_kind(const __u8 *b)
{
	__u32 w0, w1;

	__builtin_memcpy(&w0, b, 4);
	__builtin_memcpy(&w1, b + 4, 4);
	switch (w0) {
	case FS_STR4('H', 'T', 'T', 'P'):
		return (b[4] == '/' && b[5] == '1' && b[6] == '.') ? FS_L7_HTTP_RESPONSE : 0;
	case FS_STR4('G', 'E', 'T', ' '):
	case FS_STR4('P', 'U', 'T', ' '):
		return FS_L7_HTTP_REQUEST;
	case FS_STR4('P', 'O', 'S', 'T'):
	case FS_STR4('H', 'E', 'A', 'D'):
		return b[4] == ' ' ? FS_L7_HTTP_REQUEST : 0;
	case FS_STR4('P', 'A', 'T', 'C'):
		return (b[4] == 'H' && b[5] == ' ') ? FS_L7_HTTP_REQUEST : 0;
	case FS_STR4('T', 'R', 'A', 'C'):
		return (b[4] == 'E' && b[5] == ' ') ? FS_L7_HTTP_REQUEST : 0;
	case FS_STR4('D', 'E', 'L', 'E'):
		return w1 == FS_STR4('T', 'E', ' ', 0) || (b[4] == 'T' && b[5] == 'E' && b[6] == ' ') ?
			       FS_L7_HTTP_REQUEST : 0;
	case FS_STR4('O', 'P', 'T', 'I'):
		return w1 == FS_STR4('O', 'N', 'S', ' ') ? FS_L7_HTTP_REQUEST : 0;
	case FS_STR4('C', 'O', 'N', 'N'):
		return w1 == FS_STR4('E', 'C', 'T', ' ') ? FS_L7_HTTP_REQUEST : 0;
	}
	return 0;
}

#define FS_CAND_DNS_UDP 1
#define FS_CAND_DNS_TCP 2
#define FS_CAND_HTTP 3

/* Port-based preselection, before any payload byte is read. */
static __always_inline __u8 fs_l7_candidate(const struct fs_pkt *p)
{
	__u16 dns = fs_cfg.dns_port;

	if ((fs_cfg.l7_flags & FS_L7F_DNS) && (p->sport == dns || p->dport == dns)) {
		if (p->proto == IPPROTO_UDP && p->payload_len >= 12)
			return FS_CAND_DNS_UDP;
		if (p->proto == IPPROTO_TCP)
			return FS_CAND_DNS_TCP;
	}
	if ((fs_cfg.l7_flags & FS_L7F_HTTP) && p->proto == IPPROTO_TCP && p->payload_len >= 8 &&
	    ((fs_cfg.l7_flags & FS_L7F_ALL_PORTS) || fs_l7_port(p->sport) || fs_l7_port(p->dport)))
		return FS_CAND_HTTP;
	return 0;
}

/* Which kind of L7 message starts at the payload (absolute offset off), 0 for none. */
static __always_inline __u8 fs_l7_kind(struct __sk_buff *skb, const struct fs_pkt *p, __u8 cand, __u32 off)
{
	__u8 b[8];

	if (cand == FS_CAND_DNS_TCP)
		return p->dport == fs_cfg.dns_port ? FS_L7_DNS_QUERY : FS_L7_DNS_RESPONSE;
	if (bpf_skb_load_bytes(skb, off, b, sizeof(b)) < 0) /* both candidates have >= 8 bytes */
		return 0;
	if (cand == FS_CAND_DNS_UDP)
		return (b[2] & 0x80) ? FS_L7_DNS_RESPONSE : FS_L7_DNS_QUERY;
	return fs_http_kind(b);
}

static __always_inline void fs_l7_packet(struct __sk_buff *skb, const struct fs_pkt *p,
					 const struct fs_flow_state *st, __u8 dir, __u8 hook, __u64 now)
{
	struct fs_l7_event *e;
	__u32 snap = fs_cfg.l7_snap_len; /* a constant for the verifier: .rodata is frozen */
	__u64 n, last; /* 64-bit: register copies keep their scalar id (6.1 drops it on 32-bit moves) */
	__u32 off;
	int netoff;
	__u8 cand, kind;

	if (!fs_cfg.l7_flags || !p->has_l4 || p->payload_len == 0)
		return;
	cand = fs_l7_candidate(p);
	if (!cand)
		return;
	netoff = fs_net_offset(skb);
	if (netoff < 0)
		return;
	off = netoff + p->payload_off;
	kind = fs_l7_kind(skb, p, cand, off);
	if (!kind)
		return;
	if (snap > FS_L7_SNAP_MAX)
		snap = FS_L7_SNAP_MAX;
	n = p->payload_len < snap ? p->payload_len : snap;

	e = bpf_ringbuf_reserve(&fs_l7_events, sizeof(*e) + snap, 0);
	if (!e) {
		fs_stat_inc(FS_STAT_LOST_L7_RING);
		return;
	}
	/*
	 * Copy length for Linux 6.1's verifier, which cannot bound n from the source's tests: the
	 * compiler drops n > snap (it knows n <= snap) and 6.1 learns nothing from n != 0. So test
	 * n - 1 < snap (n == 0 wraps) on a value whose origin barrier_var() hides: that gives
	 * [0, snap - 1], and the size n - 1 + 1 is then [1, snap].
	 */
	last = n - 1;
	barrier_var(last);
	if (last >= snap || bpf_skb_load_bytes(skb, off, (__u8 *)(e + 1), last + 1) < 0) {
		bpf_ringbuf_discard(e, 0);
		return;
	}
	e->ts_ns = now;
	e->flow_first_ns = st ? st->first_ns : 0;
	fs_copy16(e->src_addr, p->src);
	fs_copy16(e->dst_addr, p->dst);
	e->ifindex = skb->ifindex;
	e->tcp_seq = p->tcp_seq;
	e->payload_len = p->payload_len;
	e->src_port = p->sport;
	e->dst_port = p->dport;
	e->captured_len = n;
	e->l4_proto = p->proto;
	e->ip_version = p->ip_version;
	e->hook = hook;
	e->l7_kind = kind;
	e->is_reply = st ? dir != st->initiator : 0;
	e->_pad0 = 0;
	bpf_ringbuf_submit(e, 0);
	fs_stat_inc(FS_STAT_L7_EVENTS);
}

#endif /* FLOWSHIP_L7_PAYLOAD_H */
