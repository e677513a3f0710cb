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
 * Entries are keyed by the tuple as seen by the hook that allowed the first
 * packet plus that hook's direction. A packet is a reply when its reversed
 * tuple exists with the *other* direction: a pod's egress connection is
 * created by cy_from_pod (CY_DIR_EGRESS) and its replies arrive at cy_to_pod.
 * Entries are created for every allowed packet of a known endpoint, also when
 * the direction is not enforced, so that replies pass an enforced opposite
 * direction. Lifetimes: TCP 6 h, others 60 s, 10 s after FIN/RST; LRU evicts
 * under pressure.
 */
#ifndef CY_CONNTRACK_H
#define CY_CONNTRACK_H

static __always_inline __u8 cy_other_dir(__u8 dir)
{
	return dir == CY_DIR_INGRESS ? CY_DIR_EGRESS : CY_DIR_INGRESS;
}

static __always_inline __u64 cy_ct_lifetime(const struct cy_packet *p)
{
	if (p->protocol != CY_PROTO_TCP)
		return CY_CT_LIFETIME_OTHER;
	if (p->tcp_flags & (CY_TCP_FIN | CY_TCP_RST))
		return CY_CT_LIFETIME_CLOSE;
	return CY_CT_LIFETIME_TCP;
}

/* Is p a reply of a live connection opened in the other direction? */
static __always_inline int cy_ct_is_reply(const struct cy_packet *p, __u8 dir, __u64 now)
{
	struct ct_key key = {};
	struct ct_entry *entry;

	if (p->is_fragment)
		return 0;
	key.saddr = p->daddr;
	key.daddr = p->saddr;
	key.sport = p->dport;
	key.dport = p->sport;
	key.protocol = p->protocol;
	key.direction = cy_other_dir(dir);
	entry = cy_ct.lookup(&key);
	if (!entry || entry->expires < now)
		return 0;
	if (p->protocol == CY_PROTO_TCP && (p->tcp_flags & (CY_TCP_FIN | CY_TCP_RST)))
		entry->expires = now + CY_CT_LIFETIME_CLOSE;
	else if (entry->expires < now + cy_ct_lifetime(p) - CY_CT_REFRESH)
		entry->expires = now + cy_ct_lifetime(p);
	return 1;
}

/* Record an allowed forward packet. Returns 1 when the entry is new. */
static __always_inline int cy_ct_track(const struct cy_packet *p, __u8 dir, __u32 ep_id,
				       __u32 cookie, __u64 now)
{
	struct ct_key key = {};
	struct ct_entry *entry;
	struct ct_entry fresh = {};

	if (p->is_fragment)
		return 0;
	/* Only ICMP echo requests open ICMP "connections". */
	if (p->protocol == CY_PROTO_ICMP && p->icmp_type != CY_ICMP_ECHO_REQUEST)
		return 0;
	key.saddr = p->saddr;
	key.daddr = p->daddr;
	key.sport = p->sport;
	key.dport = p->dport;
	key.protocol = p->protocol;
	key.direction = dir;
	entry = cy_ct.lookup(&key);
	if (entry && entry->expires >= now) {
		entry->packets += 1;
		entry->cookie = cookie;
		if (entry->expires < now + cy_ct_lifetime(p) - CY_CT_REFRESH ||
		    (p->tcp_flags & (CY_TCP_FIN | CY_TCP_RST)))
			entry->expires = now + cy_ct_lifetime(p);
		return 0;
	}
	fresh.expires = now + cy_ct_lifetime(p);
	fresh.ep_id = ep_id;
	fresh.cookie = cookie;
	fresh.packets = 1;
	cy_ct.update(&key, &fresh);
	return 1;
}

#endif /* CY_CONNTRACK_H */
