/* ipcache.h - peer address to security identity.
 *
 * Local endpoints are looked up first (cy_endpoints, exact), then the
 * cluster-wide cy_ipcache (longest prefix). An address found in neither is
 * "world" (CY_ID_WORLD), as in Cilium.
 */
#ifndef CY_IPCACHE_H
#define CY_IPCACHE_H

static __always_inline __u32 cy_identity_of(__u32 addr)
{
	struct endpoint_info *ep = cy_endpoints.lookup(&addr);
	struct ipcache_key key = {};
	struct ipcache_value *val;

	if (ep)
		return ep->identity;
	key.prefixlen = 32;
	key.addr = addr;
	val = cy_ipcache.lookup(&key);
	return val ? val->identity : CY_ID_WORLD;
}

#endif /* CY_IPCACHE_H */
