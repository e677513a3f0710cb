/* lb_nat.h - rewriting a north-south packet as a cy_lb4_nat entry says, and
 * sending it on.
 *
 * Shared by the device programs (lib/lb_nodeport.h, lib/lb_reject.h): the
 * outcome counters (cy_lb4_nsct), entry lifetimes and refresh, the L4 offset,
 * the address/port rewrite with incremental checksum updates
 * (bpf_l3_csum_replace; bpf_l4_csum_replace with BPF_F_PSEUDO_HDR for
 * addresses and BPF_F_MARK_MANGLED_0 for UDP, so a 0 UDP checksum stays 0 and
 * a partial checksum the device completes stays right) and the route lookup
 * that sends a SNATed packet back out (bpf_fib_lookup, then bpf_redirect, or
 * bpf_redirect_neigh while the neighbour is unresolved).
 */
#ifndef CY_LIB_LB_NAT_H
#define CY_LIB_LB_NAT_H

#define CY_NS_ETH_HLEN 14
#define CY_NS_IP_CSUM (CY_NS_ETH_HLEN + 10)
#define CY_NS_IP_SADDR (CY_NS_ETH_HLEN + 12)
#define CY_NS_IP_DADDR (CY_NS_ETH_HLEN + 16)
#define CY_NS_TCP_ACK 0x10
#define CY_NS_AF_INET 2

/* NAT entry lifetimes (ns): TCP 6 h once past the SYN, 60 s for a SYN not
 * answered yet and for UDP, 10 s after FIN or RST; LRU evicts under pressure. */
#define CY_LB_NAT_LIFETIME_TCP (21600ULL * 1000000000ULL)
#define CY_LB_NAT_LIFETIME_SYN (60ULL * 1000000000ULL)
#define CY_LB_NAT_LIFETIME_OTHER (60ULL * 1000000000ULL)
#define CY_LB_NAT_LIFETIME_CLOSE (10ULL * 1000000000ULL)
#define CY_LB_SNAT_TRIES 8 /* random SNAT ports tried before CY_NS_DROP_NAT_PORTS */

static __always_inline void cy_ns_count(__u32 reason)
{
	__u64 *n = cy_lb4_nsct.lookup(&reason);

	if (n)
		*n += 1;
}

static __always_inline int cy_ns_drop(__u32 reason)
{
	cy_ns_count(reason);
	return TC_ACT_SHOT;
}

static __always_inline __u64 cy_ns_lifetime(const struct cy_packet *p, __u8 flags)
{
	if (p->protocol != CY_PROTO_TCP)
		return CY_LB_NAT_LIFETIME_OTHER;
	if ((flags & CY_NAT_F_CLOSING) || (p->tcp_flags & (CY_TCP_FIN | CY_TCP_RST)))
		return CY_LB_NAT_LIFETIME_CLOSE;
	if ((p->tcp_flags & (CY_TCP_SYN | CY_NS_TCP_ACK)) == CY_TCP_SYN)
		return CY_LB_NAT_LIFETIME_SYN;
	return CY_LB_NAT_LIFETIME_TCP;
}

/* Keep a live entry ahead of its deadline: written at most once a second,
 * and once when the connection starts closing. */
static __always_inline void cy_ns_refresh(struct lb4_nat_entry *e, const struct cy_packet *p, __u64 now)
{
	__u64 life;

	if (p->protocol == CY_PROTO_TCP && (p->tcp_flags & (CY_TCP_FIN | CY_TCP_RST)) &&
	    !(e->flags & CY_NAT_F_CLOSING)) {
		e->flags |= CY_NAT_F_CLOSING;
		e->expires = now + CY_LB_NAT_LIFETIME_CLOSE;
		return;
	}
	life = cy_ns_lifetime(p, e->flags);
	if (e->expires < now + life - CY_CT_REFRESH)
		e->expires = now + life;
}

static __always_inline void cy_ns_key(const struct cy_packet *p, __u8 hook, struct lb4_nat_key *key)
{
	key->saddr = p->saddr;
	key->daddr = p->daddr;
	key->sport = p->sport;
	key->dport = p->dport;
	key->proto = p->protocol;
	key->hook = hook;
}

/* The key of the reply entry a local backend's answers to p meet at the
 * device's egress: p's addresses and ports swapped. */
static __always_inline void cy_ns_reply_key(const struct cy_packet *p, struct lb4_nat_key *key)
{
	key->saddr = p->daddr;
	key->sport = p->dport;
	key->daddr = p->saddr;
	key->dport = p->sport;
	key->proto = p->protocol;
	key->hook = CY_NAT_AT_EGRESS;
}

/* Offset of the L4 header (after Ethernet and the IPv4 header with options). */
static __always_inline int cy_ns_l4_offset(struct __sk_buff *skb, __u32 *l4off)
{
	__u8 vihl;

	if (bpf_skb_load_bytes(skb, CY_NS_ETH_HLEN, &vihl, 1) < 0)
		return -1;
	*l4off = CY_NS_ETH_HLEN + (vihl & 0xf) * 4;
	return 0;
}

/* Rewrite p's addresses and ports to those of `to`, checksums included. */
static __always_inline int cy_ns_rewrite(struct __sk_buff *skb, const struct cy_packet *p, __u32 l4off,
					 __u32 saddr, __u16 sport, __u32 daddr, __u16 dport)
{
	__u32 csum = l4off + (p->protocol == CY_PROTO_TCP ? 16 : 6);
	__u64 l4flags = p->protocol == CY_PROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (saddr != p->saddr) {
		if (bpf_l4_csum_replace(skb, csum, p->saddr, saddr, l4flags | BPF_F_PSEUDO_HDR | 4) < 0 ||
		    bpf_l3_csum_replace(skb, CY_NS_IP_CSUM, p->saddr, saddr, 4) < 0 ||
		    bpf_skb_store_bytes(skb, CY_NS_IP_SADDR, &saddr, 4, 0) < 0)
			return -1;
	}
	if (daddr != p->daddr) {
		if (bpf_l4_csum_replace(skb, csum, p->daddr, daddr, l4flags | BPF_F_PSEUDO_HDR | 4) < 0 ||
		    bpf_l3_csum_replace(skb, CY_NS_IP_CSUM, p->daddr, daddr, 4) < 0 ||
		    bpf_skb_store_bytes(skb, CY_NS_IP_DADDR, &daddr, 4, 0) < 0)
			return -1;
	}
	if (sport != p->sport) {
		if (bpf_l4_csum_replace(skb, csum, p->sport, sport, l4flags | 2) < 0 ||
		    bpf_skb_store_bytes(skb, l4off, &sport, 2, 0) < 0)
			return -1;
	}
	if (dport != p->dport) {
		if (bpf_l4_csum_replace(skb, csum, p->dport, dport, l4flags | 2) < 0 ||
		    bpf_skb_store_bytes(skb, l4off + 2, &dport, 2, 0) < 0)
			return -1;
	}
	return 0;
}

/* bcc declares bpf_redirect_neigh with three arguments; the kernel's has four
 * (ifindex, params, params length, flags). */
static long (*cy_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

/* Send a translated packet on by a route lookup for its new destination.
 * tot_len 0: the kernel checks the skb against the device (GSO aware);
 * otherwise the IPv4 total length checked against the route's MTU. A packet
 * too big is dropped, counted as `too_big`. */
static __always_inline int cy_ns_send(struct __sk_buff *skb, __u32 saddr, __u32 daddr, __u8 proto, __u16 tot_len,
				      __u32 too_big)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	fib.family = CY_NS_AF_INET;
	fib.l4_protocol = proto;
	fib.tot_len = tot_len;
	fib.ipv4_src = saddr;
	fib.ipv4_dst = daddr;
	fib.ifindex = skb->ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib.dmac, 6, 0) < 0 ||
		    bpf_skb_store_bytes(skb, 6, fib.smac, 6, 0) < 0)
			return cy_ns_drop(CY_NS_DROP_REWRITE);
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return cy_redirect_neigh(fib.ifindex, 0, 0, 0);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return cy_ns_drop(too_big);
	return cy_ns_drop(CY_NS_DROP_NO_ROUTE);
}

/* Translate p as entry e says; count `reason` when it goes on. */
static __always_inline int cy_ns_apply(struct __sk_buff *skb, const struct cy_packet *p, __u32 l4off,
				       const struct lb4_nat_entry *e, __u32 reason)
{
	__u32 saddr = e->saddr, daddr = e->daddr;
	__u16 sport = e->sport, dport = e->dport;
	__u8 flags = e->flags;

	if (cy_ns_rewrite(skb, p, l4off, saddr, sport, daddr, dport) < 0)
		return cy_ns_drop(CY_NS_DROP_REWRITE);
	cy_ns_count(reason);
	if (!(flags & CY_NAT_F_REDIRECT))
		return TC_ACT_OK;
	return cy_ns_send(skb, saddr, daddr, p->protocol, 0, CY_NS_DROP_NO_ROUTE);
}

#endif /* CY_LIB_LB_NAT_H */
