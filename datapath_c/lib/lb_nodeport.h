/* lb_nodeport.h - north-south load balancing on a node's external device (tc).
 *
 * A TCP or UDP packet arriving on the device (cy_ns_from_device, tc ingress)
 * for a frontend the agent marked external (CY_LB_F_EXTERNAL: a NodePort, an
 * ExternalIP or a LoadBalancer IP; ClusterIPs are not served from outside)
 * gets a backend once per connection, remembered in cy_lb4_nat:
 *   - a backend on this node (CY_LB_BE_LOCAL): the destination becomes the
 *     backend, the client's address stays; the node's stack routes the packet
 *     to the pod's veth, where the pod's ingress policy sees the client. The
 *     reply leaves through this device, where cy_ns_to_device (tc egress)
 *     puts the frontend back as its source;
 *   - a backend elsewhere: the destination becomes the backend and the source
 *     this device's address (cy_lb4_dev) and a port of
 *     CY_LB_SNAT_PORT_MIN..MAX, so the reply comes back here; the backend's
 *     policy sees this node's address. The reply (backend -> that address and
 *     port) is translated back to frontend -> client on ingress. Both are sent
 *     on by a route lookup (bpf_fib_lookup, then bpf_redirect, or
 *     bpf_redirect_neigh when the neighbour is not resolved yet), bypassing
 *     the node's input path, which would refuse its own address as a source.
 * A frontend without backends refuses a TCP SYN with a RST (cy_ns_reset) and
 * drops everything else, UDP included (CY_NS_DROP_NO_BACKEND: no ICMP port
 * unreachable is built); with
 * externalTrafficPolicy Local the frontend's external entry (scope
 * CY_LB_SCOPE_EXTERNAL) holds this node's backends only, and none here drops
 * (CY_NS_DROP_NO_LOCAL). Fragments of such packets cannot be translated and
 * are dropped (CY_NS_DROP_FRAGMENT); every other fragment, non-TCP/UDP
 * packet (ICMP, SCTP, ...) and non-IPv4 packet passes untouched. Checksums are
 * updated incrementally (bpf_l3_csum_replace, bpf_l4_csum_replace with the
 * pseudo-header flag for addresses; a UDP checksum of 0 stays 0). A known
 * connection whose backend left the maps picks a new one.
 */
#ifndef CY_LIB_LB_NODEPORT_H
#define CY_LIB_LB_NODEPORT_H

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

/* Send a translated packet on by a route lookup for its new destination. */
static __always_inline int cy_ns_send(struct __sk_buff *skb, __u32 saddr, __u32 daddr, __u8 proto)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	fib.family = CY_NS_AF_INET;
	fib.l4_protocol = proto;
	fib.tot_len = 0; /* the kernel checks the skb itself (GSO aware) */
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
	return cy_ns_send(skb, saddr, daddr, p->protocol);
}

/* The forward entry's backend is still the one the maps hold under its id. */
static __always_inline int cy_ns_backend_alive(const struct lb4_nat_entry *e)
{
	__u32 id = e->backend_id;
	struct lb4_backend *be = cy_lb4_be.lookup(&id);

	return be && be->address == e->daddr && be->port == e->dport;
}

/* A free SNAT port towards (backend, port) on `snat`: the reply entry is
 * written under it. Returns the port (network order) or 0. */
static __always_inline __u16 cy_ns_snat_port(struct lb4_nat_key *rkey, struct lb4_nat_entry *rev, __u64 now)
{
	struct lb4_nat_entry *old;
	__u16 port;

#pragma unroll
	for (int i = 0; i < CY_LB_SNAT_TRIES; i++) {
		port = CY_LB_SNAT_PORT_MIN + bpf_get_prandom_u32() % (CY_LB_SNAT_PORT_MAX - CY_LB_SNAT_PORT_MIN + 1);
		rkey->dport = bpf_htons(port);
		old = cy_lb4_nat.lookup(rkey);
		if (old && old->expires >= now)
			continue;
		if (cy_lb4_nat.update(rkey, rev) == 0)
			return rkey->dport;
	}
	return 0;
}

/* Refuse a TCP SYN (no ACK, no payload, IPv4 header without options) to a
 * frontend without backends as kube-proxy's REJECT does: the SYN becomes, in
 * place, a RST|ACK from the frontend (seq 0, ack = the SYN's seq + 1, TCP
 * options cut off) sent back out of the device. Checksums are updated with the
 * replace helpers only, so a checksum the device completes later (partial)
 * stays right: swapping the addresses and the ports changes no sum. */
static __always_inline int cy_ns_reset(struct __sk_buff *skb, __u32 l4off)
{
	struct iphdr ip;
	struct tcphdr tcp;
	__u8 macs[12], swapped[12];
	__u32 csum = l4off + 16, doff, tot, word, seq, ack;
	__u16 flags_old, flags_new, zero16 = 0;

	if (l4off != CY_NS_ETH_HLEN + sizeof(ip) || bpf_skb_load_bytes(skb, CY_NS_ETH_HLEN, &ip, sizeof(ip)) < 0 ||
	    bpf_skb_load_bytes(skb, l4off, &tcp, sizeof(tcp)) < 0 || bpf_skb_load_bytes(skb, 0, macs, 12) < 0)
		return cy_ns_drop(CY_NS_DROP_NO_BACKEND);
	doff = tcp.doff * 4;
	tot = bpf_ntohs(ip.tot_len);
	if (doff < sizeof(tcp) || tot != sizeof(ip) + doff)
		return cy_ns_drop(CY_NS_DROP_NO_BACKEND);
	seq = tcp.seq;
	ack = bpf_htonl(bpf_ntohl(tcp.seq) + 1);
	__builtin_memcpy(&flags_old, (__u8 *)&tcp + 12, 2);
	((__u8 *)&flags_new)[0] = 0x50;          /* data offset 5 words */
	((__u8 *)&flags_new)[1] = 0x14;          /* RST | ACK */
	if (bpf_l4_csum_replace(skb, csum, seq, 0, 4) < 0 || bpf_l4_csum_replace(skb, csum, tcp.ack_seq, ack, 4) < 0 ||
	    bpf_l4_csum_replace(skb, csum, flags_old, flags_new, 2) < 0 ||
	    bpf_l4_csum_replace(skb, csum, tcp.window, 0, 2) < 0 ||
	    bpf_l4_csum_replace(skb, csum, tcp.urg_ptr, 0, 2) < 0 ||
	    bpf_l4_csum_replace(skb, csum, bpf_htons(doff), bpf_htons(sizeof(tcp)), BPF_F_PSEUDO_HDR | 2) < 0 ||
	    bpf_l3_csum_replace(skb, CY_NS_IP_CSUM, ip.tot_len, bpf_htons(sizeof(ip) + sizeof(tcp)), 2) < 0)
		return cy_ns_drop(CY_NS_DROP_REWRITE);
#pragma unroll
	for (int i = 0; i < 10; i++) { /* the options leave the segment: their words leave the sum */
		if ((__u32)(sizeof(tcp) + i * 4) >= doff)
			break;
		if (bpf_skb_load_bytes(skb, l4off + sizeof(tcp) + i * 4, &word, 4) < 0 ||
		    bpf_l4_csum_replace(skb, csum, word, 0, 4) < 0)
			return cy_ns_drop(CY_NS_DROP_REWRITE);
	}
	if (bpf_skb_load_bytes(skb, csum, &tcp.check, 2) < 0 ||
	    bpf_skb_load_bytes(skb, CY_NS_IP_CSUM, &ip.check, 2) < 0)
		return cy_ns_drop(CY_NS_DROP_REWRITE);
	word = ip.saddr;
	ip.saddr = ip.daddr;
	ip.daddr = word;
	ip.tot_len = bpf_htons(sizeof(ip) + sizeof(tcp));
	flags_old = tcp.source;
	tcp.source = tcp.dest;
	tcp.dest = flags_old;
	tcp.seq = 0;
	tcp.ack_seq = ack;
	__builtin_memcpy((__u8 *)&tcp + 12, &flags_new, 2);
	tcp.window = zero16;
	tcp.urg_ptr = zero16;
	__builtin_memcpy(swapped, macs + 6, 6);
	__builtin_memcpy(swapped + 6, macs, 6);
	if (bpf_skb_store_bytes(skb, 0, swapped, 12, 0) < 0 ||
	    bpf_skb_store_bytes(skb, CY_NS_ETH_HLEN, &ip, sizeof(ip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, l4off, &tcp, sizeof(tcp), 0) < 0 ||
	    bpf_skb_change_tail(skb, l4off + sizeof(tcp), 0) < 0)
		return cy_ns_drop(CY_NS_DROP_REWRITE);
	cy_ns_count(CY_NS_DROP_NO_BACKEND);
	cy_ns_count(CY_NS_RST_SENT);
	return bpf_redirect(skb->ifindex, 0);
}

/* A new connection to frontend `svc` (slot 0 entry of `key`): choose its
 * backend, write both NAT entries, translate. */
static __always_inline int cy_ns_new(struct __sk_buff *skb, const struct cy_packet *p, __u32 l4off,
				     struct lb4_key *key, struct lb4_service *svc, struct lb4_nat_key *nkey,
				     __u32 snat, __u64 now)
{
	struct lb4_nat_entry fwd = {}, rev = {};
	struct lb4_nat_key rkey = {};
	struct lb4_service *entry;
	struct lb4_backend *be;
	__u32 backend_id, frontend_id = svc->backend_id;
	__u64 life = cy_ns_lifetime(p, 0);

	if (svc->count == 0) {
		if (svc->flags & CY_LB_F_NO_LOCAL)
			return cy_ns_drop(CY_NS_DROP_NO_LOCAL);
		if (p->protocol == CY_PROTO_TCP && (p->tcp_flags & (CY_TCP_SYN | CY_NS_TCP_ACK)) == CY_TCP_SYN)
			return cy_ns_reset(skb, l4off);
		return cy_ns_drop(CY_NS_DROP_NO_BACKEND);
	}
	key->slot = (__u16)(bpf_get_prandom_u32() % svc->count) + 1;
	entry = cy_lb4_svc.lookup(key);
	if (!entry)
		return cy_ns_drop(CY_NS_DROP_NO_BACKEND);
	backend_id = entry->backend_id;
	be = cy_lb4_be.lookup(&backend_id);
	if (!be)
		return cy_ns_drop(CY_NS_DROP_NO_BACKEND);
	fwd.expires = rev.expires = now + life;
	fwd.daddr = be->address;
	fwd.dport = be->port;
	fwd.backend_id = backend_id;
	fwd.frontend_id = frontend_id;
	rev.saddr = p->daddr;
	rev.sport = p->dport;
	rev.daddr = p->saddr;
	rev.dport = p->sport;
	rkey.saddr = be->address;
	rkey.sport = be->port;
	rkey.proto = p->protocol;
	if (be->flags & CY_LB_BE_LOCAL) {
		fwd.saddr = p->saddr;
		fwd.sport = p->sport;
		rkey.daddr = p->saddr;
		rkey.dport = p->sport;
		rkey.hook = CY_NAT_AT_EGRESS;
		cy_lb4_nat.update(&rkey, &rev);
	} else {
		if (!snat)
			return cy_ns_drop(CY_NS_DROP_NO_ROUTE);
		rev.flags = CY_NAT_F_REDIRECT;
		fwd.flags = CY_NAT_F_REDIRECT;
		fwd.saddr = snat;
		rkey.daddr = snat;
		rkey.hook = CY_NAT_AT_INGRESS;
		fwd.sport = cy_ns_snat_port(&rkey, &rev, now);
		if (!fwd.sport)
			return cy_ns_drop(CY_NS_DROP_NAT_PORTS);
	}
	cy_lb4_nat.update(nkey, &fwd);
	return cy_ns_apply(skb, p, l4off, &fwd, CY_NS_NEW);
}

/* tc ingress of an external device. */
static __always_inline int cy_ns_from_device(struct __sk_buff *skb)
{
	struct cy_packet p = {};
	struct lb4_nat_key nkey = {};
	struct lb4_key key = {};
	struct lb4_nat_entry *e;
	struct lb4_service *svc;
	struct lb4_device *dev;
	__u32 ifindex = skb->ifindex, l4off, snat;
	__u64 now;

	dev = cy_lb4_dev.lookup(&ifindex);
	if (!dev)
		return TC_ACT_OK;
	snat = dev->snat_addr;
	if (cy_parse(skb, &p) != CY_PARSE_OK || (p.protocol != CY_PROTO_TCP && p.protocol != CY_PROTO_UDP))
		return TC_ACT_OK; /* not IPv4 TCP/UDP, or a fragment without ports: not ours */
	if (cy_ns_l4_offset(skb, &l4off) < 0)
		return TC_ACT_OK;
	now = bpf_ktime_get_coarse_ns();
	cy_ns_key(&p, CY_NAT_AT_INGRESS, &nkey);
	e = cy_lb4_nat.lookup(&nkey);
	if (e && e->expires >= now) {
		if (p.is_fragment)
			return cy_ns_drop(CY_NS_DROP_FRAGMENT);
		if (!e->backend_id) {
			cy_ns_refresh(e, &p, now);
			return cy_ns_apply(skb, &p, l4off, e, CY_NS_REPLY);
		}
		if (cy_ns_backend_alive(e)) {
			cy_ns_refresh(e, &p, now);
			return cy_ns_apply(skb, &p, l4off, e, CY_NS_FORWARD);
		}
	}
	key.address = p.daddr;
	key.dport = p.dport;
	key.proto = p.protocol;
	svc = cy_lb4_svc.lookup(&key);
	if (!svc || !(svc->flags & CY_LB_F_EXTERNAL))
		return TC_ACT_OK;
	if (p.is_fragment)
		return cy_ns_drop(CY_NS_DROP_FRAGMENT);
	if (svc->flags & CY_LB_F_EXT_LOCAL) {
		key.scope = CY_LB_SCOPE_EXTERNAL;
		svc = cy_lb4_svc.lookup(&key);
		if (!svc)
			return cy_ns_drop(CY_NS_DROP_NO_LOCAL);
	}
	return cy_ns_new(skb, &p, l4off, &key, svc, &nkey, snat, now);
}

/* tc egress of an external device: replies of local backends. */
static __always_inline int cy_ns_to_device(struct __sk_buff *skb)
{
	struct cy_packet p = {};
	struct lb4_nat_key nkey = {};
	struct lb4_nat_entry *e;
	__u32 ifindex = skb->ifindex, l4off;
	__u64 now;

	if (!cy_lb4_dev.lookup(&ifindex))
		return TC_ACT_OK;
	if (cy_parse(skb, &p) != CY_PARSE_OK || (p.protocol != CY_PROTO_TCP && p.protocol != CY_PROTO_UDP))
		return TC_ACT_OK;
	cy_ns_key(&p, CY_NAT_AT_EGRESS, &nkey);
	e = cy_lb4_nat.lookup(&nkey);
	if (!e)
		return TC_ACT_OK;
	now = bpf_ktime_get_coarse_ns();
	if (e->expires < now)
		return TC_ACT_OK;
	if (p.is_fragment)
		return cy_ns_drop(CY_NS_DROP_FRAGMENT);
	if (cy_ns_l4_offset(skb, &l4off) < 0)
		return TC_ACT_OK;
	cy_ns_refresh(e, &p, now);
	return cy_ns_apply(skb, &p, l4off, e, CY_NS_REPLY);
}

#endif /* CY_LIB_LB_NODEPORT_H */
