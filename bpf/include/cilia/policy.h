/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_POLICY_H
#define CILIA_POLICY_H

#include <linux/types.h>

#define POLICY_MAP_SIZE 262144

/* Peer identity that matches every peer: the datapath looks up the peer's own identity
 * and this one, so a rule for "any peer" needs one entry, not one per identity. */
#define IDENTITY_ANY 0

/* Entries for ipBlock-style CIDR rules are keyed by the CIDR identity with this bit set,
 * and the datapath looks a peer's CIDR view (ipcache cidr_identity) up with it set.
 * A CIDR rule thus matches every address in the CIDR, pods included, while a rule on
 * identities (the world entity is every CIDR identity) matches only peers that ARE
 * that identity, never a pod that merely lies inside a CIDR. */
#define IDENTITY_CIDR_VIEW 0x80000000

/* The tiers of sig-network's admin policy API, evaluated in this order: Admin
 * (ClusterNetworkPolicy), then NetworkPolicy (NetworkPolicy and cilia's own policies),
 * then Baseline (ClusterNetworkPolicy). The NetworkPolicy tier is 0 so that entries
 * written before tiers existed (the field was padding) keep their meaning. */
enum policy_tier {
	POLICY_TIER_NETWORK_POLICY = 0,
	POLICY_TIER_ADMIN = 1,
	POLICY_TIER_BASELINE = 2,
};

enum policy_dir {
	POLICY_INGRESS = 1,
	POLICY_EGRESS = 2,
};

/* LPM trie key of the policy map. The fields are ordered from always-exact to
 * wildcardable so that a wildcard is simply a shorter prefix:
 *   ep_id, dir, tier, identity   64 bits, always matched exactly
 *   proto                         8 bits, left out of the prefix for "any protocol"
 *   pad1                          8 bits, always 0 (keeps dport 16-bit aligned)
 *   dport                        16 bits, network order: a port range is a union of
 *                                prefixes, exactly as an address range is of CIDRs
 * so prefixlen is 64 (any protocol, any port), 72 (one protocol, any port) or
 * 80 + n (one protocol, ports sharing their top n bits). One map serves every endpoint
 * on the node; ep_id first keeps each endpoint's entries in their own subtree.
 */
struct policy_key {
	__u32 prefixlen;
	__u16 ep_id;
	__u8  dir;		/* enum policy_dir */
	__u8  tier;		/* enum policy_tier */
	__u32 identity;		/* peer security identity, or IDENTITY_ANY */
	__u8  proto;		/* IPPROTO_* */
	__u8  pad1;
	__be16 dport;
};

#define POLICY_PREFIX_STATIC 64
#define POLICY_PREFIX_PROTO  72
#define POLICY_PREFIX_FULL   96

enum policy_action {
	POLICY_ALLOW = 1,	/* a ClusterNetworkPolicy's Accept */
	POLICY_DENY = 2,
	POLICY_PASS = 3,	/* Admin and Baseline tiers: no decision here, the next tier's */
};

/* Priorities of ClusterNetworkPolicy without a walk of the rules.
 *
 * In the Admin and Baseline tiers the first matching rule decides, by (priority, policy,
 * rule order). The agent numbers the rules of a tier and direction in that order: the
 * rank, lower first. A packet could match rules through three keys (its peer's identity,
 * its CIDR view, any peer) and, within one key, through nested port prefixes; the LPM
 * trie finds only the most specific prefix, not the best rank. So the agent writes into
 * every key the best rank among all the rules whose match contains that key's prefix
 * (its ancestors and itself: a more specific key inherits a better-ranked wildcard's
 * decision). Then the longest-prefix match of each of the three keys IS the best rule
 * through that key, and the tier's verdict is the better rank of the three lookups: a
 * fixed three lookups per tier, whatever the number of policies. The NetworkPolicy tier
 * keeps its own rule (a deny wins over every allow; rank 0 there).
 *
 * 8 bytes as before the tiers (the rank took the padding), so a map pinned by an older
 * agent is reused as it is. */
struct policy_value {
	__u8  action;		/* enum policy_action */
	__u8  pad;
	__u16 rank;		/* Admin and Baseline tiers: the rule's order, lower wins */
	__u32 cookie;
};

#endif
