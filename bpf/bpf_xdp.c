/* SPDX-License-Identifier: Apache-2.0 */
/* The XDP prefilter on the node's uplinks: a CIDR deny list checked before the kernel
 * allocates anything for a packet. A match is dropped and counted per CIDR; everything
 * else goes on to tc (cil_from_netdev) and the stack untouched. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include <cilia/prefilter.h>
#define CILIA_NO_SKB
#include "lib/metrics.h"
#include "lib/ipv4.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct prefilter_key);
	__type(value, struct prefilter_value);
	__uint(max_entries, PREFILTER_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_prefilter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(max_entries, PREFILTER_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_prefilter_stats SEC(".maps");

static __always_inline int prefilter_drop(struct xdp_md *ctx, struct prefilter_key *key)
{
	struct prefilter_value *v = bpf_map_lookup_elem(&cilia_prefilter, key);
	struct metrics_value *stats;

	if (!v)
		return XDP_PASS;
	stats = bpf_map_lookup_elem(&cilia_prefilter_stats, &v->slot);
	if (stats) {
		stats->packets += 1;
		stats->bytes += ctx->data_end - ctx->data;
	}
	update_metrics(DROP_PREFILTER, METRIC_DIR_INGRESS, ctx->data_end - ctx->data);
	return XDP_DROP;
}

SEC("xdp")
int cil_xdp_prefilter(struct xdp_md *ctx)
{
	void *data_end = (void *)(long)ctx->data_end;
	void *data = (void *)(long)ctx->data;
	struct prefilter_key key = {};
	struct ethhdr *eth = data;
	struct iphdr *ip4;
	int hdr;

	/* A source in the deny list is dropped whatever the rest of its header says: the
	 * fixed header's addresses are all the prefilter reads. */
	hdr = ipv4_parse(data, data_end, data_end - data, &ip4);
	if (hdr == IPV4_TRUNCATED)
		return XDP_PASS;
	if (hdr == IPV4_OK || hdr == IPV4_MALFORMED) {
		key.prefixlen = PREFILTER_PREFIX_STATIC + 32;
		key.family = PREFILTER_AF_INET;
		__builtin_memcpy(key.addr, &ip4->saddr, 4);
		return prefilter_drop(ctx, &key);
	}
	if (hdr == IPV4_NOT_IPV4) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IPV6))
			return XDP_PASS;
		key.prefixlen = PREFILTER_PREFIX_STATIC + 128;
		key.family = PREFILTER_AF_INET6;
		__builtin_memcpy(key.addr, &ip6->saddr, 16);
		return prefilter_drop(ctx, &key);
	}
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
