/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Kernel drops: tp_btf/kfree_skb with a reason above SKB_DROP_REASON_NOT_SPECIFIED becomes one
 * FS_KIND_DROP record in the flow ring. Reason values differ between kernels, so the threshold is a
 * CO-RE enum relocation and user space names the numbers from the running kernel's BTF.
 */
#ifndef FLOWSHIP_KERNEL_DROPS_H
#define FLOWSHIP_KERNEL_DROPS_H

#include "common.h"
#include "packet.h"

/* 5-tuple of the packet from skb->head + network_header (works before and after L2/L3 pulls). */
static __always_inline int fs_drop_parse(struct sk_buff *skb, struct fs_flow_event *e)
{
	unsigned char *head = BPF_CORE_READ(skb, head);
	__u16 nh = BPF_CORE_READ(skb, network_header);
	__u16 proto = BPF_CORE_READ(skb, protocol);
	unsigned char *l3 = head + nh;
	unsigned char *l4;
	__u8 l4proto;

	if (nh == (__u16)~0U)
		return -1;
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr iph;
		__u8 vihl;

		if (bpf_probe_read_kernel(&iph, sizeof(iph), l3) < 0)
			return -1;
		vihl = *(__u8 *)&iph;
		if ((vihl >> 4) != 4 || (vihl & 0xf) < 5)
			return -1;
		e->ip_version = 4;
		fs_map_v4(e->src_addr, iph.saddr);
		fs_map_v4(e->dst_addr, iph.daddr);
		l4proto = iph.protocol;
		if (bpf_ntohs(iph.frag_off) & 0x1fff)
			goto out_no_l4;
		l4 = l3 + (vihl & 0xf) * 4;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_probe_read_kernel(&ip6, sizeof(ip6), l3) < 0)
			return -1;
		if ((*(__u8 *)&ip6 >> 4) != 6)
			return -1;
		e->ip_version = 6;
		__builtin_memcpy(e->src_addr, &ip6.saddr, 16);
		__builtin_memcpy(e->dst_addr, &ip6.daddr, 16);
		l4proto = ip6.nexthdr; /* extension headers are not followed here */
		l4 = l3 + sizeof(ip6);
	} else {
		return -1;
	}

	e->l4_proto = l4proto;
	if (l4proto == IPPROTO_TCP) {
		__u8 th[14];

		if (bpf_probe_read_kernel(th, sizeof(th), l4) == 0) {
			e->src_port = ((__u16)th[0] << 8) | th[1];
			e->dst_port = ((__u16)th[2] << 8) | th[3];
			e->tcp_flags = th[13] | ((__u16)(th[12] & 1) << 8);
		}
	} else if (l4proto == IPPROTO_UDP || l4proto == IPPROTO_SCTP) {
		__u8 uh[4];

		if (bpf_probe_read_kernel(uh, sizeof(uh), l4) == 0) {
			e->src_port = ((__u16)uh[0] << 8) | uh[1];
			e->dst_port = ((__u16)uh[2] << 8) | uh[3];
		}
	} else if (l4proto == IPPROTO_ICMP || l4proto == IPPROTO_ICMPV6) {
		__u8 ih[6];

		if (bpf_probe_read_kernel(ih, sizeof(ih), l4) == 0) {
			e->icmp_type = ih[0];
			e->icmp_code = ih[1];
			if (fs_is_echo(e->ip_version, ih[0]))
				e->icmp_id = ((__u16)ih[4] << 8) | ih[5];
		}
	}
	return 0;
out_no_l4:
	e->l4_proto = l4proto;
	return 0;
}

SEC("tp_btf/kfree_skb")
int BPF_PROG(fs_kfree_skb, struct sk_buff *skb, void *location, enum skb_drop_reason reason)
{
	struct net_device *dev;
	struct fs_flow_event *e;
	struct sock *sk;
	__u32 netns = 0, ifindex = 0;
	__u16 proto;

	if ((__u32)reason <= (__u32)bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_NOT_SPECIFIED))
		return 0;
	proto = BPF_CORE_READ(skb, protocol);
	if (proto != bpf_htons(ETH_P_IP) && proto != bpf_htons(ETH_P_IPV6))
		return 0;

	dev = BPF_CORE_READ(skb, dev);
	sk = BPF_CORE_READ(skb, sk);
	if (dev) {
		netns = BPF_CORE_READ(dev, nd_net.net, ns.inum);
		ifindex = BPF_CORE_READ(dev, ifindex);
	} else {
		if (sk)
			netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
		ifindex = BPF_CORE_READ(skb, skb_iif);
	}
	if (fs_cfg.drop_netns_ino && netns != fs_cfg.drop_netns_ino)
		return 0;

	e = bpf_ringbuf_reserve(&fs_events, sizeof(*e), 0);
	if (!e) {
		fs_stat_inc(FS_STAT_LOST_DROP_RING);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	if (fs_drop_parse(skb, e) < 0) {
		bpf_ringbuf_discard(e, 0);
		return 0;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->first_ns = e->ts_ns;
	e->last_ns = e->ts_ns;
	e->bytes = BPF_CORE_READ(skb, len);
	e->packets = 1;
	e->ifindex = ifindex;
	e->drop_reason = reason;
	e->netns_ino = netns;
	e->kind = FS_KIND_DROP;
	e->hook = FS_HOOK_KFREE_SKB;
	bpf_ringbuf_submit(e, 0);
	fs_stat_inc(FS_STAT_DROP_EVENTS);
	return 0;
}

#endif /* FLOWSHIP_KERNEL_DROPS_H */
