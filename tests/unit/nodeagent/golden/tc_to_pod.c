/* tc_to_pod - packets entering a pod.
 * Rendered by ciliary.nodeagent.rendering; local #includes are inlined. */
/* Rendered per node by ciliary.nodeagent.rendering (RenderContext). */
#define CY_PIN_DIR "/sys/fs/bpf/ciliary/golden-node"
#define CY_IPCACHE_MAX 16384
#define CY_ENDPOINTS_MAX 1024
#define CY_POLICY_MAX 65536
#define CY_CT_MAX 65536
#define CY_EVENTS_PAGES 256
#define CY_TRACE_ALL 0
#define CY_TRACE_FLAGS 1
#define CY_TRACE_INTERVAL_S 5


#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>

/* ---- include/consts.h ---- */
/* consts.h - numeric constants shared by every program.
 *
 * Values that a node may tune (map sizes, feature switches) are rendered by
 * programs/macros.j2 as #defines *before* this header is inlined, so each one
 * here is only a default (#ifndef). Nothing here depends on policy content:
 * policy lives in maps and never recompiles a program.
 */
#ifndef CY_CONSTS_H
#define CY_CONSTS_H

/* Map sizes (entries). */
#ifndef CY_IPCACHE_MAX
#define CY_IPCACHE_MAX 16384
#endif
#ifndef CY_ENDPOINTS_MAX
#define CY_ENDPOINTS_MAX 1024
#endif
#ifndef CY_POLICY_MAX
#define CY_POLICY_MAX 65536
#endif
#ifndef CY_CT_MAX
#define CY_CT_MAX 65536
#endif
#ifndef CY_EVENTS_PAGES
#define CY_EVENTS_PAGES 64
#endif

/* Feature switches. */
#ifndef CY_TRACE_ALL
#define CY_TRACE_ALL 0 /* 1: one flow event per packet; 0: new flows and drops only */
#endif
#ifndef CY_TRACE_FLAGS
#define CY_TRACE_FLAGS 1 /* 1 (with CY_TRACE_ALL 0): also a packet of a tracked TCP connection
			  * carrying a flag not reported yet in its direction */
#endif
#ifndef CY_TRACE_INTERVAL_S
#define CY_TRACE_INTERVAL_S 5 /* with CY_TRACE_FLAGS: also a tracked connection's packet when its
			       * direction reported nothing for this many seconds; 0: never */
#endif

/* Direction of a policy as seen by the endpoint (types.h: policy_key.direction). */
#define CY_DIR_INGRESS 1 /* traffic entering the pod: tc egress of the host veth */
#define CY_DIR_EGRESS 2  /* traffic leaving the pod: tc ingress of the host veth */

/* endpoint_info.flags */
#define CY_EP_INGRESS_ENFORCED (1U << 0)
#define CY_EP_EGRESS_ENFORCED (1U << 1)
/* cy_policy_deny holds entries for this endpoint and direction; when clear the
 * deny probes are skipped. The agent keeps the flag a superset of the map's
 * contents: set before the first deny entry is written, cleared only after the
 * last one is deleted (ciliary.nodeagent.planning.write_order). */
#define CY_EP_INGRESS_DENY (1U << 2)
#define CY_EP_EGRESS_DENY (1U << 3)

/* policy_value.flags */
#define CY_POLICY_DENY (1U << 0)
#define CY_POLICY_HTTP (1U << 1) /* allow entry with HTTP rules: redirect to the proxy (lib/l7redirect.h) */
/* allow entry whose L7 rules need a proxy this node does not run: drop it
 * (CY_DROP_PROXY_UNAVAILABLE), never pass it as a plain L3/L4 allow
 * (ciliary.nodeagent.planning.entry_flags) */
#define CY_POLICY_NO_PROXY (1U << 2)
/* the key's port block is "any port" (0 port bits): tells the match types apart */
#define CY_POLICY_ANY_PORT (1U << 3)

/* flow_event.match_type: what kind of entry decided, numbered as Hubble's
 * Flow.policy_match_type (none when no entry did: default deny, unenforced,
 * replies). "proto" kinds: a protocol with any port. */
#define CY_MATCH_NONE 0
#define CY_MATCH_L3_ONLY 1    /* a peer identity, any protocol and port */
#define CY_MATCH_L3_L4 2      /* a peer identity and a port */
#define CY_MATCH_L4_ONLY 3    /* any peer, a port */
#define CY_MATCH_ALL 4        /* any peer, any protocol and port */
#define CY_MATCH_L3_PROTO 5   /* a peer identity and a protocol, any port */
#define CY_MATCH_PROTO_ONLY 6 /* any peer, a protocol, any port */

/* Proxy redirection (lib/redirect.h): the mark that routes a packet assigned to a
 * proxy socket to local delivery, and the routing table holding the local route.
 * ciliary.nodeagent.proxy_routing installs the matching rule with the same numbers. */
#define CY_MARK_TO_PROXY 0x0A00
#define CY_MARK_PROXY_MASK 0x0F00
#define CY_PROXY_TABLE 2005

/* Reserved identities (Cilium's numbering). */
#define CY_ID_ANY 0   /* in policy keys: any peer */
#define CY_ID_WORLD 2 /* peer not in the ipcache */

/* Policy LPM key: bits of data before the port (ep_id, identity, direction,
 * protocol) are always matched in full; the port adds 0..16 prefix bits. */
#define CY_POLICY_FIXED_BITS 80
#define CY_POLICY_FULL_BITS 96

/* Conntrack lifetimes (ns). */
#define CY_CT_LIFETIME_TCP (21600ULL * 1000000000ULL)
#define CY_CT_LIFETIME_OTHER (60ULL * 1000000000ULL)
#define CY_CT_LIFETIME_CLOSE (10ULL * 1000000000ULL)
#define CY_CT_REFRESH (1ULL * 1000000000ULL) /* rewrite expiry at most once a second */

/* Verdicts in flow events. */
#define CY_VERDICT_FORWARDED 1
#define CY_VERDICT_DROPPED 2

/* Protocol numbers (netinet/in.h is not available to bcc programs). */
#define CY_PROTO_ICMP 1
#define CY_PROTO_TCP 6
#define CY_PROTO_UDP 17
#define CY_PROTO_SCTP 132

#define CY_PROTO_ICMPV6 58

/* ICMPv6 types the veth needs (router solicitation .. redirect): never dropped. */
#define CY_ICMPV6_ND_FIRST 133
#define CY_ICMPV6_ND_LAST 137

#define CY_ICMP_ECHO_REPLY 0
#define CY_ICMP_ECHO_REQUEST 8

#define CY_ETH_P_IP 0x0800
#define CY_ETH_P_IPV6 0x86DD
#define CY_IP_MF 0x2000
#define CY_IP_OFFSET 0x1FFF

/* TCP flag bits as in the 13th byte of the TCP header. */
#define CY_TCP_FIN 0x01
#define CY_TCP_SYN 0x02
#define CY_TCP_RST 0x04
#define CY_TCP_ACK 0x10

#endif /* CY_CONSTS_H */
/* ---- include/drop_reasons.h ---- */
/* drop_reasons.h - why a packet was forwarded or dropped.
 *
 * One number space for both outcomes so that counters and flow events carry a
 * single "reason" byte. Mirrored by ciliary.nodeagent.datapath.maps.Reason.
 * Counters are indexed by direction * CY_REASON_MAX + reason.
 */
#ifndef CY_DROP_REASONS_H
#define CY_DROP_REASONS_H

#define CY_OK_POLICY 1       /* forwarded: an allow entry matched */
#define CY_OK_REPLY 2        /* forwarded: reply of a tracked connection (conntrack) */
#define CY_OK_UNENFORCED 3   /* forwarded: the direction is not enforced for this endpoint */
#define CY_DROP_POLICY_DENY 4 /* dropped: a deny entry matched (deny beats allow) */
#define CY_DROP_POLICY 5     /* dropped: enforced and no allow entry matched (default deny) */
#define CY_DROP_INVALID 6    /* dropped: L4 header truncated on an enforced endpoint */
#define CY_DROP_FRAGMENT 7   /* dropped: IPv4 fragment without L4 header on an enforced endpoint */
#define CY_DROP_INVALID_L3 8 /* dropped: IPv4 header shorter than 20 bytes (ihl < 5, truncated) */
#define CY_DROP_UNSUPPORTED_L3 9 /* dropped: IPv6 (no IPv6 policy yet) other than ND */
#define CY_DROP_SPOOFED_SOURCE 10 /* dropped: IPv4 from a pod's veth whose source is not the pod's address */
#define CY_DROP_PROXY_UNAVAILABLE 11 /* dropped: its entry redirects to a proxy and no proxy (socket or device) is there */
#define CY_OK_PROXY 12       /* forwarded: an allow entry matched and the packet went to the node's proxy */
#define CY_OK_FROM_PROXY 13  /* forwarded: the node's HTTP proxy connects to the pod (judged by the proxy) */

#define CY_REASON_MAX 16

#endif /* CY_DROP_REASONS_H */
/* ---- include/types.h ---- */
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
/* ---- include/maps.h ---- */
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
/* ---- include/lb_trail_maps.h ---- */
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
/* ---- lib/parse.h ---- */
/* parse.h - Ethernet/IPv4/IPv6/L4 parsing with direct packet access, failing closed.
 *
 * cy_parse() fills a struct cy_packet: addresses, ports, the port used for
 * policy (destination port, or the ICMP type for ICMP) and the conntrack
 * ports (ICMP echo id), and says what kind of packet it is (CY_PARSE_*).
 * Headers that lie beyond the linear area are pulled in first
 * (bpf_skb_pull_data), so "not in the linear area" never means "unreadable";
 * only the bytes the headers need are pulled (cy_headers_len), never payload:
 * a TCP segment whose payload sits in page fragments right after its headers
 * (the usual case for locally sent data) is left as it is.
 * What the parser cannot read is never passed as if it were understood:
 *   - CY_PARSE_BAD_L3: an IPv4 frame shorter than an IPv4 header, or ihl < 5
 *     (the caller drops it: the stack would discard it anyway);
 *   - CY_PARSE_FRAGMENT: a non-first fragment (no L4 header at all), or a first
 *     fragment too short to hold the L4 header: no ports to evaluate policy on
 *     (fragments are not tracked; the caller drops them on an enforced direction);
 *   - CY_PARSE_SHORT: an unfragmented packet whose L4 header is truncated;
 *   - CY_PARSE_IPV6: IPv6, which has no policy yet (dropped by the caller on
 *     an enforced direction),
 *     except CY_PARSE_IPV6_ND: Neighbor Discovery and router messages (ICMPv6
 *     133-137 right after the fixed header, hop limit 255) that the veth needs,
 *     and only link-scoped ones: the destination in ff02::/16 (link-local
 *     multicast: solicitations, DAD, RS/RA) or fe80::/10 (replies to the
 *     gateway fe80::1), or the source in fe80::/10 (the gateway's replies
 *     and probes to a pod's global address). A pod's own solicitations carry
 *     its global source and a multicast or fe80 destination, so "both sides
 *     link-local" would break address resolution. Either form stays on the
 *     veth (the stack forwards neither link-scoped destinations nor
 *     link-local sources); an ND-typed message between two non-link-local
 *     addresses, or from :: to one, is dropped like other IPv6.
 *     MLD is not among them: it travels behind a hop-by-hop header, nothing on
 *     a point-to-point veth snoops it, so it is dropped like other IPv6.
 * Other ethertypes (ARP, ...) are CY_PARSE_SKIP and passed.
 */
#ifndef CY_PARSE_H
#define CY_PARSE_H

#define CY_PARSE_SKIP 0     /* not IP: not ours (ARP, ...) */
#define CY_PARSE_OK 1       /* IPv4, fully parsed */
#define CY_PARSE_SHORT 2    /* IPv4, unfragmented, L4 header truncated */
#define CY_PARSE_FRAGMENT 3 /* IPv4 fragment without a (complete) L4 header */
#define CY_PARSE_BAD_L3 4   /* IPv4 header unreadable or ihl < 5 */
#define CY_PARSE_IPV6 5     /* IPv6 other than the ND messages below */
#define CY_PARSE_IPV6_ND 6  /* ICMPv6 133-137 (router/neighbor discovery, redirect) */

/* Bytes worth having linear: Ethernet, the longest IPv4 header, a TCP header. */
#define CY_PULL_LEN (14 + 60 + 20)

struct cy_packet {
	__u32 saddr;
	__u32 daddr;
	__be16 sport;       /* conntrack ports (network order) */
	__be16 dport;
	__u16 policy_port;  /* host order: dport, ICMP type, or 0 */
	__u8 protocol;      /* IPv4 protocol; IPv6: the next header after the fixed header */
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 is_fragment;   /* IPv4 fragment (first or not): never tracked */
	__u8 family;        /* 4 or 6 */
	__u8 pad;
	__u32 len;
	__u32 saddr6[4];    /* IPv6 only */
	__u32 daddr6[4];
};

/* The L4 header bytes cy_parse reads for a protocol (0: none). */
static __always_inline __u32 cy_l4_need(__u8 protocol)
{
	switch (protocol) {
	case CY_PROTO_TCP:
		return sizeof(struct tcphdr);
	case CY_PROTO_UDP:
	case CY_PROTO_SCTP:
		return sizeof(struct udphdr);
	case CY_PROTO_ICMP:
		return sizeof(struct icmphdr);
	default:
		return 0;
	}
}

/* fe80::/10, first byte and second byte of the address. */
static __always_inline int cy_ipv6_link_local(const __u8 *a)
{
	return a[0] == 0xfe && (a[1] & 0xc0) == 0x80;
}

/* The addresses ND on a point-to-point veth uses (see the header comment). */
static __always_inline int cy_ipv6_nd_scoped(const struct ipv6hdr *ip6)
{
	const __u8 *src = ip6->saddr.in6_u.u6_addr8, *dst = ip6->daddr.in6_u.u6_addr8;

	return (dst[0] == 0xff && dst[1] == 0x02) || cy_ipv6_link_local(dst) || cy_ipv6_link_local(src);
}

static __always_inline int cy_parse_ipv6(void *data, void *data_end, struct cy_packet *p)
{
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	__u8 *icmp6;

	p->family = 6;
	if ((void *)(ip6 + 1) > data_end)
		return CY_PARSE_IPV6;
	__builtin_memcpy(p->saddr6, &ip6->saddr, 16);
	__builtin_memcpy(p->daddr6, &ip6->daddr, 16);
	p->protocol = ip6->nexthdr;
	if (ip6->nexthdr != CY_PROTO_ICMPV6)
		return CY_PARSE_IPV6;
	icmp6 = (void *)(ip6 + 1);
	if ((void *)(icmp6 + 1) > data_end)
		return CY_PARSE_IPV6;
	p->icmp_type = *icmp6;
	if (ip6->hop_limit == 255 && *icmp6 >= CY_ICMPV6_ND_FIRST && *icmp6 <= CY_ICMPV6_ND_LAST &&
	    cy_ipv6_nd_scoped(ip6))
		return CY_PARSE_IPV6_ND;
	return CY_PARSE_IPV6;
}

/* How many leading bytes the parser reads: Ethernet, the IPv4 header (its ihl)
 * and the L4 header cy_l4_need names, or the IPv6 fixed header and one ICMPv6
 * byte. CY_PULL_LEN (the most) when the Ethernet or IPv4 header needed to tell
 * is not linear itself. */
static __always_inline __u32 cy_headers_len(void *data, void *data_end)
{
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	__u32 ihl;

	if ((void *)(eth + 1) > data_end)
		return CY_PULL_LEN;
	if (eth->h_proto == bpf_htons(CY_ETH_P_IPV6))
		return sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + 1;
	if (eth->h_proto != bpf_htons(CY_ETH_P_IP))
		return sizeof(struct ethhdr);
	if ((void *)(ip + 1) > data_end)
		return CY_PULL_LEN;
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return sizeof(struct ethhdr) + sizeof(*ip);
	if (ip->frag_off & bpf_htons(CY_IP_OFFSET))
		return sizeof(struct ethhdr) + ihl; /* non-first fragment: no L4 header */
	return sizeof(struct ethhdr) + ihl + cy_l4_need(ip->protocol);
}

static __always_inline int cy_parse(struct __sk_buff *skb, struct cy_packet *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	void *l4;
	__u32 ihl, tot_len, need, len = skb->len;

	p->len = len;
	if (data + CY_PULL_LEN > data_end && data_end - data < len) {
		/* Some header bytes may be in paged data: make linear what the headers need. */
		need = cy_headers_len(data, data_end);
		if (data + need > data_end) {
			bpf_skb_pull_data(skb, len < need ? len : need);
			data = (void *)(long)skb->data;
			data_end = (void *)(long)skb->data_end;
		}
	}
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return CY_PARSE_SKIP;
	if (eth->h_proto == bpf_htons(CY_ETH_P_IPV6))
		return cy_parse_ipv6(data, data_end, p);
	if (eth->h_proto != bpf_htons(CY_ETH_P_IP))
		return CY_PARSE_SKIP;
	p->family = 4;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return CY_PARSE_BAD_L3;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->protocol = ip->protocol;
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return CY_PARSE_BAD_L3;

	need = cy_l4_need(ip->protocol);
	tot_len = bpf_ntohs(ip->tot_len); /* 0 for BIG TCP packets: bounded by data_end only */
	if (ip->frag_off & bpf_htons(CY_IP_MF | CY_IP_OFFSET)) {
		p->is_fragment = 1;
		if (ip->frag_off & bpf_htons(CY_IP_OFFSET))
			return CY_PARSE_FRAGMENT; /* not the first: no L4 header at all */
		if (tot_len && tot_len < ihl + need)
			return CY_PARSE_FRAGMENT; /* first, but the L4 header does not fit */
	} else if (tot_len && tot_len < ihl + need) {
		return CY_PARSE_SHORT;
	}

	l4 = (void *)ip + ihl;
	switch (ip->protocol) {
	case CY_PROTO_TCP: {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end)
			return p->is_fragment ? CY_PARSE_FRAGMENT : CY_PARSE_SHORT;
		p->sport = tcp->source;
		p->dport = tcp->dest;
		p->policy_port = bpf_ntohs(tcp->dest);
		p->tcp_flags = ((__u8 *)tcp)[13];
		break;
	}
	case CY_PROTO_UDP:
	case CY_PROTO_SCTP: {
		/* UDP and SCTP both start with source and destination ports. */
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > data_end)
			return p->is_fragment ? CY_PARSE_FRAGMENT : CY_PARSE_SHORT;
		p->sport = udp->source;
		p->dport = udp->dest;
		p->policy_port = bpf_ntohs(udp->dest);
		break;
	}
	case CY_PROTO_ICMP: {
		struct icmphdr *icmp = l4;
		if ((void *)(icmp + 1) > data_end)
			return p->is_fragment ? CY_PARSE_FRAGMENT : CY_PARSE_SHORT;
		p->icmp_type = icmp->type;
		p->policy_port = icmp->type;
		if (icmp->type == CY_ICMP_ECHO_REQUEST)
			p->sport = icmp->un.echo.id;
		else if (icmp->type == CY_ICMP_ECHO_REPLY)
			p->dport = icmp->un.echo.id;
		break;
	}
	default:
		break;
	}
	return CY_PARSE_OK;
}

#endif /* CY_PARSE_H */
/* ---- lib/counters.h ---- */
/* counters.h - per-CPU packet and byte counters per (direction, reason). */
#ifndef CY_COUNTERS_H
#define CY_COUNTERS_H

static __always_inline void cy_count(__u8 dir, __u8 reason, __u32 len)
{
	__u32 idx = (__u32)dir * CY_REASON_MAX + reason;
	struct counter *c = cy_counters.lookup(&idx);

	if (c) {
		c->packets += 1;
		c->bytes += len;
	}
}

#endif /* CY_COUNTERS_H */
/* ---- lib/events.h ---- */
/* events.h - flow events to user space through the cy_events ring buffer.
 *
 * A failed ringbuf_output (buffer full) increments cy_lost, so loss is always
 * visible to the agent (datapath/flows.py reports it).
 */
#ifndef CY_EVENTS_H
#define CY_EVENTS_H

static __always_inline void cy_emit(struct __sk_buff *skb, const struct cy_packet *p, __u8 dir,
				    __u8 verdict, __u8 reason, __u8 is_reply, __u32 ep_id,
				    __u32 src_identity, __u32 dst_identity, __u32 cookie, __u8 established,
				    __u8 match_type, __u32 svc_addr, __u16 svc_port)
{
	struct flow_event ev = {};

	ev.ts_ns = bpf_ktime_get_ns();
	ev.saddr = p->saddr;
	ev.daddr = p->daddr;
	ev.sport = p->sport;
	ev.dport = p->dport;
	if (p->protocol == CY_PROTO_ICMP || (p->family == 6 && p->protocol == CY_PROTO_ICMPV6)) {
		ev.sport = p->icmp_type;
		ev.dport = 0;
	}
	ev.protocol = p->protocol;
	ev.tcp_flags = p->tcp_flags;
	ev.verdict = verdict;
	ev.reason = reason;
	ev.direction = dir;
	ev.is_reply = is_reply;
	ev.established = established;
	ev.match_type = match_type;
	ev.ep_id = ep_id;
	ev.src_identity = src_identity;
	ev.dst_identity = dst_identity;
	ev.cookie = cookie;
	ev.svc_addr = svc_addr;
	ev.svc_port = svc_port;
	ev.ifindex = skb->ifindex;
	ev.len = p->len;
	ev.family = p->family;
	if (p->family == 6) {
		__builtin_memcpy(ev.saddr6, p->saddr6, 16);
		__builtin_memcpy(ev.daddr6, p->daddr6, 16);
	}
	if (cy_events.ringbuf_output(&ev, sizeof(ev), 0) != 0) {
		__u32 zero = 0;
		__u64 *lost = cy_lost.lookup(&zero);
		if (lost)
			*lost += 1;
	}
}

#endif /* CY_EVENTS_H */
/* ---- lib/ipcache.h ---- */
/* ipcache.h - peer address to security identity.
 *
 * Local endpoints are looked up first (cy_endpoints, exact), then the
 * cluster-wide cy_ipcache (longest prefix). An address found in neither is
 * "world" (CY_ID_WORLD), as in Cilium.
 */
#ifndef CY_IPCACHE_H
#define CY_IPCACHE_H

static __always_inline __u32 cy_identity_of(__u32 addr)
{
	struct endpoint_info *ep = cy_endpoints.lookup(&addr);
	struct ipcache_key key = {};
	struct ipcache_value *val;

	if (ep)
		return ep->identity;
	key.prefixlen = 32;
	key.addr = addr;
	val = cy_ipcache.lookup(&key);
	return val ? val->identity : CY_ID_WORLD;
}

#endif /* CY_IPCACHE_H */
/* ---- lib/policy.h ---- */
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
/* ---- lib/conntrack.h ---- */
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
/* ---- lib/redirect.h ---- */
/* redirect.h - hand a pod's packet to a node-local proxy socket, transparently.
 *
 * One concept: a policy entry whose policy_value.proxy_port is set sends the
 * matching packets to the proxy listening on that port in the node's network
 * namespace, without rewriting them. The proxy sees the pod's address and port
 * as the peer and the original destination as its local address (TCP: the
 * accepted socket's name; UDP: IP_RECVORIGDSTADDR), and answers from the
 * original destination (IP_TRANSPARENT), so the pod never sees the proxy.
 *
 * How: bpf_sk_lookup_{tcp,udp} finds the socket and bpf_sk_assign() attaches
 * it to the skb; the stack then delivers the packet to that socket, provided
 * routing sends it to local delivery. That is what the mark is for: the agent
 * keeps, inside the node's namespace only,
 *     ip rule add fwmark CY_MARK_TO_PROXY/CY_MARK_PROXY_MASK lookup CY_PROXY_TABLE
 *     ip route add local 0.0.0.0/0 dev lo table CY_PROXY_TABLE
 * (ciliary.nodeagent.proxy_routing; the numbers are rendered there from the
 * same constants). bpf_sk_assign is valid at tc ingress only: cy_from_pod, the
 * pod's egress. The proxy socket needs IP_TRANSPARENT.
 *
 * TCP: a connection's first packet (SYN without ACK) is assigned to the
 * proxy's listener, found by the proxy port; the listener's request socket
 * then carries the original 4-tuple, so every later packet (the handshake's
 * ACK, data) only needs the mark: local delivery finds that request or
 * accepted socket by its 4-tuple, as for any local connection. (Assigning the
 * listener to those packets would hand them to the listener itself, which
 * does not know the half-open connection.)
 * UDP: always the proxy's socket on the proxy port.
 *
 * Fail closed: no proxy socket, or a protocol other than TCP/UDP -> the
 * caller drops the packet (CY_DROP_PROXY_UNAVAILABLE); it is never passed
 * unproxied.
 */
#ifndef CY_REDIRECT_H
#define CY_REDIRECT_H

/* 0: assigned (the caller returns TC_ACT_OK); -1: no socket (drop). */
static __always_inline int cy_redirect_to_proxy(struct __sk_buff *skb, const struct cy_packet *p,
						__u16 proxy_port)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk = 0;
	long err;

	tuple.ipv4.saddr = p->saddr;
	tuple.ipv4.daddr = p->daddr;
	tuple.ipv4.sport = p->sport;
	tuple.ipv4.dport = p->dport;
	if (p->protocol == CY_PROTO_TCP) {
		if ((p->tcp_flags & (CY_TCP_SYN | CY_TCP_ACK)) != CY_TCP_SYN)
			goto mark;
		tuple.ipv4.dport = bpf_htons(proxy_port);
		sk = bpf_sk_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
		if (sk && sk->state != BPF_TCP_LISTEN) {
			bpf_sk_release(sk);
			sk = 0;
		}
	} else if (p->protocol == CY_PROTO_UDP) {
		tuple.ipv4.dport = bpf_htons(proxy_port);
		sk = bpf_sk_lookup_udp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	}
	if (!sk)
		return -1;
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return -1;
mark:
	skb->mark = (skb->mark & ~CY_MARK_PROXY_MASK) | CY_MARK_TO_PROXY;
	return 0;
}

#endif /* CY_REDIRECT_H */
/* ---- lib/l7redirect.h ---- */
/* l7redirect.h - hand a pod's ingress connections to the node's HTTP proxy (Envoy).
 *
 * An allow entry of an ingress direction whose policy_value.flags carries
 * CY_POLICY_HTTP (the entry has HTTP rules, ciliary.operator.intents.PolicyEntry.http)
 * does not deliver the packet to the pod: cy_to_pod runs at tc EGRESS of the pod's
 * host veth, where a packet cannot be assigned to a local socket (bpf_sk_assign
 * works at tc ingress only). So the packet is marked CY_MARK_TO_L7PROXY, its
 * destination MAC is set to the proxy device's (the node-local veth CY_PROXY_IFINDEX,
 * created by the agent, ciliary.nodeagent.proxy_plumbing) and it is redirected to
 * that device's INGRESS. There it re-enters the node's stack: an iptables TPROXY rule
 * on the mark hands it to Envoy's transparent listener (by the original destination
 * address and port, which Envoy then sees as its local address; the source is
 * untouched), and a policy-routing rule on the mark delivers it locally. Every
 * forward packet of the connection takes this path (they are all re-evaluated).
 *
 * The proxy's own connection to the pod carries socket mark CY_MARK_FROM_L7PROXY
 * (SO_MARK, ciliary.nodeagent.envoy_config): cy_to_pod lets those packets through
 * without a policy lookup and never redirects them again (the request was judged by
 * the proxy on behalf of the original peer). Only a process of the node's network
 * namespace with CAP_NET_ADMIN can set a mark: a packet's mark is cleared when it
 * crosses into another network namespace, so a pod cannot forge it.
 * CY_PROXY_IFINDEX 0 (no proxy device) drops what should be redirected
 * (CY_DROP_PROXY_UNAVAILABLE): an HTTP rule is never widened to an L4 allow.
 */
#ifndef CY_L7REDIRECT_H
#define CY_L7REDIRECT_H

#ifndef CY_PROXY_IFINDEX
#define CY_PROXY_IFINDEX 0
#define CY_PROXY_MAC {0, 0, 0, 0, 0, 0}
#endif

/* Marks of the ingress HTTP path, in the CY_MARK_PROXY_MASK nibble shared with
 * lib/redirect.h (whose egress mark is CY_MARK_TO_PROXY); ciliary.nodeagent.envoy_config
 * and proxy_plumbing (table 2012) use the same numbers. */
#define CY_MARK_TO_L7PROXY 0x0C00
#define CY_MARK_FROM_L7PROXY 0x0D00

/* Was this packet sent by the node's proxy (its upstream connection to a pod)? */
static __always_inline int cy_from_proxy(const struct __sk_buff *skb)
{
	return (skb->mark & CY_MARK_PROXY_MASK) == CY_MARK_FROM_L7PROXY;
}

/* Redirect skb to the proxy device's ingress; TC_ACT_SHOT if there is none. */
static __always_inline int cy_redirect_to_l7proxy(struct __sk_buff *skb)
{
	__u8 mac[6] = CY_PROXY_MAC;

	if (!CY_PROXY_IFINDEX)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, mac, 6, 0) < 0)
		return TC_ACT_SHOT;
	skb->mark = CY_MARK_TO_L7PROXY;
	return bpf_redirect(CY_PROXY_IFINDEX, BPF_F_INGRESS);
}

#endif /* CY_L7REDIRECT_H */
/* ---- lib/enforce.h ---- */
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

/* Hook: tc EGRESS (clsact ffff:fff3) of the pod's host-side veth.
 * Sees: traffic entering the pod. Enforces: the pod's INGRESS policy. */
int cy_to_pod(struct __sk_buff *skb)
{
	return cy_enforce(skb, CY_DIR_INGRESS);
}
