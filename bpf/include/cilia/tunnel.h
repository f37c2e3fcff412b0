/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_TUNNEL_H
#define CILIA_TUNNEL_H

#include <linux/types.h>

#define TUNNEL_MAP_SIZE 16384
#define TUNNEL_VNI 2	/* agent/routing.py VXLAN_VNI */
#define TUNNEL_TTL 64

/* cilia_tunnel, the overlay's map of the cluster (VXLAN routing only; agent/routing.py
 * writes it from the CiliaNodes): an LPM trie keyed as the ipcache is (struct
 * ipcache_key) holding every other node's pod CIDR and its address (/32), each to that
 * node's tunnel endpoint. cilia_vxlan is a collect_md ("external") device: nothing is
 * sent out of it without a destination set by cil_to_vxlan from this map, and what
 * comes in has its outer source beside it, which cil_from_vxlan checks against the
 * node this map says owns the inner source (lib/antispoof.h). */
struct tunnel_endpoint {
	__be32 remote;	/* the owning node's address: the outer destination out, and the
			 * only outer source accepted in */
	__be32 local;	/* this node's address: the outer source of what it sends */
};

#endif
