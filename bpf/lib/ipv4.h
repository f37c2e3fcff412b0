/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_IPV4_H
#define CILIA_LIB_IPV4_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>

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
