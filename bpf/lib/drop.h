/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_DROP_H
#define CILIA_LIB_DROP_H

/* The one home of the tc programs' drops: every packet they refuse goes through drop(),
 * which counts it (cilia_metrics, by reason and direction) and reports it (a flow event,
 * VERDICT_DROPPED with the reason), as include/cilia/events.h promises; then the program
 * returns what drop() returns. A drop reason is an enum metric_reason name
 * (include/cilia/metrics.h), which userspace prints (cilia/datapath/layouts.py Reason).
 *
 * What is no tc drop, and why:
 * - the XDP prefilter (bpf_xdp.c) counts its drops (by reason, and by CIDR slot) but sends
 *   no event: it is there to shed floods before an skb exists, and an event a packet
 *   would hand every flood to the agent;
 * - the socket LB's refused connect()/sendmsg() (lib/sock_lb.h) is counted; no packet
 *   exists, and the caller hears of it at once (EPERM);
 * - the kernel's own drops (lib/kernel_drop.h) are counted and reported there, as
 *   DROP_KERNEL with the kernel's reason.
 */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <stddef.h>
#include <cilia/events.h>
#include <cilia/metrics.h>
#include "maps.h"
#include "metrics.h"
#include "events.h"

/* Counts and reports the drop of `skb` for `reason`, in `dir` (enum metric_dir), with
 * what `f` knows of its flow; TC_ACT_SHOT, the program's verdict. A packet refused before
 * its tuple was read (a malformed header, a spoofed or foreign source) is reported with
 * the addresses its IPv4 header has, if it has them. */
static __always_inline int drop(struct __sk_buff *skb, const struct flow_ctx *f, __u8 reason,
				__u8 dir)
{
	__be32 addrs[2] = {};

	update_metrics(reason, dir, skb->len);
	if (f->l4.tuple.saddr || f->l4.tuple.daddr || skb->protocol != bpf_htons(ETH_P_IP) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct iphdr, saddr), addrs,
			       sizeof(addrs)) < 0) {
		emit_flow(skb, f, VERDICT_DROPPED, reason, dir);
		return TC_ACT_SHOT;
	}
	emit_flow_addrs(skb, f, addrs[0], addrs[1], VERDICT_DROPPED, reason, dir);
	return TC_ACT_SHOT;
}

#endif
