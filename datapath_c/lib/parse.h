/* parse.h - Ethernet/IPv4/L4 parsing with direct packet access.
 *
 * cy_parse() fills a struct cy_packet: addresses, ports, the port used for
 * policy (destination port, or the ICMP type for ICMP) and the conntrack
 * ports (ICMP echo id). Non-IPv4 frames (ARP, IPv6, ...) return CY_PARSE_SKIP
 * and are passed by the caller. Non-first fragments carry no L4 header: they
 * are evaluated with port 0 (only "any port" entries can allow them).
 */
#ifndef CY_PARSE_H
#define CY_PARSE_H

#define CY_PARSE_SKIP 0   /* not IPv4: not ours */
#define CY_PARSE_OK 1     /* fully parsed */
#define CY_PARSE_SHORT 2  /* IPv4 but L4 header truncated */

struct cy_packet {
	__u32 saddr;
	__u32 daddr;
	__be16 sport;       /* conntrack ports (network order) */
	__be16 dport;
	__u16 policy_port;  /* host order: dport, ICMP type, or 0 */
	__u8 protocol;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 is_fragment;   /* non-first fragment */
	__u16 pad;
	__u32 len;
};

static __always_inline int cy_parse(struct __sk_buff *skb, struct cy_packet *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	void *l4;
	__u32 ihl;

	if ((void *)(eth + 1) > data_end)
		return CY_PARSE_SKIP;
	if (eth->h_proto != bpf_htons(CY_ETH_P_IP))
		return CY_PARSE_SKIP;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return CY_PARSE_SKIP;
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return CY_PARSE_SKIP;

	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->protocol = ip->protocol;
	p->len = skb->len;
	if (ip->frag_off & bpf_htons(CY_IP_OFFSET)) {
		p->is_fragment = 1;
		return CY_PARSE_OK;
	}

	l4 = (void *)ip + ihl;
	switch (ip->protocol) {
	case CY_PROTO_TCP: {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end)
			return CY_PARSE_SHORT;
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
			return CY_PARSE_SHORT;
		p->sport = udp->source;
		p->dport = udp->dest;
		p->policy_port = bpf_ntohs(udp->dest);
		break;
	}
	case CY_PROTO_ICMP: {
		struct icmphdr *icmp = l4;
		if ((void *)(icmp + 1) > data_end)
			return CY_PARSE_SHORT;
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
