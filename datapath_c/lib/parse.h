/* parse.h - Ethernet/IPv4/IPv6/L4 parsing with direct packet access, failing closed.
 *
 * cy_parse() fills a struct cy_packet: addresses, ports, the port used for
 * policy (destination port, or the ICMP type for ICMP) and the conntrack
 * ports (ICMP echo id), and says what kind of packet it is (CY_PARSE_*).
 * Headers that lie beyond the linear area are pulled in first
 * (bpf_skb_pull_data), so "not in the linear area" never means "unreadable";
 * only the bytes the headers need are pulled (cy_headers_len), never payload:
 * a TCP segment whose payload sits in page fragments right after its headers
 * (the usual case for locally sent data) is left as it is.
 * What the parser cannot read is never passed as if it were understood:
 *   - CY_PARSE_BAD_L3: an IPv4 frame shorter than an IPv4 header, or ihl < 5
 *     (the caller drops it: the stack would discard it anyway);
 *   - CY_PARSE_FRAGMENT: a non-first fragment (no L4 header at all), or a first
 *     fragment too short to hold the L4 header: no ports to evaluate policy on
 *     (fragments are not tracked; the caller drops them on an enforced direction);
 *   - CY_PARSE_SHORT: an unfragmented packet whose L4 header is truncated;
 *   - CY_PARSE_IPV6: IPv6, which has no policy yet (dropped by the caller on
 *     an enforced direction),
 *     except CY_PARSE_IPV6_ND: Neighbor Discovery and router messages (ICMPv6
 *     133-137 right after the fixed header, hop limit 255) that the veth needs,
 *     and only link-scoped ones: the destination in ff02::/16 (link-local
 *     multicast: solicitations, DAD, RS/RA) or fe80::/10 (replies to the
 *     gateway fe80::1), or the source in fe80::/10 (the gateway's replies
 *     and probes to a pod's global address). A pod's own solicitations carry
 *     its global source and a multicast or fe80 destination, so "both sides
 *     link-local" would break address resolution. Either form stays on the
 *     veth (the stack forwards neither link-scoped destinations nor
 *     link-local sources); an ND-typed message between two non-link-local
 *     addresses, or from :: to one, is dropped like other IPv6.
 *     MLD is not among them: it travels behind a hop-by-hop header, nothing on
 *     a point-to-point veth snoops it, so it is dropped like other IPv6.
 * Other ethertypes (ARP, ...) are CY_PARSE_SKIP and passed.
 */
#ifndef CY_PARSE_H
#define CY_PARSE_H

#define CY_PARSE_SKIP 0     /* not IP: not ours (ARP, ...) */
#define CY_PARSE_OK 1       /* IPv4, fully parsed */
#define CY_PARSE_SHORT 2    /* IPv4, unfragmented, L4 header truncated */
#define CY_PARSE_FRAGMENT 3 /* IPv4 fragment without a (complete) L4 header */
#define CY_PARSE_BAD_L3 4   /* IPv4 header unreadable or ihl < 5 */
#define CY_PARSE_IPV6 5     /* IPv6 other than the ND messages below */
#define CY_PARSE_IPV6_ND 6  /* ICMPv6 133-137 (router/neighbor discovery, redirect) */

/* Bytes worth having linear: Ethernet, the longest IPv4 header, a TCP header. */
#define CY_PULL_LEN (14 + 60 + 20)

struct cy_packet {
	__u32 saddr;
	__u32 daddr;
	__be16 sport;       /* conntrack ports (network order) */
	__be16 dport;
	__u16 policy_port;  /* host order: dport, ICMP type, or 0 */
	__u8 protocol;      /* IPv4 protocol; IPv6: the next header after the fixed header */
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 is_fragment;   /* IPv4 fragment (first or not): never tracked */
	__u8 family;        /* 4 or 6 */
	__u8 pad;
	__u32 len;
	__u32 saddr6[4];    /* IPv6 only */
	__u32 daddr6[4];
};

/* The L4 header bytes cy_parse reads for a protocol (0: none). */
static __always_inline __u32 cy_l4_need(__u8 protocol)
{
	switch (protocol) {
	case CY_PROTO_TCP:
		return sizeof(struct tcphdr);
	case CY_PROTO_UDP:
	case CY_PROTO_SCTP:
		return sizeof(struct udphdr);
	case CY_PROTO_ICMP:
		return sizeof(struct icmphdr);
	default:
		return 0;
	}
}

/* fe80::/10, first byte and second byte of the address. */
static __always_inline int cy_ipv6_link_local(const __u8 *a)
{
	return a[0] == 0xfe && (a[1] & 0xc0) == 0x80;
}

/* The addresses ND on a point-to-point veth uses (see the header comment). */
static __always_inline int cy_ipv6_nd_scoped(const struct ipv6hdr *ip6)
{
	const __u8 *src = ip6->saddr.in6_u.u6_addr8, *dst = ip6->daddr.in6_u.u6_addr8;

	return (dst[0] == 0xff && dst[1] == 0x02) || cy_ipv6_link_local(dst) || cy_ipv6_link_local(src);
}

static __always_inline int cy_parse_ipv6(void *data, void *data_end, struct cy_packet *p)
{
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	__u8 *icmp6;

	p->family = 6;
	if ((void *)(ip6 + 1) > data_end)
		return CY_PARSE_IPV6;
	__builtin_memcpy(p->saddr6, &ip6->saddr, 16);
	__builtin_memcpy(p->daddr6, &ip6->daddr, 16);
	p->protocol = ip6->nexthdr;
	if (ip6->nexthdr != CY_PROTO_ICMPV6)
		return CY_PARSE_IPV6;
	icmp6 = (void *)(ip6 + 1);
	if ((void *)(icmp6 + 1) > data_end)
		return CY_PARSE_IPV6;
	p->icmp_type = *icmp6;
	if (ip6->hop_limit == 255 && *icmp6 >= CY_ICMPV6_ND_FIRST && *icmp6 <= CY_ICMPV6_ND_LAST &&
	    cy_ipv6_nd_scoped(ip6))
		return CY_PARSE_IPV6_ND;
	return CY_PARSE_IPV6;
}

/* How many leading bytes the parser reads: Ethernet, the IPv4 header (its ihl)
 * and the L4 header cy_l4_need names, or the IPv6 fixed header and one ICMPv6
 * byte. CY_PULL_LEN (the most) when the Ethernet or IPv4 header needed to tell
 * is not linear itself. */
static __always_inline __u32 cy_headers_len(void *data, void *data_end)
{
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	__u32 ihl;

	if ((void *)(eth + 1) > data_end)
		return CY_PULL_LEN;
	if (eth->h_proto == bpf_htons(CY_ETH_P_IPV6))
		return sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + 1;
	if (eth->h_proto != bpf_htons(CY_ETH_P_IP))
		return sizeof(struct ethhdr);
	if ((void *)(ip + 1) > data_end)
		return CY_PULL_LEN;
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return sizeof(struct ethhdr) + sizeof(*ip);
	if (ip->frag_off & bpf_htons(CY_IP_OFFSET))
		return sizeof(struct ethhdr) + ihl; /* non-first fragment: no L4 header */
	return sizeof(struct ethhdr) + ihl + cy_l4_need(ip->protocol);
}

static __always_inline int cy_parse(struct __sk_buff *skb, struct cy_packet *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	void *l4;
	__u32 ihl, tot_len, need, len = skb->len;

	p->len = len;
	if (data + CY_PULL_LEN > data_end && data_end - data < len) {
		/* Some header bytes may be in paged data: make linear what the headers need. */
		need = cy_headers_len(data, data_end);
		if (data + need > data_end) {
			bpf_skb_pull_data(skb, len < need ? len : need);
			data = (void *)(long)skb->data;
			data_end = (void *)(long)skb->data_end;
		}
	}
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return CY_PARSE_SKIP;
	if (eth->h_proto == bpf_htons(CY_ETH_P_IPV6))
		return cy_parse_ipv6(data, data_end, p);
	if (eth->h_proto != bpf_htons(CY_ETH_P_IP))
		return CY_PARSE_SKIP;
	p->family = 4;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return CY_PARSE_BAD_L3;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->protocol = ip->protocol;
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return CY_PARSE_BAD_L3;

	need = cy_l4_need(ip->protocol);
	tot_len = bpf_ntohs(ip->tot_len); /* 0 for BIG TCP packets: bounded by data_end only */
	if (ip->frag_off & bpf_htons(CY_IP_MF | CY_IP_OFFSET)) {
		p->is_fragment = 1;
		if (ip->frag_off & bpf_htons(CY_IP_OFFSET))
			return CY_PARSE_FRAGMENT; /* not the first: no L4 header at all */
		if (tot_len && tot_len < ihl + need)
			return CY_PARSE_FRAGMENT; /* first, but the L4 header does not fit */
	} else if (tot_len && tot_len < ihl + need) {
		return CY_PARSE_SHORT;
	}

	l4 = (void *)ip + ihl;
	switch (ip->protocol) {
	case CY_PROTO_TCP: {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end)
			return p->is_fragment ? CY_PARSE_FRAGMENT : CY_PARSE_SHORT;
		p->sport = tcp->source;
		p->dport = tcp->dest;
		p->policy_port = bpf_ntohs(tcp->dest);
		p->tcp_flags = ((__u8 *)tcp)[13];
		break;
	}
	case CY_PROTO_UDP:
	case CY_PROTO_SCTP: {
		/* UDP and SCTP both start with source and destination ports. */
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > data_end)
			return p->is_fragment ? CY_PARSE_FRAGMENT : CY_PARSE_SHORT;
		p->sport = udp->source;
		p->dport = udp->dest;
		p->policy_port = bpf_ntohs(udp->dest);
		break;
	}
	case CY_PROTO_ICMP: {
		struct icmphdr *icmp = l4;
		if ((void *)(icmp + 1) > data_end)
			return p->is_fragment ? CY_PARSE_FRAGMENT : CY_PARSE_SHORT;
		p->icmp_type = icmp->type;
		p->policy_port = icmp->type;
		if (icmp->type == CY_ICMP_ECHO_REQUEST)
			p->sport = icmp->un.echo.id;
		else if (icmp->type == CY_ICMP_ECHO_REPLY)
			p->dport = icmp->un.echo.id;
		break;
	}
	default:
		break;
	}
	return CY_PARSE_OK;
}

#endif /* CY_PARSE_H */
