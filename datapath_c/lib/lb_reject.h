/* lb_reject.h - the north-south refusal of a connection to a frontend without
 * backends: kube-proxy REJECTs it, so the client's connect() fails at once.
 *
 * Used by lib/lb_nodeport.h (cy_ns_new) for TCP only; UDP, which would need an
 * ICMP port unreachable grown around the datagram, is dropped and counted there.
 */
#ifndef CY_LIB_LB_REJECT_H
#define CY_LIB_LB_REJECT_H

/* Refuse a TCP SYN (no ACK, no payload, IPv4 header without options) to a
 * frontend without backends as kube-proxy's REJECT does: the SYN becomes, in
 * place, a RST|ACK from the frontend (seq 0, ack = the SYN's seq + 1, TCP
 * options cut off) sent back out of the device. Checksums are updated with the
 * replace helpers only, so a checksum the device completes later (partial)
 * stays right: swapping the addresses and the ports changes no sum. */
static __always_inline int cy_ns_reset(struct __sk_buff *skb, __u32 l4off)
{
	struct iphdr ip;
	struct tcphdr tcp;
	__u8 macs[12], swapped[12];
	__u32 csum = l4off + 16, doff, tot, word, seq, ack;
	__u16 flags_old, flags_new, zero16 = 0;

	if (l4off != CY_NS_ETH_HLEN + sizeof(ip) || bpf_skb_load_bytes(skb, CY_NS_ETH_HLEN, &ip, sizeof(ip)) < 0 ||
	    bpf_skb_load_bytes(skb, l4off, &tcp, sizeof(tcp)) < 0 || bpf_skb_load_bytes(skb, 0, macs, 12) < 0)
		return cy_ns_drop(CY_NS_DROP_NO_BACKEND);
	doff = tcp.doff * 4;
	tot = bpf_ntohs(ip.tot_len);
	if (doff < sizeof(tcp) || tot != sizeof(ip) + doff)
		return cy_ns_drop(CY_NS_DROP_NO_BACKEND);
	seq = tcp.seq;
	ack = bpf_htonl(bpf_ntohl(tcp.seq) + 1);
	__builtin_memcpy(&flags_old, (__u8 *)&tcp + 12, 2);
	((__u8 *)&flags_new)[0] = 0x50;          /* data offset 5 words */
	((__u8 *)&flags_new)[1] = 0x14;          /* RST | ACK */
	if (bpf_l4_csum_replace(skb, csum, seq, 0, 4) < 0 || bpf_l4_csum_replace(skb, csum, tcp.ack_seq, ack, 4) < 0 ||
	    bpf_l4_csum_replace(skb, csum, flags_old, flags_new, 2) < 0 ||
	    bpf_l4_csum_replace(skb, csum, tcp.window, 0, 2) < 0 ||
	    bpf_l4_csum_replace(skb, csum, tcp.urg_ptr, 0, 2) < 0 ||
	    bpf_l4_csum_replace(skb, csum, bpf_htons(doff), bpf_htons(sizeof(tcp)), BPF_F_PSEUDO_HDR | 2) < 0 ||
	    bpf_l3_csum_replace(skb, CY_NS_IP_CSUM, ip.tot_len, bpf_htons(sizeof(ip) + sizeof(tcp)), 2) < 0)
		return cy_ns_drop(CY_NS_DROP_REWRITE);
#pragma unroll
	for (int i = 0; i < 10; i++) { /* the options leave the segment: their words leave the sum */
		if ((__u32)(sizeof(tcp) + i * 4) >= doff)
			break;
		if (bpf_skb_load_bytes(skb, l4off + sizeof(tcp) + i * 4, &word, 4) < 0 ||
		    bpf_l4_csum_replace(skb, csum, word, 0, 4) < 0)
			return cy_ns_drop(CY_NS_DROP_REWRITE);
	}
	if (bpf_skb_load_bytes(skb, csum, &tcp.check, 2) < 0 ||
	    bpf_skb_load_bytes(skb, CY_NS_IP_CSUM, &ip.check, 2) < 0)
		return cy_ns_drop(CY_NS_DROP_REWRITE);
	word = ip.saddr;
	ip.saddr = ip.daddr;
	ip.daddr = word;
	ip.tot_len = bpf_htons(sizeof(ip) + sizeof(tcp));
	flags_old = tcp.source;
	tcp.source = tcp.dest;
	tcp.dest = flags_old;
	tcp.seq = 0;
	tcp.ack_seq = ack;
	__builtin_memcpy((__u8 *)&tcp + 12, &flags_new, 2);
	tcp.window = zero16;
	tcp.urg_ptr = zero16;
	__builtin_memcpy(swapped, macs + 6, 6);
	__builtin_memcpy(swapped + 6, macs, 6);
	if (bpf_skb_store_bytes(skb, 0, swapped, 12, 0) < 0 ||
	    bpf_skb_store_bytes(skb, CY_NS_ETH_HLEN, &ip, sizeof(ip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, l4off, &tcp, sizeof(tcp), 0) < 0 ||
	    bpf_skb_change_tail(skb, l4off + sizeof(tcp), 0) < 0)
		return cy_ns_drop(CY_NS_DROP_REWRITE);
	cy_ns_count(CY_NS_DROP_NO_BACKEND);
	cy_ns_count(CY_NS_RST_SENT);
	return bpf_redirect(skb->ifindex, 0);
}

#endif /* CY_LIB_LB_REJECT_H */
