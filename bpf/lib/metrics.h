/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_METRICS_H
#define CILIA_LIB_METRICS_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"

static __always_inline void update_metrics(__u8 reason, __u8 dir, __u32 bytes)
{
	struct metrics_key key = { .reason = reason, .dir = dir };
	struct metrics_value *val;

	val = bpf_map_lookup_elem(&cilia_metrics, &key);
	if (val) {
		val->packets += 1;
		val->bytes += bytes;
	} else {
		struct metrics_value init = { .packets = 1, .bytes = bytes };

		bpf_map_update_elem(&cilia_metrics, &key, &init, BPF_NOEXIST);
	}
}

/* Drops: lib/drop.h drop(), which counts and reports them. */
#ifndef CILIA_NO_SKB
static __always_inline int pass_to_stack(struct __sk_buff *skb, __u8 dir)
{
	update_metrics(REASON_TO_STACK, dir, skb->len);
	return TC_ACT_OK;
}
#endif

#endif
