/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_POLICY_H
#define CILIA_LIB_POLICY_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <cilia/policy.h>
#include <cilia/ipcache.h>
#include "maps.h"

static __always_inline struct ipcache_value *ipcache_lookup(__be32 ip4)
{
	struct ipcache_key key = { .prefixlen = 32, .ip4 = ip4 };

	return bpf_map_lookup_elem(&cilia_ipcache, &key);
}

/* Everything unknown is the world. */
static __always_inline void peer_identity(__be32 ip4, __u32 *identity, __u32 *cidr_identity)
{
	struct ipcache_value *v = ipcache_lookup(ip4);

	*identity = v ? v->identity : IDENTITY_WORLD;
	*cidr_identity = v ? v->cidr_identity : IDENTITY_WORLD;
}

/* An identity of a label set: a pod (as opposed to the node, another node, the world or
 * a CIDR). */
static __always_inline int identity_is_pod(__u32 identity)
{
	return identity >= IDENTITY_MIN_CLUSTER && identity < IDENTITY_CIDR_BASE;
}

static __always_inline struct policy_value *
policy_probe(struct policy_key *key, __u32 identity)
{
	key->identity = identity;
	return bpf_map_lookup_elem(&cilia_policy, key);
}

/* The NetworkPolicy tier: POLICY_ALLOW, POLICY_DENY, or 0 when no entry matches (the
 * caller's default). The peer is looked up as itself, through its CIDR view
 * (IDENTITY_CIDR_VIEW) and as "any peer"; a deny from any of them wins over every allow,
 * so specificity never lets an allow undo a deny. */
static __always_inline int np_verdict(struct policy_key *key, __u32 identity,
				      __u32 cidr_identity, __u32 *cookie)
{
	struct policy_value *v;
	int verdict = 0;

	key->tier = POLICY_TIER_NETWORK_POLICY;
	v = policy_probe(key, identity);
	if (v) {
		*cookie = v->cookie;
		if (v->action == POLICY_DENY)
			return POLICY_DENY;
		verdict = POLICY_ALLOW;
	}
	v = policy_probe(key, cidr_identity | IDENTITY_CIDR_VIEW);
	if (v) {
		if (v->action == POLICY_DENY) {
			*cookie = v->cookie;
			return POLICY_DENY;
		}
		if (!verdict)
			*cookie = v->cookie;
		verdict = POLICY_ALLOW;
	}
	v = policy_probe(key, IDENTITY_ANY);
	if (v) {
		if (v->action == POLICY_DENY) {
			*cookie = v->cookie;
			return POLICY_DENY;
		}
		if (!verdict)
			*cookie = v->cookie;
		verdict = POLICY_ALLOW;
	}
	return verdict;
}

/* The best-ranked rule of an Admin or Baseline tier through one key, kept in `best_*`
 * if it ranks better than what was found so far. */
static __always_inline void tier_probe(struct policy_key *key, __u32 identity,
				       __u32 *best_rank, __u8 *best_action, __u32 *best_cookie)
{
	struct policy_value *v = policy_probe(key, identity);

	if (v && v->rank < *best_rank) {
		*best_rank = v->rank;
		*best_action = v->action;
		*best_cookie = v->cookie;
	}
}

/* An Admin or Baseline tier's decision: the action of its best-ranked matching rule
 * (POLICY_ALLOW, POLICY_DENY, POLICY_PASS), or 0 when none matches. Three lookups
 * whatever the number of ClusterNetworkPolicies: the agent has written each key's best
 * rank into it (include/cilia/policy.h, struct policy_value). */
static __always_inline int tier_verdict(struct policy_key *key, __u8 tier, __u32 identity,
					__u32 cidr_identity, __u32 *cookie)
{
	__u32 rank = 0x10000;	/* worse than every rank */
	__u8 action = 0;

	key->tier = tier;
	tier_probe(key, identity, &rank, &action, cookie);
	tier_probe(key, cidr_identity | IDENTITY_CIDR_VIEW, &rank, &action, cookie);
	tier_probe(key, IDENTITY_ANY, &rank, &action, cookie);
	return action;
}

/* The verdict of an endpoint's policies in one direction for one peer and port, tier by
 * tier as sig-network's admin policy API orders them: the Admin tier's Accept or Deny is
 * final, its Pass (or no match) hands over to the NetworkPolicy tier; a direction that
 * NetworkPolicy (or cilia's own policies) isolates is decided there, an allow or else a
 * deny; otherwise the Baseline tier's Accept or Deny, else Kubernetes' default: allowed.
 * POLICY_ALLOW, POLICY_DENY, or 0: isolated and nothing allowed it. `dport` is the policy
 * port: the destination port, or the ICMP type. `cookie`: the deciding rule, 0 none. */
static __always_inline int policy_verdict(__u16 ep_id, __u16 ep_flags, __u8 dir,
					  __u32 identity, __u32 cidr_identity, __u8 proto,
					  __be16 dport, __u32 *cookie)
{
	__u16 tiered = dir == POLICY_INGRESS ? ENDPOINT_F_TIERED_INGRESS :
					       ENDPOINT_F_TIERED_EGRESS;
	__u16 enforced = dir == POLICY_INGRESS ? ENDPOINT_F_INGRESS_ENFORCED :
						 ENDPOINT_F_EGRESS_ENFORCED;
	struct policy_key key = {
		.prefixlen = POLICY_PREFIX_FULL,
		.ep_id = ep_id,
		.dir = dir,
		.proto = proto,
		.dport = dport,
	};
	int verdict;

	if (ep_flags & tiered) {
		verdict = tier_verdict(&key, POLICY_TIER_ADMIN, identity, cidr_identity, cookie);
		if (verdict == POLICY_ALLOW || verdict == POLICY_DENY)
			return verdict;
	}
	*cookie = 0;
	if (ep_flags & enforced)
		return np_verdict(&key, identity, cidr_identity, cookie);
	if (ep_flags & tiered) {
		verdict = tier_verdict(&key, POLICY_TIER_BASELINE, identity, cidr_identity,
				       cookie);
		if (verdict == POLICY_DENY)
			return POLICY_DENY;
		if (verdict != POLICY_ALLOW)
			*cookie = 0;
	}
	return POLICY_ALLOW;
}

#endif
