/* maps.h - every map of the datapath, declared once.
 *
 * All maps are pinned under CY_PIN_DIR (one directory per node, rendered into
 * the program by the agent), so a restarted agent reuses them and both hooks
 * (compiled as separate objects) share them. Sizes come from consts.h
 * (rendered per node). Names are at most 15 characters.
 */
#ifndef CY_MAPS_H
#define CY_MAPS_H

#ifndef CY_PIN_DIR
#error "CY_PIN_DIR must be rendered (programs/macros.j2)"
#endif

/* cy_ipcache: which security identity owns an IPv4 address.
 * key ipcache_key (LPM prefix), value ipcache_value, CY_IPCACHE_MAX entries.
 * Filled from NodeIntent.ipcache; longest prefix wins; a miss means world. */
BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, struct ipcache_value, cy_ipcache,
		 CY_IPCACHE_MAX, CY_PIN_DIR "/cy_ipcache", BPF_F_NO_PREALLOC);

/* cy_endpoints: the pods of this node.
 * key __u32 pod IPv4 (network order), value endpoint_info, CY_ENDPOINTS_MAX.
 * A packet whose pod side is not in this map is passed untouched. */
BPF_TABLE_PINNED("hash", __u32, struct endpoint_info, cy_endpoints,
		 CY_ENDPOINTS_MAX, CY_PIN_DIR "/cy_endpoints");

/* cy_ep_ifindex: the pod behind each host veth.
 * key __u32 ifindex of the host-side veth, value __u32 the pod's IPv4 (network
 * order, a cy_endpoints key), CY_ENDPOINTS_MAX. An IPv6 packet has no IPv4
 * address to find its endpoint by: the veth it crosses names the pod. It is
 * also the address an IPv4 packet leaving that veth must come from
 * (CY_DROP_SPOOFED_SOURCE, lib/enforce.h). */
BPF_TABLE_PINNED("hash", __u32, __u32, cy_ep_ifindex, CY_ENDPOINTS_MAX, CY_PIN_DIR "/cy_ep_ifindex");

/* cy_policy: allow entries of every endpoint and direction.
 * key policy_key (LPM: port ranges are stored as prefix blocks), value
 * policy_value, CY_POLICY_MAX entries (one per block). See lib/policy.h. */
BPF_TABLE_PINNED("lpm_trie", struct policy_key, struct policy_value, cy_policy,
		 CY_POLICY_MAX, CY_PIN_DIR "/cy_policy", BPF_F_NO_PREALLOC);

/* cy_policy_deny: deny entries, same layout as cy_policy. Kept apart so a
 * more specific allow can never hide a less specific deny in one LPM lookup. */
BPF_TABLE_PINNED("lpm_trie", struct policy_key, struct policy_value, cy_policy_deny,
		 CY_POLICY_MAX, CY_PIN_DIR "/cy_policy_deny", BPF_F_NO_PREALLOC);

/* cy_ct: connection tracking, LRU hash.
 * key ct_key (tuple + direction of the hook that saw the first packet),
 * value ct_entry, CY_CT_MAX entries. Only used to pass replies; see
 * lib/conntrack.h for why forward packets are always re-evaluated. */
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_entry, cy_ct,
		 CY_CT_MAX, CY_PIN_DIR "/cy_ct");

/* cy_counters: packets and bytes per (direction, reason), per CPU.
 * key __u32 direction * CY_REASON_MAX + reason, value counter. */
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, cy_counters,
		 3 * CY_REASON_MAX, CY_PIN_DIR "/cy_counters");

/* cy_lost: flow events that did not fit the ring buffer, per CPU.
 * key __u32 0, value __u64. Loss is counted, never silent. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, cy_lost, 1, CY_PIN_DIR "/cy_lost");

/* cy_events: ring buffer of struct flow_event, CY_EVENTS_PAGES pages.
 * Written like BPF_RINGBUF_OUTPUT, but pinned (bcc has no pinned variant of
 * that macro) so events keep flowing to a restarted agent. */
struct cy_events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" CY_PIN_DIR "/cy_events")))
struct cy_events_table_t cy_events = { .max_entries = CY_EVENTS_PAGES * 4096 };

#endif /* CY_MAPS_H */
