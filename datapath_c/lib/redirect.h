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
