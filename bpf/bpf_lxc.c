/* SPDX-License-Identifier: Apache-2.0 */
/* "From pod": tc ingress on the host side of every pod's veth, i.e. every packet a pod
 * sends. A packet for another pod on this node is delivered straight into that pod's
 * netns with bpf_redirect_peer (no second pass through the node's stack, no backlog
 * queue); everything else goes to the node's stack, which routes it.
 *
 * Pods have a /32 address and a default route via 169.254.1.1, a link-local next hop
 * with a permanent neighbour entry pointing at this veth's MAC, so pods never ARP and
 * every frame they send arrives here already addressed to the host side.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/eth.h"
#include "lib/ipv4.h"

static __always_inline struct endpoint_info *lookup_endpoint(__be32 ip4)
{
	struct endpoint_key key = { .ip4 = ip4 };

	return bpf_map_lookup_elem(&cilia_endpoints, &key);
}

SEC("tc")
int cil_from_pod(struct __sk_buff *skb)
{
	void *data_end = (void *)(long)skb->data_end;
	void *data = (void *)(long)skb->data;
	struct endpoint_info *src, *dst;
	struct ethhdr *eth = data;
	struct iphdr *ip4;

	if ((void *)(eth + 1) > data_end)
		return drop(skb, DROP_INVALID, METRIC_DIR_EGRESS);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return pass_to_stack(skb, METRIC_DIR_EGRESS);

	ip4 = (void *)(eth + 1);
	if ((void *)(ip4 + 1) > data_end)
		return drop(skb, DROP_INVALID, METRIC_DIR_EGRESS);
	if (ip4->version != 4 || ip4->ihl < 5)
		return drop(skb, DROP_INVALID, METRIC_DIR_EGRESS);

	/* A pod may only send from its own address: the source must be the endpoint
	 * whose veth this packet came in on. Without this, one pod could speak for
	 * another, and later, for another's security identity.
	 */
	src = lookup_endpoint(ip4->saddr);
	if (!src || src->ifindex != skb->ingress_ifindex)
		return drop(skb, DROP_SPOOFED_SOURCE, METRIC_DIR_EGRESS);

	dst = lookup_endpoint(ip4->daddr);
	if (!dst)
		return pass_to_stack(skb, METRIC_DIR_EGRESS);
	if (!dst->ifindex)
		return drop(skb, DROP_NO_ENDPOINT_IFINDEX, METRIC_DIR_EGRESS);
	/* Expiring TTL: let the stack answer with ICMP time exceeded. */
	if (ip4->ttl <= 1)
		return pass_to_stack(skb, METRIC_DIR_EGRESS);

	ipv4_dec_ttl(ip4);
	eth_rewrite(eth, dst->mac, dst->node_mac);
	update_metrics(REASON_REDIRECT_PEER, METRIC_DIR_EGRESS, skb->len);
	return bpf_redirect_peer(dst->ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
