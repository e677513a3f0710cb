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
