/* lb_icmp_error.h - ICMP errors about a north-south connection, translated
 * like the connection's replies.
 *
 * A backend (or a router on its way) that answers a translated packet with an
 * ICMP error (destination unreachable: port unreachable, fragmentation needed;
 * time exceeded; parameter problem) quotes the packet it got: the backend's
 * address and port, and the client's as the translation left them (this
 * node's SNAT address and port for a backend elsewhere). Its client must see
 * the error about the connection it opened, or a UDP client waits out its
 * timeout instead of being refused and TCP path MTU discovery never learns.
 * So the error takes the reply entry of the quoted packet (its reply is what
 * cy_lb4_nat keys at this hook: the quoted packet's addresses and ports
 * swapped), and like a reply:
 *   - the quoted packet becomes client -> frontend (addresses, ports, its IPv4
 *     header checksum and its UDP or TCP checksum when the quote holds it);
 *   - the error goes to the client; its source, when it is the backend itself,
 *     becomes the frontend (a router's address stays);
 *   - the ICMP checksum follows every changed word of the quote (ICMP has no
 *     pseudo-header: the outer addresses do not enter it).
 * At the device's ingress (a backend elsewhere, SNAT) the error is sent on to
 * the client by a route lookup (lib/lb_nat.h's cy_ns_send); at its egress (a
 * local backend's error leaving for the client) it goes on. Counted as a reply
 * (CY_NS_REPLY). Quotes with IPv4 options, of other protocols, of a later
 * fragment or with less than 8 bytes of L4 header, fragmented errors, errors
 * about DSR connections (the backend's node learnt them: lib/lb_dsr.h) and
 * every other ICMP message pass untouched.
 */
#ifndef CY_LIB_LB_ICMP_ERROR_H
#define CY_LIB_LB_ICMP_ERROR_H

#define CY_ICMP_DEST_UNREACH 3
#define CY_ICMP_TIME_EXCEEDED 11
#define CY_ICMP_PARAMETERPROB 12
#define CY_ICMP_HLEN 8

/* A word of the quote rewritten (an address, size 4, or a port, size 2; network
 * order, at off): the ICMP checksum (at csum) follows it. A port is stored
 * from a 16-bit copy, whatever the host's byte order. */
static __always_inline int cy_icmp_quote_word(struct __sk_buff *skb, __u32 csum, __u32 off, __u32 old, __u32 new,
					      __u32 size)
{
	__u16 port = new;

	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, csum, old, new, size) < 0 ||
	    bpf_skb_store_bytes(skb, off, size == 2 ? (void *)&port : (void *)&new, size, 0) < 0)
		return -1;
	return 0;
}

/* A checksum inside the quote updated for a changed word (flags: the
 * helper's size and BPF_F_MARK_MANGLED_0 for UDP), the ICMP checksum
 * following the checksum's own change. */
static __always_inline int cy_icmp_quote_csum(struct __sk_buff *skb, __u32 csum, __u32 at, __u32 old, __u32 new,
					      __u64 flags, int l3)
{
	__u16 before = 0, after = 0;
	int rc;

	if (old == new)
		return 0;
	if (bpf_skb_load_bytes(skb, at, &before, 2) < 0)
		return -1;
	rc = l3 ? bpf_l3_csum_replace(skb, at, old, new, flags) : bpf_l4_csum_replace(skb, at, old, new, flags);
	if (rc < 0 || bpf_skb_load_bytes(skb, at, &after, 2) < 0)
		return -1;
	if (before != after && bpf_l4_csum_replace(skb, csum, before, after, 2) < 0)
		return -1;
	return 0;
}

/* An ICMP error at this device's hook (CY_NAT_AT_INGRESS / _EGRESS). */
static __always_inline int cy_ns_icmp_error(struct __sk_buff *skb, const struct cy_packet *p, __u8 hook)
{
	struct lb4_nat_key key = {};
	struct lb4_nat_entry *e;
	__u32 l4off, quote, ql4, csum, addrs[2], outer_s = p->saddr, outer_d = p->daddr, client, frontend;
	__u16 ports[2], frag = 0, client_port, frontend_port;
	__u32 l4csum = 0;
	__u64 l4flags = 0;
	__u8 vihl = 0, proto = 0, flags;
	__u64 now;

	if (p->is_fragment || (p->icmp_type != CY_ICMP_DEST_UNREACH && p->icmp_type != CY_ICMP_TIME_EXCEEDED &&
			       p->icmp_type != CY_ICMP_PARAMETERPROB))
		return TC_ACT_OK;
	if (cy_ns_l4_offset(skb, &l4off) < 0)
		return TC_ACT_OK;
	csum = l4off + 2;
	quote = l4off + CY_ICMP_HLEN;
	/* an IPv4 quote without options, not a later fragment, of TCP or UDP, with 8 bytes of its L4 header */
	if (bpf_skb_load_bytes(skb, quote, &vihl, 1) < 0 || vihl != 0x45 ||
	    bpf_skb_load_bytes(skb, quote + 6, &frag, 2) < 0 || (frag & bpf_htons(CY_IP_OFFSET)) ||
	    bpf_skb_load_bytes(skb, quote + 9, &proto, 1) < 0 || (proto != CY_PROTO_TCP && proto != CY_PROTO_UDP) ||
	    bpf_skb_load_bytes(skb, quote + 12, addrs, 8) < 0)
		return TC_ACT_OK;
	ql4 = quote + 20;
	if (skb->len < ql4 + 8 || bpf_skb_load_bytes(skb, ql4, ports, 4) < 0)
		return TC_ACT_OK;
	key.saddr = addrs[1];
	key.sport = ports[1];
	key.daddr = addrs[0];
	key.dport = ports[0];
	key.proto = proto;
	key.hook = hook;
	e = cy_lb4_nat.lookup(&key);
	now = bpf_ktime_get_coarse_ns();
	if (!e || e->expires < now || e->backend_id || (e->flags & CY_NAT_F_DSR_LEARNT))
		return TC_ACT_OK;
	/* read once: the LRU entry may be rewritten beside this packet */
	client = e->daddr;
	client_port = e->dport;
	frontend = e->saddr;
	frontend_port = e->sport;
	flags = e->flags;
	/* the quoted packet's L4 checksum, when the quote holds it (a UDP 0 stays 0) */
	if (proto == CY_PROTO_UDP) {
		l4csum = ql4 + 6;
		l4flags = BPF_F_MARK_MANGLED_0;
	} else if (skb->len >= ql4 + 18) {
		l4csum = ql4 + 16;
	}
	/* the quote: client -> frontend */
	if (cy_icmp_quote_word(skb, csum, quote + 12, addrs[0], client, 4) < 0 ||
	    cy_icmp_quote_csum(skb, csum, quote + 10, addrs[0], client, 4, 1) < 0 ||
	    (l4csum && cy_icmp_quote_csum(skb, csum, l4csum, addrs[0], client, l4flags | 4, 0) < 0) ||
	    cy_icmp_quote_word(skb, csum, quote + 16, addrs[1], frontend, 4) < 0 ||
	    cy_icmp_quote_csum(skb, csum, quote + 10, addrs[1], frontend, 4, 1) < 0 ||
	    (l4csum && cy_icmp_quote_csum(skb, csum, l4csum, addrs[1], frontend, l4flags | 4, 0) < 0) ||
	    cy_icmp_quote_word(skb, csum, ql4, ports[0], client_port, 2) < 0 ||
	    (l4csum && cy_icmp_quote_csum(skb, csum, l4csum, ports[0], client_port, l4flags | 2, 0) < 0) ||
	    cy_icmp_quote_word(skb, csum, ql4 + 2, ports[1], frontend_port, 2) < 0 ||
	    (l4csum && cy_icmp_quote_csum(skb, csum, l4csum, ports[1], frontend_port, l4flags | 2, 0) < 0))
		return cy_ns_drop(CY_NS_DROP_REWRITE);
	/* the error itself: to the client, from the frontend when the backend sent it */
	if (outer_s == addrs[1]) {
		if (bpf_l3_csum_replace(skb, CY_NS_IP_CSUM, outer_s, frontend, 4) < 0 ||
		    bpf_skb_store_bytes(skb, CY_NS_IP_SADDR, &frontend, 4, 0) < 0)
			return cy_ns_drop(CY_NS_DROP_REWRITE);
		outer_s = frontend;
	}
	if (outer_d != client) {
		if (bpf_l3_csum_replace(skb, CY_NS_IP_CSUM, outer_d, client, 4) < 0 ||
		    bpf_skb_store_bytes(skb, CY_NS_IP_DADDR, &client, 4, 0) < 0)
			return cy_ns_drop(CY_NS_DROP_REWRITE);
		outer_d = client;
	}
	cy_ns_count(CY_NS_REPLY);
	if (!(flags & CY_NAT_F_REDIRECT))
		return TC_ACT_OK;
	return cy_ns_send(skb, outer_s, outer_d, CY_PROTO_ICMP, 0, CY_NS_DROP_NO_ROUTE);
}

#endif /* CY_LIB_LB_ICMP_ERROR_H */
