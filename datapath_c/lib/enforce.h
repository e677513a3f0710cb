/* enforce.h - the per-packet decision shared by both hooks.
 *
 * dir is the pod's policy direction: CY_DIR_EGRESS in cy_from_pod (packet
 * leaves the pod, the pod is the source), CY_DIR_INGRESS in cy_to_pod (packet
 * enters the pod, the pod is the destination). Order:
 *   0. what the parser cannot read is dropped, never passed (parse.h):
 *      IPv6 other than ND on an enforced direction of the veth's pod
 *      (cy_ep_ifindex) -> CY_DROP_UNSUPPORTED_L3: there is no IPv6 policy;
 *      a malformed IPv4 header -> CY_DROP_INVALID_L3 (the stack would discard
 *      it too, on any endpoint);
 *   0b. cy_from_pod only: an IPv4 packet (readable header) from a veth that
 *      belongs to a known pod (cy_ep_ifindex) whose source address is not
 *      that pod's -> CY_DROP_SPOOFED_SOURCE, enforced or not: a pod cannot
 *      claim another pod's (or an unknown) address to pick the egress policy
 *      it is judged by, or the identity other pods' ingress policy sees;
 *   1. a fully parsed packet that is a reply of a tracked connection -> pass
 *      (CY_OK_REPLY), decided by one cy_ct lookup before anything else is
 *      looked up: replies are about half of all packets (entries exist only
 *      for connections of known endpoints, conntrack.h);
 *   2. not IP (ARP, ...), or the pod side is not a known endpoint -> pass (no event);
 *      on an enforced direction, a fragment without L4 header ->
 *      CY_DROP_FRAGMENT (fragments are not tracked) and a truncated L4 header
 *      -> CY_DROP_INVALID; on an unenforced one they pass;
 *   3. direction not enforced -> pass (CY_OK_UNENFORCED);
 *   4. policy.h verdict: deny entry -> drop, allow entry -> pass, else drop
 *      (the deny map is probed only when the endpoint's CY_EP_*_DENY is set);
 *      an allow entry flagged CY_POLICY_NO_PROXY (its L7 rules need a proxy
 *      this node does not run) -> CY_DROP_PROXY_UNAVAILABLE, both hooks;
 *   5. cy_from_pod only: an allow entry with a proxy port hands the packet to
 *      the node's proxy (redirect.h, CY_OK_PROXY); no proxy socket ->
 *      CY_DROP_PROXY_UNAVAILABLE. The connection is tracked as usual, so the
 *      proxy's answers (sent from the original destination) pass as replies.
 *   6. cy_to_pod only (l7redirect.h): an allow entry with HTTP rules
 *      (CY_POLICY_HTTP) redirects the packet to the node's HTTP proxy (CY_OK_PROXY;
 *      no proxy device -> CY_DROP_PROXY_UNAVAILABLE) instead of passing it, and a
 *      packet of the proxy's own connection to the pod passes without a lookup
 *      (CY_OK_FROM_PROXY), tracked so that the pod's replies pass.
 * One cy_ct lookup per packet (conntrack.h) tells replies from forward
 * packets. Forwarded forward-direction packets create/refresh a cy_ct entry; a flow
 * event is emitted for every drop and every new connection (every packet when
 * CY_TRACE_ALL), and with CY_TRACE_FLAGS for a tracked TCP packet, forward or
 * reply, carrying a flag its direction has not reported yet (conntrack.h
 * cy_ct_new_flags: the answer to the handshake, FIN, RST). The peer's identity (ipcache.h) is looked up only when the
 * verdict or an event needs it: replies and unenforced packets of a known
 * connection, most of the traffic, skip that lookup.
 */
#ifndef CY_ENFORCE_H
#define CY_ENFORCE_H

/* IPv6 (not ND): dropped when the veth's pod is enforced in this direction. */
static __always_inline int cy_enforce_ipv6(struct __sk_buff *skb, const struct cy_packet *p, __u8 dir)
{
	__u32 ifindex = skb->ifindex;
	__u32 *pod = cy_ep_ifindex.lookup(&ifindex);
	struct endpoint_info *ep;

	if (!pod)
		return TC_ACT_OK;
	ep = cy_endpoints.lookup(pod);
	if (!ep || !(ep->flags & (dir == CY_DIR_EGRESS ? CY_EP_EGRESS_ENFORCED : CY_EP_INGRESS_ENFORCED)))
		return TC_ACT_OK;
	cy_count(dir, CY_DROP_UNSUPPORTED_L3, p->len);
	cy_emit(skb, p, dir, CY_VERDICT_DROPPED, CY_DROP_UNSUPPORTED_L3, 0, ep->ep_id,
		dir == CY_DIR_EGRESS ? ep->identity : 0, dir == CY_DIR_EGRESS ? 0 : ep->identity, 0, 0, 0, 0, 0);
	return TC_ACT_SHOT;
}

/* cy_from_pod, IPv4: the source must be the address of the veth's pod. A veth
 * the agent has not (yet) mapped has no pod to compare with: the packet goes on
 * to step 1 like any other. The usual case costs one lookup: the source's
 * endpoint is recorded behind this very veth (*src_ep gets it, so cy_enforce
 * need not look it up again); otherwise cy_ep_ifindex decides. */
static __always_inline int cy_spoofed_source(struct __sk_buff *skb, const struct cy_packet *p,
					     struct endpoint_info **src_ep)
{
	__u32 ifindex = skb->ifindex;
	__u32 saddr = p->saddr;
	__u32 *pod;
	struct endpoint_info *ep = cy_endpoints.lookup(&saddr);

	if (ep && ep->ifindex == ifindex) {
		*src_ep = ep;
		return 0;
	}
	pod = cy_ep_ifindex.lookup(&ifindex);
	if (!pod || *pod == p->saddr)
		return 0;
	ep = cy_endpoints.lookup(pod);
	cy_count(CY_DIR_EGRESS, CY_DROP_SPOOFED_SOURCE, p->len);
	cy_emit(skb, p, CY_DIR_EGRESS, CY_VERDICT_DROPPED, CY_DROP_SPOOFED_SOURCE, 0, ep ? ep->ep_id : 0,
		ep ? ep->identity : 0, 0, 0, 0, 0, 0, 0);
	return 1;
}

static __always_inline int cy_enforce(struct __sk_buff *skb, __u8 dir)
{
	struct cy_packet p = {};
	struct ct_key ct_key = {};
	struct ct_entry *ct_entry = 0;
	struct endpoint_info *ep, *src_ep = 0;
	__u32 pod_addr, peer_addr, peer_id = 0, cookie = 0, vflags = 0;
	__u32 flags, enforced, has_deny;
	__u16 proxy_port = 0;
	__u8 match_type = CY_MATCH_NONE;
	int to_l7proxy = 0;
	__u64 ct_now = 0;
	struct lb4_trail_key trail_key = {};
	struct lb4_trail *trail;
	__u32 svc_addr = 0;
	__u16 svc_port = 0;
	__u8 reason;
	int parsed, is_new;

	parsed = cy_parse(skb, &p);
	if (parsed == CY_PARSE_SKIP || parsed == CY_PARSE_IPV6_ND)
		return TC_ACT_OK;
	if (parsed == CY_PARSE_BAD_L3) {
		cy_count(dir, CY_DROP_INVALID_L3, p.len);
		cy_emit(skb, &p, dir, CY_VERDICT_DROPPED, CY_DROP_INVALID_L3, 0, 0, 0, 0, 0, 0, 0, 0, 0);
		return TC_ACT_SHOT;
	}
	if (parsed == CY_PARSE_IPV6)
		return cy_enforce_ipv6(skb, &p, dir);
	if (dir == CY_DIR_EGRESS && cy_spoofed_source(skb, &p, &src_ep))
		return TC_ACT_SHOT;
	pod_addr = dir == CY_DIR_EGRESS ? p.saddr : p.daddr;
	peer_addr = dir == CY_DIR_EGRESS ? p.daddr : p.saddr;

	/* Replies first: one conntrack lookup and they are done (a fully parsed
	 * packet only; entries exist for known endpoints only). */
	if (parsed == CY_PARSE_OK) {
		ct_now = bpf_ktime_get_coarse_ns();
		cy_ct_key(&p, dir, &ct_key);
		ct_entry = cy_ct_find(&p, &ct_key, ct_now);
		if (cy_ct_is_reply(ct_entry, dir)) {
			cy_ct_refresh(ct_entry, &p, ct_now);
			cy_count(dir, CY_OK_REPLY, p.len);
			if (CY_TRACE_ALL || cy_ct_report_due(ct_entry, &p, 1, ct_now)) {
				ep = cy_endpoints.lookup(&pod_addr);
				peer_id = cy_identity_of(peer_addr);
				cy_emit(skb, &p, dir, CY_VERDICT_FORWARDED, CY_OK_REPLY, 1, ep ? ep->ep_id : 0,
					dir == CY_DIR_EGRESS ? (ep ? ep->identity : 0) : peer_id,
					dir == CY_DIR_EGRESS ? peer_id : (ep ? ep->identity : 0), 0, 0, 0,
					ct_entry->svc_addr, ct_entry->svc_port);
			}
			return TC_ACT_OK;
		}
	}

	ep = src_ep ? src_ep : cy_endpoints.lookup(&pod_addr);
	if (!ep)
		return TC_ACT_OK;
	flags = ep->flags;
	enforced = flags & (dir == CY_DIR_EGRESS ? CY_EP_EGRESS_ENFORCED : CY_EP_INGRESS_ENFORCED);
	has_deny = flags & (dir == CY_DIR_EGRESS ? CY_EP_EGRESS_DENY : CY_EP_INGRESS_DENY);
#define CY_SRC_ID (dir == CY_DIR_EGRESS ? ep->identity : peer_id)
#define CY_DST_ID (dir == CY_DIR_EGRESS ? peer_id : ep->identity)

	if (parsed == CY_PARSE_SHORT || parsed == CY_PARSE_FRAGMENT) {
		if (!enforced)
			return TC_ACT_OK;
		reason = parsed == CY_PARSE_SHORT ? CY_DROP_INVALID : CY_DROP_FRAGMENT;
		peer_id = cy_identity_of(peer_addr);
		cy_count(dir, reason, p.len);
		cy_emit(skb, &p, dir, CY_VERDICT_DROPPED, reason, 0, ep->ep_id, CY_SRC_ID, CY_DST_ID, 0, 0, 0, 0, 0);
		return TC_ACT_SHOT;
	}

	if (enforced && dir == CY_DIR_INGRESS && cy_from_proxy(skb)) {
		reason = CY_OK_FROM_PROXY;
	} else if (enforced) {
		peer_id = cy_identity_of(peer_addr);
		reason = cy_policy_verdict(ep->ep_id, dir, has_deny, peer_id, p.protocol,
					   p.policy_port, &cookie, &vflags, &proxy_port, &match_type);
		if (reason == CY_OK_POLICY && (vflags & CY_POLICY_NO_PROXY)) {
			reason = CY_DROP_PROXY_UNAVAILABLE;
		} else if (reason == CY_OK_POLICY && dir == CY_DIR_INGRESS && (vflags & CY_POLICY_HTTP)) {
			reason = CY_PROXY_IFINDEX ? CY_OK_PROXY : CY_DROP_PROXY_UNAVAILABLE;
			to_l7proxy = 1;
		} else if (dir == CY_DIR_EGRESS && reason == CY_OK_POLICY && proxy_port) {
			reason = cy_redirect_to_proxy(skb, &p, proxy_port) ? CY_DROP_PROXY_UNAVAILABLE
									   : CY_OK_PROXY;
		}
	} else {
		reason = CY_OK_UNENFORCED;
	}

	cy_count(dir, reason, p.len);
	/* the Service frontend this connection was opened through: kept in its
	 * conntrack entry, or the trail its socket left (include/lb_trail_maps.h) */
	if (ct_entry) {
		svc_addr = ct_entry->svc_addr;
		svc_port = ct_entry->svc_port;
	} else if (dir == CY_DIR_EGRESS && parsed == CY_PARSE_OK) {
		trail_key.pod = p.saddr;
		trail_key.backend = p.daddr;
		trail_key.port = p.dport;
		trail_key.sport = p.sport;
		trail_key.proto = p.protocol;
		trail = cy_lb4_trail.lookup(&trail_key);
		if (!trail) {
			trail_key.sport = 0;
			trail = cy_lb4_trail.lookup(&trail_key);
		}
		if (trail && bpf_ktime_get_ns() - trail->at_ns <= CY_LB_TRAIL_FRESH_NS) {
			svc_addr = trail->address;
			svc_port = trail->port;
		}
		if (trail) /* taken (or stale): a later connection to the backend leaves its own */
			cy_lb4_trail.delete(&trail_key);
	}
	if (reason == CY_DROP_POLICY || reason == CY_DROP_POLICY_DENY || reason == CY_DROP_PROXY_UNAVAILABLE) {
		cy_emit(skb, &p, dir, CY_VERDICT_DROPPED, reason, 0, ep->ep_id, CY_SRC_ID, CY_DST_ID, cookie, 0,
			match_type, svc_addr, svc_port);
		return TC_ACT_SHOT;
	}
	is_new = cy_ct_track(&p, &ct_key, ct_entry, dir, ep->ep_id, cookie, ct_now, svc_addr, svc_port);
	if (is_new || CY_TRACE_ALL || cy_ct_report_due(ct_entry, &p, 0, ct_now)) {
		if (!enforced)
			peer_id = cy_identity_of(peer_addr);
		cy_emit(skb, &p, dir, CY_VERDICT_FORWARDED, reason, 0, ep->ep_id, CY_SRC_ID, CY_DST_ID, cookie,
			ct_entry ? 1 : 0, match_type, svc_addr, svc_port);
	}
	if (to_l7proxy)
		return cy_redirect_to_l7proxy(skb);
	return TC_ACT_OK;
#undef CY_SRC_ID
#undef CY_DST_ID
}

#endif /* CY_ENFORCE_H */
