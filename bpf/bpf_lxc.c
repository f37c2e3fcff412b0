/* SPDX-License-Identifier: Apache-2.0 */
/* The pod's side of the node: two tc programs on the host side of every pod's veth.
 *
 * cil_from_pod (tc ingress: every packet the pod sends). Services first: a packet to a
 * Service frontend (a ClusterIP) gets a backend as its destination (lib/lb.h), so that
 * all that follows judges and delivers it as the pod-to-pod flow it now is. Then
 * conntrack: packets of known connections skip policy. A new connection must pass the source pod's egress
 * policy and, for a pod on this node, the destination pod's ingress policy too,
 * because bpf_redirect_peer delivers straight into the destination's netns and skips
 * its hooks. Then a packet for a local pod is delivered with bpf_redirect_peer. A
 * packet for a pod on another node, and an answer to a connection that came in from
 * another node or the outside past the stack (cil_from_netdev), leaves past the stack
 * too: FIB lookup, then out of the uplink or the VXLAN device (lib/fib.h). Everything
 * that needs the node's stack goes to it, and the whole of its connection with it
 * (CT_F_VIA_STACK): the node itself, Services that kube-proxy translates, the outside
 * (masqueraded). So netfilter sees each connection whole, or not at all.
 *
 * cil_to_pod (tc egress: every packet the node's stack sends into the pod, i.e. from
 * the node itself, other nodes and the outside). New connections pass the pod's
 * ingress policy; the node itself may always reach its pods (Kubernetes semantics).
 *
 * Pods have a /32 address and a default route via 169.254.1.1, a link-local next hop
 * with a permanent neighbour entry naming the host-side veth's MAC, so pods never ARP
 * and every frame they send arrives here already addressed to the host side.
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
#include "lib/drop.h"
#include "lib/new_flow.h"
#include "lib/local_delivery.h"
#include "lib/fib.h"
#include "lib/lb.h"
#include "lib/antispoof.h"

static __always_inline int from_pod(struct __sk_buff *skb, struct flow_ctx *f)
{
	struct endpoint_info *src, *dst;
	struct bpf_fib_lookup fib;
	struct ct_state st = {};
	struct ct_key svc_tuple = {};
	struct ct_value *svc_ct = NULL;
	struct lb4_service *svc;
	struct lb4_backend *be = NULL;
	struct iphdr *ip4;
	__u32 src_cidr, dst_cidr, backend_id = 0;
	__u16 rev_nat_id = 0;
	__u8 reason, ct_flags;
	int ct, ret, out = FIB_OUT_UNASKED, write_svc = 0;

	ret = ipv4_parse_skb(skb, &ip4);
	if (ret == IPV4_NOT_IPV4)
		return drop(skb, f, DROP_NOT_IPV4, METRIC_DIR_EGRESS);
	if (ret != IPV4_OK)
		return drop(skb, f, DROP_INVALID, METRIC_DIR_EGRESS);

	/* A pod may only send from its own address: the source must be the endpoint
	 * whose veth this packet came in on, or it could speak for another pod's
	 * identity. */
	src = lookup_endpoint(ip4->saddr);
	if (!src || src->ifindex != skb->ingress_ifindex)
		return drop(skb, f, DROP_SPOOFED_SOURCE, METRIC_DIR_EGRESS);
	if (parse_l4(skb, &f->l4) < 0)
		return drop(skb, f, DROP_INVALID, METRIC_DIR_EGRESS);

	/* To a Service frontend: the connection's backend (its service entry), or a new
	 * one for a new connection; then the destination is the backend's, before
	 * conntrack and policy. A connection that began untranslated (through kube-proxy,
	 * before cilia knew the service) keeps its way to the end. */
	svc = lb4_lookup_service(&f->l4, LB_SCOPE_INTERNAL);
	if (svc) {
		svc_tuple = f->l4.tuple;
		be = lb4_connection_backend(&svc_tuple, f->l4.tcp_flags, &svc_ct, &backend_id);
		if (be) {
			write_svc = ct_bare_syn(&svc_tuple, f->l4.tcp_flags);
		} else if (!ct_bare_syn(&svc_tuple, f->l4.tcp_flags) &&
			   ct_lookup(&svc_tuple, f->l4.tcp_flags, NULL, 0, 0) != CT_NEW) {
			svc = NULL;
		} else {
			int pick = lb4_select_backend(svc, &svc_tuple, &be, &backend_id);

			if (pick == LB4_NO_BACKEND) {
				f->src_ep = src->ep_id;
				f->src_identity = src->sec_identity;
				f->rev_nat_id = svc->rev_nat_id;
				f->l4.first_frag = 0;	/* answered, not passed */
				return lb4_reject(skb, f, src->ifindex, METRIC_DIR_EGRESS);
			}
			if (pick == LB4_SLOT_MISS)
				return drop(skb, f, DROP_NO_SERVICE_BACKEND, METRIC_DIR_EGRESS);
			if (pick == LB4_HAIRPIN_ONLY)
				svc = NULL;	/* to the stack, untranslated */
			write_svc = 1;
		}
		if (svc && be) {
			rev_nat_id = svc->rev_nat_id;
			f->rev_nat_id = rev_nat_id;
			if (lb4_dnat(skb, &f->l4, be, METRIC_DIR_EGRESS) < 0)
				return drop(skb, f, DROP_INVALID, METRIC_DIR_EGRESS);
		} else {
			write_svc = 0;
		}
	}
	dst = lookup_endpoint(f->l4.tuple.daddr);

	ct = ct_lookup(&f->l4.tuple, f->l4.tcp_flags, &st, src->ep_id, dst ? dst->ep_id : 0);
	ct = ct_or_related(ct, &f->l4, &st);
	ct_flags = st.flags;
	f->src_ep = src->ep_id;
	reason = ct_recheck(skb, f, ct, &st, src, dst);
	if (reason)
		return drop(skb, f, reason, METRIC_DIR_EGRESS);
	if (ct == CT_NEW) {
		f->src_ep = src->ep_id;
		f->src_identity = src->sec_identity;
		peer_identity(f->l4.tuple.daddr, &f->dst_identity, &dst_cidr);
		if (f->l4.tuple.proto == IPPROTO_UDP &&
		    f->l4.tuple.dport == bpf_htons(OVERLAY_PORT) &&
		    (f->dst_identity == IDENTITY_HOST || f->dst_identity == IDENTITY_REMOTE_NODE))
			return drop(skb, f, DROP_TO_OVERLAY_PORT, METRIC_DIR_EGRESS);
		reason = enforce(src, POLICY_EGRESS, ENDPOINT_F_EGRESS_ENFORCED,
				 f->dst_identity, dst_cidr, f);
		if (reason)
			return drop(skb, f, reason, METRIC_DIR_EGRESS);
		src_cidr = 0;
		if (dst) {
			__u32 ignored;

			f->dst_ep = dst->ep_id;
			f->dst_identity = dst->sec_identity;
			peer_identity(f->l4.tuple.saddr, &ignored, &src_cidr);
		} else {
			/* Not for a local pod: past the stack only to a pod on another node,
			 * out of a device whose answers come back by cil_from_netdev.
			 * Everything else needs the stack (the node, a Service, the outside),
			 * and so does the rest of its connection, both ways. A translated flow
			 * is a pod-to-pod flow here: what netfilter sees of it (if anything) it
			 * need not translate. */
			if (identity_is_pod(f->dst_identity))
				out = fib_route(skb, &f->l4.tuple, &fib, 1);
			ct_flags = out >= 0 ? CT_F_BYPASS_STACK : CT_F_VIA_STACK;
		}
		/* A local destination's ingress policy too: bpf_redirect_peer skips its
		 * hooks. */
		ret = new_flow(skb, f, dst, src->sec_identity, src_cidr, src->ep_id, ct_flags,
			       rev_nat_id, METRIC_DIR_EGRESS);
		if (ret != NEW_FLOW_PASS)
			return ret;
	} else if (!dst && (ct_flags & CT_F_BYPASS_STACK)) {
		/* A connection past the stack: the pod's own to another node (out of a
		 * cilia device, as it began), or the answer to one that came in past the
		 * stack from another node or the outside (out of whatever device); an
		 * ICMP error about one goes as a packet of its sender's side would. */
		out = fib_route(skb, &f->l4.tuple, &fib, ct == CT_ESTABLISHED ||
				(ct == CT_RELATED && st.related_opener));
	}
	if (write_svc)
		lb4_ct_service_create(&svc_tuple, backend_id, rev_nat_id, f->l4.tcp_flags, 0);
	else if (svc_ct && be)
		lb4_ct_service_follow(svc_ct, svc_tuple.proto, ct_flags);
	/* A backend's reply to a translated flow whose client is on this node (the client's
	 * cil_from_pod made the entry): from the frontend again. */
	if (ct == CT_REPLY && st.rev_nat_id &&
	    lb4_rev_nat(skb, &f->l4, st.rev_nat_id, METRIC_DIR_EGRESS) < 0)
		return drop(skb, f, DROP_INVALID, METRIC_DIR_EGRESS);

	if (!dst) {
		if (out >= 0)
			return fib_redirect(skb, f, &fib, out, METRIC_DIR_EGRESS);
		if (ct == CT_REPLY)
			skb->mark |= MARK_CT_REPLY;
		if (out == FIB_OUT_STACK)
			return pass_to_stack_fib(skb, METRIC_DIR_EGRESS);
		return pass_to_stack(skb, METRIC_DIR_EGRESS);
	}
	/* The reply of a connection that reached this pod through the node's stack, from a
	 * pod of this node: if netfilter translated it (a kube-proxy Service), it goes back
	 * through the stack, which undoes the translation. Only such replies cost the
	 * netfilter lookup; direct pod-to-pod connections never do. */
	if (ct == CT_REPLY && (ct_flags & CT_F_VIA_STACK) && nf_nat_tracked(skb, &f->l4.tuple)) {
		skb->mark |= MARK_CT_REPLY;
		return pass_to_stack_nat(skb, METRIC_DIR_EGRESS);
	}
	return deliver_local(skb, f, dst, METRIC_DIR_EGRESS);
}

/* The verdict first; only then, if it let a first fragment pass, its datagram's ports
 * are remembered for the fragments after it (lib/l4.h frag_remember). */
SEC("tc")
int cil_from_pod(struct __sk_buff *skb)
{
	struct flow_ctx f = {};

	return frag_remember(&f.l4, from_pod(skb, &f));
}

static __always_inline int to_pod(struct __sk_buff *skb, struct flow_ctx *f)
{
	struct endpoint_info *dst;
	struct ct_state st = {};
	struct iphdr *ip4;
	__u32 src_cidr;
	__u8 reason;
	int ct, ret;

	ret = ipv4_parse_skb(skb, &ip4);
	if (ret == IPV4_NOT_IPV4)
		return drop(skb, f, DROP_NOT_IPV4, METRIC_DIR_INGRESS);
	if (ret != IPV4_OK || parse_l4(skb, &f->l4) < 0)
		return drop(skb, f, DROP_INVALID, METRIC_DIR_INGRESS);

	/* This program sits on pod veths only, so whatever leaves here enters a pod: with
	 * no entry naming this interface (an ADD not finished, a DEL under way, a restore
	 * that lost its state) nobody can say which policy applies, and it must not pass.
	 */
	dst = lookup_endpoint(f->l4.tuple.daddr);
	if (!dst || dst->ifindex != skb->ifindex)
		return drop(skb, f, DROP_UNKNOWN_ENDPOINT, METRIC_DIR_INGRESS);

	ct = ct_lookup(&f->l4.tuple, f->l4.tcp_flags, &st, 0, dst->ep_id);
	ct = ct_or_related(ct, &f->l4, &st);
	f->dst_ep = dst->ep_id;
	reason = ct_recheck(skb, f, ct, &st, NULL, dst);
	if (reason)
		return drop(skb, f, reason, METRIC_DIR_INGRESS);
	if (ct == CT_NEW) {
		int from_node;

		f->dst_ep = dst->ep_id;
		f->dst_identity = dst->sec_identity;
		peer_identity(f->l4.tuple.saddr, &f->src_identity, &src_cidr);
		/* The node may always reach its pods, but only what the node itself sends
		 * (a local socket's packet: the kubelet's probes, node daemons). Forwarded
		 * traffic that netfilter SNATed to a node address (kube-proxy's NodePort,
		 * externalTrafficPolicy: Cluster) comes from somewhere unknown: world. */
		if (f->src_identity == IDENTITY_HOST && !skb->sk)
			f->src_identity = IDENTITY_WORLD;
		from_node = f->src_identity == IDENTITY_HOST;
		ret = new_flow(skb, f, from_node ? NULL : dst, f->src_identity, src_cidr,
			       dst->ep_id, CT_F_VIA_STACK | (from_node ? CT_F_FROM_NODE : 0), 0,
			       METRIC_DIR_INGRESS);
		if (ret != NEW_FLOW_PASS)
			return ret;
	} else if (ct == CT_REPLY && st.rev_nat_id) {
		/* A backend's reply to this pod's translated flow, through the stack (the
		 * backend is the node itself, or beyond a device without cil_from_netdev):
		 * from the frontend again. */
		if (lb4_rev_nat(skb, &f->l4, st.rev_nat_id, METRIC_DIR_INGRESS) < 0)
			return drop(skb, f, DROP_INVALID, METRIC_DIR_INGRESS);
	}
	update_metrics(REASON_TO_POD, METRIC_DIR_INGRESS, skb->len);
	return TC_ACT_OK;
}

/* The verdict first; only then, if it let a first fragment pass, its datagram's ports
 * are remembered for the fragments after it (lib/l4.h frag_remember). */
SEC("tc")
int cil_to_pod(struct __sk_buff *skb)
{
	struct flow_ctx f = {};

	return frag_remember(&f.l4, to_pod(skb, &f));
}

char LICENSE[] SEC("license") = "GPL";
