/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_CONNTRACK_H
#define CILIA_LIB_CONNTRACK_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <cilia/conntrack.h>
#include "maps.h"
#include "l4.h"

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10
#define NSEC_PER_SEC 1000000000ULL

enum ct_status {
	CT_NEW = 0,
	CT_ESTABLISHED = 1,	/* the packet goes the way the connection's first packet went */
	CT_REPLY = 2,		/* the packet answers a connection the other side opened */
	CT_RELATED = 3,		/* an ICMP error about a packet of a known connection (a
				 * router's "fragmentation needed" for path-MTU discovery,
				 * an unreachable port): it belongs to that connection */
};

static __always_inline void ct_reverse(const struct ct_key *in, struct ct_key *out)
{
	out->saddr = in->daddr;
	out->daddr = in->saddr;
	out->sport = in->dport;
	out->dport = in->sport;
	out->proto = in->proto;
}

static __always_inline __u32 ct_lifetime(__u8 proto, __u8 flags)
{
	if (flags & CT_F_CLOSING)
		return CT_LIFETIME_CLOSING;
	if (proto != IPPROTO_TCP)
		return CT_LIFETIME_NONTCP;
	return (flags & CT_F_REPLY_SEEN) ? CT_LIFETIME_TCP : CT_LIFETIME_SYN;
}

static __always_inline int ct_live(const struct ct_value *ct, __u64 now)
{
	return now - ct->last_seen_ns <= (__u64)ct->lifetime_s * NSEC_PER_SEC;
}

/* A packet of the entry's connection: it has been seen now, and a FIN or RST shortens
 * its lifetime. last_seen is written at most once a second, so a busy flow does not
 * bounce the entry's cache line between CPUs on every packet. */
static __always_inline void ct_refresh(struct ct_value *ct, __u64 now, __u8 proto,
				       __u8 tcp_flags, int reply)
{
	__u8 flags = ct->flags;

	if (reply)
		flags |= CT_F_REPLY_SEEN;
	if (tcp_flags & (TCP_FIN | TCP_RST))
		flags |= CT_F_CLOSING;
	if (flags != ct->flags) {
		ct->flags = flags;
		ct->lifetime_s = ct_lifetime(proto, flags);
		ct->last_seen_ns = now;
	} else if (now - ct->last_seen_ns > NSEC_PER_SEC) {
		ct->last_seen_ns = now;
	}
}

/* Refreshes a live entry; returns 0 if it has expired (the packet then counts as new). */
static __always_inline int ct_touch(struct ct_value *ct, __u8 proto, __u8 tcp_flags,
				    int reply)
{
	__u64 now = bpf_ktime_get_ns();

	if (!ct_live(ct, now))
		return 0;
	ct_refresh(ct, now, proto, tcp_flags, reply);
	return 1;
}

static __always_inline int ct_bare_syn(const struct ct_key *tuple, __u8 tcp_flags)
{
	return tuple->proto == IPPROTO_TCP && (tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
}

/* What a lookup found besides the packet's place: the entry's CT_F_* flags and, for a
 * flow translated from a Service frontend, its reverse-NAT id (both 0 when new). */
struct ct_state {
	__u8  flags;
	__u16 rev_nat_id;
	__u16 src_ep;	/* the endpoints the entry was made for (ct_value) */
	__u16 dst_ep;
	__u8  policy_rev;	/* the revision it was judged under */
	__u8  related_opener;	/* CT_RELATED: the error's sender opened the connection */
};

/* The low byte of the policy revision in force (maps.h cilia_policy_rev). */
static __always_inline __u8 policy_rev_now(void)
{
	__u32 key = 0, *rev = bpf_map_lookup_elem(&cilia_policy_rev, &key);

	return rev ? (__u8)*rev : 0;
}

/* Whether a live entry is a connection of the endpoints this packet goes between:
 * `from_ep` sends it, `to_ep` receives it (0: not a pod of this node). An entry made for
 * another endpoint (a deleted pod whose address a new pod got before the entry expired)
 * is no connection of this one: the packet is judged as new, or it would pass on the old
 * pod's verdict, and it leaves the entry as it was (its FIN or RST shortens no
 * lifetime of another's). Ids are compared only where both sides know one: an entry made
 * where the other end was not a local pod (through the stack, from another node) has 0. */
static __always_inline int ct_owned(const struct ct_value *ct, int reply, __u16 from_ep,
				    __u16 to_ep)
{
	__u16 orig_src = reply ? to_ep : from_ep, orig_dst = reply ? from_ep : to_ep;

	return !((orig_src && ct->src_ep && ct->src_ep != orig_src) ||
		 (orig_dst && ct->dst_ep && ct->dst_ep != orig_dst));
}

/* The packet's place in a connection of `from_ep` and `to_ep` (ct_owned; 0, 0: any);
 * `st` (may be NULL) gets what the entry says. Only a packet of the connection
 * refreshes its entry. */
static __always_inline int ct_lookup(const struct ct_key *tuple, __u8 tcp_flags,
				     struct ct_state *st, __u16 from_ep, __u16 to_ep)
{
	__u64 now = bpf_ktime_get_ns();
	struct ct_key rev = {};
	struct ct_value *ct;
	int status = CT_NEW;
	__u16 rev_nat_id = 0, src_ep = 0, dst_ep = 0;
	__u8 flags = 0, policy_rev = 0;

	/* A bare SYN opens a connection: policy is asked again even if an entry of the
	 * same tuple lingers, so a reused port never inherits an old verdict. */
	if (!ct_bare_syn(tuple, tcp_flags)) {
		ct = bpf_map_lookup_elem(&cilia_ct, tuple);
		if (ct && ct_live(ct, now)) {
			status = CT_ESTABLISHED;
		} else {
			ct_reverse(tuple, &rev);
			ct = bpf_map_lookup_elem(&cilia_ct, &rev);
			if (ct && ct_live(ct, now))
				status = CT_REPLY;
		}
		if (ct && status != CT_NEW) {
			if (ct_owned(ct, status == CT_REPLY, from_ep, to_ep)) {
				ct_refresh(ct, now, tuple->proto, tcp_flags, status == CT_REPLY);
				flags = ct->flags;
				rev_nat_id = ct->rev_nat_id;
				src_ep = ct->src_ep;
				dst_ep = ct->dst_ep;
				policy_rev = ct->policy_rev;
			} else {
				status = CT_NEW;
			}
		}
	}
	if (st) {
		st->flags = flags;
		st->rev_nat_id = rev_nat_id;
		st->src_ep = src_ep;
		st->dst_ep = dst_ep;
		st->policy_rev = policy_rev;
	}
	return status;
}

/* Whether an ICMP error is about a packet of a connection conntrack knows: the packet
 * it quotes went one way or the other of that connection. The error itself travels
 * against the quoted packet, so its sender is a router on the way (or the peer) and its
 * receiver the end that sent the quoted packet. */
static __always_inline struct ct_value *ct_related(const struct l4_info *l4, __be32 *opener)
{
	struct ct_key rev = {};
	struct ct_value *ct;

	if (!l4->icmp_error)
		return NULL;
	ct = bpf_map_lookup_elem(&cilia_ct, &l4->inner);
	if (ct) {
		*opener = l4->inner.saddr;
		return ct;
	}
	ct_reverse(&l4->inner, &rev);
	*opener = rev.saddr;
	return bpf_map_lookup_elem(&cilia_ct, &rev);
}

/* A new packet that is an ICMP error about a known connection is CT_RELATED: it passes
 * with that connection, as netfilter's RELATED does (no policy of its own, no entry),
 * and it takes the connection's way (`st->flags`: through the node's stack or past it),
 * or netfilter would see an error about a connection it never saw (kube-proxy drops
 * those as INVALID), or miss one about a connection it tracks. */
static __always_inline int ct_or_related(int status, const struct l4_info *l4,
					 struct ct_state *st)
{
	struct ct_value *ct;
	__be32 opener = 0;

	if (status != CT_NEW)
		return status;
	ct = ct_related(l4, &opener);
	if (!ct)
		return status;
	st->flags = ct->flags & (CT_F_VIA_STACK | CT_F_BYPASS_STACK);
	st->related_opener = opener == l4->tuple.saddr;
	return CT_RELATED;
}

/* The entry of a known connection (`status` from ct_lookup: CT_ESTABLISHED or
 * CT_REPLY), found by the packet's tuple. */
static __always_inline struct ct_value *ct_entry(const struct ct_key *tuple, int status)
{
	struct ct_key rev = {};

	if (status != CT_REPLY)
		return bpf_map_lookup_elem(&cilia_ct, tuple);
	ct_reverse(tuple, &rev);
	return bpf_map_lookup_elem(&cilia_ct, &rev);
}

/* Forgets a connection that policy no longer allows: its next packet is new. */
static __always_inline void ct_forget(const struct ct_key *tuple, int status)
{
	struct ct_key rev = {};

	if (status != CT_REPLY) {
		bpf_map_delete_elem(&cilia_ct, tuple);
		return;
	}
	ct_reverse(tuple, &rev);
	bpf_map_delete_elem(&cilia_ct, &rev);
}

/* Whether endpoint `ep_id` may make another conntrack entry: under its limit (see
 * cilia/conntrack.h, cilia_ct_created), and then it is counted; 0 (no local pod):
 * always, uncounted. For a new flow that passed policy, just before ct_create. */
static __always_inline int ct_charge(__u16 ep_id)
{
	__u32 key = 0, id = ep_id, *limit;
	__u64 *created, *credited;

	if (!ep_id)
		return 1;
	created = bpf_map_lookup_elem(&cilia_ct_created, &id);
	credited = bpf_map_lookup_elem(&cilia_ct_credited, &id);
	limit = bpf_map_lookup_elem(&cilia_ct_limit, &key);
	if (!created || !credited)
		return 1;
	if (limit && *limit && *created - *credited >= *limit)
		return 0;
	__sync_fetch_and_add(created, 1);
	return 1;
}

/* `flags`: CT_F_VIA_STACK or CT_F_BYPASS_STACK, the way the connection takes here.
 * `rev_nat_id`: the Service frontend the flow was translated from (0: none). */
static __always_inline void ct_create(const struct ct_key *tuple, __u16 src_ep, __u16 dst_ep,
				      __u32 cookie, __u8 tcp_flags, __u8 flags,
				      __u16 rev_nat_id)
{
	struct ct_value ct = {
		.last_seen_ns = bpf_ktime_get_ns(),
		.src_ep = src_ep,
		.dst_ep = dst_ep,
		.cookie = cookie,
		.flags = flags | ((tcp_flags & (TCP_FIN | TCP_RST)) ? CT_F_CLOSING : 0),
		.policy_rev = policy_rev_now(),
		.rev_nat_id = rev_nat_id,
	};

	ct.lifetime_s = ct_lifetime(tuple->proto, ct.flags);
	bpf_map_update_elem(&cilia_ct, tuple, &ct, BPF_ANY);
}

#endif
