/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_TUNNEL_H
#define CILIA_LIB_TUNNEL_H

/* The VXLAN overlay's tunnel endpoints (include/cilia/tunnel.h). */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <cilia/ipcache.h>
#include <cilia/tunnel.h>

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct tunnel_endpoint);
	__uint(max_entries, TUNNEL_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_tunnel SEC(".maps");

/* The tunnel endpoint of the node that owns `addr` (its pod CIDR holds it, or it is the
 * node's address), or NULL: no other node's. */
static __always_inline struct tunnel_endpoint *tunnel_lookup(__be32 addr)
{
	struct ipcache_key key = { .prefixlen = 32, .ip4 = addr };

	return bpf_map_lookup_elem(&cilia_tunnel, &key);
}

/* Sets the VXLAN tunnel for a packet out of cilia_vxlan to `daddr`: to the node that owns
 * it, from this node's address, VNI TUNNEL_VNI. 0, or -1 when no node owns `daddr`. */
static __always_inline int tunnel_encap(struct __sk_buff *skb, __be32 daddr)
{
	struct bpf_tunnel_key key = {};
	struct tunnel_endpoint *ep = tunnel_lookup(daddr);

	if (!ep)
		return -1;
	key.tunnel_id = TUNNEL_VNI;
	key.remote_ipv4 = bpf_ntohl(ep->remote);	/* the helper takes host order */
	key.local_ipv4 = bpf_ntohl(ep->local);
	key.tunnel_ttl = TUNNEL_TTL;
	return bpf_skb_set_tunnel_key(skb, &key, sizeof(key), 0) < 0 ? -1 : 0;
}

#endif
