/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_EVENTS_H
#define CILIA_LIB_EVENTS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <cilia/events.h>
#include "maps.h"
#include "l4.h"

/* Ring buffers carry no key or value type, so nothing would put struct flow_event into
 * the object's BTF, where tests/unit/test_layouts.py checks the Python mirror against
 * it. This never-loaded variable does; libbpf skips the section. */
struct flow_event __flow_event_btf SEC(".btf_anchor") __attribute__((used));

struct flow_ctx {
	struct l4_info l4;
	__u32 src_identity;
	__u32 dst_identity;
	__u16 src_ep;
	__u16 dst_ep;
	__u32 cookie;
	__u16 rev_nat_id;	/* the Service frontend the flow was translated from */
	__u32 audit_cookie;	/* policy audit mode (lib/enforce.h audit()): the rule of */
	__u8  audit_reason;	/* the first refusal audited, its drop reason (0: none) and */
	__u8  audit_dir;	/* whose policy refused it (enum metric_dir) */
};

/* Best effort: when the ring is full (no reader), the event is lost, never the packet.
 * The flow's addresses are `saddr`, `daddr` (emit_flow: its tuple's). */
static __always_inline void emit_flow_addrs(struct __sk_buff *skb, const struct flow_ctx *f,
					    __be32 saddr, __be32 daddr, __u8 verdict,
					    __u8 reason, __u8 dir)
{
	struct flow_event *e = bpf_ringbuf_reserve(&cilia_events, sizeof(*e), 0);

	if (!e)
		return;
	e->ts_ns = bpf_ktime_get_ns();
	e->saddr = saddr;
	e->daddr = daddr;
	e->sport = f->l4.tuple.sport;
	e->dport = f->l4.tuple.dport;
	e->proto = f->l4.tuple.proto;
	e->src_identity = f->src_identity;
	e->dst_identity = f->dst_identity;
	e->src_ep = f->src_ep;
	e->dst_ep = f->dst_ep;
	e->cookie = f->cookie;
	e->ifindex = skb->ifindex;
	e->verdict = verdict;
	e->reason = reason;
	e->dir = dir;
	e->rev_nat_id = f->rev_nat_id;
	e->tcp_flags = f->l4.tcp_flags;	/* parse_l4() leaves 0 for other protocols */
	e->pad = 0;
	/* No wakeup: the agent drains the ring on a timer. A wakeup per new flow would
	 * cost every connection a context switch into the agent (TCP_CRR showed it). */
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

static __always_inline void emit_flow(struct __sk_buff *skb, const struct flow_ctx *f,
				      __u8 verdict, __u8 reason, __u8 dir)
{
	emit_flow_addrs(skb, f, f->l4.tuple.saddr, f->l4.tuple.daddr, verdict, reason, dir);
}

#endif
