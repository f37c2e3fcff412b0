/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_NETDEV_H
#define CILIA_NETDEV_H

#include <linux/types.h>

#define NETDEVS_MAP_SIZE 64

/* netdev_info.flags */
#define NETDEV_F_UPLINK		1	/* an uplink (--devices) */
#define NETDEV_F_OVERLAY	2	/* the VXLAN device, cilia_vxlan */

/* The node's devices that carry cil_from_netdev at tc ingress, keyed by ifindex
 * (__u32), written by the agent. Traffic that cilia sends out of one of them past the
 * node's stack (bpf_redirect_neigh) has its answers come back through cil_from_netdev,
 * which delivers them past the stack too: so netfilter sees none of the connection.
 * Out of any other device, answers would come up through the stack and netfilter
 * would see half a connection; cil_from_pod sends such traffic through the stack. */
struct netdev_info {
	__u32 flags;		/* NETDEV_F_* */
};

#endif
