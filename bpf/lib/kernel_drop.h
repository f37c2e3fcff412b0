/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_KERNEL_DROP_H
#define CILIA_LIB_KERNEL_DROP_H

/* The kernel's own drops of the pods' packets (bpf_trace.c, on skb:kfree_skb): a socket
 * that is not there, a full queue, netfilter, a bad checksum. Reported into the same
 * ring as the datapath's drops, as verdict dropped, reason DROP_KERNEL, with the
 * kernel's enum skb_drop_reason in the cookie, so `cilia observe` shows
 * "kernel:NO_SOCKET" beside "drop_policy". */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <cilia/events.h>
#include <cilia/ipcache.h>
#include "maps.h"
#define CILIA_NO_SKB
#include "metrics.h"
#include "policy.h"

/* Only the members read, found by name in the running kernel's own struct (CO-RE,
 * against /sys/kernel/btf/vmlinux): no vmlinux.h to generate, no layout to keep. */
struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

struct net_device {
	int ifindex;
	struct {
		struct net *net;
	} nd_net;
} __attribute__((preserve_access_index));

struct sock_common {
	struct {
		struct net *net;
	} skc_net;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

struct sk_buff {
	struct net_device *dev;
	struct sock *sk;
	unsigned int len;
	__be16 protocol;
	__u16 network_header;
	unsigned char *head;
} __attribute__((preserve_access_index));

#define KERNEL_DROP_NETNS_MAP_SIZE 65536

/* The network namespaces of this node by inode number (net->ns.inum; what stat() of
 * /proc/self/ns/net or of a pod's netns file gives): the node's own and each of its
 * pods', written by the agent (cilia/datapath/kernel_drops.py). An address says whose
 * packet it is only within one node: one kernel may hold several nodes (the lab) or
 * other namespaces with the same pod addresses, so a drop is this node's only where
 * it happened in one of these. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, KERNEL_DROP_NETNS_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_kdrop_netns SEC(".maps");

/* Only the names compared against: their values are the running kernel's (CO-RE enum
 * relocations), which move between releases as reasons are added. */
enum skb_drop_reason {
	SKB_NOT_DROPPED_YET,
	SKB_CONSUMED,
	SKB_DROP_REASON_TC_INGRESS,
	SKB_DROP_REASON_TC_EGRESS,
	SKB_DROP_REASON_QUEUE_PURGE,
};

#define KERNEL_REASON_IS(r, name)						\
	(bpf_core_enum_value_exists(enum skb_drop_reason, name) &&		\
	 (r) == bpf_core_enum_value(enum skb_drop_reason, name))

#define SKB_HEADER_UNSET	((__u16)~0U)	/* skb_network_header_was_set() */
#define IP4_FRAG_OFFSET		0x1fff

/* Not a drop (a freed skb that did its work); a drop the datapath made and reported
 * itself with its own reason (TC_ACT_SHOT from cil_from_pod, cil_to_pod or
 * cil_from_netdev reaches kfree_skb as TC_INGRESS or TC_EGRESS); or a closing socket
 * freeing what it still held (QUEUE_PURGE: every connection's last FIN in a busy pod,
 * no packet the stack refused). */
static __always_inline int kernel_drop_ignored(__u32 reason)
{
	return KERNEL_REASON_IS(reason, SKB_NOT_DROPPED_YET) ||
	       KERNEL_REASON_IS(reason, SKB_CONSUMED) ||
	       KERNEL_REASON_IS(reason, SKB_DROP_REASON_TC_INGRESS) ||
	       KERNEL_REASON_IS(reason, SKB_DROP_REASON_TC_EGRESS) ||
	       KERNEL_REASON_IS(reason, SKB_DROP_REASON_QUEUE_PURGE);
}

/* Where the kernel dropped it: the namespace of its device, else of its socket. */
static __always_inline int kernel_drop_on_node(const struct sk_buff *skb)
{
	struct net_device *dev = skb->dev;
	struct sock *sk = skb->sk;
	__u32 inum;

	if (dev)
		inum = dev->nd_net.net->ns.inum;
	else if (sk)
		inum = sk->__sk_common.skc_net.net->ns.inum;
	else
		return 0;
	return bpf_map_lookup_elem(&cilia_kdrop_netns, &inum) != NULL;
}

static __always_inline __u32 kernel_drop_identity(const struct endpoint_info *ep, __be32 ip4)
{
	struct ipcache_value *v;

	if (ep)
		return ep->sec_identity;
	v = ipcache_lookup(ip4);
	return v ? v->identity : IDENTITY_WORLD;
}

/* Runs for every skb the kernel frees as dropped, on the whole machine: what is not
 * IPv4 from or to a pod of this node (its own cilia_endpoints, in its own namespaces)
 * leaves after one read of the IP header and two or three hash lookups. Best effort like emit_flow(): a full ring loses
 * the event, and a header the kernel cannot give (not set yet, paged out) loses it. */
static __always_inline void kernel_drop(struct sk_buff *skb, __u32 reason)
{
	struct endpoint_key skey = {}, dkey = {};
	struct endpoint_info *src, *dst;
	struct flow_event *e;
	unsigned char *l3;
	struct iphdr ip;
	__u8 dir, flags = 0;
	__be16 ports[2] = {};
	__u16 nh;

	if (kernel_drop_ignored(reason))
		return;
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return;
	nh = skb->network_header;
	if (nh == SKB_HEADER_UNSET)
		return;
	l3 = skb->head + nh;
	if (bpf_probe_read_kernel(&ip, sizeof(ip), l3) || ip.version != 4)
		return;
	skey.ip4 = ip.saddr;
	dkey.ip4 = ip.daddr;
	src = bpf_map_lookup_elem(&cilia_endpoints, &skey);
	dst = bpf_map_lookup_elem(&cilia_endpoints, &dkey);
	barrier_var(src);	/* else clang tests (src | dst), which the verifier refuses */
	if (!src && !dst)
		return;
	if (!kernel_drop_on_node(skb))
		return;
	dir = dst ? METRIC_DIR_INGRESS : METRIC_DIR_EGRESS;	/* towards a pod, or from one */
	update_metrics(DROP_KERNEL, dir, skb->len);

	if (!(ip.frag_off & bpf_htons(IP4_FRAG_OFFSET)) &&
	    (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP ||
	     ip.protocol == IPPROTO_SCTP)) {
		unsigned char *l4 = l3 + ip.ihl * 4;

		if (bpf_probe_read_kernel(ports, sizeof(ports), l4))
			ports[0] = ports[1] = 0;
		if (ip.protocol == IPPROTO_TCP && bpf_probe_read_kernel(&flags, 1, l4 + 13))
			flags = 0;
	}

	e = bpf_ringbuf_reserve(&cilia_events, sizeof(*e), 0);
	if (!e)
		return;
	e->ts_ns = bpf_ktime_get_ns();
	e->saddr = ip.saddr;
	e->daddr = ip.daddr;
	e->src_identity = kernel_drop_identity(src, ip.saddr);
	e->dst_identity = kernel_drop_identity(dst, ip.daddr);
	e->cookie = reason;
	e->ifindex = skb->dev ? skb->dev->ifindex : 0;
	e->sport = ports[0];
	e->dport = ports[1];
	e->src_ep = src ? src->ep_id : 0;
	e->dst_ep = dst ? dst->ep_id : 0;
	e->proto = ip.protocol;
	e->verdict = VERDICT_DROPPED;
	e->reason = DROP_KERNEL;
	e->dir = dir;
	e->rev_nat_id = 0;
	e->tcp_flags = flags;
	e->pad = 0;
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

#endif
