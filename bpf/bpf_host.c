/* SPDX-License-Identifier: Apache-2.0 */
/* "From netdev": tc ingress on the node's uplinks (and the VXLAN device). Traffic for a
 * pod on this node passes the pod's ingress policy (source identity from the ipcache)
 * and is delivered straight into the pod's netns with bpf_redirect_peer; everything
 * else (for the node itself, to be routed, encapsulated) goes to the stack untouched,
 * and so do replies of connections that netfilter here translated (kube-proxy's
 * Services with a backend on another node), so that netfilter can translate them back,
 * and every packet of a connection whose other direction passes the node's stack
 * (CT_F_VIA_STACK: a pod's connection to the node's address, say), so that netfilter
 * sees it whole. Answers to what arrives here past the stack leave past it too
 * (cil_from_pod, lib/fib.h). Replies from backends on other nodes to flows that a pod
 * of this node opened to a Service frontend get the frontend back as their source here
 * (lib/lb.h).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/eth.h"
#include "lib/ipv4.h"
#include "lib/l4.h"
#include "lib/conntrack.h"
#include "lib/policy.h"
#include "lib/events.h"
#include "lib/enforce.h"
#include "lib/local_delivery.h"
#include "lib/lb.h"
#include "lib/antispoof.h"

SEC("tc")
int cil_from_netdev(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct endpoint_info *dst;
	struct flow_ctx f = {};
	struct ct_state st = {};
	struct iphdr *ip4;
	__u32 src_cidr;
	__u8 reason, ct_flags;
	int ct;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip4 = (void *)(eth + 1);
	if ((void *)(ip4 + 1) > data_end)
		return TC_ACT_OK;
	dst = lookup_endpoint(ip4->daddr);
	if (!dst) {
		if (overlay_spoofed(skb, ip4, data_end))
			return drop(skb, DROP_OVERLAY_SOURCE, METRIC_DIR_INGRESS);
		return TC_ACT_OK;	/* not for a local pod: the stack's business */
	}
	if (ip4->version != 4 || ip4->ihl < 5 || parse_l4(skb, &f.l4) < 0)
		return drop(skb, DROP_INVALID, METRIC_DIR_INGRESS);

	ct = ct_or_related(ct_owned(ct_lookup(&f.l4.tuple, f.l4.tcp_flags, &st), &st, 0,
				    dst->ep_id), &f.l4);
	ct_flags = st.flags;
	/* A connection through the stack is judged again by cil_to_pod. */
	if (!(ct_flags & CT_F_VIA_STACK)) {
		f.dst_ep = dst->ep_id;
		reason = ct_recheck(&f, ct, &st, NULL, dst);
		if (reason)
			return drop_flow(skb, &f, reason, METRIC_DIR_INGRESS);
	}
	/* A connection that passes the node's stack here (the pod sent its first packet
	 * there): this direction goes through it too, or netfilter sees half of it (and
	 * kube-proxy drops the rest as INVALID). cil_to_pod knows it from conntrack. */
	if (ct != CT_NEW && (ct_flags & CT_F_VIA_STACK))
		return pass_to_stack_symmetric(skb, METRIC_DIR_INGRESS);
	/* Nothing of cilia's, but perhaps netfilter's: the reply of a connection a pod of
	 * this node opened to a Service, which netfilter here translated (kube-proxy's DNAT)
	 * and sent to a backend on another node. It must pass netfilter to be translated
	 * back: to the stack, before policy (a reply is no new connection; cil_to_pod judges
	 * it on the pod's veth, against the pod's own connection). A bare SYN is no reply. */
	if (ct == CT_NEW && !ct_bare_syn(&f.l4.tuple, f.l4.tcp_flags) &&
	    nf_nat_tracked(skb, &f.l4.tuple))
		return pass_to_stack_nat(skb, METRIC_DIR_INGRESS);
	if (ct == CT_NEW) {
		f.dst_ep = dst->ep_id;
		f.dst_identity = dst->sec_identity;
		peer_identity(f.l4.tuple.saddr, &f.src_identity, &src_cidr);
		if (identity_is_pod(f.src_identity) &&
		    !reverse_path_ok(skb, f.l4.tuple.saddr, f.l4.tuple.daddr))
			return drop_flow(skb, &f, DROP_REVERSE_PATH, METRIC_DIR_INGRESS);
		reason = enforce(dst, POLICY_INGRESS, ENDPOINT_F_INGRESS_ENFORCED,
				 f.src_identity, src_cidr, &f);
		if (reason)
			return drop_flow(skb, &f, reason, METRIC_DIR_INGRESS);
		ct_create(&f.l4.tuple, 0, f.dst_ep, f.cookie, f.l4.tcp_flags, CT_F_BYPASS_STACK,
			  0);
		emit_flow(skb, &f, VERDICT_FORWARDED, 0, METRIC_DIR_INGRESS);
	}
	/* A reply from a backend on another node to a flow a pod of this node opened to a
	 * Service frontend (translated in its cil_from_pod, past the stack both ways): from
	 * the frontend again before it reaches the client. */
	if (ct == CT_REPLY && st.rev_nat_id &&
	    lb4_rev_nat(skb, &f.l4, st.rev_nat_id, METRIC_DIR_INGRESS) < 0)
		return drop(skb, DROP_INVALID, METRIC_DIR_INGRESS);

	return deliver_local(skb, dst, METRIC_DIR_INGRESS);
}

char LICENSE[] SEC("license") = "GPL";
