/* SPDX-License-Identifier: Apache-2.0 */
#ifndef CILIA_LIB_L4_H
#define CILIA_LIB_L4_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <cilia/conntrack.h>
#include "maps.h"
#include "ipv4.h"

#ifndef IPPROTO_SCTP
#define IPPROTO_SCTP 132
#endif

/* linux/icmp.h drags in libc headers; the echo header is all the datapath reads. */
#define ICMP_ECHOREPLY		0
#define ICMP_DEST_UNREACH	3
#define ICMP_ECHO		8
#define ICMP_TIME_EXCEEDED	11
#define ICMP_PARAMETERPROB	12
struct icmp_echo {
	__u8   type;
	__u8   code;
	__sum16 checksum;
	__be16 id;
	__be16 sequence;
};

/* The tuple of an ICMP packet of any type but echo: source port 0, destination port
 * this plus the type. Each type is a flow of its own, in its own direction: never an
 * echo's (whose two ports are its identifier, equal), never another type's, and never
 * the reverse of one (whose source port would be this). */
#define ICMP_TUPLE_TYPE		0x100

#define IP_OFFSET	0x1FFF
#define IP_MF		0x2000

/* SCTP's common header (RFC 9260 3.1): ports, verification tag, checksum. A packet
 * without all of it is no SCTP packet, whatever its first 4 bytes say. */
#define SCTP_COMMON_HLEN	12

/* TCP, UDP and SCTP all begin with 16-bit source and destination ports. */
struct l4_ports {
	__be16 sport;
	__be16 dport;
};

struct l4_info {
	struct ct_key tuple;
	__be16 policy_port;	/* what policy matches on: the destination port, or the
				 * ICMP type (echo ids make ICMP's tuple ports) */
	__u8 tcp_flags;		/* the TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10) */
	__u8 nonfirst_frag;	/* a fragment without an L4 header, and no ports known */
	__u8 later_frag;	/* a fragment without an L4 header whose ports are known
				 * (cilia_frags): a packet of its connection, but with
				 * nothing of L4 in it to rewrite (lib/lb.h lb4_rewrite) */
	__u8 first_frag;	/* the first fragment of a datagram with ports: `frag`,
				 * `frag_ports` as it arrived, remembered if it passes */
	__u8 icmp_error;	/* an ICMP error: `inner` is the tuple of the packet it is
				 * about (the header it quotes), as that packet went */
	struct ct_key inner;
	struct frag_key frag;
	struct frag_ports frag_ports;
};

/* The tuple of the packet an ICMP error quotes (its IPv4 header and the first 8 bytes
 * after it, which RFC 792 guarantees: the ports). Sets l4->icmp_error only when all of
 * it is there, inside the error's datagram (before `end`), and it is TCP, UDP, SCTP or
 * an echo; anything else is no known flow's. */
static __always_inline void parse_icmp_error(struct __sk_buff *skb, struct l4_info *l4,
					     __u32 off, __u32 end)
{
	struct iphdr inner;
	struct l4_ports ports;
	struct icmp_echo echo;

	if (off + sizeof(inner) > end ||
	    bpf_skb_load_bytes(skb, off, &inner, sizeof(inner)) < 0 ||
	    !ipv4_hdr_valid(&inner, end - off))
		return;
	off += inner.ihl * 4;
	__builtin_memset(&l4->inner, 0, sizeof(l4->inner));
	l4->inner.saddr = inner.saddr;
	l4->inner.daddr = inner.daddr;
	l4->inner.proto = inner.protocol;
	switch (inner.protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		if (off + sizeof(ports) > end ||
		    bpf_skb_load_bytes(skb, off, &ports, sizeof(ports)) < 0)
			return;
		l4->inner.sport = ports.sport;
		l4->inner.dport = ports.dport;
		break;
	case IPPROTO_ICMP:
		if (off + sizeof(echo) > end ||
		    bpf_skb_load_bytes(skb, off, &echo, sizeof(echo)) < 0 ||
		    (echo.type != ICMP_ECHO && echo.type != ICMP_ECHOREPLY))
			return;
		l4->inner.sport = echo.id;
		l4->inner.dport = echo.id;
		break;
	default:
		return;
	}
	l4->icmp_error = 1;
}

/* Fills the tuple from the IPv4 header and whatever L4 header follows it. Returns 0, or
 * -1 if the header is malformed, its total length impossible (ipv4_datagram_end), or the
 * datagram too short for the L4 header its protocol promises. Headers of
 * locally generated packets are linear; anything else is pulled in first (which
 * invalidates every packet pointer the caller holds).
 */
static __always_inline int parse_l4(struct __sk_buff *skb, struct l4_info *l4)
{
	void *data, *data_end;
	struct iphdr *ip4;
	__u32 l4_off, end, need;
	__be16 frag_id;
	__u8 proto, first_frag;

	/* A header that is no IPv4 one (ipv4_parse), or whose total length is shorter than
	 * the header or runs past the frame: nothing after it can be trusted, whatever the
	 * protocol. */
	if (ipv4_parse_skb(skb, &ip4) != IPV4_OK || ipv4_datagram_end(skb, ip4, &end) < 0)
		return -1;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	proto = ip4->protocol;
	l4_off = sizeof(struct ethhdr) + ip4->ihl * 4;
	l4->tuple.saddr = ip4->saddr;
	l4->tuple.daddr = ip4->daddr;
	l4->tuple.proto = proto;
	l4->tcp_flags = 0;
	l4->policy_port = 0;
	l4->icmp_error = 0;
	l4->first_frag = 0;
	l4->later_frag = 0;
	l4->nonfirst_frag = (ip4->frag_off & bpf_htons(IP_OFFSET)) != 0;
	if (l4->nonfirst_frag) {
		/* The ports its first fragment carried, if it passed here: then this
		 * fragment is a packet of that connection like any other. */
		struct frag_key fk = { .saddr = ip4->saddr, .daddr = ip4->daddr,
				       .id = ip4->id, .proto = proto };
		struct frag_ports *fp = bpf_map_lookup_elem(&cilia_frags, &fk);

		if (fp) {
			l4->tuple.sport = fp->sport;
			l4->tuple.dport = fp->dport;
			l4->policy_port = fp->dport;
			l4->nonfirst_frag = 0;
			l4->later_frag = 1;
		}
		return 0;
	}
	first_frag = (ip4->frag_off & bpf_htons(IP_MF)) != 0;
	frag_id = ip4->id;

	switch (proto) {
	case IPPROTO_TCP:
		need = sizeof(struct tcphdr);
		break;
	case IPPROTO_UDP:
	case IPPROTO_ICMP:
		need = 8;
		break;
	case IPPROTO_SCTP:
		need = SCTP_COMMON_HLEN;
		break;
	default:
		return 0;
	}
	if (l4_off + need > end)
		return -1;
	if (data + l4_off + need > data_end) {
		if (bpf_skb_pull_data(skb, l4_off + need) < 0)
			return -1;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}

	if (proto == IPPROTO_ICMP) {
		struct icmp_echo *icmp = data + l4_off;

		if ((void *)(icmp + 1) > data_end)
			return -1;
		/* Echo request and reply share the identifier: use it as both ports so a
		 * reply finds its request reversed. Every other type is a flow of its own
		 * (ICMP_TUPLE_TYPE), so that no type passes on another's connection (a
		 * timestamp request on an echo's, an echo on a redirect's). */
		l4->policy_port = bpf_htons(icmp->type);
		if (icmp->type == ICMP_ECHO || icmp->type == ICMP_ECHOREPLY) {
			l4->tuple.sport = icmp->id;
			l4->tuple.dport = icmp->id;
			return 0;
		}
		l4->tuple.sport = 0;
		l4->tuple.dport = bpf_htons(ICMP_TUPLE_TYPE | icmp->type);
		if (icmp->type == ICMP_DEST_UNREACH || icmp->type == ICMP_TIME_EXCEEDED ||
		    icmp->type == ICMP_PARAMETERPROB)
			parse_icmp_error(skb, l4, l4_off + sizeof(*icmp), end);
		return 0;
	}

	struct l4_ports *ports = data + l4_off;

	if ((void *)(ports + 1) > data_end)
		return -1;
	l4->tuple.sport = ports->sport;
	l4->tuple.dport = ports->dport;
	l4->policy_port = ports->dport;
	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcp = data + l4_off;

		if ((void *)(tcp + 1) > data_end)
			return -1;
		l4->tcp_flags = ((__u8 *)tcp)[13];
	}
	if (first_frag) {
		__builtin_memset(&l4->frag, 0, sizeof(l4->frag));
		l4->frag.saddr = l4->tuple.saddr;
		l4->frag.daddr = l4->tuple.daddr;
		l4->frag.id = frag_id;
		l4->frag.proto = proto;
		l4->frag_ports.sport = l4->tuple.sport;
		l4->frag_ports.dport = l4->tuple.dport;
		l4->first_frag = 1;
	}
	return 0;
}

/* A program's last word on a packet: a first fragment that passed (anything but
 * TC_ACT_SHOT) has its datagram's ports remembered for the fragments after it, under the
 * addresses it arrived with (before any translation). Never before the verdict: the
 * later fragments of a datagram whose first fragment was refused have no connection to
 * find (drop_fragment where policy needs ports), not the refused one's ports. */
static __always_inline int frag_remember(const struct l4_info *l4, int ret)
{
	if (l4->first_frag && ret != TC_ACT_SHOT)
		bpf_map_update_elem(&cilia_frags, &l4->frag, &l4->frag_ports, BPF_ANY);
	return ret;
}

#endif
