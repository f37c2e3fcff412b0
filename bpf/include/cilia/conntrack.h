/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_CONNTRACK_H
#define CILIA_CONNTRACK_H

#include <linux/types.h>

/* The table's size in the objects; the agent sizes it at load from the node's memory
 * (cilia/datapath/conntrack.py ct_map_size, --ct-map-max), so this is only what a bare
 * load (a test) gets. */
#define CT_MAP_SIZE 65536

/* One entry per connection, keyed by its tuple in the direction of the first packet.
 * A packet is looked up as is (an established flow) and reversed (a reply). Ports are
 * 0 for protocols without them; ICMP echo puts its identifier in both. Explicitly
 * padded to 16 bytes so equal tuples hash equally.
 *
 * `scope` keeps two kinds of entry apart in one table (Cilium's CT_SERVICE): a flow's
 * own entry (CT_SCOPE_FLOW, the tuple as delivered, after any Service translation) and
 * a translated flow's service entry (CT_SCOPE_SERVICE, the tuple as the client sent it,
 * to the frontend), which remembers the backend the flow was given, so that every later
 * packet of the connection goes to it. It took a byte of the old padding: entries of an
 * older datapath are flow entries, as they were. */
struct ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8   proto;
	__u8   scope;	/* CT_SCOPE_* */
	__u8   pad[2];
};

#define CT_SCOPE_FLOW		0
#define CT_SCOPE_SERVICE	1

/* skb->mark bit on replies of connections the other side opened, when they go to the
 * node's stack. Replies of inbound connections that reached a pod past the stack leave
 * past it too (bpf_redirect_neigh); should one go to the stack after all (no route out
 * of a device), netfilter would take it for a new outbound flow and masquerade it: the
 * masquerade chain (agent/masquerade.py) returns early on this bit. */
#define MARK_CT_REPLY	0x200

#define CT_F_REPLY_SEEN	1	/* the other side has answered */
#define CT_F_CLOSING	2	/* FIN or RST seen: short lifetime */
#define CT_F_VIA_STACK	4	/* the connection passes the node's stack (and netfilter)
				 * here, both ways: opened through it (first seen by
				 * cil_to_pod), or sent to it by cil_from_pod (for the node, a
				 * Service, the outside). netfilter's conntrack must see it
				 * whole (kube-proxy drops what it finds INVALID), and may
				 * have translated it (Service DNAT, masquerade). */
#define CT_F_BYPASS_STACK 8	/* the connection goes past the node's stack here, both
				 * ways: opened by cil_from_netdev (delivered by
				 * bpf_redirect_peer), or by cil_from_pod to a pod on another
				 * node; the pod's packets leave by FIB lookup and
				 * bpf_redirect_neigh. With neither flag: between two pods of
				 * this node (bpf_redirect_peer both ways), or an entry older
				 * than these flags, which keeps the way it had. */
#define CT_F_FROM_NODE	16	/* opened by the node itself (cil_to_pod: the node's address
				 * and a socket of the node's, the kubelet's probes): its pod's
				 * ingress policy exempts it, when it is judged again too. A
				 * connection through the stack from a node address without
				 * this (kube-proxy's NodePort SNAT) is from the world. */

/* Lifetimes, in seconds, like Cilium's defaults. */
#define CT_LIFETIME_TCP		21600
#define CT_LIFETIME_NONTCP	60
#define CT_LIFETIME_SYN		60
#define CT_LIFETIME_CLOSING	10

/* 24 bytes, as before Services: rev_nat_id took padding, so a restarted agent with this
 * datapath reuses an older pinned table (its entries: rev_nat_id 0, no translation). */
struct ct_value {
	__u64 last_seen_ns;	/* bpf_ktime_get_ns() of the last packet, refreshed each second */
	__u32 lifetime_s;	/* from last_seen_ns */
	__u16 src_ep;		/* endpoint ids at creation (0: not a local pod) */
	__u16 dst_ep;		/* in a service entry (CT_SCOPE_SERVICE), which names no
				 * endpoint: the NodePort SNAT port the flow was given
				 * (network order; 0: none), see cilia_snat4 */
	__u32 cookie;		/* the rule that allowed the flow; in a service entry
				 * (CT_SCOPE_SERVICE), which no rule judges: the backend id
				 * the flow was given (lib/lb.h) */
	__u8  flags;		/* CT_F_* */
	__u8  policy_rev;	/* the low byte of cilia_policy_rev when the flow was last
				 * judged (a byte of the old padding: an older entry has 0,
				 * and is judged again at once). 0 is no revision's after the
				 * first: the agent skips it, and before the low byte wraps
				 * marks every entry 0, so an entry idle across 256 revisions
				 * is never taken for judged under the one in force
				 * (cilia/datapath/conntrack.py bump_policy_revision) */
	__u16 rev_nat_id;	/* a flow translated from a Service frontend: its reverse-NAT
				 * id (services.h), so the backend's replies get the frontend
				 * back as their source; 0: not translated */
};

/* Live conntrack entries per endpoint, so that one pod cannot fill the shared LRU table
 * with new flows and evict every other pod's idle connections (issue 13 item 10).
 *
 * An LRU evicts without telling anyone, so a count kept by the programs alone could only
 * go up: an entry is counted when it is made, never when it is evicted, expires or is
 * deleted. A token bucket (a rate of new flows) would not bound what matters either: a
 * TCP connection that was answered lives six hours, so a pod opening a few a second
 * fills the table in a day. So the count is the programs' and the agent's together, in
 * two arrays indexed by endpoint id (16 bits), each with one writer:
 *
 * - cilia_ct_created: the programs add one (atomically) for every flow entry they make
 *   for the endpoint: cil_from_pod for the pod that opens a flow, cil_to_pod and
 *   cil_from_netdev for the pod a flow from elsewhere is opened to. A new flow whose
 *   endpoint has `created - credited` at the limit (cilia_ct_limit) is dropped
 *   (DROP_CT_ENDPOINT_LIMIT) before it makes an entry, so it evicts nothing.
 * - cilia_ct_credited: written by the agent alone, every few seconds (its conntrack GC,
 *   cilia/datapath/conntrack.py): it reads `created`, then counts the endpoint's live
 *   entries in the table (by src_ep, or dst_ep where src_ep is 0: whom the programs
 *   counted the entry for), and sets credited = created as read - live. An entry made
 *   during its walk is counted twice at most, never missed, so `created - credited` is
 *   never below the endpoint's live entries: the limit holds, and what an endpoint's
 *   flows gave back (closed and expired, evicted, purged) is its own again at the next
 *   GC.
 *
 * A pod at its limit makes new flows again after the next GC; with the agent away, once
 * the agent is back (its established flows go on meanwhile). Service entries
 * (CT_SCOPE_SERVICE) are not counted: each goes with a flow entry that is.
 */
#define CT_QUOTA_MAP_SIZE 65536

/* IPv4 fragments: only the first carries the ports, so the ports of a fragmented
 * datagram are remembered by what every fragment carries (addresses, protocol, IP id)
 * when its first fragment passes, and the others find their connection by them. Keyed
 * as the datagram goes; an LRU, since a datagram whose last fragment never comes leaves
 * its entry behind. 16 bytes, padded explicitly so equal keys hash equally. */
#define FRAG_MAP_SIZE 8192

struct frag_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;
	__u8   proto;
	__u8   pad[5];
};

struct frag_ports {
	__be16 sport;
	__be16 dport;
};

#endif
