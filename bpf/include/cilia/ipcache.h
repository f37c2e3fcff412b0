/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_IPCACHE_H
#define CILIA_IPCACHE_H

#include <linux/types.h>

#define IPCACHE_MAP_SIZE 524288

/* Reserved identities (below 256), numbered as Cilium numbers them. */
#define IDENTITY_HOST		1	/* this node */
#define IDENTITY_WORLD		2	/* anything outside the cluster */
#define IDENTITY_REMOTE_NODE	6	/* another node of the cluster */
/* Identities of label sets (pods) are numbered from IDENTITY_MIN_CLUSTER; CIDR
 * identities (ipBlock, node-local) from IDENTITY_CIDR_BASE (cilia/identity.py). */
#define IDENTITY_MIN_CLUSTER	256
#define IDENTITY_CIDR_BASE	0x1000000

/* LPM trie key: every pod (/32), node address (/32), ipBlock CIDR, and 0.0.0.0/0 (world).
 * The prefix length counts bits of ip4 only; the address is in network order because
 * LPM tries compare keys byte by byte, most significant first. */
struct ipcache_key {
	__u32 prefixlen;
	__be32 ip4;
};

/* Two identities per prefix: `identity` is who the address is (a pod's labels, host,
 * world); `cidr_identity` is the most specific ipBlock CIDR containing it. A pod's
 * /32 hides every shorter CIDR in the trie, so the agent stores the CIDR identity
 * beside it: ipBlock rules then match pod addresses too, with `except` holes intact,
 * in one lookup. For CIDR entries the two are equal. */
struct ipcache_value {
	__u32 identity;
	__u32 cidr_identity;
};

#endif
