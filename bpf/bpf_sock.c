/* SPDX-License-Identifier: Apache-2.0 */
/* Socket LB: Services for the node's own processes (the host network namespace), where
 * no cil_from_pod sees their packets and, without kube-proxy, nothing else would
 * translate a ClusterIP. Hung on a cgroup v2 (the agent's --socket-lb-cgroup) by bpf_links
 * pinned under the agent's bpffs root; see lib/sock_lb.h for how each copy keeps to its
 * own agent's network namespace. The maps are the load balancer's (lib/lb.h), shared
 * with bpf_lxc.o by their pins.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/sock_lb.h"

/* connect() of TCP and UDP sockets: a connected socket is connected to the backend. */
SEC("cgroup/connect4")
int cil_sock_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_fwd(ctx);
}

/* sendto()/sendmsg() with an address on an unconnected UDP socket: each datagram to a
 * frontend goes to the socket's backend. */
SEC("cgroup/sendmsg4")
int cil_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_fwd(ctx);
}

/* recvfrom()/recvmsg() on UDP: a datagram from the socket's backend shows the frontend
 * as its source, so that a client matching answers to its question (a DNS resolver)
 * accepts it. */
SEC("cgroup/recvmsg4")
int cil_sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx);
	return SYS_PROCEED;
}

/* getpeername(): a socket connected to a frontend has it as its peer, as with
 * kube-proxy. */
SEC("cgroup/getpeername4")
int cil_sock_getpeername4(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx);
	return SYS_PROCEED;
}

char LICENSE[] SEC("license") = "GPL";
