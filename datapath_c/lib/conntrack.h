/* conntrack.h - pass replies of allowed connections.
 *
 * Behaviour chosen (Cilium's, since cilium/cilium#2700): a conntrack entry is
 * used only to recognise REPLY packets. Packets in the original direction of
 * an established connection are evaluated against the policy maps on every
 * packet, like new ones. Consequences:
 *   - a policy edit that still allows a connection leaves it untouched (no
 *     recompile, no CT flush; its replies keep passing through cy_ct);
 *   - a policy edit that revokes the allow (or adds a deny) cuts the
 *     connection at its next forward packet, immediately, without waiting for
 *     the entry to expire;
 *   - enforcement of the reply direction never breaks a connection that was
 *     allowed in its original direction.
 *
 * Entries are keyed from the local pod's side (types.h: pod address and port,
 * peer address and port, protocol), so both hooks of a pod find a connection's
 * entry with one lookup, and remember the direction of the hook that allowed
 * the connection's first packet (origin). A packet is a reply when a live entry
 * has the *other* origin: a pod's egress connection is opened at cy_from_pod
 * (CY_DIR_EGRESS) and its replies arrive at cy_to_pod. Entries are created for
 * every allowed packet of a known endpoint, also when the direction is not
 * enforced, so that replies pass an enforced opposite direction. Packets of a
 * known connection write to the entry only when something changes (deciding
 * rule, expiry due for refresh, FIN/RST), so a busy connection's entry is not
 * rewritten, and bounced between CPUs, on every packet. Lifetimes: TCP 6 h,
 * others 60 s, 10 s after FIN/RST; LRU evicts under pressure. Deadlines are in
 * bpf_ktime_get_coarse_ns() time (monotonic, one tick coarse, no clock read).
 */
#ifndef CY_CONNTRACK_H
#define CY_CONNTRACK_H

static __always_inline __u64 cy_ct_lifetime(const struct cy_packet *p)
{
	if (p->protocol != CY_PROTO_TCP)
		return CY_CT_LIFETIME_OTHER;
	if (p->tcp_flags & (CY_TCP_FIN | CY_TCP_RST))
		return CY_CT_LIFETIME_CLOSE;
	return CY_CT_LIFETIME_TCP;
}

/* The key of p's connection from the side of the hook's pod. */
static __always_inline void cy_ct_key(const struct cy_packet *p, __u8 dir, struct ct_key *key)
{
	if (dir == CY_DIR_EGRESS) {
		key->pod_addr = p->saddr;
		key->peer_addr = p->daddr;
		key->pod_port = p->sport;
		key->peer_port = p->dport;
	} else {
		key->pod_addr = p->daddr;
		key->peer_addr = p->saddr;
		key->pod_port = p->dport;
		key->peer_port = p->sport;
	}
	key->protocol = p->protocol;
}

/* The live entry of p's connection, or 0 (fragments are never tracked). */
static __always_inline struct ct_entry *cy_ct_find(const struct cy_packet *p, const struct ct_key *key,
						   __u64 now)
{
	struct ct_entry *entry;

	if (p->is_fragment)
		return 0;
	entry = cy_ct.lookup((struct ct_key *)key);
	if (!entry || entry->expires < now)
		return 0;
	return entry;
}

/* Push a live entry's deadline out when p closes the connection or the
 * deadline is due for a refresh; no write otherwise. */
static __always_inline void cy_ct_refresh(struct ct_entry *entry, const struct cy_packet *p, __u64 now)
{
	__u64 lifetime = cy_ct_lifetime(p);

	if (p->protocol == CY_PROTO_TCP && (p->tcp_flags & (CY_TCP_FIN | CY_TCP_RST)))
		entry->expires = now + CY_CT_LIFETIME_CLOSE;
	else if (entry->expires < now + lifetime - CY_CT_REFRESH)
		entry->expires = now + lifetime;
}

/* Is p, at the hook of direction dir, a reply of the live connection entry? */
static __always_inline int cy_ct_is_reply(const struct ct_entry *entry, __u8 dir)
{
	return entry && entry->origin != dir;
}

/* The TCP flags monitor aggregation reports once per direction. */
#define CY_CT_REPORTED_FLAGS (CY_TCP_FIN | CY_TCP_SYN | CY_TCP_RST)

/* Monitor aggregation (CY_TRACE_FLAGS): does the TCP packet p of the live
 * entry carry a flag its direction (side 0: forward, 1: reply) has not
 * reported yet? If so the flags are marked reported (the entry is written
 * only then: a few times per connection) and the caller emits a flow event,
 * so a connection shows its first packet, the answer, and the FIN or RST of
 * each side, not every packet (ACK, PSH, URG are not reported on their own). A new entry's opening flags are marked by
 * cy_ct_track. Two CPUs racing may both report a flag: never none. */
static __always_inline int cy_ct_new_flags(struct ct_entry *entry, const struct cy_packet *p, int side)
{
	__u8 flags;

	if (p->protocol != CY_PROTO_TCP)
		return 0;
	flags = p->tcp_flags & CY_CT_REPORTED_FLAGS;
	/* a new connection on the tuple of one that closed (its entry still
	 * lives out the close lifetime): its reports start over */
	if (side == 0 && (p->tcp_flags & (CY_TCP_SYN | CY_TCP_ACK)) == CY_TCP_SYN &&
	    ((entry->reported[0] | entry->reported[1]) & (CY_TCP_FIN | CY_TCP_RST))) {
		entry->reported[0] = flags;
		entry->reported[1] = 0;
		return 1;
	}
	if (!(flags & ~entry->reported[side]))
		return 0;
	entry->reported[side] |= flags;
	return 1;
}

/* The coarse clock's second, mod 2^16 (ct_entry.last_report). */
static __always_inline __u16 cy_ct_second(__u64 now)
{
	return (__u16)(now / 1000000000ULL);
}

/* Monitor aggregation (CY_TRACE_FLAGS): is a flow event due for packet p of
 * the live entry on its side (0: forward, 1: reply)? When it carries a TCP
 * flag the side has not reported (cy_ct_new_flags), or the side reported
 * nothing for CY_TRACE_INTERVAL_S seconds (any protocol: a long connection
 * shows it is alive, as Cilium's monitor interval does). The side's time is
 * stamped then: the entry is written a few times per connection and once per
 * interval at most. */
static __always_inline int cy_ct_report_due(struct ct_entry *entry, const struct cy_packet *p, int side,
					    __u64 now)
{
	__u16 second;

	if (!CY_TRACE_FLAGS || !entry || side < 0 || side > 1)
		return 0;
	second = cy_ct_second(now);
	if (cy_ct_new_flags(entry, p, side) ||
	    (CY_TRACE_INTERVAL_S && (__u16)(second - entry->last_report[side]) >= CY_TRACE_INTERVAL_S)) {
		entry->last_report[side] = second;
		return 1;
	}
	return 0;
}

/* Record an allowed forward packet; entry is cy_ct_find's answer for its key.
 * Returns 1 when the entry is new. */
static __always_inline int cy_ct_track(const struct cy_packet *p, const struct ct_key *key,
				       struct ct_entry *entry, __u8 dir, __u32 ep_id, __u32 cookie,
				       __u64 now, __u32 svc_addr, __u16 svc_port)
{
	struct ct_entry fresh = {};

	if (p->is_fragment)
		return 0;
	/* Only ICMP echo requests open ICMP "connections". */
	if (p->protocol == CY_PROTO_ICMP && p->icmp_type != CY_ICMP_ECHO_REQUEST)
		return 0;
	if (entry) {
		if (entry->cookie != cookie)
			entry->cookie = cookie;
		cy_ct_refresh(entry, p, now);
		return 0;
	}
	fresh.expires = now + cy_ct_lifetime(p);
	fresh.ep_id = ep_id;
	fresh.cookie = cookie;
	fresh.origin = dir;
	fresh.svc_addr = svc_addr;
	fresh.svc_port = svc_port;
	if (p->protocol == CY_PROTO_TCP)
		fresh.reported[0] = p->tcp_flags & CY_CT_REPORTED_FLAGS;
	/* the opening packet is reported; the replies' clock starts with it too, so
	 * a UDP answer is reported after a quiet interval, as a later request is */
	fresh.last_report[0] = fresh.last_report[1] = cy_ct_second(now);
	cy_ct.update((struct ct_key *)key, &fresh);
	return 1;
}

#endif /* CY_CONNTRACK_H */
