/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_EVENTS_H
#define CILIA_EVENTS_H

#include <linux/types.h>

#define EVENTS_RINGBUF_SIZE 1048576	/* 1 MiB */

enum flow_verdict {
	VERDICT_FORWARDED = 1,
	VERDICT_DROPPED = 2,
	VERDICT_AUDIT = 3,	/* a policy in audit mode refused it, and it passed: `reason`
				 * is the drop it was spared (DROP_POLICY, DROP_POLICY_DENY),
				 * `dir` whose policy refused it, `cookie` the deny rule */
};

/* One record in the events ring buffer: a new flow's policy verdict, or a drop.
 * Established flows send nothing (they would drown the buffer); `cilia monitor`
 * shows connections, not packets. Fields in the order they pack without holes. */
struct flow_event {
	__u64 ts_ns;
	__be32 saddr;
	__be32 daddr;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 cookie;		/* deciding rule (0: default verdict); for DROP_KERNEL, the
				 * kernel's enum skb_drop_reason (lib/kernel_drop.h) */
	__u32 ifindex;		/* where the packet was seen */
	__be16 sport;
	__be16 dport;
	__u16 src_ep;
	__u16 dst_ep;
	__u8  proto;
	__u8  verdict;		/* enum flow_verdict */
	__u8  reason;		/* enum metric_reason */
	__u8  dir;		/* enum metric_dir: which policy decided */
	__u16 rev_nat_id;	/* translated from a Service frontend: the service (its
				 * reverse-NAT id, services.h); 0: none. Half of what was
				 * padding: older readers see 0 */
	__u8  tcp_flags;	/* the packet's TCP flags byte (SYN 0x02, ...); 0 for others.
				 * Half of what was padding, like rev_nat_id */
	__u8  pad;
};

#endif
