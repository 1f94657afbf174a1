/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Header parsing for the tc programs. All loads are relative to the network header
 * (BPF_HDR_START_NET), so the same code works on Ethernet and on L3-only devices, and
 * bpf_skb_load_bytes_relative copes with non-linear skbs without pulling data (the packet
 * is never modified).
 */
#ifndef FLOWSHIP_PACKET_H
#define FLOWSHIP_PACKET_H

#include "common.h"

#define FS_IPV6_MAX_EXT_HEADERS 6

/* What the flow table and the L7 code need to know about one packet. */
struct fs_pkt {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport;
	__u16 dport;
	__u16 tcp_flags;
	__u16 icmp_id;
	__u32 tcp_seq;
	__u32 payload_off; /* L4 payload offset from the network header */
	__u32 payload_len; /* L4 payload bytes */
	__u8 proto;
	__u8 ip_version;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 has_l4; /* transport header present (not a later fragment) */
};

static __always_inline int fs_load(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	return bpf_skb_load_bytes_relative(skb, off, to, len, BPF_HDR_START_NET);
}

static __always_inline void fs_map_v4(__u8 *dst, __be32 addr)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, &addr, 4);
}

static __always_inline bool fs_is_echo(__u8 version, __u8 type)
{
	if (version == 4)
		return type == 8 || type == 0;
	return type == 128 || type == 129;
}

/* Parse the L4 header at l4_off; returns 0 on success. */
static __always_inline int fs_parse_l4(struct __sk_buff *skb, struct fs_pkt *p, __u32 l4_off, __u32 l4_len)
{
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr th;
		__u8 *raw = (__u8 *)&th;
		__u32 hl;

		if (fs_load(skb, l4_off, &th, sizeof(th)) < 0)
			return -1;
		p->sport = bpf_ntohs(th.source);
		p->dport = bpf_ntohs(th.dest);
		p->tcp_seq = bpf_ntohl(th.seq);
		p->tcp_flags = raw[13] | ((__u16)(raw[12] & 0x01) << 8);
		hl = (raw[12] >> 4) * 4;
		if (hl < sizeof(th))
			return -1;
		p->payload_off = l4_off + hl;
		p->payload_len = l4_len > hl ? l4_len - hl : 0;
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr uh;

		if (fs_load(skb, l4_off, &uh, sizeof(uh)) < 0)
			return -1;
		p->sport = bpf_ntohs(uh.source);
		p->dport = bpf_ntohs(uh.dest);
		p->payload_off = l4_off + sizeof(uh);
		p->payload_len = l4_len > sizeof(uh) ? l4_len - sizeof(uh) : 0;
	} else if (p->proto == IPPROTO_SCTP) {
		__be16 ports[2];

		if (fs_load(skb, l4_off, ports, sizeof(ports)) < 0)
			return -1;
		p->sport = bpf_ntohs(ports[0]);
		p->dport = bpf_ntohs(ports[1]);
	} else if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
		__u8 ih[8];

		if (fs_load(skb, l4_off, ih, sizeof(ih)) < 0)
			return -1;
		p->icmp_type = ih[0];
		p->icmp_code = ih[1];
		if (fs_is_echo(p->ip_version, ih[0]))
			p->icmp_id = ((__u16)ih[4] << 8) | ih[5];
	} else {
		return 0;
	}
	p->has_l4 = 1;
	return 0;
}

static __always_inline int fs_parse_v4(struct __sk_buff *skb, struct fs_pkt *p)
{
	struct iphdr iph;
	__u32 hl, tot;

	if (fs_load(skb, 0, &iph, sizeof(iph)) < 0)
		return -1;
	if ((*(__u8 *)&iph >> 4) != 4)
		return -1;
	hl = (*(__u8 *)&iph & 0x0f) * 4;
	if (hl < sizeof(iph))
		return -1;
	p->ip_version = 4;
	p->proto = iph.protocol;
	fs_map_v4(p->src, iph.saddr);
	fs_map_v4(p->dst, iph.daddr);
	tot = bpf_ntohs(iph.tot_len);
	if (tot == 0) /* BIG TCP GSO packet: the length lives in the skb only */
		tot = 0xffff;
	if (bpf_ntohs(iph.frag_off) & 0x1fff) /* later fragment: no L4 header */
		return 0;
	return fs_parse_l4(skb, p, hl, tot > hl ? tot - hl : 0);
}

static __always_inline int fs_parse_v6(struct __sk_buff *skb, struct fs_pkt *p)
{
	struct ipv6hdr ip6;
	__u32 off = sizeof(ip6);
	__u32 len;
	__u8 nh;

	if (fs_load(skb, 0, &ip6, sizeof(ip6)) < 0)
		return -1;
	if ((*(__u8 *)&ip6 >> 4) != 6)
		return -1;
	p->ip_version = 6;
	__builtin_memcpy(p->src, &ip6.saddr, 16);
	__builtin_memcpy(p->dst, &ip6.daddr, 16);
	len = bpf_ntohs(ip6.payload_len);
	if (len == 0) /* jumbogram / BIG TCP */
		len = 0xffff;
	len += sizeof(ip6);
	nh = ip6.nexthdr;

#pragma unroll
	for (int i = 0; i < FS_IPV6_MAX_EXT_HEADERS; i++) {
		__u8 ext[2];

		if (nh != 0 && nh != 43 && nh != 60 && nh != 44 && nh != 51)
			break;
		if (fs_load(skb, off, ext, sizeof(ext)) < 0)
			return -1;
		if (nh == 44) { /* fragment header: fixed 8 bytes */
			__be16 frag;

			if (fs_load(skb, off + 2, &frag, sizeof(frag)) < 0)
				return -1;
			p->proto = ext[0];
			if (bpf_ntohs(frag) & 0xfff8) /* offset != 0: later fragment */
				return 0;
			off += 8;
		} else if (nh == 51) { /* AH: (len + 2) * 4 */
			off += ((__u32)ext[1] + 2) * 4;
		} else {
			off += ((__u32)ext[1] + 1) * 8;
		}
		nh = ext[0];
	}
	p->proto = nh;
	return fs_parse_l4(skb, p, off, len > off ? len - off : 0);
}

/*
 * Offset of the network header from skb->data (at tc, the MAC header): 14 on Ethernet, 0 on L3
 * devices, 18 with an in-band VLAN tag. bpf_skb_load_bytes_relative only reads the linear part of
 * an skb, so payload bytes (often in page fragments) must be read with bpf_skb_load_bytes at an
 * absolute offset; the offset is found by matching the first 16 bytes of the network header.
 */
static __always_inline int fs_net_offset(struct __sk_buff *skb)
{
	__u64 want[2], got[2];

	if (fs_load(skb, 0, want, sizeof(want)) < 0)
		return -1;
	if (bpf_skb_load_bytes(skb, 14, got, sizeof(got)) == 0 && got[0] == want[0] && got[1] == want[1])
		return 14;
	if (bpf_skb_load_bytes(skb, 0, got, sizeof(got)) == 0 && got[0] == want[0] && got[1] == want[1])
		return 0;
	if (bpf_skb_load_bytes(skb, 18, got, sizeof(got)) == 0 && got[0] == want[0] && got[1] == want[1])
		return 18;
	return -1;
}

/* Returns 0 when the packet is IPv4/IPv6 and p is filled. */
static __always_inline int fs_parse(struct __sk_buff *skb, struct fs_pkt *p)
{
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return fs_parse_v4(skb, p);
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return fs_parse_v6(skb, p);
	return -1;
}

#endif /* FLOWSHIP_PACKET_H */
