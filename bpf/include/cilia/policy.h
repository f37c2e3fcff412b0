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

enum policy_dir {
	POLICY_INGRESS = 1,
	POLICY_EGRESS = 2,
};

/* LPM trie key of the policy map. The fields are ordered from always-exact to
 * wildcardable so that a wildcard is simply a shorter prefix:
 *   ep_id, dir, pad0, identity   64 bits, always matched exactly
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
	__u8  pad0;
	__u32 identity;		/* peer security identity, or IDENTITY_ANY */
	__u8  proto;		/* IPPROTO_* */
	__u8  pad1;
	__be16 dport;
};

#define POLICY_PREFIX_STATIC 64
#define POLICY_PREFIX_PROTO  72
#define POLICY_PREFIX_FULL   96

enum policy_action {
	POLICY_ALLOW = 1,
	POLICY_DENY = 2,
};

/* What a matching entry says, and which rule said it: the cookie is the agent's
 * handle for (policy, direction, rule), shown in flow events and by policy trace. */
struct policy_value {
	__u8  action;		/* enum policy_action */
	__u8  pad[3];
	__u32 cookie;
};

#endif
