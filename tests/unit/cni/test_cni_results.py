"""Result shape, veth naming and the agent payload (checked against the agent's own model)."""

import hashlib
import json
from ipaddress import IPv4Address

from ciliary.cni import commands, config, invocation, plumbing
from ciliary.nodeagent import endpoints

LINK = plumbing.PodLink("cy0123456789a", 42, "aa:bb:cc:dd:ee:01", "eth0", "aa:bb:cc:dd:ee:02",
                        "/run/netns/pod", IPv4Address("10.244.1.5"), 4097)


def conf(version="1.0.0"):
    return config.parse_network_config(json.dumps({
        "cniVersion": version, "name": "ciliary", "type": "ciliary-cni",
        "ipam": {"type": "host-local-ciliary", "subnet": "10.244.1.0/24"}}).encode())


def test_host_ifname_is_cy_plus_11_hex_of_sha256():
    name = plumbing.host_ifname_for("abc")
    assert name == "cy" + hashlib.sha256(b"abc").hexdigest()[:11]
    assert len(name) == 13 <= 15


def test_result_1_0_0():
    assert commands.build_result(conf(), LINK) == {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cy0123456789a", "mac": "aa:bb:cc:dd:ee:01"},
            {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/run/netns/pod"},
        ],
        "ips": [{"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
        "dns": {},
    }


def test_result_pre_1_0_carries_ip_version():
    assert commands.build_result(conf("0.4.0"), LINK)["ips"][0]["version"] == "4"


def test_payload_is_accepted_by_the_agent_model():
    inv = invocation.Invocation(command="ADD", container_id="c1", netns="/run/netns/pod", ifname="eth0",
                                args={"K8S_POD_NAMESPACE": "ns", "K8S_POD_NAME": "web", "K8S_POD_UID": "u"})
    payload = commands.endpoint_payload(inv, LINK)
    endpoint = endpoints.Endpoint.model_validate(payload)
    assert endpoint.wire() == payload
    assert endpoint.netns_cookie == payload["netnsCookie"] == 4097


def test_the_netns_cookie_is_the_kernels_and_an_unreadable_one_is_zero(tmp_path):
    """``SO_NETNS_COOKIE`` of the namespace behind the path (here the test's own, via /proc/self/ns/net); a path
    that is no namespace gives 0 (the pod's flows then name no Service) instead of failing the ADD."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as own:
        expected = int.from_bytes(own.getsockopt(socket.SOL_SOCKET, 71, 8), "little")
    assert plumbing._cookie_of("/proc/self/ns/net") == expected != 0
    assert plumbing._cookie_of(str(tmp_path / "missing")) == 0
