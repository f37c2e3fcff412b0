/* SPDX-License-Identifier: Apache-2.0 */
/* The kernel's drops of the pods' packets, in the flow stream (lib/kernel_drop.h).
 *
 * cil_kfree_skb (tp_btf/kfree_skb: every skb the kernel frees as dropped, with its
 * enum skb_drop_reason, since Linux 5.17). Attached by the agent for as long as it
 * runs (a link held by the process, never pinned): nobody reads the ring while the
 * agent is away, and an agent that is gone leaves nothing behind. Its maps are the
 * node's pinned ones, cilia_endpoints to choose and cilia_events to report. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "lib/kernel_drop.h"

SEC("tp_btf/kfree_skb")
int BPF_PROG(cil_kfree_skb, struct sk_buff *skb, void *location, enum skb_drop_reason reason)
{
	kernel_drop(skb, reason);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
