/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_ENFORCE_H
#define CILIA_LIB_ENFORCE_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"
#include "metrics.h"
#include "policy.h"
#include "events.h"

static __always_inline struct endpoint_info *lookup_endpoint(__be32 ip4)
{
	struct endpoint_key key = { .ip4 = ip4 };

	return bpf_map_lookup_elem(&cilia_endpoints, &key);
}

static __always_inline __u8 drop_reason(int verdict)
{
	return verdict == POLICY_DENY ? DROP_POLICY_DENY : DROP_POLICY;
}

/* Policy of `ep` in `dir` for a new connection; 0 allows, else the drop reason. */
static __always_inline __u8 enforce(const struct endpoint_info *ep, __u8 dir, __u32 flag,
				    __u32 peer_identity, __u32 peer_cidr_identity,
				    struct flow_ctx *f)
{
	int verdict;

	if (!(ep->flags & flag))
		return 0;
	if (f->l4.nonfirst_frag)
		return DROP_FRAGMENT;
	verdict = policy_verdict(ep->ep_id, dir, peer_identity, peer_cidr_identity,
				 f->l4.tuple.proto, f->l4.policy_port, &f->cookie);
	return verdict == POLICY_ALLOW ? 0 : drop_reason(verdict);
}

static __always_inline int drop_flow(struct __sk_buff *skb, struct flow_ctx *f, __u8 reason,
				     __u8 dir)
{
	emit_flow(skb, f, VERDICT_DROPPED, reason, dir);
	return drop(skb, reason, dir);
}

#endif
