// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * flowship kernel side: tc ingress/egress flow accounting with L7 snippets, kernel drop
 * reporting, and the flow-table sweep that user space triggers. Features live in one header
 * each; flowship_abi.h is the contract with agent/.
 */
#include "common.h"
#include "packet.h"
#include "flow_table.h"
#include "l7_payload.h"
#include "kernel_drops.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Observe only: the verdict is always TC_ACT_UNSPEC (tcx: next program / default path). */
static __always_inline int fs_tc(struct __sk_buff *skb, __u8 hook)
{
	struct fs_flow_state *st;
	struct fs_flow_key k;
	struct fs_pkt p = {};
	__u64 now = bpf_ktime_get_ns();
	__u8 dir = 0;

	fs_stat_inc(FS_STAT_PACKETS);
	if (fs_parse(skb, &p) < 0) {
		fs_stat_inc(FS_STAT_NON_IP);
		return TC_ACT_UNSPEC;
	}
	st = fs_flow_packet(skb, &p, &k, &dir, hook, now);
	fs_l7_packet(skb, &p, st, dir, hook, now);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int fs_tc_ingress(struct __sk_buff *skb)
{
	return fs_tc(skb, FS_HOOK_INGRESS);
}

SEC("tc")
int fs_tc_egress(struct __sk_buff *skb)
{
	return fs_tc(skb, FS_HOOK_EGRESS);
}

/*
 * Sweep of the flow table, run by user space with BPF_PROG_TEST_RUN: reports due flows that got no
 * packet since their report fell due and evicts idle/ended entries with their remaining counters.
 * Done in the kernel so that taking the counters is the same atomic exchange the tc path uses.
 */
SEC("syscall")
int fs_sweep(struct fs_sweep_args *args)
{
	struct fs_sweep_ctx c = {};

	c.now = bpf_ktime_get_ns();
	c.idle_ns = args->idle_ns;
	c.ended_ns = args->ended_ns;
	c.flush = args->flush;
	bpf_for_each_map_elem(&fs_flows, fs_sweep_cb, &c, 0);
	args->visited = c.visited;
	args->reported = c.reported;
	args->evicted = c.evicted;
	args->ring_full = c.ring_full;
	return 0;
}

/*
 * Never called: its prototype puts the ring-record structs into the object's BTF (clang only emits
 * types reachable from functions and globals), so `bpftool btf dump` and the ABI test can check them.
 */
__attribute__((used)) static __noinline int fs_abi_types(struct fs_flow_event *flow, struct fs_l7_event *l7)
{
	return flow != 0 && l7 != 0;
}
