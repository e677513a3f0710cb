/* lb_maps.h - the load balancer's frontend and backend maps and their types, declared once.
 *
 * Filled by the agent from its node's load-balancing intent
 * (ciliary.nodeagent.lb_planning); read by the cgroup sock_addr programs
 * (programs/sock_*.c.j2, logic in lib/lb.h) and by the north-south tc
 * programs on the external devices (programs/tc_lb_*.c.j2, lib/lb_nodeport.h). Pinned under CY_PIN_DIR next to
 * the policy maps, so a restarted agent and all four programs share them.
 * Addresses and ports are in network byte order. Sizes come from the
 * rendered CY_LB_* defines (programs/lb_macros.j2).
 */
#ifndef CY_LB_MAPS_H
#define CY_LB_MAPS_H

#ifndef CY_PIN_DIR
#error "CY_PIN_DIR must be rendered (programs/lb_macros.j2)"
#endif

/* A frontend (address, port, L4 protocol) and a slot: slot 0 is the
 * frontend's own entry, slots 1..count name its backends. TCP and UDP on
 * one port are different keys. Scope 0 serves every client; a frontend whose
 * slot 0 carries CY_LB_F_EXT_LOCAL also has entries of scope
 * CY_LB_SCOPE_EXTERNAL: the backends clients from outside the node get
 * (externalTrafficPolicy Local: this node's only). */
struct lb4_key {
	__u32 address;
	__u16 dport;
	__u8 proto;
	__u8 scope;
	__u16 slot;
	__u16 pad2;
};

#define CY_LB_SCOPE_EXTERNAL 1

/* Slot 0: backend_id is the frontend's id (rev-NAT, affinity), count the
 * number of backend slots, flags CY_LB_F_*. Slot n: backend_id only. */
struct lb4_service {
	__u32 backend_id;
	__u16 count;
	__u16 flags;
	__u32 affinity_timeout; /* seconds; used with CY_LB_F_AFFINITY */
	__u32 pad;
};

#define CY_LB_F_NO_LOCAL 0x1 /* Local policy, endpoints elsewhere only: drop */
#define CY_LB_F_AFFINITY 0x2 /* sessionAffinity ClientIP */
#define CY_LB_F_EXTERNAL 0x4 /* NodePort, ExternalIP, LoadBalancer: served on the external devices too */
#define CY_LB_F_EXT_LOCAL 0x8 /* external clients use the CY_LB_SCOPE_EXTERNAL entries */
#define CY_LB_F_SRC_RANGES 0x10 /* loadBalancerSourceRanges: external clients must match cy_lb4_srcrange */
#define CY_LB_F_DSR 0x20 /* external clients reach backends on other nodes by direct server return (lib/lb_dsr.h) */

struct lb4_backend {
	__u32 address;
	__u16 port;
	__u8 proto;
	__u8 flags; /* CY_LB_BE_* */
};

#define CY_LB_BE_LOCAL 0x1 /* runs on this node: reached without SNAT */
#define CY_LB_BE_NODE 0x2  /* runs on a node of the cluster (its endpoint names one): that node's programs can answer by DSR */

/* The frontend a socket was translated from: key (socket cookie, backend
 * address, backend port), so recvmsg/getpeername show the frontend. */
struct lb4_sock_key {
	__u64 cookie;
	__u32 address;
	__u16 port;
	__u16 pad;
};

struct lb4_frontend {
	__u32 address;
	__u16 port;
	__u16 pad;
};

/* Session affinity: (client network-namespace cookie, frontend id). A pod
 * has its own network namespace and one IPv4, so this is ClientIP. */
/* Session affinity is remembered per client: a socket client by its network
 * namespace's cookie (its pod, or the node), a client from outside the node
 * (north-south) by its IPv4 address; client_kind keeps the two apart. */
struct lb4_affinity_key {
	__u64 client;
	__u32 frontend_id;
	__u32 client_kind;
};

#define CY_LB_AFF_NETNS 0   /* client: bpf_get_netns_cookie */
#define CY_LB_AFF_ADDRESS 1 /* client: the IPv4 source address (network order) */

struct lb4_affinity_value {
	__u64 last_used_ns;
	__u32 backend_id;
	__u16 slot;
	__u16 pad;
};

/* A NodePort (port in network byte order, L4 protocol): the bind hook keeps
 * host processes off it (lib/lb_bind.h). */
struct lb4_nodeport_key {
	__u16 port;
	__u8 proto;
	__u8 pad;
};

/* cy_lb4_svc: frontends and their backend slots, CY_LB_SERVICES_MAX entries. */
BPF_TABLE_PINNED("hash", struct lb4_key, struct lb4_service, cy_lb4_svc,
		 CY_LB_SERVICES_MAX, CY_PIN_DIR "/cy_lb4_svc");

/* cy_lb4_be: backend id -> backend, CY_LB_BACKENDS_MAX entries. */
BPF_TABLE_PINNED("hash", __u32, struct lb4_backend, cy_lb4_be,
		 CY_LB_BACKENDS_MAX, CY_PIN_DIR "/cy_lb4_be");

/* cy_lb4_revsk: per-socket reverse translation (LRU; written at connect and
 * sendmsg, read at recvmsg and getpeername). */
BPF_TABLE_PINNED("lru_hash", struct lb4_sock_key, struct lb4_frontend, cy_lb4_revsk,
		 CY_LB_REVSK_MAX, CY_PIN_DIR "/cy_lb4_revsk");

/* cy_lb4_aff: session affinity (LRU). */
BPF_TABLE_PINNED("lru_hash", struct lb4_affinity_key, struct lb4_affinity_value, cy_lb4_aff,
		 CY_LB_AFFINITY_MAX, CY_PIN_DIR "/cy_lb4_aff");

/* A client range a frontend admits from outside the node: LPM key whose
 * prefixlen counts the 32 bits of the frontend id plus the range's bits. */
struct lb4_srcrange_key {
	__u32 prefixlen;
	__u32 frontend_id;
	__u32 addr;
};

/* cy_lb4_srcrange: loadBalancerSourceRanges of the frontends flagged
 * CY_LB_F_SRC_RANGES (value unused: 1), CY_LB_SERVICES_MAX entries; read by
 * the north-south programs (lib/lb_nodeport.h). */
BPF_TABLE_PINNED("lpm_trie", struct lb4_srcrange_key, __u8, cy_lb4_srcrange,
		 CY_LB_SERVICES_MAX, CY_PIN_DIR "/cy_lb4_srcrange", BPF_F_NO_PREALLOC);

/* cy_lb4_nodeport: the NodePorts of this node's frontends (value: 1, plus
 * CY_LB_NP_DSR for a NodePort served by DSR), CY_LB_SERVICES_MAX entries. */
#define CY_LB_NP_DSR 0x2
BPF_TABLE_PINNED("hash", struct lb4_nodeport_key, __u8, cy_lb4_nodeport,
		 CY_LB_SERVICES_MAX, CY_PIN_DIR "/cy_lb4_nodeport");

#include "include/lb_trail_maps.h"

#endif /* CY_LB_MAPS_H */
