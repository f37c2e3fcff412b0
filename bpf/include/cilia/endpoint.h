/* SPDX-License-Identifier: Apache-2.0 */
/* Layouts shared by the datapath and the agent: the one source of truth.
 * cilia/datapath/layouts.py mirrors them, and tests/unit/test_layouts.py checks that
 * mirror against the BTF of the compiled objects.
 */
#ifndef CILIA_ENDPOINT_H
#define CILIA_ENDPOINT_H

#include <linux/types.h>

#define ENDPOINTS_MAP_SIZE 65536

/* endpoint_info.flags: a direction is enforced once any policy selects the endpoint in
 * it; until then the endpoint is open in that direction (Kubernetes semantics). */
#define ENDPOINT_F_INGRESS_ENFORCED	1
#define ENDPOINT_F_EGRESS_ENFORCED	2
/* Policy audit mode (the agent's --policy-audit-mode, or the annotation
 * cilia.io/policy-audit-mode: "true" on the pod or its namespace): what this endpoint's
 * policy refuses passes instead, reported as VERDICT_AUDIT and counted as
 * REASON_POLICY_AUDIT (lib/enforce.h audit()). Only the policy of the endpoint that
 * decides is audited: the source's for egress, the destination's for ingress. Its
 * change bumps cilia_policy_rev like any enforcement change, so connections it let
 * through are judged again, enforced, at their next packet once it is off. */
#define ENDPOINT_F_AUDIT		4
/* The endpoint is the subject of a ClusterNetworkPolicy rule in that direction: its
 * Admin and Baseline tier entries are looked up (lib/policy.h policy_verdict()). Without
 * the flag those lookups are skipped, so a node with no ClusterNetworkPolicy pays nothing
 * for the tiers; with it, the verdict stays a fixed number of lookups. */
#define ENDPOINT_F_TIERED_INGRESS	8
#define ENDPOINT_F_TIERED_EGRESS	16

/* Keyed by the IPv4 address exactly as it sits in the IP header (network byte order),
 * so the hot path looks up iph->daddr with no conversion. A struct rather than a bare
 * __be32 leaves room for IPv6 and a cluster id without changing every caller.
 */
struct endpoint_key {
	__be32 ip4;
};

/* Everything the from-pod program needs to deliver to a local pod, in one lookup.
 * 24 bytes, every field naturally aligned and no implicit padding, so the Python
 * mirror packs it with a plain struct format and BTF agrees byte for byte.
 */
struct endpoint_info {
	__u32 ifindex;		/* host-side veth in the node's netns: the redirect_peer target */
	__u32 sec_identity;	/* security identity of the pod's labels (0: not yet known) */
	__u16 ep_id;		/* endpoint id, unique on this node */
	__u16 flags;		/* ENDPOINT_F_* */
	__u8  mac[6];		/* the pod's eth0: destination MAC on delivery */
	__u8  node_mac[6];	/* the host-side veth: source MAC on delivery */
};

#endif
