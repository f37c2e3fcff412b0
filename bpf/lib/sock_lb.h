/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_SOCK_LB_H
#define CILIA_LIB_SOCK_LB_H

/* Socket LB (bpf/bpf_sock.c): a socket of the node's own network namespace that connects
 * or sends to a Service frontend is given a backend's address before any packet exists
 * (cgroup connect4/sendmsg4), and is shown the frontend again where the kernel reports
 * the peer (recvmsg4, getpeername4). Cilium's bpf_sock.c, reduced to ClusterIPs.
 *
 * The programs hang on a cgroup, so they run for every process of the machine in any
 * network namespace; each agent loads its own copy, which acts only in the namespace
 * that agent serves (sock_lb_in_host_netns). Pods are left alone on purpose: their
 * packets are translated in cil_from_pod, before their egress policy judges the backend.
 */

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <cilia/sock_lb.h>
#include "lb.h"

/* What a cgroup sock_addr program returns: 0 fails the call (connect/sendmsg get EPERM),
 * 1 lets it go on. recvmsg4 and getpeername4 must always return 1. */
#define SYS_REJECT	0
#define SYS_PROCEED	1

/* The cookie of the network namespace this copy serves (the agent's own, read with
 * SO_NETNS_COOKIE): written by the agent into the object before load (its own section,
 * so that the loader finds it at offset 0 whatever else the object holds), read-only
 * once loaded. 0 (never set) acts nowhere. One object per agent: several agents on one
 * machine hang their copies on the same cgroup, each with its own cookie. */
const volatile __u64 sock_lb_netns_cookie SEC(".rodata.sock_lb") = 0;

/* socket cookie + backend -> frontend, for recvmsg4/getpeername4 (include/cilia/sock_lb.h).
 * LRU: an entry of a closed socket is never deleted explicitly, it ages out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_sock_rev_key);
	__type(value, struct lb4_sock_rev_value);
	__uint(max_entries, LB_REVERSE_SK_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lb4_reverse_sk SEC(".maps");

/* Whether the socket lives in the network namespace this copy serves. */
#define SOCK_LB_AFFINITY_CLIENT	0	/* cilia_lb4_affinity's client for the node itself */

static __always_inline int sock_lb_in_host_netns(struct bpf_sock_addr *ctx)
{
	__u64 cookie = sock_lb_netns_cookie;

	return cookie && bpf_get_netns_cookie(ctx) == cookie;
}

/* The frontend the call names (user_ip4/user_port hold address and port in network
 * order, the port in the low 16 bits), or NULL: TCP and UDP only (a ping socket's
 * connect comes here too). */
static __always_inline struct lb4_service *sock4_lookup_service(struct bpf_sock_addr *ctx,
								struct lb4_key *key)
{
	key->address = ctx->user_ip4;
	key->dport = (__be16)ctx->user_port;
	key->proto = (__u8)ctx->protocol;
	key->scope = LB_SCOPE_INTERNAL;
	if (key->proto != IPPROTO_TCP && key->proto != IPPROTO_UDP)
		return NULL;
	return bpf_map_lookup_elem(&cilia_lb4_services, key);
}

/* The slot of a socket's backend. At connect time there is no source port yet (the
 * tuple hash of lib/lb.h has nothing to hash), so the socket's cookie is hashed: every
 * socket picks anew, and one socket always gets the same backend for one frontend (an
 * unconnected UDP socket's datagrams go to one backend, whose answers recvmsg4 maps back). */
static __always_inline __u32 sock4_slot(__u64 sock_cookie, __u32 count)
{
	return lb4_mix((__u32)sock_cookie ^ lb4_mix((__u32)(sock_cookie >> 32))) % count;
}

/* Remembers which frontend a socket's backend stands for, so that recvmsg4 and
 * getpeername4 can show the frontend. An LRU update makes room rather than fail, so the
 * result is not checked: should it ever fail, the process sees the backend's address,
 * and its datagrams still flow. */
static __always_inline void sock4_remember(__u64 sock_cookie, const struct lb4_backend *be,
					   const struct lb4_key *frontend, __u16 rev_nat_id)
{
	struct lb4_sock_rev_key key = {
		.cookie = sock_cookie,
		.address = be->address,
		.port = be->port,
	};
	struct lb4_sock_rev_value val = {
		.address = frontend->address,
		.port = frontend->dport,
		.rev_nat_id = rev_nat_id,
	};

	bpf_map_update_elem(&cilia_lb4_reverse_sk, &key, &val, BPF_ANY);
}

/* connect4/sendmsg4: a frontend becomes one of its backends. A frontend with no ready
 * backend (count 0, or a slot the agent is rewriting) fails the call at once, as
 * Cilium does (the caller gets EPERM instead of waiting for a SYN's timeout). */
static __always_inline int sock4_xlate_fwd(struct bpf_sock_addr *ctx)
{
	struct lb4_key frontend;
	struct lb4_service *svc;
	struct lb4_backend *be;
	__u32 backend_id, count;
	__u16 rev_nat_id;
	__u64 cookie;

	if (!sock_lb_in_host_netns(ctx))
		return SYS_PROCEED;
	svc = sock4_lookup_service(ctx, &frontend);
	if (!svc)
		return SYS_PROCEED;
	count = svc->count;
	rev_nat_id = svc->rev_nat_id;
	if (!count) {
		update_metrics(DROP_NO_SERVICE_BACKEND, METRIC_DIR_EGRESS, 0);
		return SYS_REJECT;
	}
	cookie = bpf_get_socket_cookie(ctx);
	/* ClientIP affinity: the node's own processes are one client (they all speak from
	 * the node's addresses), under the address no pod has, 0.0.0.0. */
	be = (svc->flags & LB_F_AFFINITY) ?
		lb4_affinity_backend(rev_nat_id, SOCK_LB_AFFINITY_CLIENT, &backend_id) : NULL;
	if (!be)
		be = lb4_slot_backend(rev_nat_id, sock4_slot(cookie, count), &backend_id);
	if (!be) {
		update_metrics(DROP_NO_SERVICE_BACKEND, METRIC_DIR_EGRESS, 0);
		return SYS_REJECT;
	}
	if (svc->flags & LB_F_AFFINITY)
		lb4_affinity_record(rev_nat_id, SOCK_LB_AFFINITY_CLIENT, backend_id);
	sock4_remember(cookie, be, &frontend, rev_nat_id);
	ctx->user_ip4 = be->address;
	ctx->user_port = (__u32)be->port;
	update_metrics(REASON_LB_SOCK_TRANSLATED, METRIC_DIR_EGRESS, 0);
	return SYS_PROCEED;
}

/* recvmsg4/getpeername4: a backend this socket was given shows as the frontend it
 * stands for, while that frontend is still the same service's; a stale entry is
 * forgotten. */
static __always_inline void sock4_xlate_rev(struct bpf_sock_addr *ctx)
{
	struct lb4_sock_rev_key key = {};
	struct lb4_sock_rev_value *val;
	struct lb4_service *svc;
	struct lb4_key frontend = {};

	if (!sock_lb_in_host_netns(ctx))
		return;
	key.cookie = bpf_get_socket_cookie(ctx);
	key.address = ctx->user_ip4;
	key.port = (__be16)ctx->user_port;
	val = bpf_map_lookup_elem(&cilia_lb4_reverse_sk, &key);
	if (!val)
		return;
	frontend.address = val->address;
	frontend.dport = val->port;
	frontend.proto = (__u8)ctx->protocol;
	svc = bpf_map_lookup_elem(&cilia_lb4_services, &frontend);
	if (!svc || svc->rev_nat_id != val->rev_nat_id) {
		bpf_map_delete_elem(&cilia_lb4_reverse_sk, &key);
		return;
	}
	ctx->user_ip4 = val->address;
	ctx->user_port = (__u32)val->port;
}

#endif
