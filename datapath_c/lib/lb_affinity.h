/* lb_affinity.h - session affinity (ClientIP): the backend a client used last
 * for a frontend, kept in cy_lb4_aff while it is used within the frontend's
 * timeout and still sits in the same slot. Used by the socket programs
 * (lib/lb.h, clients keyed by network namespace) and the north-south ones
 * (lib/lb_nodeport.h, clients keyed by address).
 */
#ifndef CY_LIB_LB_AFFINITY_H
#define CY_LIB_LB_AFFINITY_H

/* The backend of an affinity entry, if still in slot `slot` of the frontend. */
static __always_inline __u32 cy_lb4_affine(struct lb4_key *key, struct lb4_service *svc,
					   struct lb4_affinity_key *akey, __u16 *slot)
{
	struct lb4_affinity_value *seen = cy_lb4_aff.lookup(akey);
	if (!seen)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	if (now - seen->last_used_ns > (__u64)svc->affinity_timeout * 1000000000ULL)
		return 0;
	if (seen->slot == 0 || seen->slot > svc->count)
		return 0;
	key->slot = seen->slot;
	struct lb4_service *entry = cy_lb4_svc.lookup(key);
	key->slot = 0;
	if (!entry || entry->backend_id != seen->backend_id)
		return 0;
	*slot = seen->slot;
	return seen->backend_id;
}

/* Remember the client's choice (refreshing its time). */
static __always_inline void cy_lb4_remember(struct lb4_affinity_key *akey, __u32 backend_id, __u16 slot)
{
	struct lb4_affinity_value now = {};

	now.last_used_ns = bpf_ktime_get_ns();
	now.backend_id = backend_id;
	now.slot = slot;
	cy_lb4_aff.update(akey, &now);
}

#endif /* CY_LIB_LB_AFFINITY_H */
