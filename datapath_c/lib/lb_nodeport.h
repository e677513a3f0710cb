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
 *   - a backend on another node (CY_LB_BE_NODE), the frontend flagged
 *     CY_LB_F_DSR, the client's IPv4 header without options: direct server
 *     return, only the destination becomes the backend and the backend's
 *     node answers the client itself (lib/lb_dsr.h; that node's side is
 *     cy_dsr_learn, for a packet to no frontend);
 *   - a backend elsewhere otherwise: the destination becomes the backend and the source
 *     this device's address (cy_lb4_dev) and a port of
 *     CY_LB_SNAT_PORT_MIN..MAX, so the reply comes back here; the backend's
 *     policy sees this node's address. The reply (backend -> that address and
 *     port) is translated back to frontend -> client on ingress. Both are sent
 *     on by a route lookup (bpf_fib_lookup, then bpf_redirect, or
 *     bpf_redirect_neigh when the neighbour is not resolved yet), bypassing
 *     the node's input path, which would refuse its own address as a source.
 * Rewriting and sending: lib/lb_nat.h. A frontend without backends refuses a
 * TCP SYN with a RST and a UDP datagram with an ICMP port unreachable
 * (lib/lb_reject.h) and drops everything else (CY_NS_DROP_NO_BACKEND); with
 * externalTrafficPolicy Local the frontend's external entry (scope
 * CY_LB_SCOPE_EXTERNAL) holds this node's backends only, and none here drops
 * (CY_NS_DROP_NO_LOCAL). A LoadBalancer frontend with loadBalancerSourceRanges
 * (CY_LB_F_SRC_RANGES) takes new connections only from clients inside them
 * (cy_lb4_srcrange; others: CY_NS_DROP_SOURCE_RANGE). Fragments of such packets cannot be translated and
 * are dropped (CY_NS_DROP_FRAGMENT); an ICMP error about a translated
 * connection is translated like its replies (lib/lb_icmp_error.h); every other
 * fragment, non-TCP/UDP packet (other ICMP, SCTP, ...) and non-IPv4 packet
 * passes untouched. A known
 * connection whose backend left the maps picks a new one. With session
 * affinity (CY_LB_F_AFFINITY) a new connection goes to the backend the same
 * client address used last within the timeout (lib/lb_affinity.h). A TCP
 * SYN on the entry of a connection that ended (FIN or RST seen) opens a new
 * one; one that reuses the four addresses and ports of an ended connection to
 * a local backend, now straight to the backend, first ends that connection's
 * entries (cy_ns_forget_reused).
 */
#ifndef CY_LIB_LB_NODEPORT_H
#define CY_LIB_LB_NODEPORT_H

/* loadBalancerSourceRanges: the client is inside one of the frontend's ranges. */
static __always_inline int cy_ns_source_admitted(__u32 frontend_id, __u32 saddr)
{
	struct lb4_srcrange_key key = {.prefixlen = 64, .frontend_id = frontend_id, .addr = saddr};

	return cy_lb4_srcrange.lookup(&key) != NULL;
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

/* A TCP SYN opening a connection (SYN without ACK). */
static __always_inline int cy_ns_opens(const struct cy_packet *p)
{
	return p->protocol == CY_PROTO_TCP && (p->tcp_flags & (CY_TCP_SYN | CY_NS_TCP_ACK)) == CY_TCP_SYN;
}

/* A TCP SYN that no frontend takes, for a local backend that still has the
 * reply entry (egress) of an ended north-south connection with these same
 * four addresses and ports: the client reused its port to reach the backend
 * directly (a pod whose node's socket programs already picked the backend),
 * and the old entry would turn the backend's answer into the frontend's,
 * which the client refuses. Ended: a FIN or RST seen either way (the reply
 * entry closing, or its forward entry closing or gone), as a client that
 * resets marks only the forward one. Both entries go; a live connection's
 * stay (the backend cannot take a second one on the same four anyway). */
static __always_inline void cy_ns_forget_reused(const struct cy_packet *p, __u64 now)
{
	struct lb4_nat_key rkey = {}, fkey = {};
	struct lb4_nat_entry *old, *fwd;

	if (!cy_ns_opens(p))
		return;
	cy_ns_reply_key(p, &rkey);
	old = cy_lb4_nat.lookup(&rkey);
	if (!old)
		return;
	fkey.saddr = p->saddr;
	fkey.sport = p->sport;
	fkey.daddr = old->saddr; /* the frontend the connection went to */
	fkey.dport = old->sport;
	fkey.proto = p->protocol;
	fkey.hook = CY_NAT_AT_INGRESS;
	fwd = cy_lb4_nat.lookup(&fkey);
	if ((old->flags & CY_NAT_F_DSR_LEARNT) && old->expires >= now && !(old->flags & CY_NAT_F_CLOSING))
		return; /* a live DSR connection another node sent here: no forward entry on this node */
	if (!(old->flags & CY_NAT_F_CLOSING) && fwd && fwd->expires >= now && !(fwd->flags & CY_NAT_F_CLOSING))
		return;
	cy_lb4_nat.delete(&rkey);
	if (fwd)
		cy_lb4_nat.delete(&fkey);
}

/* A new connection to frontend `svc` (slot 0 entry of `key`): choose its
 * backend, write both NAT entries, translate. */
static __always_inline int cy_ns_new(struct __sk_buff *skb, const struct cy_packet *p, __u32 l4off,
				     struct lb4_key *key, struct lb4_service *svc, struct lb4_nat_key *nkey,
				     __u32 snat, __u64 now)
{
	struct lb4_nat_entry fwd = {}, rev = {};
	struct lb4_nat_entry *old;
	struct lb4_nat_key rkey = {};
	struct lb4_service *entry;
	struct lb4_backend *be;
	struct lb4_affinity_key akey = {};
	__u32 backend_id = 0, frontend_id = svc->backend_id;
	__u16 slot = 0;
	__u64 life = cy_ns_lifetime(p, 0);

	if (svc->count == 0) {
		if (svc->flags & CY_LB_F_NO_LOCAL)
			return cy_ns_drop(CY_NS_DROP_NO_LOCAL);
		if (cy_ns_opens(p))
			return cy_ns_reset(skb, l4off);
		if (p->protocol == CY_PROTO_UDP)
			return cy_ns_unreachable(skb, l4off);
		return cy_ns_drop(CY_NS_DROP_NO_BACKEND);
	}
	if (svc->flags & CY_LB_F_AFFINITY) {
		akey.client = p->saddr;
		akey.client_kind = CY_LB_AFF_ADDRESS;
		akey.frontend_id = frontend_id;
		backend_id = cy_lb4_affine(key, svc, &akey, &slot);
	}
	if (!backend_id) {
		slot = (__u16)(bpf_get_prandom_u32() % svc->count) + 1;
		key->slot = slot;
		entry = cy_lb4_svc.lookup(key);
		if (!entry)
			return cy_ns_drop(CY_NS_DROP_NO_BACKEND);
		backend_id = entry->backend_id;
	}
	be = cy_lb4_be.lookup(&backend_id);
	if (!be)
		return cy_ns_drop(CY_NS_DROP_NO_BACKEND);
	if (svc->flags & CY_LB_F_AFFINITY)
		cy_lb4_remember(&akey, backend_id, slot);
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
		old = cy_lb4_nat.lookup(&rkey);
		if (old && (old->flags & CY_NAT_F_DSR_LEARNT) && old->expires >= now && !(old->flags & CY_NAT_F_CLOSING))
			return cy_ns_drop(CY_NS_DROP_DSR); /* these four are a live DSR connection's (lib/lb_dsr.h) */
		cy_lb4_nat.update(&rkey, &rev);
	} else if ((svc->flags & CY_LB_F_DSR) && (be->flags & CY_LB_BE_NODE) && l4off == CY_NS_ETH_HLEN + CY_NS_IP_BASE_LEN) {
		/* direct server return: the backend's node answers the client itself (lib/lb_dsr.h) */
		fwd.flags = CY_NAT_F_REDIRECT | CY_NAT_F_DSR;
		fwd.saddr = p->saddr;
		fwd.sport = p->sport;
		cy_lb4_nat.update(nkey, &fwd);
		return cy_dsr_forward(skb, p, l4off, &fwd, CY_NS_NEW);
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
	if (cy_parse(skb, &p) != CY_PARSE_OK)
		return TC_ACT_OK; /* not IPv4, or a fragment without ports: not ours */
	if (p.protocol == CY_PROTO_ICMP)
		return cy_ns_icmp_error(skb, &p, CY_NAT_AT_INGRESS); /* an error about a SNATed connection */
	if (p.protocol != CY_PROTO_TCP && p.protocol != CY_PROTO_UDP)
		return TC_ACT_OK;
	if (cy_ns_l4_offset(skb, &l4off) < 0)
		return TC_ACT_OK;
	now = bpf_ktime_get_coarse_ns();
	cy_ns_key(&p, CY_NAT_AT_INGRESS, &nkey);
	e = cy_lb4_nat.lookup(&nkey);
	/* a SYN on an entry whose connection ended opens a new one: chosen afresh below */
	if (e && e->expires >= now && !(cy_ns_opens(&p) && (e->flags & CY_NAT_F_CLOSING))) {
		if (p.is_fragment)
			return cy_ns_drop(CY_NS_DROP_FRAGMENT);
		if (!e->backend_id) {
			cy_ns_refresh(e, &p, now);
			return cy_ns_apply(skb, &p, l4off, e, CY_NS_REPLY);
		}
		if (cy_ns_backend_alive(e)) {
			cy_ns_refresh(e, &p, now);
			if (e->flags & CY_NAT_F_DSR)
				return cy_dsr_forward(skb, &p, l4off, e, CY_NS_FORWARD);
			return cy_ns_apply(skb, &p, l4off, e, CY_NS_FORWARD);
		}
	}
	key.address = p.daddr;
	key.dport = p.dport;
	key.proto = p.protocol;
	svc = cy_lb4_svc.lookup(&key);
	if (!svc || !(svc->flags & CY_LB_F_EXTERNAL)) {
		cy_ns_forget_reused(&p, now);
		cy_dsr_client_ends(&p, now);
		cy_dsr_learn(skb, &p, now); /* a DSR connection another node sent to a backend here */
		return TC_ACT_OK;
	}
	if (p.is_fragment)
		return cy_ns_drop(CY_NS_DROP_FRAGMENT);
	if ((svc->flags & CY_LB_F_SRC_RANGES) && !cy_ns_source_admitted(svc->backend_id, p.saddr))
		return cy_ns_drop(CY_NS_DROP_SOURCE_RANGE);
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
	if (cy_parse(skb, &p) != CY_PARSE_OK)
		return TC_ACT_OK;
	if (p.protocol == CY_PROTO_ICMP)
		return cy_ns_icmp_error(skb, &p, CY_NAT_AT_EGRESS); /* a local backend's error to its client */
	if (p.protocol != CY_PROTO_TCP && p.protocol != CY_PROTO_UDP)
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
