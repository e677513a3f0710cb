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
