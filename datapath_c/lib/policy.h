/* policy.h - the per-endpoint policy lookup (deny beats allow).
 *
 * Semantics (ciliary.operator.intents.evaluate_entries): an entry covers a
 * packet when its identity is 0 or the peer's, its protocol is 0 or the
 * packet's, and its port range is "any" (0, 0) or holds the packet's port.
 * If any covering entry denies -> drop; else if any covering entry allows ->
 * forward; else drop (default deny). Not enforced -> forward.
 *
 * Storage: every entry is written to cy_policy_deny or cy_policy (by verdict)
 * as one LPM key per prefix block of its port range:
 *     {ep_id, identity, direction, protocol, port block}
 * prefixlen = CY_POLICY_FIXED_BITS + block bits (0 for "any port"). Port range
 * [lo, hi] is decomposed into the minimal set of aligned power-of-two blocks
 * (at most 30 for 16 bits); ICMP entries use the ICMP type as the port.
 *
 * Lookup: for (identity in {peer, 0}) x (protocol in {proto, 0}) look up the
 * full-length key {ep, identity, dir, protocol, port}. An LPM hit means a key
 * with exactly those fixed fields has a block containing the port, i.e. some
 * entry of that (identity, protocol) covers the packet. The union of the four
 * probes is therefore "some entry covers the packet". Probing the deny map
 * first and the allow map second gives "deny beats allow" whatever the
 * specificity: inside one map every key has the same verdict, so a longer
 * prefix can never hide a shorter one of the other verdict.
 * The deny probes are skipped when the endpoint's CY_EP_*_DENY flag for the
 * direction is clear: the agent keeps that flag set whenever cy_policy_deny
 * holds an entry of the endpoint and direction (consts.h), so skipping them
 * never changes the answer. Most endpoints have no deny entry at all.
 * At most 8 LPM lookups per packet (4 without deny entries); map writes never
 * recompile.
 * The Python model is ciliary.nodeagent.lookup_model.simulate_lookup, checked
 * against evaluate_entries by hypothesis in tests/unit/nodeagent.
 */
#ifndef CY_POLICY_H
#define CY_POLICY_H

/* One LPM lookup in the deny (deny != 0) or allow map. bcc rewrites map
 * method calls only in plain functions, not inside macros, hence the flag. */
static __always_inline struct policy_value *cy_policy_get(int deny, struct policy_key *key)
{
	if (deny)
		return cy_policy_deny.lookup(key);
	return cy_policy.lookup(key);
}

/* Hubble's match type of a hit: by_identity when the key named the peer's
 * identity, key_proto the key's protocol (0: any), the value's ANY_PORT flag
 * whether its port block was "any port". */
static __always_inline __u8 cy_match_type(int by_identity, __u8 key_proto, const struct policy_value *val)
{
	if (!(val->flags & CY_POLICY_ANY_PORT))
		return by_identity ? CY_MATCH_L3_L4 : CY_MATCH_L4_ONLY;
	if (key_proto)
		return by_identity ? CY_MATCH_L3_PROTO : CY_MATCH_PROTO_ONLY;
	return by_identity ? CY_MATCH_L3_ONLY : CY_MATCH_ALL;
}

/* The four probes of one map, most specific first (see above); *match gets
 * the hit's match type. */
static __always_inline struct policy_value *cy_policy_probe(int deny, __u32 ep_id, __u8 dir,
							    __u32 identity, __u8 proto,
							    __u16 port, __u8 *match)
{
	struct policy_key key = {};
	struct policy_value *val;
	int by_identity = identity != CY_ID_ANY;

	key.prefixlen = CY_POLICY_FULL_BITS;
	key.ep_id = ep_id;
	key.direction = dir;
	key.dport = bpf_htons(port);
	key.identity = identity;
	key.protocol = proto;
	val = cy_policy_get(deny, &key);
	if (val) {
		*match = cy_match_type(by_identity, proto, val);
		return val;
	}
	if (proto != 0) {
		key.protocol = 0;
		val = cy_policy_get(deny, &key);
		if (val) {
			*match = cy_match_type(by_identity, 0, val);
			return val;
		}
	}
	if (!by_identity)
		return 0;
	key.identity = CY_ID_ANY;
	key.protocol = proto;
	val = cy_policy_get(deny, &key);
	if (val) {
		*match = cy_match_type(0, proto, val);
		return val;
	}
	if (proto != 0) {
		key.protocol = 0;
		val = cy_policy_get(deny, &key);
		if (val)
			*match = cy_match_type(0, 0, val);
	}
	return val;
}

/* Returns a drop_reasons.h code; *cookie gets the deciding rule's cookie and
 * *vflags the deciding allow entry's policy_value.flags (0 otherwise), *proxy_port its
 * proxy port (0: no redirect; lib/redirect.h), *match the deciding entry's match
 * type (CY_MATCH_NONE when none decided).
 * has_deny: the endpoint's CY_EP_*_DENY flag of dir (0 skips cy_policy_deny). */
static __always_inline __u8 cy_policy_verdict(__u32 ep_id, __u8 dir, __u32 has_deny,
					      __u32 identity, __u8 proto, __u16 port,
					      __u32 *cookie, __u32 *vflags, __u16 *proxy_port,
					      __u8 *match)
{
	struct policy_value *val;

	*proxy_port = 0;
	*vflags = 0;
	*match = CY_MATCH_NONE;
	if (has_deny) {
		val = cy_policy_probe(1, ep_id, dir, identity, proto, port, match);
		if (val) {
			*cookie = val->cookie;
			return CY_DROP_POLICY_DENY;
		}
	}
	val = cy_policy_probe(0, ep_id, dir, identity, proto, port, match);
	if (val) {
		*cookie = val->cookie;
		*vflags = val->flags;
		*proxy_port = val->proxy_port;
		return CY_OK_POLICY;
	}
	*cookie = 0;
	return CY_DROP_POLICY;
}

#endif /* CY_POLICY_H */
