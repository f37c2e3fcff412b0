/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_ETH_H
#define CILIA_LIB_ETH_H

#include <linux/if_ether.h>

static __always_inline void eth_rewrite(struct ethhdr *eth, const __u8 *dst, const __u8 *src)
{
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
}

#endif
