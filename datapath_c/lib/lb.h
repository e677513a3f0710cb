/* lb.h - socket-level load balancing: pick a backend once, at connect() or
 * sendmsg(), and rewrite the destination; show the frontend again to
 * recvmsg() and getpeername().
 *
 * A destination that is no frontend passes untouched. A frontend without
 * backends refuses (the syscall fails with ECONNREFUSED, like kube-proxy's
 * REJECT); one whose Local policy leaves no backend on this node fails with
 * EPERM (kube-proxy drops; a socket hook cannot make the client wait).
 * Backends are chosen at random at connect(); for unconnected UDP (sendmsg)
 * by the socket's cookie, so one socket keeps one backend while the set is
 * unchanged; with session affinity, the one this client's network namespace
 * used last within the timeout.
 */
#ifndef CY_LIB_LB_H
#define CY_LIB_LB_H

#define CY_SYSCALL_PASS 1
#define CY_SYSCALL_FAIL 0
#define CY_ECONNREFUSED 111
#define CY_EPERM 1

static __always_inline int cy_lb4_fail(struct lb4_service *svc)
{
	bpf_set_retval(svc->flags & CY_LB_F_NO_LOCAL ? -CY_EPERM : -CY_ECONNREFUSED);
	return CY_SYSCALL_FAIL;
}

/* Translate ctx's destination if it is a frontend of protocol `proto`;
 * `per_socket` picks the slot by socket cookie instead of at random. Every
 * translation is recorded for recvmsg/getpeername. */
static __always_inline int cy_lb4_translate(struct bpf_sock_addr *ctx, __u8 proto, int per_socket)
{
	struct lb4_key key = {};
	key.address = ctx->user_ip4;
	key.dport = (__u16)ctx->user_port;
	key.proto = proto;
	struct lb4_service *svc = cy_lb4_svc.lookup(&key);
	if (!svc)
		return CY_SYSCALL_PASS;
	if (svc->count == 0)
		return cy_lb4_fail(svc);
	__u32 frontend_id = svc->backend_id;
	__u16 count = svc->count;
	__u16 flags = svc->flags;
	struct lb4_affinity_key akey = {};
	__u32 backend_id = 0;
	__u16 slot = 0;
	if (flags & CY_LB_F_AFFINITY) {
		akey.client = bpf_get_netns_cookie(ctx);
		akey.client_kind = CY_LB_AFF_NETNS;
		akey.frontend_id = frontend_id;
		backend_id = cy_lb4_affine(&key, svc, &akey, &slot);
	}
	if (!backend_id) {
		__u64 pick = per_socket ? bpf_get_socket_cookie(ctx) : bpf_get_prandom_u32();
		slot = (__u16)(pick % count) + 1;
		key.slot = slot;
		struct lb4_service *entry = cy_lb4_svc.lookup(&key);
		if (!entry)
			return cy_lb4_fail(svc);
		backend_id = entry->backend_id;
	}
	struct lb4_backend *backend = cy_lb4_be.lookup(&backend_id);
	if (!backend)
		return cy_lb4_fail(svc);
	if (flags & CY_LB_F_AFFINITY) {
		cy_lb4_remember(&akey, backend_id, slot);
	}
	struct lb4_sock_key skey = {};
	skey.cookie = bpf_get_socket_cookie(ctx);
	skey.address = backend->address;
	skey.port = backend->port;
	struct lb4_frontend front = {};
	front.address = key.address;
	front.port = key.dport;
	cy_lb4_revsk.update(&skey, &front);
	ctx->user_ip4 = backend->address;
	ctx->user_port = backend->port;
	return CY_SYSCALL_PASS;
}

/* Show the frontend instead of the backend a socket was translated to. */
static __always_inline int cy_lb4_reverse(struct bpf_sock_addr *ctx)
{
	struct lb4_sock_key skey = {};
	skey.cookie = bpf_get_socket_cookie(ctx);
	skey.address = ctx->user_ip4;
	skey.port = (__u16)ctx->user_port;
	struct lb4_frontend *front = cy_lb4_revsk.lookup(&skey);
	if (front) {
		ctx->user_ip4 = front->address;
		ctx->user_port = front->port;
	}
	return CY_SYSCALL_PASS;
}

#endif /* CY_LIB_LB_H */
