/* SPDX-License-Identifier: Apache-2.0 */
/* The benchmark's "limit": the least a tc program can do to deliver pod to pod on one
 * node. Endpoint lookup of the destination, MAC rewrite, bpf_redirect_peer; nothing
 * else (no source check, conntrack, policy, TTL or counters). Attached in place of
 * cil_from_pod on the host veths of one pod pair, it shows what cilia's own program
 * costs on top.
 *
 * It shares cilia's endpoints map: lib/maps.h is the map's one definition, and the
 * benchmark loads this object with the agent's bpffs root, so libbpf reuses the pinned
 * map the agent fills.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include <cilia/endpoint.h>
#include "lib/maps.h"

SEC("tc")
int limit_from_pod(struct __sk_buff *skb)
{
	void *data_end = (void *)(long)skb->data_end;
	void *data = (void *)(long)skb->data;
	struct ethhdr *eth = data;
	struct iphdr *ip4 = (void *)(eth + 1);
	struct endpoint_key key = {};
	struct endpoint_info *dst;

	if ((void *)(ip4 + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	key.ip4 = ip4->daddr;
	dst = bpf_map_lookup_elem(&cilia_endpoints, &key);
	if (!dst)
		return TC_ACT_OK;
	__builtin_memcpy(eth->h_dest, dst->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, dst->node_mac, ETH_ALEN);
	return bpf_redirect_peer(dst->ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
