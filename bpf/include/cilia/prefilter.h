/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_PREFILTER_H
#define CILIA_PREFILTER_H

#include <linux/types.h>

#define PREFILTER_MAP_SIZE 65536
#define PREFILTER_AF_INET 4
#define PREFILTER_AF_INET6 6

/* LPM key of the XDP deny list. The family leads the key so IPv4 and IPv6 prefixes
 * live in one trie without ever matching each other: prefixlen always covers family
 * and pad (32 bits), then the address bits (at most 32 for IPv4, 128 for IPv6). */
struct prefilter_key {
	__u32 prefixlen;
	__u8  family;		/* PREFILTER_AF_* */
	__u8  pad[3];
	__u8  addr[16];		/* network order; IPv4 in the first 4 bytes */
};

#define PREFILTER_PREFIX_STATIC 32

/* The entry's slot in cilia_prefilter_stats: the LPM value stays small and shared,
 * the counters are per CPU, so a flood costs no cache-line bouncing. */
struct prefilter_value {
	__u32 slot;
};

#endif
