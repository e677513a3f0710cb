"""Choosing the north-south load balancer's devices (``lb_device.choose_devices``) and ``--lb-devices``."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

import pytest

from ciliary.nodeagent import settings
from ciliary.nodeagent.datapath.lb_device import Device, DeviceSelectionError, LinkInfo, choose_devices

LO = LinkInfo("lo", 1, (IPv4Interface("127.0.0.1/8"),), loopback=True)
ETH0 = LinkInfo("eth0", 2, (IPv4Interface("192.0.2.11/24"),))
VETH = LinkInfo("cyabc", 7, (IPv4Interface("169.254.1.1/32"),))
ETH1 = LinkInfo("eth1", 3, (IPv4Interface("198.51.100.5/32"), IPv4Interface("198.51.100.9/24")), default_route=True)


def test_auto_without_a_default_route_takes_devices_with_a_real_subnet() -> None:
    assert choose_devices([LO, ETH0, VETH], None) == [Device("eth0", 2, IPv4Address("192.0.2.11"))]


def test_auto_prefers_the_default_route_devices_and_snats_to_a_subnet_address() -> None:
    assert choose_devices([LO, ETH0, VETH, ETH1], None) == [Device("eth1", 3, IPv4Address("198.51.100.9"))]


def test_named_devices_must_exist_and_have_an_address() -> None:
    assert choose_devices([LO, ETH0, VETH], ["eth0"]) == [Device("eth0", 2, IPv4Address("192.0.2.11"))]
    with pytest.raises(DeviceSelectionError) as missing:
        choose_devices([LO, ETH0], ["eth9"])
    assert missing.value.device == "eth9"
    with pytest.raises(DeviceSelectionError):
        choose_devices([LinkInfo("eth2", 4)], ["eth2"])


@pytest.mark.parametrize(("raw", "parsed"), [("auto", None), ("off", ()), ("", ()), ("eth0", ("eth0",)),
                                             ("eth0, eth1", ("eth0", "eth1"))])
def test_lb_devices_setting(raw: str, parsed: tuple[str, ...] | None) -> None:
    assert settings.parse_devices(raw) == parsed


def test_lb_devices_default_is_auto_and_bad_names_are_refused() -> None:
    base = ["--node", "n1", "--etcd-endpoints", "http://127.0.0.1:2379", "--etcd-insecure"]
    assert settings.load_settings(base, {}).lb_devices is None
    assert settings.load_settings(base + ["--lb-devices", "eth0"], {}).lb_devices == ("eth0",)
    with pytest.raises(SystemExit):
        settings.load_settings(base + ["--lb-devices", "a/b"], {})
