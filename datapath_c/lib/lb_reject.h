/* lb_reject.h - the north-south refusal of a connection to a frontend without
 * backends: kube-proxy REJECTs it, so the client's connect() fails at once.
 *
 * Used by lib/lb_nodeport.h (cy_ns_new): a TCP SYN gets a RST (cy_ns_reset), a
 * UDP datagram an ICMP port unreachable (cy_ns_unreachable), as kube-proxy's
 * REJECT rule refuses both (it answers TCP with an ICMP port unreachable too;
 * a RST fails the client's connect() the same way). The ICMP errors keep
 * within the node's kernel's rate limits (lib/lb_icmp_budget.h); the RSTs,
 * like those the kernel sends for its own closed ports, have none.
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

/* The bytes after the Ethernet header of an ICMP port unreachable that quotes
 * the datagram's IPv4 header (no options) and its first 8 bytes (RFC 792). */
struct cy_ns_icmp_unreach {
	struct iphdr ip;
	__u8 type;
	__u8 code;
	__u16 check;
	__u32 unused;
	struct iphdr quoted_ip;
	__u8 quoted_l4[8];
};

static __always_inline __u16 cy_ns_csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Refuse a UDP datagram (IPv4 header without options) to a frontend without
 * backends as kube-proxy's REJECT does: the datagram becomes, in place, an
 * ICMP destination unreachable / port unreachable from the frontend address
 * to the client, quoting its header, sent back out of the device. The client's
 * connected socket then fails with ECONNREFUSED instead of waiting. Its
 * checksum is right whether the datagram's own was complete or partial. */
static __always_inline int cy_ns_unreachable(struct __sk_buff *skb, __u32 l4off)
{
	struct cy_ns_icmp_unreach out = {};
	__u8 macs[12], swapped[12];
	__u32 size = sizeof(out);
	__u16 seed, completed;

	if (l4off != CY_NS_ETH_HLEN + sizeof(struct iphdr) ||
	    bpf_skb_load_bytes(skb, CY_NS_ETH_HLEN, &out.quoted_ip, sizeof(out.quoted_ip)) < 0 ||
	    bpf_skb_load_bytes(skb, l4off, out.quoted_l4, sizeof(out.quoted_l4)) < 0 ||
	    bpf_skb_load_bytes(skb, 0, macs, 12) < 0)
		return cy_ns_drop(CY_NS_DROP_NO_BACKEND);
	if (!cy_ns_icmp_allowed(out.quoted_ip.saddr)) {
		cy_ns_count(CY_NS_ICMP_LIMITED);
		return cy_ns_drop(CY_NS_DROP_NO_BACKEND);
	}
	/* room for the new IPv4 and ICMP headers in front of the quoted datagram,
	 * then everything past the quoted 8 bytes cut off */
	if (bpf_skb_adjust_room(skb, sizeof(struct iphdr) + 8, BPF_ADJ_ROOM_MAC, 0) < 0 ||
	    bpf_skb_change_tail(skb, CY_NS_ETH_HLEN + size, 0) < 0)
		return cy_ns_drop(CY_NS_DROP_REWRITE);
	out.ip.version = 4;
	out.ip.ihl = 5;
	out.ip.tot_len = bpf_htons(size);
	out.ip.ttl = 64;
	out.ip.protocol = CY_PROTO_ICMP;
	out.ip.saddr = out.quoted_ip.daddr;
	out.ip.daddr = out.quoted_ip.saddr;
	out.ip.check = cy_ns_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&out.ip, sizeof(out.ip), 0));
	out.type = 3; /* destination unreachable */
	out.code = 3; /* port unreachable */
	/* A datagram whose checksum its sender left to a device (partial) holds
	 * only the pseudo-header seed in its checksum field, and the skb still
	 * tells the device to complete the checksum there, over the bytes from
	 * that header on: over the quoted 8 bytes now, on whichever device
	 * completes it on the way back. So the ICMP sum is taken with the value
	 * that completion writes, then moved to the bytes as they are with the
	 * replace helper, which changes nothing on a partial skb: right in both
	 * cases. (0 and 0xffff, the value a completed zero is sent as, add the
	 * same to a one's complement sum.) */
	__builtin_memcpy(&seed, out.quoted_l4 + 6, 2);
	completed = cy_ns_csum_fold(bpf_csum_diff(0, 0, (__be32 *)out.quoted_l4, sizeof(out.quoted_l4), 0));
	__builtin_memcpy(out.quoted_l4 + 6, &completed, 2);
	out.check = cy_ns_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&out.type, size - sizeof(out.ip), 0));
	__builtin_memcpy(out.quoted_l4 + 6, &seed, 2);
	__builtin_memcpy(swapped, macs + 6, 6);
	__builtin_memcpy(swapped + 6, macs, 6);
	if (bpf_skb_store_bytes(skb, 0, swapped, 12, 0) < 0 ||
	    bpf_skb_store_bytes(skb, CY_NS_ETH_HLEN, &out, size, 0) < 0 ||
	    bpf_l4_csum_replace(skb, CY_NS_ETH_HLEN + sizeof(out.ip) + 2, completed, seed, 2) < 0)
		return cy_ns_drop(CY_NS_DROP_REWRITE);
	cy_ns_count(CY_NS_DROP_NO_BACKEND);
	cy_ns_count(CY_NS_ICMP_SENT);
	return bpf_redirect(skb->ifindex, 0);
}

#endif /* CY_LIB_LB_REJECT_H */
