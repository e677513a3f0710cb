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
