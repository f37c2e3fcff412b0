/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_LB_H
#define CILIA_LIB_LB_H

/* Services in the datapath (kube-proxy's job, done before policy): a pod's packet to a
 * Service frontend (a ClusterIP and port) gets a backend's address and port as its
 * destination in cil_from_pod, *before* conntrack and policy, so that the source's egress
 * policy judges the backend pod, as NetworkPolicy means it to (kube-proxy translates in
 * the node's stack, after cilia has judged the ClusterIP as `world`). The rest of the
 * way is a pod-to-pod flow's: conntrack, the destination's ingress policy, delivery by
 * bpf_redirect_peer or past the stack to another node; netfilter never translates it.
 *
 * - A new flow gets a backend by a hash of its tuple over the service's slots
 *   (lb4_select_backend). Its choice is remembered in a service entry of the conntrack
 *   table (CT_SCOPE_SERVICE, keyed by the tuple as the client sent it), looked up first
 *   for every later packet: the backend stays the connection's while it exists in
 *   cilia_lb4_backends, however the service's backends change, and across agent
 *   restarts (the tables are pinned).
 * - ClientIP session affinity (LB_F_AFFINITY): a client's new connection first asks for
 *   the backend its last one got (cilia_lb4_affinity), kept while the service still
 *   counts it ready and within its timeout (cilia_lb4_affinity_match).
 * - A frontend without a ready backend rejects with an ICMP port unreachable
 *   (lb4_reject), as kube-proxy does.
 * - The translated flow's own conntrack entry records the service's reverse-NAT id;
 *   the backend's replies get the frontend back as their source where they reach the
 *   client: cil_from_pod (backend on the same node), cil_from_netdev (backend on another
 *   node, past the stack) and cil_to_pod (through the stack: a backend beyond a cilia
 *   device, the node's own address).
 *
 * Modelled on Cilium's bpf/lib/lb.h (lb4_lookup_service, lb4_select_backend_id,
 * lb4_xlate, lb4_rev_nat, lb4_affinity_backend_id), reduced to what ClusterIPs need.
 */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <stddef.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <cilia/services.h>
#include <cilia/conntrack.h>
#include "maps.h"
#include "metrics.h"
#include "conntrack.h"
#include "l4.h"
#include "icmp.h"
#include "events.h"
#include "drop.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_key);
	__type(value, struct lb4_service);
	__uint(max_entries, LB_SERVICES_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lb4_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_slot_key);
	__type(value, struct lb4_slot);
	__uint(max_entries, LB_SLOTS_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lb4_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb4_backend);
	__uint(max_entries, LB_BACKENDS_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lb4_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u16);
	__type(value, struct lb4_reverse_nat);
	__uint(max_entries, LB_REVNAT_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lb4_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_affinity_key);
	__type(value, struct lb4_affinity);
	__uint(max_entries, LB_AFFINITY_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lb4_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_affinity_match_key);
	__type(value, struct lb4_affinity_match);
	__uint(max_entries, LB_AFFINITY_MATCH_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lb4_affinity_match SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct snat4_key);
	__type(value, struct snat4_entry);
	__uint(max_entries, SNAT4_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_snat4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct lb4_snat_source);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lb4_snat_source SEC(".maps");

/* Where a connection to `svc` is SNATed when its backend is on another node (LB_F_SNAT):
 * a NodePort's own address (the node's), an ExternalIP's node address; 0: none. */
static __always_inline __be32 lb4_snat_source(const struct lb4_service *svc, __be32 frontend)
{
	struct lb4_snat_source *src;
	__u32 zero = 0;

	if (svc->flags & LB_F_NODEPORT)
		return frontend;
	src = bpf_map_lookup_elem(&cilia_lb4_snat_source, &zero);
	return src ? src->address : 0;
}

/* lb4_select_backend()'s answers besides a backend. */
enum lb4_pick {
	LB4_PICKED = 0,
	LB4_NO_BACKEND = -1,	/* no ready backend: the frontend rejects */
	LB4_HAIRPIN_ONLY = -2,	/* the client is the service's only backend */
	LB4_SLOT_MISS = -3,	/* a slot or its backend missing: the agent's writes are
				 * ordered so that this never happens; dropped, not
				 * rejected, should it ever */
};

/* A frontend's service, or NULL: TCP and UDP to a known (address, port), as seen from
 * `scope` (LB_SCOPE_*). A fragment without its L4 header has no port to look up and is
 * never translated, unless its first fragment passed (its ports known): then it goes
 * where its first fragment went, its address alone translated (lb4_rewrite). */
static __always_inline struct lb4_service *lb4_lookup_service(const struct l4_info *l4,
							      __u8 scope)
{
	struct lb4_key key = {
		.address = l4->tuple.daddr,
		.dport = l4->tuple.dport,
		.proto = l4->tuple.proto,
		.scope = scope,
	};

	if (l4->nonfirst_frag)
		return NULL;
	if (key.proto != IPPROTO_TCP && key.proto != IPPROTO_UDP)
		return NULL;
	return bpf_map_lookup_elem(&cilia_lb4_services, &key);
}

/* murmur3's finaliser: every input bit moves about half of the output bits. */
static __always_inline __u32 lb4_mix(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* A hash of what varies between a service's flows (the client's address and ports).
 * Computed here, not skb->hash: a socket's hash is random and TCP picks a new one on
 * retransmission timeouts; this one is the same for a tuple on every node, every boot. */
static __always_inline __u32 lb4_hash(const struct ct_key *tuple)
{
	return lb4_mix(tuple->saddr ^ lb4_mix(((__u32)tuple->sport << 16) | tuple->dport));
}

static __always_inline struct lb4_backend *lb4_slot_backend(__u16 rev_nat_id, __u32 slot,
							    __u32 *backend_id)
{
	struct lb4_slot_key key = { .rev_nat_id = rev_nat_id, .slot = slot };
	struct lb4_slot *s;

	s = bpf_map_lookup_elem(&cilia_lb4_slots, &key);
	if (!s)
		return NULL;
	*backend_id = s->backend_id;
	return bpf_map_lookup_elem(&cilia_lb4_backends, &s->backend_id);
}

/* The backend a ClientIP-affinity service gave this client last, while that is within
 * the service's timeout and the backend still one of its ready backends; else NULL. */
static __always_inline struct lb4_backend *lb4_affinity_backend(__u16 rev_nat_id,
								 __be32 client,
								 __u32 *backend_id)
{
	struct lb4_affinity_key key = { .client = client, .rev_nat_id = rev_nat_id };
	struct lb4_affinity_match_key mkey = { .rev_nat_id = rev_nat_id };
	struct lb4_affinity_match *match;
	struct lb4_affinity *aff;

	aff = bpf_map_lookup_elem(&cilia_lb4_affinity, &key);
	if (!aff)
		return NULL;
	mkey.backend_id = aff->backend_id;
	match = bpf_map_lookup_elem(&cilia_lb4_affinity_match, &mkey);
	if (!match || bpf_ktime_get_ns() - aff->last_used_ns > match->timeout_s * 1000000000ULL)
		return NULL;
	*backend_id = mkey.backend_id;
	return bpf_map_lookup_elem(&cilia_lb4_backends, &mkey.backend_id);
}

/* The client's new connection went to `backend_id`: its clock restarts. */
static __always_inline void lb4_affinity_record(__u16 rev_nat_id, __be32 client,
						__u32 backend_id)
{
	struct lb4_affinity_key key = { .client = client, .rev_nat_id = rev_nat_id };
	struct lb4_affinity value = {
		.last_used_ns = bpf_ktime_get_ns(),
		.backend_id = backend_id,
	};

	bpf_map_update_elem(&cilia_lb4_affinity, &key, &value, BPF_ANY);
}

/* A backend for a new flow: with ClientIP affinity, the client's backend while it holds
 * (lb4_affinity_backend); else one hash of its tuple, one slot. A pod that reaches itself
 * through its own Service (hairpin) would receive a packet from its own address, which
 * its stack drops as a martian; while the service has other backends, the next slot is
 * taken instead. Alone, it is LB4_HAIRPIN_ONLY (the caller leaves such a packet to the
 * node's stack, where kube-proxy, if any, masquerades hairpin traffic). */
static __always_inline int lb4_select_backend(const struct lb4_service *svc,
					      const struct ct_key *tuple,
					      struct lb4_backend **backend, __u32 *backend_id)
{
	__u32 count = svc->count, slot;
	struct lb4_backend *be;

	if (!count)
		return LB4_NO_BACKEND;
	if (svc->flags & LB_F_AFFINITY) {
		be = lb4_affinity_backend(svc->rev_nat_id, tuple->saddr, backend_id);
		if (be && be->address != tuple->saddr)
			goto picked;
	}
	slot = lb4_hash(tuple) % count;
	be = lb4_slot_backend(svc->rev_nat_id, slot, backend_id);
	if (be && be->address == tuple->saddr) {
		if (count == 1)
			return LB4_HAIRPIN_ONLY;
		be = lb4_slot_backend(svc->rev_nat_id, (slot + 1) % count, backend_id);
	}
	if (!be)
		return LB4_SLOT_MISS;
picked:
	if (svc->flags & LB_F_AFFINITY)
		lb4_affinity_record(svc->rev_nat_id, tuple->saddr, *backend_id);
	*backend = be;
	return LB4_PICKED;
}

/* The connection's service entry (keyed by its tuple towards the frontend), if alive;
 * it names the backend the connection was given. */
static __always_inline struct ct_value *lb4_ct_service_lookup(const struct ct_key *tuple,
							      __u8 tcp_flags)
{
	struct ct_key key = *tuple;
	struct ct_value *ct;

	key.scope = CT_SCOPE_SERVICE;
	ct = bpf_map_lookup_elem(&cilia_ct, &key);
	if (ct && ct_touch(ct, tuple->proto, tcp_flags, 0))
		return ct;
	return NULL;
}

/* The backend a live service entry names, if it still exists (a backend removed from
 * cilia_lb4_backends is gone for good: its connections get a new one). */
static __always_inline struct lb4_backend *lb4_ct_backend(const struct ct_value *svc_ct,
							  __u32 *backend_id)
{
	*backend_id = svc_ct->cookie;
	return bpf_map_lookup_elem(&cilia_lb4_backends, backend_id);
}

/* The backend a connection towards a frontend already has (`tuple`: as the client sent
 * it): its live service entry's (*svc_ct), while that backend exists; else NULL. */
static __always_inline struct lb4_backend *lb4_connection_backend(const struct ct_key *tuple,
								  __u8 tcp_flags,
								  struct ct_value **svc_ct,
								  __u32 *backend_id)
{
	*svc_ct = lb4_ct_service_lookup(tuple, tcp_flags);
	return *svc_ct ? lb4_ct_backend(*svc_ct, backend_id) : NULL;
}

/* Remembers the backend a connection was given: a service entry, written once the
 * flow has passed policy (a bare SYN writes it afresh, as a reused port is a new
 * connection). */
static __always_inline void lb4_ct_service_create(const struct ct_key *tuple,
						  __u32 backend_id, __u16 rev_nat_id,
						  __u8 tcp_flags, __be16 snat_port)
{
	struct ct_key key = *tuple;

	key.scope = CT_SCOPE_SERVICE;
	ct_create(&key, 0, snat_port, backend_id, tcp_flags, 0, rev_nat_id);
}

/* The service entry lives as long as its flow: replies touch only the flow's entry, so
 * the service entry takes over the flow's "answered" mark (and with it the long TCP
 * lifetime), or an idle established connection would lose its backend after a minute. */
static __always_inline void lb4_ct_service_follow(struct ct_value *svc_ct, __u8 proto,
						  __u8 flow_flags)
{
	if ((flow_flags & CT_F_REPLY_SEEN) && !(svc_ct->flags & CT_F_REPLY_SEEN)) {
		svc_ct->flags |= CT_F_REPLY_SEEN;
		svc_ct->lifetime_s = ct_lifetime(proto, svc_ct->flags);
	}
}

/* Rewrites one address and one port of the packet (its destination: `dst`, else its
 * source), with the IP checksum and the L4 checksum (its pseudo-header covers the
 * addresses) patched incrementally. A UDP datagram without a checksum keeps none.
 * A later fragment (l4->later_frag: its ports known from its first fragment) carries no
 * L4 header, only data where one would be: its address alone is rewritten (and the IP
 * checksum); the port and the L4 checksum, which cover the whole datagram, were
 * rewritten in its first fragment, so the datagram the receiver reassembles is right.
 * Invalidates every packet pointer. */
static __always_inline int lb4_rewrite(struct __sk_buff *skb, struct l4_info *l4, int dst,
				       __be32 addr, __be16 port)
{
	__u32 l4_off, csum_off, addr_off, port_off, mangle;
	__be32 old_addr = dst ? l4->tuple.daddr : l4->tuple.saddr;
	__be16 old_port = dst ? l4->tuple.dport : l4->tuple.sport;
	struct iphdr *ip4;

	if (ipv4_parse_skb(skb, &ip4) != IPV4_OK)
		return -1;
	addr_off = sizeof(struct ethhdr) + (dst ? offsetof(struct iphdr, daddr)
						: offsetof(struct iphdr, saddr));
	if (l4->later_frag) {
		if (bpf_l3_csum_replace(skb, sizeof(struct ethhdr) +
					offsetof(struct iphdr, check), old_addr, addr,
					sizeof(addr)) < 0 ||
		    bpf_skb_store_bytes(skb, addr_off, &addr, sizeof(addr), 0) < 0)
			return -1;
		goto done;
	}
	l4_off = sizeof(struct ethhdr) + ip4->ihl * 4;
	if (l4->tuple.proto == IPPROTO_TCP) {
		csum_off = l4_off + offsetof(struct tcphdr, check);
		mangle = 0;
	} else {
		csum_off = l4_off + offsetof(struct udphdr, check);
		mangle = BPF_F_MARK_MANGLED_0;
	}
	port_off = l4_off + (dst ? offsetof(struct l4_ports, dport)
				 : offsetof(struct l4_ports, sport));

	if (bpf_l4_csum_replace(skb, csum_off, old_addr, addr,
				mangle | BPF_F_PSEUDO_HDR | sizeof(addr)) < 0)
		return -1;
	if (old_port != port &&
	    bpf_l4_csum_replace(skb, csum_off, old_port, port, mangle | sizeof(port)) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, sizeof(struct ethhdr) + offsetof(struct iphdr, check),
				old_addr, addr, sizeof(addr)) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, addr_off, &addr, sizeof(addr), 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, port_off, &port, sizeof(port), 0) < 0)
		return -1;
done:
	if (dst) {
		l4->tuple.daddr = addr;
		l4->tuple.dport = port;
		l4->policy_port = port;
	} else {
		l4->tuple.saddr = addr;
		l4->tuple.sport = port;
	}
	return 0;
}

/* The packet to the frontend now goes to the backend. */
static __always_inline int lb4_dnat(struct __sk_buff *skb, struct l4_info *l4,
				    const struct lb4_backend *be, __u8 dir)
{
	__be32 addr = be->address;
	__be16 port = be->port;

	if (lb4_rewrite(skb, l4, 1, addr, port) < 0)
		return -1;
	update_metrics(REASON_LB_TRANSLATED, dir, skb->len);
	return 0;
}

/* A backend's reply to a translated flow: from the frontend again, as the client
 * expects. A service removed meanwhile has no reverse NAT left: the reply goes as it is
 * (and the client, which never spoke to the backend, refuses it). */
static __always_inline int lb4_rev_nat(struct __sk_buff *skb, struct l4_info *l4,
				       __u16 rev_nat_id, __u8 dir)
{
	struct lb4_reverse_nat *rev;
	__be32 addr;
	__be16 port;

	rev = bpf_map_lookup_elem(&cilia_lb4_revnat, &rev_nat_id);
	if (!rev)
		return 0;
	addr = rev->address;
	port = rev->port;
	if (lb4_rewrite(skb, l4, 0, addr, port) < 0)
		return -1;
	update_metrics(REASON_LB_REV_NAT, dir, skb->len);
	return 0;
}

/* NodePort SNAT (cilia_snat4): the source port an outside client's connection
 * (`client`: its tuple towards the frontend) leaves this node with towards `be`, from
 * `node`. `port`: the one it had (its service entry's), kept while its SNAT entry still
 * names this client; else a free one, from a random start, SNAT_PORT_TRIES tries. 0:
 * none free. */
static __always_inline __be16 lb4_snat_port(const struct ct_key *client,
					    const struct lb4_backend *be, __be32 node,
					    __be16 port)
{
	struct snat4_key key = {
		.backend = be->address,
		.node = node,
		.backend_port = be->port,
		.proto = client->proto,
	};
	struct snat4_entry val = {
		.client = client->saddr,
		.frontend = client->daddr,
		.client_port = client->sport,
		.frontend_port = client->dport,
	};
	struct snat4_entry *old;
	__u32 start, i;

	if (port) {
		key.node_port = port;
		old = bpf_map_lookup_elem(&cilia_snat4, &key);
		if (old && old->client == val.client && old->client_port == val.client_port)
			return port;
		if (!old && !bpf_map_update_elem(&cilia_snat4, &key, &val, BPF_NOEXIST))
			return port;	/* evicted meanwhile: the same port again */
	}
	start = bpf_get_prandom_u32();
	for (i = 0; i < SNAT_PORT_TRIES; i++) {
		key.node_port = bpf_htons(SNAT_PORT_MIN + (start + i) %
					  (SNAT_PORT_MAX - SNAT_PORT_MIN + 1));
		if (!bpf_map_update_elem(&cilia_snat4, &key, &val, BPF_NOEXIST))
			return key.node_port;
	}
	return 0;
}

/* The outside client (and the frontend it spoke to) that a backend's answer, arriving
 * at this node's SNAT port, is for; NULL: not a NodePort SNAT answer. */
static __always_inline struct snat4_entry *lb4_snat_answer(const struct ct_key *tuple)
{
	struct snat4_key key = {
		.backend = tuple->saddr,
		.node = tuple->daddr,
		.backend_port = tuple->sport,
		.node_port = tuple->dport,
		.proto = tuple->proto,
	};

	if (bpf_ntohs(tuple->dport) < SNAT_PORT_MIN)
		return NULL;	/* the range's floor: one compare spares most lookups */
	return bpf_map_lookup_elem(&cilia_snat4, &key);
}

/* A frontend with no ready backend answers at once, as kube-proxy's REJECT rule does:
 * ICMP port unreachable, from the frontend (the client's connect() fails with
 * ECONNREFUSED, a connected UDP socket's next receive too) rather than a silence the
 * client waits out. Straight back into the pod that sent it, by bpf_redirect_peer on
 * its own veth: its ingress policy never sees it (the answer to its own attempt, of a
 * flow that never existed), nor does any other pod. Dropped if it cannot be built.
 * Either way the flow `f` is reported dropped, DROP_NO_SERVICE_BACKEND, once. */
static __always_inline int lb4_reject(struct __sk_buff *skb, const struct flow_ctx *f,
				      __u32 pod_ifindex, __u8 dir)
{
	if (icmp4_error_reply(skb, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH) < 0)
		return drop(skb, f, DROP_NO_SERVICE_BACKEND, dir);
	emit_flow(skb, f, VERDICT_DROPPED, DROP_NO_SERVICE_BACKEND, dir);
	update_metrics(REASON_LB_REJECTED, dir, skb->len);
	return bpf_redirect_peer(pod_ifindex, 0);
}

#endif
