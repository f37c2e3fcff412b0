/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_ANTISPOOF_H
#define CILIA_LIB_ANTISPOOF_H

/* Sources that arrive from outside the node claiming to be pods. cil_from_netdev takes
 * a packet's identity from its source address and delivers with bpf_redirect_peer,
 * which skips the stack's rp_filter; so it checks here what the stack would have:
 *
 * - The VXLAN overlay: the kernel's cilia_vxlan device decapsulates any UDP datagram to
 *   the node's port 8472, and the inner frame may claim any pod's address. Only other
 *   nodes of the cluster may send there (their address is REMOTE_NODE in the ipcache),
 *   and pods may not (cil_from_pod: a pod's datagram to a node's VXLAN port would leave
 *   masqueraded, from its node's address).
 * - The overlay's inner source: a frame that cilia_vxlan decapsulated must claim an
 *   address of the node that sent it (the tunnel's outer source, which the collect_md
 *   device keeps beside the frame), its pod CIDR or its own address (cilia_tunnel), so
 *   that one node cannot speak for another node's pods, nor for this node's, nor for
 *   the world. The outer source itself was checked on the uplink (above).
 *
 * Not checked, for there is nothing to tell it by: a host on the nodes' own L2 segment
 * that forges a node (its address as the outer source, or with native routing a remote
 * pod's address bare, and the node's MAC) sends byte for byte what that node sends. A
 * source MAC check against the node's neighbour entry would stop only a spoofer that
 * does not bother to forge the MAC too, and would drop real traffic behind a router, a
 * bond, or a stale entry. The segment is trusted, as in any routed pod network
 * (README; tests/datapath/test_spoofing.py test_limitation_*).
 * - Reverse path: a new connection from a pod's address is accepted on a device only if
 *   the node's route back to that address leaves by the same device (strict rp_filter):
 *   a local pod's address never arrives from outside, another node's pods arrive by the
 *   uplink or the overlay that leads to that node.
 */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <cilia/ipcache.h>
#include <cilia/netdev.h>
#include "maps.h"
#include "policy.h"
#include "tunnel.h"

#ifndef AF_INET
#define AF_INET 2
#endif

#define OVERLAY_PORT 8472	/* agent/routing.py VXLAN_PORT */

#ifndef IP_OFFSET
#define IP_OFFSET 0x1FFF
#endif

/* Whether the packet is a datagram to the VXLAN port (ip4 checked against data_end):
 * wherever its UDP header sits, after IP options too (the kernel decapsulates such a
 * datagram all the same). Only a first fragment has the header: a later one is no
 * datagram to any port (its datagram is judged by its first fragment, and without it is
 * never reassembled). */
static __always_inline int to_overlay_port(struct __sk_buff *skb, struct iphdr *ip4)
{
	struct udphdr udp;

	if (ip4->protocol != IPPROTO_UDP || ip4->ihl < 5 ||
	    (ip4->frag_off & bpf_htons(IP_OFFSET)))
		return 0;
	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + ip4->ihl * 4, &udp,
			       sizeof(udp)) < 0)
		return 0;	/* no whole UDP header: nothing the kernel would decapsulate */
	return udp.dest == bpf_htons(OVERLAY_PORT);
}

/* On an uplink: a VXLAN datagram from anything but another node of the cluster. */
static __always_inline int overlay_spoofed(struct __sk_buff *skb, struct iphdr *ip4)
{
	__u32 ifindex = skb->ifindex, identity, cidr;
	struct netdev_info *dev;

	if (!to_overlay_port(skb, ip4))
		return 0;
	dev = bpf_map_lookup_elem(&cilia_netdevs, &ifindex);
	if (!dev || !(dev->flags & NETDEV_F_UPLINK))
		return 0;
	peer_identity(ip4->saddr, &identity, &cidr);
	return identity != IDENTITY_REMOTE_NODE;
}

/* On cilia_vxlan: whether the decapsulated frame's inner source `saddr` is owned by the
 * node at its tunnel's outer source. No tunnel (a device without collect_md) is no. */
static __always_inline int overlay_inner_source_ok(struct __sk_buff *skb, __be32 saddr)
{
	struct bpf_tunnel_key key = {};
	struct tunnel_endpoint *owner;

	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return 0;
	owner = tunnel_lookup(saddr);
	return owner && owner->remote == bpf_htonl(key.remote_ipv4);
}

/* Whether the node's route back to `saddr` leaves by the device the packet came in on. */
static __always_inline int reverse_path_ok(struct __sk_buff *skb, __be32 saddr, __be32 daddr)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	fib.family = AF_INET;
	fib.ipv4_src = daddr;
	fib.ipv4_dst = saddr;
	fib.ifindex = skb->ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return 0;
	return fib.ifindex == skb->ifindex;
}

#endif
