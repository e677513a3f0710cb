/* lb_nat_maps.h - the north-south load balancer's own maps, declared once.
 *
 * Read and written by the tc programs on the node's external devices
 * (programs/tc_lb_{ingress,egress}.c.j2, logic in lib/lb_nodeport.h); they
 * also read the frontends and backends of lb_maps.h. cy_lb4_dev is filled by
 * the agent (ciliary.nodeagent.datapath.lb_device), cy_lb4_nat only by the
 * programs. Addresses and ports in network byte order.
 */
#ifndef CY_LB_NAT_MAPS_H
#define CY_LB_NAT_MAPS_H

#ifndef CY_PIN_DIR
#error "CY_PIN_DIR must be rendered (programs/lb_macros.j2)"
#endif

/* Clients whose ICMP error budget is tracked at once. */
#define CY_NS_ICMP_PEERS 16384

/* Where a NAT entry is looked up: the device's tc ingress or tc egress. */
#define CY_NAT_AT_INGRESS 1
#define CY_NAT_AT_EGRESS 2

/* A packet as it crosses one hook: its 5-tuple and the hook. */
struct lb4_nat_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 hook; /* CY_NAT_AT_* */
	__u16 pad;
};

/* What such a packet becomes. A connection has two entries: the forward one
 * (client -> frontend, at ingress; backend_id != 0) and the reply one
 * (backend -> client at egress for a local backend; backend -> SNAT address
 * at ingress for a remote one). With DSR the entry node has the forward one
 * only, and the backend's node the reply one (backend -> client at egress). */
struct lb4_nat_entry {
	__u64 expires;     /* bpf_ktime_get_coarse_ns() deadline */
	__u32 saddr;       /* rewrite the source to this address and port */
	__u32 daddr;       /* and the destination to this one */
	__u16 sport;
	__u16 dport;
	__u32 backend_id;  /* forward entries: the backend chosen (cy_lb4_be) */
	__u32 frontend_id; /* forward entries: the frontend's id when chosen */
	__u8 flags;        /* CY_NAT_F_* */
	__u8 pad[7];
};

#define CY_NAT_F_REDIRECT 0x1 /* send the rewritten packet back out by a route lookup (SNAT path) */
#define CY_NAT_F_CLOSING 0x2  /* TCP FIN or RST seen: short lifetime from now on */
#define CY_NAT_F_DSR 0x4      /* forward entry, direct server return: only the destination is rewritten, a TCP SYN and every UDP datagram carry the DSR option (lib/lb_dsr.h) */
#define CY_NAT_F_DSR_LEARNT 0x8 /* reply entry learnt from a DSR option (lib/lb_dsr.h): no forward entry on this node */

/* An external device of the node: the address remote backends see as the
 * source (SNAT). A packet on a device without an entry passes untouched. */
struct lb4_device {
	__u32 snat_addr;
	__u32 flags; /* reserved, 0 */
};

/* cy_lb4_nat: both entries of every north-south connection (LRU). */
BPF_TABLE_PINNED("lru_hash", struct lb4_nat_key, struct lb4_nat_entry, cy_lb4_nat,
		 CY_LB_NAT_MAX, CY_PIN_DIR "/cy_lb4_nat");

/* cy_lb4_dev: ifindex -> lb4_device, the devices the agent attached to. */
BPF_TABLE_PINNED("hash", __u32, struct lb4_device, cy_lb4_dev, 64, CY_PIN_DIR "/cy_lb4_dev");

/* What is left of a budget for ICMP errors (lib/lb_icmp_budget.h). */
struct lb4_icmp_budget {
	__u64 stamp;  /* bpf_ktime_get_ns() of the last refill */
	__s64 credit; /* per client: nanoseconds of credit; node-wide: messages */
};

/* cy_lb4_icmppeer: client IPv4 address -> its budget (LRU: an evicted client
 * starts again with a full one, as a new peer does in the kernel). */
BPF_TABLE_PINNED("lru_hash", __u32, struct lb4_icmp_budget, cy_lb4_icmppeer, CY_NS_ICMP_PEERS,
		 CY_PIN_DIR "/cy_lb4_icmppeer");

/* cy_lb4_icmpnode: one entry, the node-wide budget. */
BPF_TABLE_PINNED("array", __u32, struct lb4_icmp_budget, cy_lb4_icmpnode, 1, CY_PIN_DIR "/cy_lb4_icmpnode");

/* cy_lb4_nsct: packets per outcome (CY_NS_*, lib/lb_nodeport.h), per CPU. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, cy_lb4_nsct, CY_NS_REASON_MAX, CY_PIN_DIR "/cy_lb4_nsct");

#endif /* CY_LB_NAT_MAPS_H */
