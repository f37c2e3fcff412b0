/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_MAPS_H
#define CILIA_LIB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <cilia/endpoint.h>
#include <cilia/metrics.h>

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

#endif
