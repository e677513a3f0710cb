/* lb_bind.h - NodePorts belong to the load balancer: a host process cannot
 * bind them.
 *
 * kube-proxy holds a socket open on every NodePort so nothing else on the node
 * takes the port; this keeps the port free without any socket: a bind() in the
 * node's own network namespace (CY_HOST_NETNS_COOKIE) to a port that is a
 * NodePort of this node for the socket's protocol, on any local address, fails
 * with EADDRINUSE. Pods have network namespaces of their own and bind freely.
 */
#ifndef CY_LIB_LB_BIND_H
#define CY_LIB_LB_BIND_H

#define CY_EADDRINUSE 98

static __always_inline int cy_lb4_bind_guard(struct bpf_sock_addr *ctx)
{
	struct lb4_nodeport_key key = {};

	if (bpf_get_netns_cookie(ctx) != CY_HOST_NETNS_COOKIE)
		return 1;
	key.port = (__u16)ctx->user_port;
	key.proto = (__u8)ctx->protocol;
	if (!cy_lb4_nodeport.lookup(&key))
		return 1;
	bpf_set_retval(-CY_EADDRINUSE);
	return 0;
}

#endif /* CY_LIB_LB_BIND_H */
