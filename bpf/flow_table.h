/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Flow table: one entry per connection and interface, counters per direction, and a flow-ring
 * event only when something new happens (new entry, first SYN/SYN-ACK/FIN/RST per side, report
 * interval elapsed, end, eviction). Each event takes (atomic exchange) the counters accumulated
 * since the previous one, so summing the events of an entry gives exact totals even when a ring
 * reservation fails (the counters then stay in the entry for the next event).
 */
#ifndef FLOWSHIP_FLOW_TABLE_H
#define FLOWSHIP_FLOW_TABLE_H

#include "common.h"
#include "packet.h"

/* Any total order on (address, port) works; this one compares two native 64-bit halves. */
static __always_inline bool fs_side_lower(const __u8 *x, __u16 xp, const __u8 *y, __u16 yp)
{
	__u64 x0, x1, y0, y1;

	__builtin_memcpy(&x0, x, 8);
	__builtin_memcpy(&x1, x + 8, 8);
	__builtin_memcpy(&y0, y, 8);
	__builtin_memcpy(&y1, y + 8, 8);
	if (x0 != y0)
		return x0 < y0;
	if (x1 != y1)
		return x1 < y1;
	return xp <= yp;
}

/* Echo replies share the entry of their request: the key keeps the request type. */
static __always_inline __u8 fs_key_icmp_type(__u8 version, __u8 type)
{
	if (version == 4 && type == 0)
		return 8;
	if (version == 6 && type == 129)
		return 128;
	return type;
}

static __always_inline bool fs_is_echo_reply(__u8 version, __u8 type)
{
	return (version == 4 && type == 0) || (version == 6 && type == 129);
}

/* Fill the normalised key; returns the packet's direction (0: a->b, 1: b->a). */
static __always_inline __u8 fs_make_key(struct fs_flow_key *k, const struct fs_pkt *p, __u32 ifindex)
{
	__u8 dir;

	__builtin_memset(k, 0, sizeof(*k));
	k->ifindex = ifindex;
	k->proto = p->proto;
	k->ip_version = p->ip_version;
	if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
		k->icmp_type = fs_key_icmp_type(p->ip_version, p->icmp_type);
		k->icmp_code = p->icmp_code;
		k->icmp_id = p->icmp_id;
	}
	if (fs_side_lower(p->src, p->sport, p->dst, p->dport)) {
		dir = 0;
		fs_copy16(k->addr_a, p->src);
		fs_copy16(k->addr_b, p->dst);
		k->port_a = p->sport;
		k->port_b = p->dport;
	} else {
		dir = 1;
		fs_copy16(k->addr_a, p->dst);
		fs_copy16(k->addr_b, p->src);
		k->port_a = p->dport;
		k->port_b = p->sport;
	}
	return dir;
}

static __always_inline __u8 fs_other_hook(__u8 hook)
{
	return hook == FS_HOOK_INGRESS ? FS_HOOK_EGRESS : FS_HOOK_INGRESS;
}

/* Orientation and identity fields of a flow event, from key and state (no counters). */
static __always_inline void fs_fill_flow_header(struct fs_flow_event *e, const struct fs_flow_key *k,
						const struct fs_flow_state *st, __u8 trigger, __u8 hook,
						__u64 now)
{
	__u8 ini = st->initiator;

	e->ts_ns = now;
	e->first_ns = st->first_ns;
	e->last_ns = st->last_ns;
	e->syn_ns = st->syn_ns;
	e->synack_ns = st->synack_ns;
	e->ifindex = k->ifindex;
	e->drop_reason = 0;
	e->netns_ino = 0;
	e->icmp_id = k->icmp_id;
	e->kind = FS_KIND_FLOW;
	e->trigger = trigger;
	e->l4_proto = k->proto;
	e->ip_version = k->ip_version;
	e->icmp_type = k->icmp_type;
	e->icmp_code = k->icmp_code;
	e->hook = hook;
	e->init_hook = ini == 0 ? st->ab_hook : fs_other_hook(st->ab_hook);
	e->eflags = st->eflags | ((st->ctl & FS_CTL_ENDED) ? FS_EF_ENDED : 0);
	e->_pad0 = 0;
	if (ini == 0) {
		fs_copy16(e->src_addr, k->addr_a);
		fs_copy16(e->dst_addr, k->addr_b);
		e->src_port = k->port_a;
		e->dst_port = k->port_b;
	} else {
		fs_copy16(e->src_addr, k->addr_b);
		fs_copy16(e->dst_addr, k->addr_a);
		e->src_port = k->port_b;
		e->dst_port = k->port_a;
	}
}

/* Move the counters accumulated since the previous event into e (atomic exchange with 0). */
static __always_inline void fs_take_counters(struct fs_flow_event *e, struct fs_flow_state *st)
{
	__u64 b0 = __sync_lock_test_and_set(&st->bytes[0], 0);
	__u64 b1 = __sync_lock_test_and_set(&st->bytes[1], 0);
	__u64 p0 = __sync_lock_test_and_set(&st->packets[0], 0);
	__u64 p1 = __sync_lock_test_and_set(&st->packets[1], 0);
	__u32 f0 = __sync_lock_test_and_set(&st->flags[0], 0);
	__u32 f1 = __sync_lock_test_and_set(&st->flags[1], 0);

	if (st->initiator == 0) {
		e->bytes = b0;
		e->reply_bytes = b1;
		e->packets = p0;
		e->reply_packets = p1;
		e->tcp_flags = f0;
		e->reply_tcp_flags = f1;
	} else {
		e->bytes = b1;
		e->reply_bytes = b0;
		e->packets = p1;
		e->reply_packets = p0;
		e->tcp_flags = f1;
		e->reply_tcp_flags = f0;
	}
}

/* Emit one event for an entry; returns 0 when written, -1 when the ring was full. */
static __always_inline int fs_emit_flow(const struct fs_flow_key *k, struct fs_flow_state *st, __u8 trigger,
					__u8 hook, __u64 now)
{
	struct fs_flow_event *e = bpf_ringbuf_reserve(&fs_events, sizeof(*e), 0);

	if (!e) {
		fs_stat_inc(FS_STAT_LOST_FLOW_RING);
		return -1;
	}
	st->last_report_ns = now;
	fs_fill_flow_header(e, k, st, trigger, hook, now);
	fs_take_counters(e, st);
	bpf_ringbuf_submit(e, 0);
	fs_stat_inc(FS_STAT_FLOW_EVENTS);
	return 0;
}

/* Flow table full: report this packet on its own so its bytes still reach user space. */
static __always_inline void fs_emit_untracked(const struct fs_flow_key *k, const struct fs_flow_state *st,
					      __u8 dir, __u32 len, __u16 tcp_flags, __u8 hook, __u64 now)
{
	struct fs_flow_event *e = bpf_ringbuf_reserve(&fs_events, sizeof(*e), 0);
	bool fwd = dir == st->initiator;

	if (!e) {
		fs_stat_inc(FS_STAT_LOST_UNTRACKED);
		return;
	}
	fs_fill_flow_header(e, k, st, FS_TRIG_UNTRACKED, hook, now);
	e->bytes = fwd ? len : 0;
	e->reply_bytes = fwd ? 0 : len;
	e->packets = fwd ? 1 : 0;
	e->reply_packets = fwd ? 0 : 1;
	e->tcp_flags = fwd ? tcp_flags : 0;
	e->reply_tcp_flags = fwd ? 0 : tcp_flags;
	bpf_ringbuf_submit(e, 0);
	fs_stat_inc(FS_STAT_FLOW_EVENTS);
}

/* Control-flag bits of one packet for fs_flow_state.ctl, already shifted to the sender's side. */
static __always_inline __u32 fs_ctl_bits(__u16 f, __u8 dir)
{
	__u32 bits = 0;

	if (f & FS_TCP_SYN)
		bits |= (f & FS_TCP_ACK) ? FS_CTL_SYNACK : FS_CTL_SYN;
	if (f & FS_TCP_FIN)
		bits |= FS_CTL_FIN;
	if (f & FS_TCP_RST)
		bits |= FS_CTL_RST;
	return dir ? bits << 8 : bits;
}

static __always_inline void fs_init_state(struct fs_flow_state *st, const struct fs_pkt *p, __u8 dir, __u8 hook,
					  __u64 now)
{
	__u8 sender = dir; /* side that sent this packet: 0 = a, 1 = b */

	__builtin_memset(st, 0, sizeof(*st));
	st->first_ns = now;
	st->last_ns = now;
	st->last_report_ns = now;
	st->ab_hook = dir == 0 ? hook : fs_other_hook(hook);
	st->initiator = sender;
	if (p->proto == IPPROTO_TCP) {
		__u16 f = p->tcp_flags;

		if ((f & FS_TCP_SYN) && (f & FS_TCP_ACK))
			st->initiator = !sender;
		else if (!(f & FS_TCP_SYN))
			st->eflags = FS_EF_INITIATOR_GUESSED;
	} else if ((p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) &&
		   fs_is_echo_reply(p->ip_version, p->icmp_type)) {
		st->initiator = !sender;
	}
}

/* Last event of an entry, then remove it. Returns -1 (entry kept) when the ring is full. */
static __always_inline int fs_evict(const struct fs_flow_key *k, struct fs_flow_state *st, __u8 hook, __u64 now)
{
	if (fs_emit_flow(k, st, FS_TRIG_EVICT, hook, now) < 0)
		return -1;
	bpf_map_delete_elem(&fs_flows, k);
	return 0;
}

/*
 * Account one packet. Returns the entry (NULL when untracked) so the L7 code can tag snippets with
 * the entry's first_ns and orientation.
 */
static __always_inline struct fs_flow_state *fs_flow_packet(struct __sk_buff *skb, const struct fs_pkt *p,
							    struct fs_flow_key *k, __u8 *dir_out, __u8 hook,
							    __u64 now)
{
	struct fs_flow_state *st;
	__u16 f = p->proto == IPPROTO_TCP ? p->tcp_flags : 0;
	__u8 dir = fs_make_key(k, p, skb->ifindex);
	__u32 len = skb->len;
	__u8 trigger = 0;

	*dir_out = dir;
	st = bpf_map_lookup_elem(&fs_flows, k);

	/* A new connection reusing the tuple of an ended (or guessed) entry starts a new entry. */
	if (st && (f & (FS_TCP_SYN | FS_TCP_ACK)) == FS_TCP_SYN &&
	    ((st->ctl & FS_CTL_ENDED) || (st->eflags & FS_EF_INITIATOR_GUESSED))) {
		if (fs_evict(k, st, hook, now) == 0)
			st = NULL;
	}

	if (!st) {
		struct fs_flow_state init;
		long err;

		fs_init_state(&init, p, dir, hook, now);
		err = bpf_map_update_elem(&fs_flows, k, &init, BPF_NOEXIST);
		if (err == 0)
			trigger |= FS_TRIG_NEW;
		st = bpf_map_lookup_elem(&fs_flows, k);
		if (!st) {
			fs_stat_inc(FS_STAT_LOST_FLOW_MAP);
			fs_emit_untracked(k, &init, dir, len, f, hook, now);
			return NULL;
		}
	}

	st->last_ns = now;
	if (dir == 0) {
		__sync_fetch_and_add(&st->bytes[0], len);
		__sync_fetch_and_add(&st->packets[0], 1);
		if (f)
			__sync_fetch_and_or(&st->flags[0], f);
	} else {
		__sync_fetch_and_add(&st->bytes[1], len);
		__sync_fetch_and_add(&st->packets[1], 1);
		if (f)
			__sync_fetch_and_or(&st->flags[1], f);
	}

	if (f & (FS_TCP_SYN | FS_TCP_FIN | FS_TCP_RST)) {
		__u32 bits = fs_ctl_bits(f, dir);

		if ((st->ctl & bits) != bits) {
			__u32 old = __sync_fetch_and_or(&st->ctl, bits);
			__u32 fresh = bits & ~old;
			__u32 all = old | bits;

			if (fresh) {
				trigger |= FS_TRIG_FLAGS;
				if (fresh & (FS_CTL_SYN | (FS_CTL_SYN << 8)))
					st->syn_ns = now;
				if (fresh & (FS_CTL_SYNACK | (FS_CTL_SYNACK << 8)))
					st->synack_ns = now;
			}
			if (!(old & FS_CTL_ENDED) &&
			    (((all & FS_CTL_FIN) && (all & (FS_CTL_FIN << 8))) ||
			     (all & (FS_CTL_RST | (FS_CTL_RST << 8))))) {
				if (!(__sync_fetch_and_or(&st->ctl, FS_CTL_ENDED) & FS_CTL_ENDED))
					trigger |= FS_TRIG_END;
			}
		}
	}

	if (!trigger) {
		__u64 last = st->last_report_ns;

		if (now > last && now - last >= fs_cfg.report_interval_ns &&
		    __sync_val_compare_and_swap(&st->last_report_ns, last, now) == last)
			trigger |= FS_TRIG_REPORT;
	}
	if (fs_cfg.aggregation == FS_AGG_PACKET)
		trigger |= FS_TRIG_PACKET;

	if (trigger)
		fs_emit_flow(k, st, trigger, hook, now);
	return st;
}

/* ---- sweep: run from user space through BPF_PROG_TEST_RUN ---- */

struct fs_sweep_ctx {
	__u64 now;
	__u64 idle_ns;
	__u64 ended_ns;
	__u32 flush;
	__u32 visited;
	__u32 reported;
	__u32 evicted;
	__u32 ring_full;
};

static long fs_sweep_cb(struct bpf_map *map, struct fs_flow_key *k, struct fs_flow_state *st,
			struct fs_sweep_ctx *c)
{
	__u64 now = c->now;
	__u64 last = st->last_ns;
	__u64 idle = now > last ? now - last : 0;
	__u64 lr;

	c->visited++;
	if (c->flush || idle >= c->idle_ns || ((st->ctl & FS_CTL_ENDED) && idle >= c->ended_ns)) {
		if (fs_evict(k, st, FS_HOOK_NONE, now) < 0) {
			c->ring_full++;
			return 1; /* ring full: stop, the rest waits for the next sweep */
		}
		c->evicted++;
		return 0;
	}
	lr = st->last_report_ns;
	if (now > lr && now - lr >= fs_cfg.report_interval_ns && (st->packets[0] | st->packets[1])) {
		if (__sync_val_compare_and_swap(&st->last_report_ns, lr, now) != lr)
			return 0; /* a packet is reporting it right now */
		if (fs_emit_flow(k, st, FS_TRIG_REPORT, FS_HOOK_NONE, now) < 0) {
			c->ring_full++;
			return 1;
		}
		c->reported++;
	}
	return 0;
}

#endif /* FLOWSHIP_FLOW_TABLE_H */
