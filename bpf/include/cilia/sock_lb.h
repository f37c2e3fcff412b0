/* SPDX-License-Identifier: Apache-2.0 */
/* Socket LB: Services for the node's own sockets (host network namespace: node daemons,
 * hostNetwork pods), translated at the socket by cgroup connect4/sendmsg4 programs
 * (bpf/bpf_sock.c) instead of per packet. A socket connected to a frontend is connected
 * to a backend in the kernel's eyes, so no packet of it ever carries the ClusterIP and
 * nothing needs translating back on the wire; only what the kernel tells the process
 * (the source of a datagram in recvmsg, the peer in getpeername) must show the frontend
 * again. That is what this table is for. Modelled on Cilium's cilium_lb4_reverse_sk.
 */
#ifndef CILIA_SOCK_LB_H
#define CILIA_SOCK_LB_H

#include <linux/types.h>

#define LB_REVERSE_SK_MAP_SIZE	65536

/* A socket and the backend it was given: keyed by the socket's cookie (unique per socket
 * for the whole boot, never reused, so an entry of a closed socket can only go stale,
 * never be found by another socket; the LRU evicts it) *and* the backend, because an
 * unconnected UDP socket may talk to several frontends at once and recvmsg must tell
 * which frontend a datagram from a backend answers. The backend in network order, as
 * recvmsg4/getpeername4 see it in user_ip4/user_port. 16 bytes, explicitly padded so
 * that equal keys hash equally.
 */
struct lb4_sock_rev_key {
	__u64  cookie;		/* bpf_get_socket_cookie() of the client's socket */
	__be32 address;		/* the backend's address */
	__be16 port;		/* the backend's port */
	__u16  pad;
};

/* The frontend the socket spoke to (network order, as user_ip4/user_port take it), and
 * the service it belonged to: an entry whose frontend is gone, or now names another
 * service, is stale and shows nothing. 8 bytes, no padding.
 */
struct lb4_sock_rev_value {
	__be32 address;		/* the ClusterIP */
	__be16 port;		/* the Service port */
	__u16  rev_nat_id;	/* the service's id (lb4_service.rev_nat_id) */
};

#endif
