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

/* The verdict of an endpoint's policy in one direction for one peer and port:
 * POLICY_ALLOW, POLICY_DENY, or 0 when no entry matches (the caller's default).
 * The peer is looked up as itself, through its CIDR view (IDENTITY_CIDR_VIEW) and as
 * "any peer"; a deny from any of them wins over every allow, so specificity never lets
 * an allow undo a deny. `dport` is the policy port: the destination port, or the
 * ICMP type.
 */
static __always_inline int policy_verdict(__u16 ep_id, __u8 dir, __u32 identity,
					  __u32 cidr_identity, __u8 proto, __be16 dport,
					  __u32 *cookie)
{
	struct policy_key key = {
		.prefixlen = POLICY_PREFIX_FULL,
		.ep_id = ep_id,
		.dir = dir,
		.proto = proto,
		.dport = dport,
	};
	struct policy_value *v;
	int verdict = 0;

	v = policy_probe(&key, identity);
	if (v) {
		*cookie = v->cookie;
		if (v->action == POLICY_DENY)
			return POLICY_DENY;
		verdict = POLICY_ALLOW;
	}
	{
		v = policy_probe(&key, cidr_identity | IDENTITY_CIDR_VIEW);
		if (v) {
			if (v->action == POLICY_DENY) {
				*cookie = v->cookie;
				return POLICY_DENY;
			}
			if (!verdict)
				*cookie = v->cookie;
			verdict = POLICY_ALLOW;
		}
	}
	v = policy_probe(&key, IDENTITY_ANY);
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

#endif
