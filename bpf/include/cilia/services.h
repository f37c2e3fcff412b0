/* SPDX-License-Identifier: Apache-2.0 */
/* Services: the load balancer's maps (a ClusterIP translated to a backend pod in
 * cil_from_pod, before conntrack and policy). Modelled on Cilium's lb4 maps
 * (bpf/lib/lb.h there): frontend -> service, (service, slot) -> backend id,
 * backend id -> address, reverse-NAT id -> frontend. Written only by the agent's services
 * controller (agent/services.py), which orders its writes so that no packet finds a
 * slot pointing at a missing backend: backends first, then slots, then the service's
 * count; on removal the other way round.
 */
#ifndef CILIA_SERVICES_H
#define CILIA_SERVICES_H

#include <linux/types.h>

#define LB_SERVICES_MAP_SIZE	65536
#define LB_BACKENDS_MAP_SIZE	65536
#define LB_SLOTS_MAP_SIZE	262144	/* four backends per frontend on average */
#define LB_REVNAT_MAP_SIZE	65536
#define LB_AFFINITY_MAP_SIZE	65536
#define LB_AFFINITY_MATCH_MAP_SIZE 65536

/* lb4_service.flags: what kind of frontend this is, and how it picks. */
#define LB_F_CLUSTER_IP		1
#define LB_F_AFFINITY		2	/* sessionAffinity: ClientIP (cilia_lb4_affinity) */
#define LB_F_EXTERNAL_IP	4	/* an ExternalIP or a LoadBalancer ingress IP */
#define LB_F_NODEPORT		8	/* a node's address on a NodePort */
#define LB_F_HOSTPORT		32	/* a pod's hostPort on this node's address (or its
					 * hostIP): the pod the one backend */
#define LB_F_SNAT		16	/* external scope, externalTrafficPolicy: Cluster: a
					 * backend on another node gets the connection SNATed
					 * to this node (a NodePort: the frontend's address, the
					 * node's own; an ExternalIP: cilia_lb4_snat_source), so
					 * that its answers come back here (cilia_snat4) */

/* lb4_key.scope: who is asking. Pods and the node's own sockets are internal; what
 * arrives at an uplink from outside is external. Kubernetes gives the two different
 * backends for one address and port: with externalTrafficPolicy: Local, outside clients
 * get only this node's endpoints (and keep their source address), pods get them all.
 * So a frontend may be two entries, one per scope; an external one exists only where
 * cilia translates that traffic (today: externalTrafficPolicy: Local). */
#define LB_SCOPE_INTERNAL	0
#define LB_SCOPE_EXTERNAL	1

/* A frontend, keyed exactly as it sits in the packet (address and port in network
 * order), so the hot path builds the key from the parsed tuple with no conversion. One
 * entry per (address, port, protocol, scope): a Service with two ports is two frontends.
 * 8 bytes, no padding (the scope took the byte that was padding: entries written before
 * it existed read as internal, which they were).
 */
struct lb4_key {
	__be32 address;		/* the ClusterIP, an external IP, a node's address */
	__be16 dport;		/* the Service port, or the NodePort */
	__u8   proto;		/* IPPROTO_TCP, IPPROTO_UDP */
	__u8   scope;		/* LB_SCOPE_* */
};

/* The frontend's service: the number of backend slots to hash over, and the service's
 * id, which is also its reverse-NAT id (the key of cilia_lb4_revnat and of its slots in
 * cilia_lb4_slots). 16 bits, like Cilium's rev_nat_index: the id travels in every
 * conntrack entry of a translated flow (ct_value.rev_nat_id), where there is room
 * for 16 bits and no more without growing the entry. count 0: a frontend with no ready
 * backend, whose packets are dropped (DROP_NO_SERVICE_BACKEND).
 */
struct lb4_service {
	__u16 rev_nat_id;	/* the service id, 1..65535 (0: none) */
	__u16 count;		/* backend slots 0..count-1 in cilia_lb4_slots */
	__u16 flags;		/* LB_F_* */
	__u16 pad;
};

/* One backend slot of a service. Slots rather than a list in the service's value: a
 * backend is picked with one hash of the flow's tuple (modulo count) and one lookup,
 * whatever the number of backends, and a change of backends rewrites only the slots
 * that change. 4 bytes, no padding.
 */
struct lb4_slot_key {
	__u16 rev_nat_id;	/* the service */
	__u16 slot;		/* 0..count-1 */
};

struct lb4_slot {
	__u32 backend_id;	/* key of cilia_lb4_backends */
};

/* A backend by id (key: __u32). An id rather than the address in every slot: a
 * connection's conntrack entry remembers the backend by id (its service entry), and
 * finds it gone when the backend is removed, instead of sending to an address that may
 * since belong to another pod. Address and port in network order, as written into the
 * packet. 8 bytes, no padding.
 */
struct lb4_backend {
	__be32 address;		/* the backend pod's address */
	__be16 port;		/* its target port */
	__u8   proto;
	__u8   flags;		/* none yet */
};

/* Reverse NAT (key: __u16, the rev-NAT id that a translated flow's conntrack entry
 * records): what a backend's reply must carry as its source for the client to
 * recognise it, the frontend it connected to. 8 bytes, explicitly padded.
 */
struct lb4_reverse_nat {
	__be32 address;		/* the ClusterIP */
	__be16 port;		/* the Service port */
	__u16  pad;
};

/* ClientIP session affinity (key: the client's address and the service): the backend
 * a client's new connections go to while it keeps making them. An LRU hash: one entry per
 * (client, service) that ever connected, so the kernel, not a sweeper, bounds it, and an
 * entry evicted early costs only the client's stickiness, never a wrong backend. Like
 * kube-proxy's `recent` match, the clock restarts at each new connection (replies and
 * later packets never touch it); an entry older than the service's timeout is ignored.
 * 8-byte key, explicitly padded.
 */
struct lb4_affinity_key {
	__be32 client;		/* the client's address */
	__u16  rev_nat_id;	/* the service */
	__u16  pad;
};

struct lb4_affinity {
	__u64 last_used_ns;	/* bpf_ktime_get_ns() of its last new connection */
	__u32 backend_id;
	__u32 pad;
};

/* Which backends an affinity entry may still name (key: backend id and service): the
 * service's ready backends, written by the agent for affinity services only. A client's
 * backend that turned terminating, or left the service, is absent and the client gets a
 * new one; a backend id alone could not say so, since a terminating backend stays in
 * cilia_lb4_backends for its open connections, and one backend may serve several
 * services. The value is the service's timeout, so the one lookup that says the backend
 * is still good also says for how long an entry holds. 8-byte key, no padding.
 */
struct lb4_affinity_match_key {
	__u32 backend_id;
	__u16 rev_nat_id;
	__u16 pad;
};

struct lb4_affinity_match {
	__u32 timeout_s;	/* sessionAffinityConfig.clientIP.timeoutSeconds */
};

/* NodePort SNAT (key: an answer's tuple as it arrives here from the backend: backend
 * address and port, this node's address and the port it was given): whom to give the
 * answer back to, and from which frontend. An outside client's connection to a NodePort
 * (externalTrafficPolicy: Cluster) whose backend is on another node leaves here with
 * this node's address and a port of SNAT_PORT_MIN..MAX as its source, or the answer
 * would go from that node straight to the client, which never spoke to it. An LRU
 * hash: the kernel bounds it; an entry evicted early breaks its one connection (its
 * answers reach nobody), never another. The port range lies above the kernel's default
 * ephemeral ports (32768-60999) and the NodePorts (30000-32767), so no local socket and
 * no frontend shares a tuple with it. 16-byte key, explicitly padded.
 */
#define SNAT4_MAP_SIZE		65536
#define SNAT_PORT_MIN		61000
#define SNAT_PORT_MAX		65535
#define SNAT_PORT_TRIES		32

struct snat4_key {
	__be32 backend;		/* the backend pod's address */
	__be32 node;		/* this node's address: the SNAT source */
	__be16 backend_port;
	__be16 node_port;	/* the SNAT source port */
	__u8   proto;
	__u8   pad[3];
};

/* The address an ExternalIP's connection is SNATed to (key: __u32 0; one entry, an
 * array): this node's own, written by the agent. A NodePort's frontend already is one of
 * the node's addresses; an ExternalIP is not the node's, and answers to it would go
 * wherever the outside routes it. 0: none known yet, and such connections are dropped
 * rather than sent out unanswerable. */
struct lb4_snat_source {
	__be32 address;
};

struct snat4_entry {
	__be32 client;		/* the outside client, as it connected */
	__be32 frontend;	/* the node address and NodePort it connected to */
	__be16 client_port;
	__be16 frontend_port;
};

#endif
