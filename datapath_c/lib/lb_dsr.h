/* lb_dsr.h - direct server return (DSR) for north-south connections.
 *
 * A frontend flagged CY_LB_F_DSR whose new connection gets a backend on
 * another node of the cluster (CY_LB_BE_NODE; a backend outside the cluster
 * cannot answer by DSR and gets SNAT, as does a client packet whose IPv4
 * header already has options) keeps the client's address and
 * port: the entry node rewrites only the destination, and tells the
 * backend's node which frontend the client asked for in an IPv4 option
 * inserted right after the fixed header (struct cy_dsr_opt: CY_DSR_OPT_TYPE,
 * length 8, the frontend's port and address, network order). A TCP SYN
 * carries it (the backend's node needs it once per connection) and so does
 * every UDP datagram (no connection start to rely on). The packet goes on by
 * a route lookup (cy_ns_send), as on the SNAT path.
 *
 * The backend's node reads the option at the tc ingress of its own external
 * device (cy_dsr_learn) and writes the same reply entry a local backend's
 * connection has (backend -> client at egress, rewritten to frontend ->
 * client): the backend's answers leave that node straight for the client
 * (cy_ns_to_device) and never cross the entry node. The option is believed
 * only for a DSR frontend this node serves too: an ExternalIP or
 * LoadBalancer IP entry flagged CY_LB_F_DSR, or a NodePort of this node
 * flagged CY_LB_NP_DSR in cy_lb4_nodeport (for a NodePort the address is the
 * entry node's and is not checked against the nodes' addresses; that the
 * packet's destination is one of the frontend's backends is not checked
 * either). A live learnt entry is never replaced by an option naming another
 * frontend, nor by a new connection to a local backend through this node's
 * own frontends (cy_ns_new drops that SYN: the four addresses and ports are
 * in use), and cy_ns_forget_reused leaves live learnt entries alone; the
 * client's FIN or RST ends one (cy_dsr_client_ends), as the backend's does. The option stays
 * in the packet; Linux ignores an IPv4 option it does not know in a packet
 * it receives.
 *
 * Limits: a UDP datagram of a DSR connection whose IPv4 header has options,
 * or that the 8 bytes make too big for the route's MTU (within 8 bytes of
 * it), is dropped, counted CY_NS_DROP_DSR (TCP carries the option on the SYN
 * only).
 */
#ifndef CY_LIB_LB_DSR_H
#define CY_LIB_LB_DSR_H

#define CY_DSR_OPT_TYPE 0x9a /* copied into fragments (0x80), option class 0, number 26 */
#define CY_DSR_OPT_LEN 8
#define CY_NS_IP_BASE_LEN 20
#define CY_DSR_MAX_TOTAL (0xffff - CY_DSR_OPT_LEN)

struct cy_dsr_opt {
	__u8 type;
	__u8 len;
	__u16 port;    /* the frontend's port */
	__u32 address; /* the frontend's address */
};

/* The packets of a DSR connection that carry the option. */
static __always_inline int cy_dsr_carries(const struct cy_packet *p)
{
	return p->protocol == CY_PROTO_UDP ||
	       (p->protocol == CY_PROTO_TCP && (p->tcp_flags & (CY_TCP_SYN | CY_NS_TCP_ACK)) == CY_TCP_SYN);
}

/* Insert the option after the fixed IPv4 header: version/ihl, total length
 * and the header checksum follow; *total is the new IPv4 total length. The
 * packet's header must have no options. */
static __always_inline int cy_dsr_insert(struct __sk_buff *skb, __u32 frontend, __u16 port, __u16 *total_out)
{
	struct cy_dsr_opt opt = {.type = CY_DSR_OPT_TYPE, .len = CY_DSR_OPT_LEN, .port = port, .address = frontend};
	__u8 old[4], now[4];
	__u16 total;
	__s64 diff;

	if (bpf_skb_load_bytes(skb, CY_NS_ETH_HLEN, old, sizeof(old)) < 0)
		return -1;
	if ((old[0] & 0xf) != CY_NS_IP_BASE_LEN / 4)
		return -1;
	total = (__u16)old[2] << 8 | old[3];
	if (total > CY_DSR_MAX_TOTAL)
		return -1;
	total += CY_DSR_OPT_LEN;
	now[0] = old[0] + CY_DSR_OPT_LEN / 4;
	now[1] = old[1];
	now[2] = total >> 8;
	now[3] = total & 0xff;
	diff = bpf_csum_diff((__be32 *)old, sizeof(old), (__be32 *)now, sizeof(now), 0);
	diff = bpf_csum_diff(NULL, 0, (__be32 *)&opt, sizeof(opt), diff);
	if (diff < 0)
		return -1;
	if (bpf_skb_adjust_room(skb, CY_DSR_OPT_LEN, BPF_ADJ_ROOM_NET, 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, CY_NS_ETH_HLEN, now, sizeof(now), 0) < 0 ||
	    bpf_skb_store_bytes(skb, CY_NS_ETH_HLEN + CY_NS_IP_BASE_LEN, &opt, sizeof(opt), 0) < 0 ||
	    bpf_l3_csum_replace(skb, CY_NS_IP_CSUM, 0, diff, 0) < 0)
		return -1;
	*total_out = total;
	return 0;
}

/* The entry node: translate a DSR connection's packet (destination only, as
 * entry e says), add the option where it belongs, send it on. */
static __always_inline int cy_dsr_forward(struct __sk_buff *skb, const struct cy_packet *p, __u32 l4off,
					  const struct lb4_nat_entry *e, __u32 reason)
{
	__u32 daddr = e->daddr;
	__u16 dport = e->dport, total = 0;

	if (cy_ns_rewrite(skb, p, l4off, p->saddr, p->sport, daddr, dport) < 0)
		return cy_ns_drop(CY_NS_DROP_REWRITE);
	if (!cy_dsr_carries(p)) {
		cy_ns_count(reason);
		return cy_ns_send(skb, p->saddr, daddr, p->protocol, 0, CY_NS_DROP_NO_ROUTE);
	}
	if (cy_dsr_insert(skb, p->daddr, p->dport, &total) < 0)
		return cy_ns_drop(CY_NS_DROP_DSR);
	cy_ns_count(reason);
	/* the IPv4 length with the option, checked against the route's MTU */
	return cy_ns_send(skb, p->saddr, daddr, p->protocol, total, CY_NS_DROP_DSR);
}

/* A DSR frontend named by an option, as this node serves it. */
static __always_inline int cy_dsr_frontend_served(const struct cy_dsr_opt *opt, __u8 proto)
{
	struct lb4_key fkey = {.address = opt->address, .dport = opt->port, .proto = proto};
	struct lb4_nodeport_key npkey = {.port = opt->port, .proto = proto};
	struct lb4_service *svc = cy_lb4_svc.lookup(&fkey);
	__u8 *np;

	if (svc)
		return (svc->flags & (CY_LB_F_EXTERNAL | CY_LB_F_DSR)) == (CY_LB_F_EXTERNAL | CY_LB_F_DSR);
	np = cy_lb4_nodeport.lookup(&npkey);
	return np && (*np & CY_LB_NP_DSR);
}

/* The backend's node: a client's FIN or RST on a DSR connection sent here
 * marks its learnt entry closing (short lifetime), as the backend's own FIN
 * or RST does on its way out (cy_ns_refresh): a client that resets ends the
 * connection for this node too. */
static __always_inline void cy_dsr_client_ends(const struct cy_packet *p, __u64 now)
{
	struct lb4_nat_key rkey = {};
	struct lb4_nat_entry *e;

	if (p->protocol != CY_PROTO_TCP || !(p->tcp_flags & (CY_TCP_FIN | CY_TCP_RST)))
		return;
	cy_ns_reply_key(p, &rkey);
	e = cy_lb4_nat.lookup(&rkey);
	if (e && (e->flags & CY_NAT_F_DSR_LEARNT) && !(e->flags & CY_NAT_F_CLOSING)) {
		e->flags |= CY_NAT_F_CLOSING;
		e->expires = now + CY_LB_NAT_LIFETIME_CLOSE;
	}
}

/* The backend's node: a packet for no frontend (a local pod's address) that
 * carries the option of a frontend this node serves from outside: remember
 * its connection's reply entry. */
static __always_inline void cy_dsr_learn(struct __sk_buff *skb, const struct cy_packet *p, __u64 now)
{
	struct cy_dsr_opt opt = {};
	struct lb4_nat_key rkey = {};
	struct lb4_nat_entry rev = {};
	struct lb4_nat_entry *old;
	__u8 vihl;

	if (!cy_dsr_carries(p) || p->is_fragment)
		return;
	if (bpf_skb_load_bytes(skb, CY_NS_ETH_HLEN, &vihl, 1) < 0 ||
	    (vihl & 0xf) != (CY_NS_IP_BASE_LEN + CY_DSR_OPT_LEN) / 4)
		return;
	if (bpf_skb_load_bytes(skb, CY_NS_ETH_HLEN + CY_NS_IP_BASE_LEN, &opt, sizeof(opt)) < 0 ||
	    opt.type != CY_DSR_OPT_TYPE || opt.len != CY_DSR_OPT_LEN)
		return;
	if (!cy_dsr_frontend_served(&opt, p->protocol))
		return;
	cy_ns_reply_key(p, &rkey);
	old = cy_lb4_nat.lookup(&rkey);
	if (old && old->expires >= now && !(old->flags & CY_NAT_F_CLOSING) &&
	    (old->saddr != opt.address || old->sport != opt.port))
		return; /* a live connection of another frontend: never taken over */
	rev.flags = CY_NAT_F_DSR_LEARNT;
	rev.expires = now + cy_ns_lifetime(p, 0);
	rev.saddr = opt.address;
	rev.sport = opt.port;
	rev.daddr = p->saddr;
	rev.dport = p->sport;
	cy_lb4_nat.update(&rkey, &rev);
	cy_ns_count(CY_NS_DSR_LEARNT);
}

#endif /* CY_LIB_LB_DSR_H */
