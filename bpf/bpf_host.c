/* SPDX-License-Identifier: Apache-2.0 */
/* "From netdev": tc ingress on the node's uplinks (and, as cil_from_vxlan, on the VXLAN
 * device, once the inner source is found to be the sending node's). Traffic for a
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
 *
 * From outside to a Service frontend with an external scope (a NodePort on this node's
 * address, an ExternalIP, with externalTrafficPolicy: Local): a backend of this node,
 * translated here, judged by its ingress policy against the client's own address (kept,
 * as that policy promises) and delivered like any traffic for a local pod; its answers
 * get the frontend back in cil_from_pod and leave past the stack. With
 * externalTrafficPolicy: Cluster, a backend on another node is reached SNATed to this
 * node (nodeport_snat_forward), and its answers are turned back here
 * (nodeport_snat_answer). External traffic to Services that cilia does not replace
 * (kube-proxy's, without --kube-proxy-replacement) is the stack's, untouched.
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
#include "lib/lb.h"
#include "lib/fib.h"
#include "lib/antispoof.h"

/* A backend's answer to an outside client's NodePort connection that this node SNATed
 * (nodeport_snat_forward): to the client again, from the frontend it connected to, out
 * past the stack. Its service entry hears of it, so that the connection keeps its
 * backend and its SNAT port as long as the backend answers. */
static __always_inline int nodeport_snat_answer(struct __sk_buff *skb, struct flow_ctx *f,
						const struct snat4_entry *nat)
{
	struct l4_info *l4 = &f->l4;
	struct ct_key svc_tuple = {
		.saddr = nat->client,
		.daddr = nat->frontend,
		.sport = nat->client_port,
		.dport = nat->frontend_port,
		.proto = l4->tuple.proto,
	};
	struct bpf_fib_lookup fib;
	struct ct_value *svc_ct;
	int out;

	svc_ct = lb4_ct_service_lookup(&svc_tuple, l4->tcp_flags);
	if (svc_ct)
		lb4_ct_service_follow(svc_ct, svc_tuple.proto, CT_F_REPLY_SEEN);
	if (lb4_rewrite(skb, l4, 1, svc_tuple.saddr, svc_tuple.sport) < 0 ||
	    lb4_rewrite(skb, l4, 0, svc_tuple.daddr, svc_tuple.dport) < 0)
		return drop(skb, f, DROP_INVALID, METRIC_DIR_INGRESS);
	update_metrics(REASON_LB_REV_NAT, METRIC_DIR_INGRESS, skb->len);
	out = fib_route(skb, &l4->tuple, &fib, 0);
	if (out < 0)
		return drop(skb, f, DROP_NO_ROUTE, METRIC_DIR_INGRESS);
	return fib_redirect(skb, f, &fib, out, METRIC_DIR_INGRESS);
}

/* An outside client's NodePort or ExternalIP connection (externalTrafficPolicy:
 * Cluster) whose backend is on another node: to the backend, from this node's address
 * (`source`: lb4_snat_source) and a SNAT port, so that the answers come back here; out past the stack, by a device whose
 * answers come back through cil_from_netdev. The backend's node judges it as coming
 * from this node (remote-node), as it would behind kube-proxy's masquerade. */
static __always_inline int nodeport_snat_forward(struct __sk_buff *skb, struct flow_ctx *f,
						 const struct ct_key *svc_tuple,
						 const struct lb4_backend *be, __u32 backend_id,
						 __u16 rev_nat_id, int write_svc, __be16 old_port,
						 __be32 source)
{
	struct l4_info *l4 = &f->l4;
	struct bpf_fib_lookup fib;
	__be16 port;
	int out;

	port = source ? lb4_snat_port(svc_tuple, be, source, old_port) : 0;
	if (!port)
		return drop(skb, f, DROP_NO_SNAT_PORT, METRIC_DIR_INGRESS);
	if (write_svc || port != old_port)
		lb4_ct_service_create(svc_tuple, backend_id, rev_nat_id, l4->tcp_flags, port);
	if (lb4_dnat(skb, l4, be, METRIC_DIR_INGRESS) < 0 ||
	    lb4_rewrite(skb, l4, 0, source, port) < 0)
		return drop(skb, f, DROP_INVALID, METRIC_DIR_INGRESS);
	out = fib_route(skb, &l4->tuple, &fib, 1);
	if (out < 0)
		return drop(skb, f, DROP_NO_ROUTE, METRIC_DIR_INGRESS);
	return fib_redirect(skb, f, &fib, out, METRIC_DIR_INGRESS);
}

static __always_inline int from_netdev(struct __sk_buff *skb, struct flow_ctx *f)
{
	struct endpoint_info *dst;
	struct ct_state st = {};
	struct ct_key svc_tuple = {};
	struct ct_value *svc_ct = NULL;
	struct lb4_service *svc = NULL;
	struct lb4_backend *be = NULL;
	struct iphdr *ip4;
	__u32 src_cidr, backend_id = 0;
	struct snat4_entry *nat;
	__u16 rev_nat_id = 0;
	__be16 snat_port = 0;
	__u8 reason, ct_flags;
	int ct, hdr, ret, write_svc = 0;

	/* Not IPv4: the stack's. A malformed IPv4 header is dropped here only for a pod of
	 * this node; anything else the stack drops itself (ip_rcv). The overlay check
	 * below reads the fixed header only, as it did before any IPv4 parse. */
	hdr = ipv4_parse_skb(skb, &ip4);
	if (hdr == IPV4_NOT_IPV4 || hdr == IPV4_TRUNCATED)
		return TC_ACT_OK;
	dst = lookup_endpoint(ip4->daddr);
	if (!dst) {
		if (overlay_spoofed(skb, ip4))
			return drop(skb, f, DROP_OVERLAY_SOURCE, METRIC_DIR_INGRESS);
		if (hdr != IPV4_OK || parse_l4(skb, &f->l4) < 0)
			return TC_ACT_OK;
		nat = lb4_snat_answer(&f->l4.tuple);
		if (nat)
			return nodeport_snat_answer(skb, f, nat);
		svc = lb4_lookup_service(&f->l4, LB_SCOPE_EXTERNAL);
		if (!svc)
			return TC_ACT_OK;	/* not for a local pod: the stack's business */
		/* The connection's backend (its service entry), or one for a new
		 * connection: a TCP SYN, or a datagram that answers nothing netfilter
		 * translated (a pod's masqueraded flow may have a NodePort as its port
		 * here); anything else is left alone, as kube-proxy leaves it. */
		svc_tuple = f->l4.tuple;
		be = lb4_connection_backend(&svc_tuple, f->l4.tcp_flags, &svc_ct, &backend_id);
		if (be) {
			write_svc = ct_bare_syn(&svc_tuple, f->l4.tcp_flags);
			snat_port = svc_ct->dst_ep;
		} else if (f->l4.tuple.proto == IPPROTO_TCP ?
			   !ct_bare_syn(&svc_tuple, f->l4.tcp_flags) :
			   nf_nat_tracked(skb, &f->l4.tuple)) {
			return TC_ACT_OK;
		} else {
			/* No backend (externalTrafficPolicy: Local, none on this node):
			 * dropped, as kube-proxy drops it (the client's load balancer is to
			 * send it to a node that has one). */
			if (lb4_select_backend(svc, &svc_tuple, &be, &backend_id) != LB4_PICKED)
				return drop(skb, f, DROP_NO_SERVICE_BACKEND, METRIC_DIR_INGRESS);
			write_svc = 1;
		}
		rev_nat_id = svc->rev_nat_id;
		f->rev_nat_id = rev_nat_id;
		dst = lookup_endpoint(be->address);
		if (!dst) {
			if (!(svc->flags & LB_F_SNAT))	/* Local: this node's backends only */
				return drop(skb, f, DROP_NO_SERVICE_BACKEND, METRIC_DIR_INGRESS);
			return nodeport_snat_forward(skb, f, &svc_tuple, be, backend_id,
						     rev_nat_id, write_svc, snat_port,
						     lb4_snat_source(svc, svc_tuple.daddr));
		}
		if (lb4_dnat(skb, &f->l4, be, METRIC_DIR_INGRESS) < 0)
			return drop(skb, f, DROP_INVALID, METRIC_DIR_INGRESS);
	} else if (hdr != IPV4_OK || parse_l4(skb, &f->l4) < 0) {
		return drop(skb, f, DROP_INVALID, METRIC_DIR_INGRESS);
	}

	ct = ct_or_related(ct_lookup(&f->l4.tuple, f->l4.tcp_flags, &st, 0, dst->ep_id),
			   &f->l4, &st);
	ct_flags = st.flags;
	/* A connection through the stack is judged again by cil_to_pod. */
	if (!(ct_flags & CT_F_VIA_STACK)) {
		f->dst_ep = dst->ep_id;
		reason = ct_recheck(skb, f, ct, &st, NULL, dst);
		if (reason)
			return drop(skb, f, reason, METRIC_DIR_INGRESS);
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
	if (ct == CT_NEW && !ct_bare_syn(&f->l4.tuple, f->l4.tcp_flags) &&
	    nf_nat_tracked(skb, &f->l4.tuple))
		return pass_to_stack_nat(skb, METRIC_DIR_INGRESS);
	if (ct == CT_NEW) {
		f->dst_ep = dst->ep_id;
		f->dst_identity = dst->sec_identity;
		peer_identity(f->l4.tuple.saddr, &f->src_identity, &src_cidr);
		if (identity_is_pod(f->src_identity) &&
		    !reverse_path_ok(skb, f->l4.tuple.saddr, f->l4.tuple.daddr))
			return drop(skb, f, DROP_REVERSE_PATH, METRIC_DIR_INGRESS);
		ret = new_flow(skb, f, dst, f->src_identity, src_cidr, dst->ep_id,
			       CT_F_BYPASS_STACK, rev_nat_id, METRIC_DIR_INGRESS);
		if (ret != NEW_FLOW_PASS)
			return ret;
	}
	if (write_svc)
		lb4_ct_service_create(&svc_tuple, backend_id, rev_nat_id, f->l4.tcp_flags, 0);
	else if (svc_ct && be)
		lb4_ct_service_follow(svc_ct, svc_tuple.proto, ct_flags);
	/* A reply from a backend on another node to a flow a pod of this node opened to a
	 * Service frontend (translated in its cil_from_pod, past the stack both ways): from
	 * the frontend again before it reaches the client. */
	if (ct == CT_REPLY && st.rev_nat_id &&
	    lb4_rev_nat(skb, &f->l4, st.rev_nat_id, METRIC_DIR_INGRESS) < 0)
		return drop(skb, f, DROP_INVALID, METRIC_DIR_INGRESS);

	return deliver_local(skb, f, dst, METRIC_DIR_INGRESS);
}

/* The verdict first; only then, if it let a first fragment pass, its datagram's ports
 * are remembered for the fragments after it (lib/l4.h frag_remember). */
SEC("tc")
int cil_from_netdev(struct __sk_buff *skb)
{
	struct flow_ctx f = {};

	return frag_remember(&f.l4, from_netdev(skb, &f));
}

/* tc ingress on cilia_vxlan: what the overlay decapsulated passes from_netdev only if its
 * inner source is an address of the node that sent it (lib/antispoof.h); anything else
 * but IPv4 goes on as from_netdev lets it. */
SEC("tc")
int cil_from_vxlan(struct __sk_buff *skb)
{
	struct flow_ctx f = {};
	struct iphdr *ip4;
	int hdr;

	/* Any frame with an IPv4 header's addresses, well-formed or not. */
	hdr = ipv4_parse_skb(skb, &ip4);
	if ((hdr == IPV4_OK || hdr == IPV4_MALFORMED) &&
	    !overlay_inner_source_ok(skb, ip4->saddr))
		return drop(skb, &f, DROP_OVERLAY_INNER_SOURCE, METRIC_DIR_INGRESS);
	return frag_remember(&f.l4, from_netdev(skb, &f));
}

/* tc egress on cilia_vxlan, a collect_md device: every packet it sends gets its tunnel
 * here, to the node that owns its destination (cilia_tunnel), whether the stack routed
 * it there or cil_from_pod redirected it; nothing else leaves. */
SEC("tc")
int cil_to_vxlan(struct __sk_buff *skb)
{
	struct flow_ctx f = {};
	struct iphdr *ip4;
	int hdr;

	/* The stack routed it here: whatever its header, its destination says where to. */
	hdr = ipv4_parse_skb(skb, &ip4);
	if ((hdr != IPV4_OK && hdr != IPV4_MALFORMED) || tunnel_encap(skb, ip4->daddr) < 0)
		return drop(skb, &f, DROP_NO_TUNNEL, METRIC_DIR_EGRESS);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
