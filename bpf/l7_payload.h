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

/* Which kind of L7 snippet this packet starts, 0 for none. */
static __always_inline __u8 fs_l7_kind(struct __sk_buff *skb, const struct fs_pkt *p)
{
	__u16 dns = fs_cfg.dns_port;

	if (!p->has_l4 || p->payload_len == 0)
		return 0;
	if ((fs_cfg.l7_flags & FS_L7F_DNS) && (p->proto == IPPROTO_UDP || p->proto == IPPROTO_TCP) &&
	    (p->sport == dns || p->dport == dns)) {
		if (p->proto == IPPROTO_UDP) {
			__u8 hdr[3];

			if (p->payload_len < 12 || fs_load(skb, p->payload_off, hdr, sizeof(hdr)) < 0)
				return 0;
			return (hdr[2] & 0x80) ? FS_L7_DNS_RESPONSE : FS_L7_DNS_QUERY;
		}
		return p->dport == dns ? FS_L7_DNS_QUERY : FS_L7_DNS_RESPONSE;
	}
	if ((fs_cfg.l7_flags & FS_L7F_HTTP) && p->proto == IPPROTO_TCP && p->payload_len >= 8 &&
	    ((fs_cfg.l7_flags & FS_L7F_ALL_PORTS) || fs_l7_port(p->sport) || fs_l7_port(p->dport))) {
		__u8 b[8];

		if (fs_load(skb, p->payload_off, b, sizeof(b)) < 0)
			return 0;
		return fs_http_kind(b);
	}
	return 0;
}

static __always_inline void fs_l7_packet(struct __sk_buff *skb, const struct fs_pkt *p,
					 const struct fs_flow_state *st, __u8 dir, __u8 hook, __u64 now)
{
	struct fs_l7_event *e;
	__u32 snap = fs_cfg.l7_snap_len; /* a constant for the verifier: .rodata is frozen */
	__u32 n;
	__u8 kind;

	if (!fs_cfg.l7_flags)
		return;
	kind = fs_l7_kind(skb, p);
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
	if (n == 0 || n > snap || fs_load(skb, p->payload_off, (__u8 *)(e + 1), n) < 0) {
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
