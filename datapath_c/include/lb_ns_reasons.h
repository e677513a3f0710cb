/* lb_ns_reasons.h - outcomes counted by the north-south load balancer.
 *
 * Index of cy_lb4_nsct (include/lb_nat_maps.h). Mirrored by
 * ciliary.nodeagent.datapath.lb_device.NS_REASONS.
 */
#ifndef CY_LB_NS_REASONS_H
#define CY_LB_NS_REASONS_H

#define CY_NS_NEW 1              /* a new connection to a frontend: backend chosen, translated */
#define CY_NS_FORWARD 2          /* a packet of a known connection, client -> backend, translated */
#define CY_NS_REPLY 3            /* a reply, backend -> client, translated back */
#define CY_NS_DROP_NO_BACKEND 4  /* refused: the frontend has no backend (a TCP SYN is answered with a RST, a UDP datagram with an ICMP port unreachable, both also counted below; the rest is dropped) */
#define CY_NS_DROP_NO_LOCAL 5    /* dropped: externalTrafficPolicy Local and no backend on this node */
#define CY_NS_DROP_FRAGMENT 6    /* dropped: an IPv4 fragment of a frontend's or a translated connection's packet */
#define CY_NS_DROP_NAT_PORTS 7   /* dropped: no free SNAT port for this backend */
#define CY_NS_DROP_NO_ROUTE 8    /* dropped: no route / neighbour to send the translated packet on */
#define CY_NS_DROP_REWRITE 9     /* dropped: the kernel refused a rewrite (checksum or store helper) */
#define CY_NS_RST_SENT 10        /* a TCP RST answered a connection attempt to a frontend without backends */
#define CY_NS_DROP_SOURCE_RANGE 12 /* dropped: a new connection from outside a LoadBalancer frontend's loadBalancerSourceRanges */
#define CY_NS_ICMP_SENT 11       /* an ICMP port unreachable answered a UDP datagram to a frontend without backends */
#define CY_NS_ICMP_LIMITED 13    /* a UDP datagram to a frontend without backends dropped unanswered: the node's ICMP rate limits (lib/lb_icmp_budget.h) */
#define CY_NS_DSR_LEARNT 14      /* a backend's node read the DSR option of a new connection: its replies will leave as the frontend (lib/lb_dsr.h) */
#define CY_NS_DROP_DSR 15        /* dropped: a DSR packet could not carry its option (its IPv4 header has options, the option makes it too big for the route, or the kernel refused), or a new connection to a local backend would take the four addresses and ports of a live DSR connection */

#define CY_NS_REASON_MAX 16

#endif /* CY_LB_NS_REASONS_H */
