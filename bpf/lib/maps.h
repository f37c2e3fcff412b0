/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_MAPS_H
#define CILIA_LIB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <cilia/endpoint.h>
#include <cilia/metrics.h>
#include <cilia/policy.h>
#include <cilia/ipcache.h>
#include <cilia/conntrack.h>
#include <cilia/events.h>
#include <cilia/netdev.h>

/* Every map is pinned by name; the agent points libbpf at its own bpffs root before
 * load, so that maps outlive the agent and two agents on one machine never share one.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_info);
	__uint(max_entries, ENDPOINTS_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, struct metrics_key);
	__type(value, struct metrics_value);
	__uint(max_entries, 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_metrics SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, IPCACHE_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, POLICY_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_policy SEC(".maps");

/* LRU: a full table evicts the least recently used flow rather than refusing new ones. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, CT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_ct SEC(".maps");

/* Live conntrack entries of each endpoint, by endpoint id (cilia/conntrack.h): flow
 * entries the programs made for it, and what the agent's GC found given back. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, CT_QUOTA_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_ct_created SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, CT_QUOTA_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_ct_credited SEC(".maps");

/* The most live conntrack entries one endpoint may have, one __u32 at key 0, written by
 * the agent (--ct-endpoint-max); 0: no limit. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_ct_limit SEC(".maps");

/* Devices with cil_from_netdev (include/cilia/netdev.h): where cil_from_pod may send
 * a new connection past the node's stack. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct netdev_info);
	__uint(max_entries, NETDEVS_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_netdevs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_ports);
	__uint(max_entries, FRAG_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_frags SEC(".maps");

/* The policy revision in force, one __u32 at key 0: the agent adds one after every
 * change of policy entries, identities or enforcement flags. A conntrack entry keeps
 * the revision it was judged under (its low byte, ct_value.policy_rev, which never
 * aliases: see there); a packet of a
 * connection judged under another is judged again (lib/enforce.h rejudge()), so a new
 * deny reaches established connections at their next packet. An array: read on every
 * such packet, never missing. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_policy_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, EVENTS_RINGBUF_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_events SEC(".maps");

#endif
