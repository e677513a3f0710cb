"""ADD, DEL and CHECK: the order of IPAM, plumbing and the agent call, and the result.

ADD  allocate → plumb → tell the agent; any failure undoes the earlier steps, so a
     failed ADD leaves neither an address nor a veth behind (an unreachable agent is
     error 101, an agent running without its datapath error 105: a pod without policy
     enforcement must not come up).
DEL  tell the agent (unreachable: logged, not fatal) → delete the veth → release the
     address. Every step tolerates "already gone", so DEL is idempotent.
CHECK the address is still reserved and the veth, address and routes are present.
"""

from __future__ import annotations

import logging
from typing import Any

from ciliary.cni import agent_client, config, errors, invocation, ipam, plumbing

log = logging.getLogger(__name__)


def _store(conf: config.NetworkConfig) -> ipam.IpamStore:
    return ipam.IpamStore(conf.data_dir, conf.ipam.subnet)


def build_result(conf: config.NetworkConfig, link: plumbing.PodLink) -> dict[str, Any]:
    """The ADD result in the requested version's shape."""
    ip_entry: dict[str, Any] = {"address": f"{link.ipv4}/32", "gateway": str(plumbing.GATEWAY), "interface": 1}
    if conf.cni_version != "1.0.0":
        ip_entry = {"version": "4", **ip_entry}
    return {
        "cniVersion": conf.cni_version,
        "interfaces": [
            {"name": link.host_ifname, "mac": link.host_mac},
            {"name": link.pod_ifname, "mac": link.pod_mac, "sandbox": link.netns},
        ],
        "ips": [ip_entry],
        "routes": [{"dst": "0.0.0.0/0", "gw": str(plumbing.GATEWAY)}],
        "dns": {},
    }


def endpoint_payload(inv: invocation.Invocation, link: plumbing.PodLink) -> agent_client.EndpointPayload:
    return {
        "containerId": inv.container_id,
        "podNamespace": inv.pod_namespace,
        "podName": inv.pod_name,
        "podUid": inv.pod_uid,
        "netns": link.netns,
        "ifname": link.pod_ifname,
        "hostIfname": link.host_ifname,
        "hostIfindex": link.host_ifindex,
        "mac": link.pod_mac,
        "ipv4": str(link.ipv4),
        "netnsCookie": link.netns_cookie,
    }


def cmd_add(inv: invocation.Invocation, conf: config.NetworkConfig) -> dict[str, Any]:
    store = _store(conf)
    address = store.allocate(inv.container_id, inv.ifname)
    log.info("Allocated %s container=%s subnet=%s", address, inv.container_id, conf.ipam.subnet)
    try:
        link = plumbing.setup(
            container_id=inv.container_id, netns_path=inv.netns, ifname=inv.ifname, ipv4=address, mtu=conf.mtu
        )
    except BaseException:
        store.release(inv.container_id, inv.ifname)
        raise
    try:
        agent_client.AgentClient(str(conf.agent_socket)).add_endpoint(endpoint_payload(inv, link))
    except (agent_client.AgentUnreachableError, agent_client.AgentRejectedError) as exc:
        _undo(inv, store)
        if isinstance(exc, agent_client.AgentRejectedError) and exc.status == 503 and \
                agent_client.DATAPATH_OFF in exc.body:
            raise errors.CniError(
                errors.ErrorCode.AGENT_NOT_ENFORCING,
                "The Ciliary agent runs without its datapath and enforces nothing; refusing to start the pod",
                str(exc),
            ) from exc
        if isinstance(exc, agent_client.AgentRejectedError):
            raise errors.CniError(
                errors.ErrorCode.AGENT_REJECTED, "The Ciliary agent rejected the endpoint", str(exc)
            ) from exc
        raise errors.CniError(
            errors.ErrorCode.AGENT_UNREACHABLE,
            f"The Ciliary agent is unreachable at {conf.agent_socket}; refusing to start a pod without policy enforcement",
            str(exc),
        ) from exc
    except BaseException:
        _undo(inv, store)
        raise
    log.info("Added endpoint container=%s ip=%s veth=%s", inv.container_id, address, link.host_ifname)
    return build_result(conf, link)


def _undo(inv: invocation.Invocation, store: ipam.IpamStore) -> None:
    try:
        plumbing.teardown(container_id=inv.container_id)
    finally:
        store.release(inv.container_id, inv.ifname)


def cmd_del(inv: invocation.Invocation, conf: config.NetworkConfig) -> None:
    try:
        agent_client.AgentClient(str(conf.agent_socket)).delete_endpoint(inv.container_id)
    except (agent_client.AgentUnreachableError, agent_client.AgentRejectedError) as exc:
        log.warning("Could not tell the agent container=%s error=%s", inv.container_id, exc)
    removed = plumbing.teardown(container_id=inv.container_id)
    released = _store(conf).release(inv.container_id, inv.ifname)
    log.info(
        "Deleted endpoint container=%s veth_removed=%s released=%s",
        inv.container_id, removed, ",".join(map(str, released)) or "-",
    )


def cmd_check(inv: invocation.Invocation, conf: config.NetworkConfig) -> None:
    if conf.cni_version in ("0.3.0", "0.3.1"):
        raise errors.CniError(
            errors.ErrorCode.INCOMPATIBLE_VERSION, f"CHECK is not defined for cniVersion {conf.cni_version}"
        )
    address = _store(conf).lookup(inv.container_id, inv.ifname)
    if address is None:
        raise errors.CniError(
            errors.ErrorCode.CHECK_FAILED, "Pod network check failed", f"no address reserved for {inv.container_id}"
        )
    plumbing.check(container_id=inv.container_id, netns_path=inv.netns, ifname=inv.ifname, ipv4=address)
