/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_LOCAL_DELIVERY_H
#define CILIA_LIB_LOCAL_DELIVERY_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/netfilter/nf_conntrack_common.h>
#include <bpf/bpf_helpers.h>
#include <cilia/conntrack.h>
#include "maps.h"
#include "metrics.h"
#include "eth.h"
#include "ipv4.h"
#include "events.h"
#include "drop.h"

/* Delivers a packet to a pod on this node, straight into its netns: routed (TTL down
 * one), addressed from the pod's host-side veth to the pod, and handed over with
 * bpf_redirect_peer, which switches netns from ingress to ingress with no trip through
 * the backlog queue. Used at tc ingress only (where redirect_peer is allowed): by
 * cil_from_pod for pod-to-pod, and by cil_from_netdev for traffic from the uplink.
 * Packet pointers are fetched afresh, since policy may have pulled data in.
 *
 * Before that, the caller asks nf_nat_tracked() where the packet may belong to a
 * connection netfilter translated: see below.
 */
static __always_inline int deliver_local(struct __sk_buff *skb, const struct flow_ctx *f,
					 const struct endpoint_info *dst, __u8 dir)
{
	struct ethhdr *eth = (void *)(long)skb->data;
	struct iphdr *ip4;

	if (!dst->ifindex)
		return drop(skb, f, DROP_NO_ENDPOINT_IFINDEX, dir);
	if (ipv4_parse_skb(skb, &ip4) != IPV4_OK)
		return drop(skb, f, DROP_INVALID, dir);
	/* Expiring TTL: let the stack answer with ICMP time exceeded. */
	if (ip4->ttl <= 1)
		return pass_to_stack(skb, dir);

	ipv4_dec_ttl(ip4);
	eth_rewrite(eth, dst->mac, dst->node_mac);
	update_metrics(REASON_REDIRECT_PEER, dir, skb->len);
	return bpf_redirect_peer(dst->ifindex, 0);
}

/* Netfilter's conntrack, read through the tc kfuncs (kernel 6.0+, nf_conntrack).
 *
 * Where kube-proxy implements Services, a pod's connection to a ClusterIP goes through
 * the node's stack, where netfilter translates it (DNAT to a backend pod). The backend's
 * reply carries the backend's address; only netfilter can turn it back into the
 * ClusterIP the client connected to. Delivered by bpf_redirect_peer, it would skip
 * netfilter and reach the client from an address the client never spoke to (TCP
 * answers with a reset, a connected UDP socket drops it). Such a reply must go to the
 * stack instead: netfilter undoes the translation and routes it to the client through
 * the client's veth, where cil_to_pod finds the client's own connection (to the
 * ClusterIP) in cilia's conntrack.
 *
 * The kfuncs' own types, declared with what cilia reads: `nf_conn` is relocated against
 * the kernel's BTF (CO-RE), `bpf_ct_opts` is passed in its first, 12-byte form, which
 * every kernel with the kfuncs accepts.
 */
struct nf_conn {
	unsigned long status;	/* enum ip_conntrack_status bits */
} __attribute__((preserve_access_index));

struct bpf_ct_opts___cilia {
	__s32 netns_id;
	__s32 error;
	__u8  l4proto;
	__u8  dir;
	__u8  reserved[2];
};

#define NF_BPF_CT_OPTS_SZ 12

extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
					 __u32 tuple__sz, struct bpf_ct_opts___cilia *opts,
					 __u32 opts__sz) __ksym;
extern void bpf_ct_release(struct nf_conn *ct) __ksym;

/* 1 if netfilter, in the netns of the device the packet came in on (the node's), tracks
 * a connection that this packet belongs to, in either direction, and translated it
 * (source or destination NAT). Only TCP and UDP: all that kube-proxy translates, and
 * all the kfunc looks up. A lookup is a hash probe in netfilter's table; callers ask
 * only for packets that can be such replies, never on the established pod-to-pod path.
 */
static __always_inline int nf_nat_tracked(struct __sk_buff *skb, const struct ct_key *tuple)
{
	struct bpf_ct_opts___cilia opts = {
		.netns_id = BPF_F_CURRENT_NETNS,
		.l4proto = tuple->proto,
	};
	struct bpf_sock_tuple t = {};
	struct nf_conn *ct;
	int nat;

	if (tuple->proto != IPPROTO_TCP && tuple->proto != IPPROTO_UDP)
		return 0;
	t.ipv4.saddr = tuple->saddr;
	t.ipv4.daddr = tuple->daddr;
	t.ipv4.sport = tuple->sport;
	t.ipv4.dport = tuple->dport;
	ct = bpf_skb_ct_lookup(skb, &t, sizeof(t.ipv4), &opts, NF_BPF_CT_OPTS_SZ);
	if (!ct)
		return 0;
	nat = (ct->status & IPS_NAT_MASK) != 0;
	bpf_ct_release(ct);
	return nat;
}

/* A packet of a connection netfilter translated: the stack undoes the translation. */
static __always_inline int pass_to_stack_nat(struct __sk_buff *skb, __u8 dir)
{
	update_metrics(REASON_TO_STACK_NAT, dir, skb->len);
	return TC_ACT_OK;
}

/* A packet for a local pod, of a connection whose other direction passes the node's
 * stack (CT_F_VIA_STACK): through the stack too, so that netfilter sees the connection
 * whole; cil_to_pod lets it into the pod as the packet of a known connection. */
static __always_inline int pass_to_stack_symmetric(struct __sk_buff *skb, __u8 dir)
{
	update_metrics(REASON_TO_STACK_SYMMETRIC, dir, skb->len);
	return TC_ACT_OK;
}

#endif
