/* types.h - structs stored in maps or sent to user space.
 *
 * Each struct is mirrored 1:1 (field order, sizes, explicit padding) by a
 * ctypes.Structure in ciliary/nodeagent/datapath/maps.py; a unit test checks
 * the sizes. Addresses are IPv4 in network byte order; ports in keys are in
 * network byte order so that LPM prefixes run over the port's high bits.
 */
#ifndef CY_TYPES_H
#define CY_TYPES_H

/* cy_ipcache key: LPM trie over an IPv4 prefix. */
struct ipcache_key {
	__u32 prefixlen; /* 0..32 */
	__u32 addr;      /* network order */
};

struct ipcache_value {
	__u32 identity;
	__u32 flags; /* reserved, 0 */
};

/* cy_endpoints value, keyed by the pod's IPv4 (__u32, network order). */
struct endpoint_info {
	__u32 ep_id;    /* node-local endpoint id, >= 1, allocated by the planner */
	__u32 identity; /* security identity of the pod */
	__u32 flags;    /* CY_EP_*_ENFORCED, CY_EP_*_DENY */
	__u32 ifindex;  /* host-side veth in the node netns: the source check's fast path */
	__u32 revision; /* intent revision (mod 2^32) whose writes are all done; the
			 * agent reads it back to report a policy enforcing */
};

/* cy_policy / cy_policy_deny key: LPM trie. prefixlen counts bits of the
 * fields after it: CY_POLICY_FIXED_BITS (ep_id..protocol) + 0..16 port bits. */
struct policy_key {
	__u32 prefixlen;
	__u32 ep_id;
	__u32 identity;  /* 0 = any peer */
	__u8 direction;  /* CY_DIR_* */
	__u8 protocol;   /* 0 = any protocol */
	__be16 dport;    /* network order; ICMP: the ICMP type */
};

struct policy_value {
	__u32 cookie;     /* rule cookie for flow events (crc32 of the rule refs) */
	__u16 flags;      /* CY_POLICY_DENY in cy_policy_deny */
	__u16 proxy_port; /* host order; != 0: deliver to the node-local proxy on this
			   * port (lib/redirect.h); cy_policy entries of CY_DIR_EGRESS only */
};

/* cy_ct key: one connection as seen from one local pod, the same for both of
 * that pod's hooks: cy_from_pod keys a packet by (saddr, daddr, sport, dport),
 * cy_to_pod by (daddr, saddr, dport, sport). So a connection's forward packets
 * and its replies find one entry with one lookup; two pods of the node that
 * talk to each other have an entry each. ICMP echo uses the echo id as sport
 * for requests and as dport for replies, so both land on the same key. */
struct ct_key {
	__u32 pod_addr;
	__u32 peer_addr;
	__be16 pod_port;
	__be16 peer_port;
	__u8 protocol;
	__u8 pad[3];
};

struct ct_entry {
	__u64 expires;  /* bpf_ktime_get_coarse_ns() deadline */
	__u32 ep_id;
	__u32 cookie;   /* rule that allowed the connection (last forward packet's) */
	__u8 origin;    /* CY_DIR_* of the hook whose allowed packet opened it: the
			 * forward direction; packets at the other hook are replies */
	__u8 reported[2]; /* TCP flags already reported in a flow event (monitor
			   * aggregation, events.h): [0] forward, [1] reply */
	__u8 pad;
	__u16 last_report[2]; /* coarse clock second (mod 2^16) of the side's last
			       * flow event: [0] forward, [1] reply (interval reports) */
	__u32 svc_addr;  /* the Service frontend a pod's socket asked for when it
			  * opened the connection (include/lb_trail_maps.h), 0: none */
	__be16 svc_port;
	__u16 pad2;
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

/* cy_events record. Ports and addresses as on the wire (network order). */
struct flow_event {
	__u64 ts_ns;     /* bpf_ktime_get_ns() */
	__u32 saddr;
	__u32 daddr;
	__be16 sport;
	__be16 dport;    /* ICMP: type in the low byte of sport, code in dport */
	__u8 protocol;
	__u8 tcp_flags;
	__u8 verdict;    /* CY_VERDICT_* */
	__u8 reason;     /* drop_reasons.h */
	__u8 direction;  /* CY_DIR_* */
	__u8 is_reply;
	__u8 family;     /* 4 or 6 */
	__u8 established; /* a forward packet of a tracked connection, not its first
			   * (monitor aggregation's flag and interval reports) */
	__u32 ep_id;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 cookie;
	__u32 ifindex;
	__u32 len;
	__u32 saddr6[4]; /* family 6 only (saddr, daddr are then 0) */
	__u32 daddr6[4];
	__u8 match_type; /* CY_MATCH_*: the kind of policy entry that decided */
	__u8 pad[3];
	__u32 svc_addr;  /* the connection's Service frontend (ct_entry.svc_addr), 0: none */
	__be16 svc_port;
	__u16 pad2;
};

#endif /* CY_TYPES_H */
