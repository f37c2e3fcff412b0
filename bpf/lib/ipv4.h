/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_IPV4_H
#define CILIA_LIB_IPV4_H

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

#endif
