/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_METRICS_H
#define CILIA_METRICS_H

#include <linux/types.h>

/* Why a packet went where it went. Values below DROP_BASE are deliveries; from
 * DROP_BASE up, drops. userspace prints these names (cilia/datapath/layouts.py
 * mirrors them and a test keeps the two lists equal), so a name is part of the
 * interface: rename with care.
 */
enum metric_reason {
	REASON_UNSPEC		= 0,
	REASON_REDIRECT_PEER	= 1,	/* delivered to a local pod by bpf_redirect_peer */
	REASON_TO_STACK		= 2,	/* handed to the node's network stack */
	REASON_TO_POD		= 3,	/* from the node's stack into a pod, after its policy */
	REASON_TO_STACK_NAT	= 4,	/* for a local pod, but of a connection netfilter NATed
					 * (kube-proxy's Services): handed to the stack, which
					 * undoes the NAT, instead of bpf_redirect_peer */
	REASON_REDIRECT_NEIGH	= 5,	/* from a pod to another node or the outside, past the
					 * node's stack: FIB lookup, then bpf_redirect (neighbour
					 * known) or bpf_redirect_neigh (neighbour to resolve) */
	REASON_TO_STACK_SYMMETRIC = 6,	/* for a local pod, but of a connection whose other
					 * direction passes the node's stack: handed to the stack
					 * too, so that netfilter sees the connection whole */
	REASON_TO_STACK_FIB	= 7,	/* from a pod, for a remote pod or an answer that could
					 * have gone past the stack, but the FIB gave no way out
					 * of a cilia device (no route, needs fragmenting, TTL
					 * expiring): to the stack */
	REASON_LB_TRANSLATED	= 8,	/* from a pod to a Service frontend (ClusterIP): its
					 * destination translated to a backend, before conntrack
					 * and policy (counted besides where it then went) */
	REASON_LB_REV_NAT	= 9,	/* a backend's reply to a translated flow: its source
					 * turned back into the frontend the client spoke to */
	REASON_LB_REJECTED	= 10,	/* to a Service frontend with no ready backend: answered
					 * at once with an ICMP port unreachable from the
					 * frontend (as kube-proxy's REJECT does) */
	REASON_LB_SOCK_TRANSLATED = 11,	/* a socket of the node's own (host netns) connecting or
					 * sending to a Service frontend: given a backend's
					 * address at the socket (cgroup connect4/sendmsg4),
					 * before any packet exists */
	REASON_POLICY_AUDIT	= 12,	/* a new flow (or one judged again) that the policy of an
					 * endpoint in audit mode refuses (ENDPOINT_F_AUDIT):
					 * passed instead, and counted here once per verdict
					 * besides where it then went */
	DROP_BASE		= 128,
	DROP_INVALID		= 130,	/* truncated or malformed Ethernet/IPv4 header */
	DROP_SPOOFED_SOURCE	= 131,	/* source IP is not the sending pod's own address */
	DROP_NO_ENDPOINT_IFINDEX = 132,	/* endpoint entry without a delivery interface */
	DROP_POLICY		= 133,	/* no policy rule allows it (default deny) */
	DROP_POLICY_DENY	= 134,	/* an explicit deny rule */
	DROP_FRAGMENT		= 135,	/* a non-first IP fragment towards policy with ports */
	DROP_PREFILTER		= 136,	/* source in the XDP prefilter's deny list */
	DROP_NO_SERVICE_BACKEND	= 137,	/* to a Service frontend with no ready backend, where
					 * no ICMP unreachable could be sent back instead */
	DROP_NOT_IPV4		= 138,	/* a frame other than IPv4 to or from a pod: pods here
					 * never ARP (permanent neighbours both ways) and have
					 * no IPv6, so such a frame could only slip past policy */
	DROP_UNKNOWN_ENDPOINT	= 139,	/* to a pod interface whose endpoint entry is missing
					 * or names another interface (the pod is being added
					 * or removed): never delivered unjudged */
	DROP_OVERLAY_SOURCE	= 140,	/* a VXLAN datagram to the node from an address that
					 * is no other node of the cluster */
	DROP_TO_OVERLAY_PORT	= 141,	/* a pod's datagram to a node's VXLAN port: it would
					 * leave masqueraded, as if from its node */
	DROP_REVERSE_PATH	= 142,	/* a new connection from a pod's address on a device
					 * the route back to it does not leave by */
	DROP_NO_SNAT_PORT	= 143,	/* a connection from outside (NodePort, ExternalIP) to a
					 * backend on another node, and no SNAT for it: every
					 * port tried taken, or no node address known yet */
	DROP_NO_ROUTE		= 144,	/* translated past the stack, but the FIB knows no way
					 * out of a cilia device (the stack would drop it: its
					 * source is this node's own address) */
	DROP_OVERLAY_INNER_SOURCE = 145,/* a frame from the overlay whose inner source is no
					 * address of the node that sent it (its pod CIDR, its
					 * own address): one node speaking for another's pods */
	DROP_NO_TUNNEL		= 146,	/* out of the overlay to an address of no other node
					 * (or no IPv4 at all): no tunnel to send it through */
	DROP_CT_ENDPOINT_LIMIT	= 150,	/* a new flow of an endpoint that has as many live
					 * conntrack entries as it may (--ct-endpoint-max): it
					 * would evict other pods' connections */
	DROP_KERNEL		= 151,	/* the kernel's network stack dropped a packet from or to
					 * a pod (skb:kfree_skb, bpf_trace.c): the flow event's
					 * cookie is its enum skb_drop_reason, which the agent
					 * names as the kernel does (kernel:NO_SOCKET) */
};

enum metric_dir {
	METRIC_DIR_UNSPEC	= 0,
	METRIC_DIR_INGRESS	= 1,	/* towards a pod */
	METRIC_DIR_EGRESS	= 2,	/* from a pod */
};

/* (reason, direction) rather than a flat array index: a new reason or direction adds
 * keys, not a new layout. Padded explicitly to 4 bytes so there are no holes whose
 * contents would make two equal keys hash differently.
 */
struct metrics_key {
	__u8  reason;	/* enum metric_reason */
	__u8  dir;	/* enum metric_dir */
	__u16 pad;
};

/* Per-CPU: each CPU adds to its own slot without atomics; userspace sums the slots. */
struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

#endif
