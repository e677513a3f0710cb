/* lb_trail_maps.h - the trail a socket translation leaves for the flow events, declared once.
 *
 * A pod's socket translated to a backend at connect()/sendmsg() (lib/lb.h)
 * leaves a trail keyed by (the pod's IPv4, backend address, backend port,
 * the socket's source port when it has one already, else 0, protocol): the
 * frontend it asked for and when. The first packet of that connection
 * leaving the pod (lib/enforce.h, no conntrack entry yet) looks for it under
 * its own source port, then under 0, takes it into its conntrack entry and
 * deletes it (also when policy drops that packet), so the connection's flow
 * events name the frontend (the agent turns it into the Service's name); a
 * trail older than CY_LB_TRAIL_FRESH_NS is never taken. A socket that sends
 * again (unconnected UDP) leaves its next trails under its own source port,
 * where only a packet from that port can find them.
 * cy_lb4_podns tells the socket hooks which pod a network namespace is
 * (written by the agent from the CNI plugin's registrations).
 * Included by the socket programs (through lb_maps.h) and the pod programs.
 */
#ifndef CY_LB_TRAIL_MAPS_H
#define CY_LB_TRAIL_MAPS_H

#ifndef CY_PIN_DIR
#error "CY_PIN_DIR must be rendered"
#endif

#define CY_LB_TRAIL_MAX 16384
#define CY_LB_PODNS_MAX 16384
#define CY_LB_TRAIL_FRESH_NS 1000000000ULL

struct lb4_trail_key {
	__u32 pod;      /* the client pod's IPv4 (network order) */
	__u32 backend;  /* the backend's address (network order) */
	__be16 port;    /* the backend's port (network order) */
	__be16 sport;   /* the socket's source port (network order), 0 before it has one */
	__u8 proto;
	__u8 pad[3];
};

struct lb4_trail {
	__u64 at_ns;    /* bpf_ktime_get_ns() of the translation */
	__u32 address;  /* the frontend asked for (network order) */
	__be16 port;
	__u16 pad;
};

/* cy_lb4_trail: translations not yet taken by a packet (LRU). */
BPF_TABLE_PINNED("lru_hash", struct lb4_trail_key, struct lb4_trail, cy_lb4_trail,
		 CY_LB_TRAIL_MAX, CY_PIN_DIR "/cy_lb4_trail");

/* cy_lb4_podns: network namespace cookie -> the pod's IPv4 (network order). */
BPF_TABLE_PINNED("hash", __u64, __u32, cy_lb4_podns, CY_LB_PODNS_MAX, CY_PIN_DIR "/cy_lb4_podns");

#endif /* CY_LB_TRAIL_MAPS_H */
