/* lb_icmp_budget.h - the rate limits on the ICMP errors the north-south load
 * balancer sends, the node's kernel's own (net.ipv4.icmp_*).
 *
 * kube-proxy refuses a UDP datagram to a Service without endpoints with an
 * iptables REJECT, whose ICMP port unreachable the kernel sends only within
 * its limits for the types in net.ipv4.icmp_ratemask: per client, one every
 * icmp_ratelimit ms after a burst of six; node-wide, icmp_msgs_per_sec with a
 * burst of icmp_msgs_burst. lib/lb_reject.h asks here before it answers; the
 * agent renders the node's values (programs/lb_macros.j2). Concurrent CPUs may
 * spend the same credit twice (the kernel allows the same race). Unlike the
 * kernel, a message costs exactly one node-wide credit, not a random 0 to 2.
 */
#ifndef CY_LIB_LB_ICMP_BUDGET_H
#define CY_LIB_LB_ICMP_BUDGET_H

#ifndef CY_NS_ICMP_PEER_INTERVAL_NS
#error "CY_NS_ICMP_* must be rendered (programs/lb_macros.j2)"
#endif

#define CY_NS_ICMP_PEER_BURST 6 /* the kernel's XRLIM_BURST_FACTOR */
#define CY_NS_ICMP_NODE_STEP_NS 20000000ULL /* node-wide refills at most every 20 ms (HZ / 50) */
#define CY_NS_SECOND_NS 1000000000ULL

/* One message more to this client: its credit (nanoseconds, at most six
 * intervals; a new client starts full) pays one interval. */
static __always_inline int cy_ns_icmp_peer_allows(__u32 client, __u64 now)
{
	struct lb4_icmp_budget fresh = {}, *b;
	__u64 full = CY_NS_ICMP_PEER_BURST * CY_NS_ICMP_PEER_INTERVAL_NS;
	__s64 credit;

	if (CY_NS_ICMP_PEER_INTERVAL_NS == 0)
		return 1;
	b = cy_lb4_icmppeer.lookup(&client);
	if (!b) {
		fresh.stamp = now;
		fresh.credit = full - CY_NS_ICMP_PEER_INTERVAL_NS;
		cy_lb4_icmppeer.update(&client, &fresh);
		return 1;
	}
	credit = b->credit + (__s64)(now - b->stamp);
	if (credit > (__s64)full)
		credit = full;
	b->stamp = now;
	if (credit < (__s64)CY_NS_ICMP_PEER_INTERVAL_NS) {
		b->credit = credit;
		return 0;
	}
	b->credit = credit - CY_NS_ICMP_PEER_INTERVAL_NS;
	return 1;
}

/* The node-wide budget, or NULL when the map cannot be read. */
static __always_inline struct lb4_icmp_budget *cy_ns_icmp_node(void)
{
	__u32 zero = 0;

	return cy_lb4_icmpnode.lookup(&zero);
}

/* Has the node a credit for one more message? A credit left, or a refill of
 * icmp_msgs_per_sec per second elapsed (at most one second's, at most the
 * burst) once 20 ms have passed since the last refill and it adds at least
 * one message (a refill that adds none keeps the time it counts from). Spends
 * nothing: cy_ns_icmp_node_spend does, once the message is allowed. */
static __always_inline int cy_ns_icmp_node_has(struct lb4_icmp_budget *b, __u64 now)
{
	__u64 elapsed;
	__s64 credit, added;

	if (b->stamp == 0) { /* first use: a full burst */
		b->stamp = now;
		b->credit = CY_NS_ICMP_NODE_BURST;
	}
	if (b->credit > 0)
		return 1;
	elapsed = now - b->stamp;
	if (elapsed > CY_NS_SECOND_NS)
		elapsed = CY_NS_SECOND_NS;
	if (elapsed < CY_NS_ICMP_NODE_STEP_NS)
		return 0;
	added = (__s64)(CY_NS_ICMP_NODE_PER_SEC * elapsed / CY_NS_SECOND_NS);
	if (added <= 0)
		return 0;
	credit = b->credit + added;
	if (credit > CY_NS_ICMP_NODE_BURST)
		credit = CY_NS_ICMP_NODE_BURST;
	b->stamp = now;
	b->credit = credit;
	return credit > 0;
}

static __always_inline void cy_ns_icmp_node_spend(struct lb4_icmp_budget *b)
{
	__sync_fetch_and_add(&b->credit, -1);
}

/* May the node answer this client with one more ICMP error? The kernel's
 * order: the node-wide budget is asked without spending, then the client's
 * (spent when it allows), then the node-wide credit is spent. */
static __always_inline int cy_ns_icmp_allowed(__u32 client)
{
	__u64 now = bpf_ktime_get_ns();
	struct lb4_icmp_budget *node;

	if (!CY_NS_ICMP_LIMITED_TYPE)
		return 1;
	node = cy_ns_icmp_node();
	if (!node || !cy_ns_icmp_node_has(node, now) || !cy_ns_icmp_peer_allows(client, now))
		return 0;
	cy_ns_icmp_node_spend(node);
	return 1;
}

#endif /* CY_LIB_LB_ICMP_BUDGET_H */
