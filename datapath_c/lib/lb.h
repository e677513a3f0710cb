/* lb.h - socket-level load balancing: pick a backend once, at connect() or
 * sendmsg(), and rewrite the destination; show the frontend again to
 * recvmsg() and getpeername().
 *
 * A destination that is no frontend passes untouched. A frontend without
 * backends refuses (the syscall fails with ECONNREFUSED, like kube-proxy's
 * REJECT); one whose Local policy leaves no backend on this node fails with
 * EPERM (kube-proxy drops; a socket hook cannot make the client wait), and so
 * does a pod outside a load balancer IP's loadBalancerSourceRanges.
 * Backends are chosen at random at connect(); for unconnected UDP (sendmsg)
 * by the socket's cookie, so one socket keeps one backend while the set is
 * unchanged; with session affinity, the one this client's network namespace
 * used last within the timeout. IPv6 sockets get the same for IPv4-mapped
 * destinations (::ffff:a.b.c.d: an IPv6 socket talking to an IPv4 Service).
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

/* A pod's socket (`pod`: its IPv4 from cy_lb4_podns) leaves the frontend it
 * asked for where its first packet to the backend finds it
 * (include/lb_trail_maps.h). The node's own sockets (NULL) leave none. */
static __always_inline void cy_lb4_leave_trail(struct bpf_sock_addr *ctx, const __u32 *pod,
					       const struct lb4_backend *backend, __u32 address, __u16 port,
					       __u8 proto)
{
	if (!pod)
		return;
	struct lb4_trail_key tkey = {};
	tkey.pod = *pod;
	tkey.backend = backend->address;
	tkey.port = backend->port;
	tkey.sport = bpf_htons((__u16)ctx->sk->src_port);
	tkey.proto = proto;
	struct lb4_trail trail = {};
	trail.at_ns = bpf_ktime_get_ns();
	trail.address = address;
	trail.port = port;
	cy_lb4_trail.update(&tkey, &trail);
}

/* loadBalancerSourceRanges for a socket client in network namespace `netns`:
 * a pod (`pod`: its IPv4 from cy_lb4_podns) must have its address inside the
 * frontend's ranges (cy_lb4_srcrange, as for clients outside the node); the
 * node's own processes are admitted (their source address is not chosen yet);
 * any other namespace (a pod not registered with its cookie) is refused: fail
 * closed. */
static __always_inline int cy_lb4_socket_admitted(__u64 netns, const __u32 *pod, __u32 frontend_id)
{
	if (!pod)
		return netns == CY_HOST_NETNS_COOKIE;
	struct lb4_srcrange_key rkey = {};
	rkey.prefixlen = 64;
	rkey.frontend_id = frontend_id;
	rkey.addr = *pod;
	return cy_lb4_srcrange.lookup(&rkey) != NULL;
}

/* cy_lb4_choose's outcomes. */
#define CY_LB_NOT_FRONTEND 0
#define CY_LB_TRANSLATED 1
#define CY_LB_REFUSED 2

/* The backend for a socket of protocol `proto` asking for (address, port)
 * (network order): CY_LB_TRANSLATED with *to set when it is a frontend with a
 * backend (the translation recorded for recvmsg/getpeername), CY_LB_REFUSED
 * (the syscall's error set) when it has none, CY_LB_NOT_FRONTEND otherwise.
 * `per_socket` picks the slot by socket cookie instead of at random. */
static __always_inline int cy_lb4_choose(struct bpf_sock_addr *ctx, __u32 address, __u16 port, __u8 proto,
					 int per_socket, struct lb4_frontend *to)
{
	struct lb4_key key = {};
	key.address = address;
	key.dport = port;
	key.proto = proto;
	struct lb4_service *svc = cy_lb4_svc.lookup(&key);
	if (!svc)
		return CY_LB_NOT_FRONTEND;
	__u64 netns = bpf_get_netns_cookie(ctx);
	__u32 *pod = cy_lb4_podns.lookup(&netns); /* NULL: not a registered pod's socket */
	if ((svc->flags & CY_LB_F_SRC_RANGES) && !cy_lb4_socket_admitted(netns, pod, svc->backend_id)) {
		bpf_set_retval(-CY_EPERM); /* kube-proxy drops; a socket hook cannot make the client wait */
		return CY_LB_REFUSED;
	}
	if (svc->count == 0) {
		cy_lb4_fail(svc);
		return CY_LB_REFUSED;
	}
	__u32 frontend_id = svc->backend_id;
	__u16 count = svc->count;
	__u16 flags = svc->flags;
	struct lb4_affinity_key akey = {};
	__u32 backend_id = 0;
	__u16 slot = 0;
	if (flags & CY_LB_F_AFFINITY) {
		akey.client = netns;
		akey.client_kind = CY_LB_AFF_NETNS;
		akey.frontend_id = frontend_id;
		backend_id = cy_lb4_affine(&key, svc, &akey, &slot);
	}
	if (!backend_id) {
		__u64 pick = per_socket ? bpf_get_socket_cookie(ctx) : bpf_get_prandom_u32();
		slot = (__u16)(pick % count) + 1;
		key.slot = slot;
		struct lb4_service *entry = cy_lb4_svc.lookup(&key);
		if (!entry) {
			cy_lb4_fail(svc);
			return CY_LB_REFUSED;
		}
		backend_id = entry->backend_id;
	}
	struct lb4_backend *backend = cy_lb4_be.lookup(&backend_id);
	if (!backend) {
		cy_lb4_fail(svc);
		return CY_LB_REFUSED;
	}
	if (flags & CY_LB_F_AFFINITY)
		cy_lb4_remember(&akey, backend_id, slot);
	struct lb4_sock_key skey = {};
	skey.cookie = bpf_get_socket_cookie(ctx);
	skey.address = backend->address;
	skey.port = backend->port;
	struct lb4_frontend front = {};
	front.address = address;
	front.port = port;
	cy_lb4_revsk.update(&skey, &front);
	cy_lb4_leave_trail(ctx, pod, backend, address, port, proto);
	to->address = backend->address;
	to->port = backend->port;
	return CY_LB_TRANSLATED;
}

/* An IPv4 socket: translate ctx's destination if it is a frontend. */
static __always_inline int cy_lb4_translate(struct bpf_sock_addr *ctx, __u8 proto, int per_socket)
{
	struct lb4_frontend to = {};
	int outcome = cy_lb4_choose(ctx, ctx->user_ip4, (__u16)ctx->user_port, proto, per_socket, &to);

	if (outcome == CY_LB_REFUSED)
		return CY_SYSCALL_FAIL;
	if (outcome == CY_LB_TRANSLATED) {
		ctx->user_ip4 = to.address;
		ctx->user_port = to.port;
	}
	return CY_SYSCALL_PASS;
}

/* ::ffff:a.b.c.d, the IPv4-mapped form an IPv6 socket uses for IPv4 peers. */
static __always_inline int cy_lb6_is_v4_mapped(struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 && ctx->user_ip6[2] == bpf_htonl(0x0000ffff);
}

/* An IPv6 socket: translate an IPv4-mapped destination like an IPv4 one (the
 * backend stays IPv4-mapped); any other IPv6 destination passes untouched. */
static __always_inline int cy_lb6_translate_v4_mapped(struct bpf_sock_addr *ctx, __u8 proto, int per_socket)
{
	struct lb4_frontend to = {};
	int outcome;

	if (!cy_lb6_is_v4_mapped(ctx))
		return CY_SYSCALL_PASS;
	outcome = cy_lb4_choose(ctx, ctx->user_ip6[3], (__u16)ctx->user_port, proto, per_socket, &to);
	if (outcome == CY_LB_REFUSED)
		return CY_SYSCALL_FAIL;
	if (outcome == CY_LB_TRANSLATED) {
		ctx->user_ip6[3] = to.address;
		ctx->user_port = to.port;
	}
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

/* The same for an IPv6 socket's IPv4-mapped peer. */
static __always_inline int cy_lb6_reverse_v4_mapped(struct bpf_sock_addr *ctx)
{
	struct lb4_sock_key skey = {};

	if (!cy_lb6_is_v4_mapped(ctx))
		return CY_SYSCALL_PASS;
	skey.cookie = bpf_get_socket_cookie(ctx);
	skey.address = ctx->user_ip6[3];
	skey.port = (__u16)ctx->user_port;
	struct lb4_frontend *front = cy_lb4_revsk.lookup(&skey);
	if (front) {
		ctx->user_ip6[3] = front->address;
		ctx->user_port = front->port;
	}
	return CY_SYSCALL_PASS;
}

#endif /* CY_LIB_LB_H */
