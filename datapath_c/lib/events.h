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
