/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_ICMP_H
#define CILIA_LIB_ICMP_H

/* ICMP errors the datapath answers with itself, where the node's stack never sees the
 * packet that caused them (a Service frontend with no backend, answered in
 * cil_from_pod as kube-proxy's REJECT rule answers in netfilter).
 */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "ipv4.h"

/* From RFC 792 (linux/icmp.h pulls in libc headers that a BPF build cannot have). */
#define ICMP_DEST_UNREACH	3
#define ICMP_PORT_UNREACH	3

struct icmp4_hdr {
	__u8    type;
	__u8    code;
	__sum16 checksum;
	__be32  unused;		/* zero in a destination unreachable */
};

/* What RFC 792 has an ICMP error quote: the offending datagram's IP header and its
 * first 8 bytes of payload (the ports, which is all the sender needs to find its
 * socket). Only option-less headers are quoted (pods send no IP options); the caller
 * drops what this cannot answer. */
#define ICMP4_QUOTE_LEN		(sizeof(struct iphdr) + 8)

/* The error as it goes on the wire after the Ethernet header: a fixed 56 bytes, built
 * on the stack and written with one store, so no packet pointer is needed after the
 * resize. */
struct icmp4_error {
	struct iphdr ip;
	struct icmp4_hdr icmp;
	__u8 quote[ICMP4_QUOTE_LEN];
};	/* 20 + 8 + 28 bytes, every member 4-aligned: no padding */

_Static_assert(sizeof(struct icmp4_error) == 56, "icmp4_error has no holes");

static __always_inline __sum16 csum_fold32(__s64 csum)
{
	__u32 sum = (__u32)csum;

	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__sum16)~sum;
}

/* Turns the packet into the ICMP error (`type`, `code`) that its destination would
 * send back to its source: addresses and MACs swapped, the original header and 8 bytes
 * quoted, checksums computed afresh, the frame cut or grown to fit. The caller sends it
 * back the way the original came. 0 on success; negative when the packet cannot be
 * quoted (IP options, too short) or a helper failed, and then the packet is to be
 * dropped. Invalidates every packet pointer. */
static __always_inline int icmp4_error_reply(struct __sk_buff *skb, __u8 type, __u8 code)
{
	struct icmp4_error err = {};
	struct iphdr *orig = (struct iphdr *)err.quote;
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];
	__s64 csum;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    bpf_skb_load_bytes(skb, sizeof(eth), err.quote, sizeof(err.quote)) < 0)
		return -1;
	/* The quote is the original header: it says where the error goes, and from. A
	 * valid header within the fixed 20 bytes is one without options. */
	if (!ipv4_hdr_valid(orig, sizeof(*orig)))
		return -1;
	err.ip.version = 4;
	err.ip.ihl = 5;
	err.ip.tos = 0xc0;	/* IPTOS_PREC_INTERNETCONTROL, as the kernel's icmp_send() */
	err.ip.tot_len = bpf_htons(sizeof(err));
	err.ip.ttl = 64;
	err.ip.protocol = IPPROTO_ICMP;
	err.ip.saddr = orig->daddr;
	err.ip.daddr = orig->saddr;
	err.icmp.type = type;
	err.icmp.code = code;

	csum = bpf_csum_diff(NULL, 0, (__be32 *)&err.ip, sizeof(err.ip), 0);
	if (csum < 0)
		return -1;
	err.ip.check = csum_fold32(csum);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&err.icmp, sizeof(err.icmp) + sizeof(err.quote),
			     0);
	if (csum < 0)
		return -1;
	err.icmp.checksum = csum_fold32(csum);

	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);

	if (bpf_skb_change_tail(skb, sizeof(eth) + sizeof(err), 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0 ||
	    bpf_skb_store_bytes(skb, sizeof(eth), &err, sizeof(err), 0) < 0)
		return -1;
	return 0;
}

#endif
