/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_IPV4_H
#define CILIA_LIB_IPV4_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* What ipv4_parse() found in a frame. */
enum ipv4_parse_result {
	IPV4_OK		= 0,
	IPV4_NOT_IPV4	= -1,	/* a whole Ethernet header, of another ethertype */
	IPV4_TRUNCATED	= -2,	/* no whole Ethernet header, or no fixed IPv4 header
				 * (20 bytes) after it in the linear data */
	IPV4_MALFORMED	= -3,	/* a fixed header is there (*ip4 is set) but it is no
				 * IPv4 header: version not 4, ihl below 5, or options
				 * running past the end of the packet */
};

/* The checks every IPv4 header must pass, wherever it is read (the packet's own, the one
 * an ICMP error quotes): version 4, a header length (ihl) of at least the fixed 20 bytes,
 * and all of it, options included, within `len` bytes from its first. */
static __always_inline int ipv4_hdr_valid(const struct iphdr *ip4, __u32 len)
{
	return ip4->version == 4 && ip4->ihl >= 5 && (__u32)ip4->ihl * 4 <= len;
}

/* The one IPv4 parse of every program: the Ethernet header, its ethertype, the fixed IPv4
 * header after it checked against `data_end` (so the caller may read its fields through
 * *ip4 at once), then ipv4_hdr_valid() against `len`, the whole packet's length from
 * `data` (skb->len at tc, data_end - data at XDP: options may lie past the linear data,
 * never past the packet). *ip4 is set for IPV4_OK and IPV4_MALFORMED. Each program
 * decides what a failure means where it sits: the pod programs drop (DROP_NOT_IPV4,
 * DROP_INVALID); the uplink's leave what is not theirs to the stack, which drops a
 * malformed header itself (ip_rcv).
 *
 * Packet pointers die with every helper that may move the data (bpf_skb_pull_data,
 * bpf_skb_store_bytes, ...): code after one parses again, with this. */
static __always_inline int ipv4_parse(void *data, void *data_end, __u32 len,
				      struct iphdr **ip4)
{
	struct ethhdr *eth = data;
	struct iphdr *hdr = (void *)(eth + 1);
	int ret;

	if ((void *)(eth + 1) > data_end) {
		ret = IPV4_TRUNCATED;
	} else if (eth->h_proto != bpf_htons(ETH_P_IP)) {
		ret = IPV4_NOT_IPV4;
	} else if ((void *)(hdr + 1) > data_end) {
		ret = IPV4_TRUNCATED;
	} else {
		*ip4 = hdr;
		ret = len >= ETH_HLEN && ipv4_hdr_valid(hdr, len - ETH_HLEN) ? IPV4_OK :
									   IPV4_MALFORMED;
	}
	/* Opaque to the compiler: else it may test the caller's `ret == IPV4_OK ||
	 * ret == IPV4_MALFORMED` as the ethertype again, on a path where the verifier
	 * cannot know that the header lies within data_end. */
	barrier_var(ret);
	return ret;
}

/* ipv4_parse() of a tc program's packet. */
static __always_inline int ipv4_parse_skb(struct __sk_buff *skb, struct iphdr **ip4)
{
	return ipv4_parse((void *)(long)skb->data, (void *)(long)skb->data_end, skb->len, ip4);
}

/* Forwarding is routing: decrement the TTL and patch the checksum incrementally
 * (RFC 1624). The TTL is the high byte of its 16-bit word, so the sum grows by 0x0100
 * in network order; fold the carry back in. Same arithmetic as the kernel's
 * ip_decrease_ttl(), with no helper call, so packet pointers stay valid.
 */
static __always_inline void ipv4_dec_ttl(struct iphdr *ip4)
{
	__u32 check = (__u32)ip4->check;

	check += (__u32)bpf_htons(0x0100);
	ip4->check = (__sum16)(check + (check >= 0xFFFF));
	ip4->ttl--;
}

/* Where the datagram ends in the frame, as its total length says (ip4 checked against
 * data_end); -1 for a header that cannot be: a total length shorter than the header
 * itself, or longer than the bytes the frame holds (a truncated datagram). Both are what
 * the kernel's ip_rcv drops; the L4 header, and an ICMP error's quote, are read within
 * the datagram, never in the link layer's padding after it (a 60-byte Ethernet frame
 * carrying a 40-byte datagram is fine). A GSO packet above 64 KiB (BIG TCP) says 0:
 * its length is the skb's, as the kernel's iph_totlen() takes it.
 */
static __always_inline int ipv4_datagram_end(const struct __sk_buff *skb,
					     const struct iphdr *ip4, __u32 *end)
{
	__u32 tot_len = bpf_ntohs(ip4->tot_len);

	if (!tot_len && skb->gso_size && skb->len > ETH_HLEN)
		tot_len = skb->len - ETH_HLEN;
	if (tot_len < ip4->ihl * 4 || ETH_HLEN + tot_len > skb->len)
		return -1;
	*end = ETH_HLEN + tot_len;
	return 0;
}

#endif
