/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_NEW_FLOW_H
#define CILIA_LIB_NEW_FLOW_H

/* A new connection's last steps, the same in every program that admits one (cil_from_pod,
 * cil_to_pod, cil_from_netdev): the ingress policy of the pod of this node it goes to,
 * then its conntrack entry, charged to the endpoint it counts against
 * (--ct-endpoint-max), then its flow event (FORWARDED, or AUDIT). What comes before
 * differs from program to program and stays with each: the source pod's egress policy
 * (cil_from_pod), reverse-path and overlay checks, where the connection goes (ct_flags).
 */

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"
#include "metrics.h"
#include "events.h"
#include "conntrack.h"
#include "enforce.h"
#include "drop.h"

#define NEW_FLOW_PASS 0	/* new_flow(): the connection is in conntrack; go on */

/* `judge`: the pod whose ingress policy the connection must pass, with `peer`,
 * `peer_cidr` the identities of its other end (NULL: none to pass, as the node itself
 * reaching its pods, or a connection to no local pod; `f` already names the pod it goes
 * to, if any). `owner`: the endpoint whose conntrack budget it takes; `ct_flags`,
 * `rev_nat_id`: its entry's; `dir`: the direction it is counted and reported in.
 * NEW_FLOW_PASS, or the program's verdict on a packet dropped (counted, reported):
 * a refusal of the ingress policy is the ingress direction's, whatever `dir`. */
static __always_inline int new_flow(struct __sk_buff *skb, struct flow_ctx *f,
				    const struct endpoint_info *judge, __u32 peer,
				    __u32 peer_cidr, __u16 owner, __u8 ct_flags,
				    __u16 rev_nat_id, __u8 dir)
{
	__u8 reason;

	if (judge) {
		reason = enforce(judge, POLICY_INGRESS, ENDPOINT_F_INGRESS_ENFORCED, peer,
				 peer_cidr, f);
		if (reason)
			return drop(skb, f, reason, METRIC_DIR_INGRESS);
	}
	if (!ct_charge(owner))
		return drop(skb, f, DROP_CT_ENDPOINT_LIMIT, dir);
	ct_create(&f->l4.tuple, f->src_ep, f->dst_ep, f->cookie, f->l4.tcp_flags, ct_flags,
		  rev_nat_id);
	emit_passed(skb, f, dir);
	return NEW_FLOW_PASS;
}

#endif
