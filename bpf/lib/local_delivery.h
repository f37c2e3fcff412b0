/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_LOCAL_DELIVERY_H
#define CILIA_LIB_LOCAL_DELIVERY_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"
#include "metrics.h"
#include "eth.h"
#include "ipv4.h"

/* Delivers a packet to a pod on this node, straight into its netns: routed (TTL down
 * one), addressed from the pod's host-side veth to the pod, and handed over with
 * bpf_redirect_peer, which switches netns from ingress to ingress with no trip through
 * the backlog queue. Used at tc ingress only (where redirect_peer is allowed): by
 * cil_from_pod for pod-to-pod, and by cil_from_netdev for traffic from the uplink.
 * Packet pointers are fetched afresh, since policy may have pulled data in.
 */
static __always_inline int deliver_local(struct __sk_buff *skb,
					 const struct endpoint_info *dst, __u8 dir)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip4 = (void *)(eth + 1);

	if (!dst->ifindex)
		return drop(skb, DROP_NO_ENDPOINT_IFINDEX, dir);
	if ((void *)(ip4 + 1) > data_end)
		return drop(skb, DROP_INVALID, dir);
	/* Expiring TTL: let the stack answer with ICMP time exceeded. */
	if (ip4->ttl <= 1)
		return pass_to_stack(skb, dir);

	ipv4_dec_ttl(ip4);
	eth_rewrite(eth, dst->mac, dst->node_mac);
	update_metrics(REASON_REDIRECT_PEER, dir, skb->len);
	return bpf_redirect_peer(dst->ifindex, 0);
}

#endif
