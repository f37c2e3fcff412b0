/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_FIB_H
#define CILIA_LIB_FIB_H

/* BPF host routing: a pod's packet for another node leaves by the node's own routing
 * table, but past the node's stack (no netfilter, no second trip through the IP layer),
 * as Cilium does it. cil_from_pod asks the FIB what the stack would do with the packet,
 * forwarding it from the pod's veth, and sends it out of the device the FIB names:
 * with bpf_redirect and the neighbour's MAC where the FIB knows it, else with
 * bpf_redirect_neigh, which resolves the neighbour (ARP) as the stack would.
 *
 * Why past the stack: cil_from_netdev delivers whatever arrives for a local pod with
 * bpf_redirect_peer, past the stack. For netfilter's conntrack to see each connection
 * whole or not at all (kube-proxy drops what conntrack finds INVALID: a SYN-ACK with no
 * SYN before it, an ACK to an unanswered SYN), the other direction must go past the
 * stack too.
 */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <cilia/conntrack.h>
#include "maps.h"
#include "metrics.h"
#include "eth.h"
#include "ipv4.h"
#include "events.h"
#include "drop.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* fib_route()'s answer: the packet goes to the stack, or past it (the neighbour's MAC
 * known, or to be resolved). FIB_OUT_UNASKED: the caller's "no lookup made". */
enum fib_out {
	FIB_OUT_UNASKED = -2,
	FIB_OUT_STACK = -1,
	FIB_OUT_NEIGH_KNOWN = 0,
	FIB_OUT_NEIGH_RESOLVE = 1,
};

/* What the stack would do with the packet if it forwarded it from the device it came
 * in on (its route, its next hop, the device out). FIB_OUT_STACK when the packet must
 * go through the stack after all: no route (the stack answers with ICMP), a local
 * destination, too big for the device out (the stack fragments or says so), a TTL
 * expiring here; and, with `netdev_only`, a device out that has no cil_from_netdev
 * (cilia_netdevs), whose answers would come up through the stack. The packet's
 * pointers are fetched afresh: callers may have pulled data in. */
static __always_inline int fib_route(struct __sk_buff *skb, const struct ct_key *tuple,
				     struct bpf_fib_lookup *fib, int netdev_only)
{
	struct iphdr *ip4;
	long rc;

	if (ipv4_parse_skb(skb, &ip4) != IPV4_OK)
		return FIB_OUT_STACK;
	if (ip4->ttl <= 1)
		return FIB_OUT_STACK;	/* the stack answers with ICMP time exceeded */
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET;
	fib->tos = ip4->tos;
	fib->l4_protocol = ip4->protocol;
	fib->sport = tuple->sport;	/* multipath routes hash on the ports too */
	fib->dport = tuple->dport;
	fib->ipv4_src = ip4->saddr;
	fib->ipv4_dst = ip4->daddr;
	fib->ifindex = skb->ingress_ifindex;
	/* tot_len 0: the kernel checks the skb itself against the MTU out (GSO aware) */
	rc = bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return FIB_OUT_STACK;
	if (netdev_only && !bpf_map_lookup_elem(&cilia_netdevs, &fib->ifindex))
		return FIB_OUT_STACK;
	return rc == BPF_FIB_LKUP_RET_SUCCESS ? FIB_OUT_NEIGH_KNOWN : FIB_OUT_NEIGH_RESOLVE;
}

/* Sends the packet the way fib_route() found (`out` is its answer, not FIB_OUT_STACK):
 * routed (TTL down one, as the stack would), then out of the FIB's device. */
static __always_inline int fib_redirect(struct __sk_buff *skb, const struct flow_ctx *f,
					const struct bpf_fib_lookup *fib, int out, __u8 dir)
{
	struct ethhdr *eth = (void *)(long)skb->data;
	struct iphdr *ip4;

	if (ipv4_parse_skb(skb, &ip4) != IPV4_OK)
		return drop(skb, f, DROP_INVALID, dir);
	ipv4_dec_ttl(ip4);
	update_metrics(REASON_REDIRECT_NEIGH, dir, skb->len);
	if (out == FIB_OUT_NEIGH_KNOWN) {
		eth_rewrite(eth, fib->dmac, fib->smac);
		return bpf_redirect(fib->ifindex, 0);
	}

	struct bpf_redir_neigh nh = {
		.nh_family = AF_INET,
		.ipv4_nh = fib->ipv4_dst,	/* the FIB's next hop (the gateway, if any) */
	};

	return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
}

/* A packet that could have gone past the stack, but the FIB said no: to the stack. */
static __always_inline int pass_to_stack_fib(struct __sk_buff *skb, __u8 dir)
{
	update_metrics(REASON_TO_STACK_FIB, dir, skb->len);
	return TC_ACT_OK;
}

#endif
