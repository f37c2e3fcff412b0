/* SPDX-License-Identifier: Apache-2.0 */
/* "From netdev": tc ingress on the node's uplinks (and the VXLAN device). Traffic for a
 * pod on this node passes the pod's ingress policy (source identity from the ipcache)
 * and is delivered straight into the pod's netns with bpf_redirect_peer; everything
 * else (for the node itself, to be routed, encapsulated) goes to the stack untouched.
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

SEC("tc")
int cil_from_netdev(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct endpoint_info *dst;
	struct flow_ctx f = {};
	struct iphdr *ip4;
	__u32 src_cidr;
	__u8 reason;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip4 = (void *)(eth + 1);
	if ((void *)(ip4 + 1) > data_end)
		return TC_ACT_OK;
	dst = lookup_endpoint(ip4->daddr);
	if (!dst)
		return TC_ACT_OK;	/* not for a local pod: the stack's business */
	if (ip4->version != 4 || ip4->ihl < 5 || parse_l4(skb, &f.l4) < 0)
		return drop(skb, DROP_INVALID, METRIC_DIR_INGRESS);

	if (ct_lookup(&f.l4.tuple, f.l4.tcp_flags) == CT_NEW) {
		f.dst_ep = dst->ep_id;
		f.dst_identity = dst->sec_identity;
		peer_identity(f.l4.tuple.saddr, &f.src_identity, &src_cidr);
		reason = enforce(dst, POLICY_INGRESS, ENDPOINT_F_INGRESS_ENFORCED,
				 f.src_identity, src_cidr, &f);
		if (reason)
			return drop_flow(skb, &f, reason, METRIC_DIR_INGRESS);
		ct_create(&f.l4.tuple, 0, f.dst_ep, f.cookie, f.l4.tcp_flags);
		emit_flow(skb, &f, VERDICT_FORWARDED, 0, METRIC_DIR_INGRESS);
	}

	return deliver_local(skb, dst, METRIC_DIR_INGRESS);
}

char LICENSE[] SEC("license") = "GPL";
