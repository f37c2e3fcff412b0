/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_ENFORCE_H
#define CILIA_LIB_ENFORCE_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maps.h"
#include "metrics.h"
#include "policy.h"
#include "events.h"
#include "l4.h"
#include "conntrack.h"

static __always_inline struct endpoint_info *lookup_endpoint(__be32 ip4)
{
	struct endpoint_key key = { .ip4 = ip4 };

	return bpf_map_lookup_elem(&cilia_endpoints, &key);
}

static __always_inline __u8 drop_reason(int verdict)
{
	return verdict == POLICY_DENY ? DROP_POLICY_DENY : DROP_POLICY;
}

/* Policy audit mode (ENDPOINT_F_AUDIT on `ep`, whose policy refused the flow in `dir`
 * for `reason`): the refusal is remembered in the flow, the first one only (its rule, its
 * reason, whose policy), and the flow passes: 0. Only a policy's own verdicts are
 * audited; a later fragment whose ports are unknown (DROP_FRAGMENT) was judged by no
 * rule and stays dropped (its first fragment, passed in audit, gives them the ports). */
static __always_inline __u8 audit(const struct endpoint_info *ep, __u8 dir, __u8 reason,
				  struct flow_ctx *f)
{
	if (!(ep->flags & ENDPOINT_F_AUDIT) ||
	    (reason != DROP_POLICY && reason != DROP_POLICY_DENY))
		return reason;
	if (!f->audit_reason) {
		f->audit_reason = reason;
		f->audit_dir = dir == POLICY_INGRESS ? METRIC_DIR_INGRESS : METRIC_DIR_EGRESS;
		f->audit_cookie = reason == DROP_POLICY_DENY ? f->cookie : 0;
	}
	return 0;
}

/* Policy of `ep` in `dir` for a new connection; 0 allows (or audits), else the drop
 * reason. */
static __always_inline __u8 enforce(const struct endpoint_info *ep, __u8 dir, __u32 flag,
				    __u32 peer_identity, __u32 peer_cidr_identity,
				    struct flow_ctx *f)
{
	__u32 tiered = dir == POLICY_INGRESS ? ENDPOINT_F_TIERED_INGRESS :
					       ENDPOINT_F_TIERED_EGRESS;
	int verdict;

	if (!(ep->flags & (flag | tiered)))
		return 0;
	if (f->l4.nonfirst_frag)
		return DROP_FRAGMENT;
	verdict = policy_verdict(ep->ep_id, ep->flags, dir, peer_identity, peer_cidr_identity,
				 f->l4.tuple.proto, f->l4.policy_port, &f->cookie);
	return verdict == POLICY_ALLOW ? 0 : audit(ep, dir, drop_reason(verdict), f);
}

/* The event of a flow that passed its policies: FORWARDED, or AUDIT if a policy in audit
 * mode refused it on the way (counted as REASON_POLICY_AUDIT, in the direction of the
 * policy that refused it; the event names that refusal's reason and rule). */
static __always_inline void emit_passed(struct __sk_buff *skb, struct flow_ctx *f, __u8 dir)
{
	if (!f->audit_reason) {
		emit_flow(skb, f, VERDICT_FORWARDED, 0, dir);
		return;
	}
	update_metrics(REASON_POLICY_AUDIT, f->audit_dir, skb->len);
	f->cookie = f->audit_cookie;
	emit_flow(skb, f, VERDICT_AUDIT, f->audit_reason, f->audit_dir);
}

/* A known connection judged again under the policy now in force, as the new connection
 * it once was and in its own direction: the egress policy of the end that opened it and
 * the ingress policy of the end it was opened to, for those ends that are pods of this
 * node (`pkt_src`, `pkt_dst`: the packet's ends; NULL: not a local pod). `reply`: the
 * packet goes against the connection's direction (its ports, and ICMP's echo reply
 * type, are the other way round). `ct_flags`: the entry's. The node may always reach its
 * pods, but only a connection the node itself opened (CT_F_FROM_NODE): one through the
 * stack from a node address that no socket of the node's sent (kube-proxy's NodePort
 * SNAT) was judged as the world's when it began, and is again. 0 allows, else the drop
 * reason. */
static __always_inline __u8 rejudge(struct flow_ctx *f, int reply, __u8 ct_flags,
				    const struct endpoint_info *pkt_src,
				    const struct endpoint_info *pkt_dst)
{
	const struct endpoint_info *opener = reply ? pkt_dst : pkt_src;
	const struct endpoint_info *opened = reply ? pkt_src : pkt_dst;
	__be32 opener_addr = reply ? f->l4.tuple.daddr : f->l4.tuple.saddr;
	__be32 opened_addr = reply ? f->l4.tuple.saddr : f->l4.tuple.daddr;
	__be16 port = f->l4.policy_port;
	__u32 identity, cidr;
	__u8 reason = 0;

	if (reply)
		f->l4.policy_port = f->l4.tuple.proto == IPPROTO_ICMP ?
				    bpf_htons(ICMP_ECHO) : f->l4.tuple.sport;
	if (opener) {
		peer_identity(opened_addr, &identity, &cidr);
		reason = enforce(opener, POLICY_EGRESS, ENDPOINT_F_EGRESS_ENFORCED, identity, cidr,
				 f);
	}
	if (!reason && opened) {
		peer_identity(opener_addr, &identity, &cidr);
		if (identity == IDENTITY_HOST && !(ct_flags & CT_F_FROM_NODE) &&
		    (ct_flags & CT_F_VIA_STACK))
			identity = IDENTITY_WORLD;	/* as cil_to_pod judged it */
		if (identity != IDENTITY_HOST || !(ct_flags & CT_F_FROM_NODE))
			reason = enforce(opened, POLICY_INGRESS, ENDPOINT_F_INGRESS_ENFORCED,
					 identity, cidr, f);
	}
	f->l4.policy_port = port;
	return reason;
}

/* After ct_lookup: a connection judged under an older policy revision is judged again;
 * allowed, its entry takes the revision in force; refused, it is forgotten. 0 allows.
 * Allowed only by audit mode, it goes on, reported as AUDIT once for this revision: so
 * audit mode switched off (a revision) enforces on connections it let through too. */
static __always_inline __u8 ct_recheck(struct __sk_buff *skb, struct flow_ctx *f, int status,
				       const struct ct_state *st,
				       const struct endpoint_info *pkt_src,
				       const struct endpoint_info *pkt_dst)
{
	__u8 now = policy_rev_now(), reason;
	struct ct_value *ct;

	if (status == CT_NEW || status == CT_RELATED || st->policy_rev == now)
		return 0;
	reason = rejudge(f, status == CT_REPLY, st->flags, pkt_src, pkt_dst);
	if (reason) {
		ct_forget(&f->l4.tuple, status);
		return reason;
	}
	ct = ct_entry(&f->l4.tuple, status);
	if (ct)
		ct->policy_rev = now;
	if (f->audit_reason)
		emit_passed(skb, f, 0);
	return 0;
}

#endif
