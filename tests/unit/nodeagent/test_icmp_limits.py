"""The node's ICMP rate-limit sysctls as the north-south programs are rendered with them."""

from __future__ import annotations

from ciliary.nodeagent.datapath import icmp_limits
from ciliary.nodeagent.datapath.icmp_limits import IcmpLimits
from ciliary.nodeagent.datapath.lb_device import DeviceLB


def test_the_kernels_defaults_read_as_the_defaults() -> None:
    values = {"icmp_ratemask": "6168\n", "icmp_ratelimit": "1000\n", "icmp_msgs_per_sec": "1000\n",
              "icmp_msgs_burst": "50\n"}
    assert icmp_limits.from_sysctls(values) == IcmpLimits()


def test_a_ratemask_without_destination_unreachable_lifts_every_limit() -> None:
    limits = icmp_limits.from_sysctls({"icmp_ratemask": str(0x1818 & ~(1 << 3))})
    assert limits.port_unreachable_limited is False


def test_values_are_taken_and_unreadable_ones_keep_the_default() -> None:
    limits = icmp_limits.from_sysctls({"icmp_ratelimit": "0", "icmp_msgs_per_sec": "garbage", "icmp_msgs_burst": "7"})
    assert limits == IcmpLimits(peer_interval_ms=0, per_second=1000, burst=7)


def test_the_programs_are_rendered_with_the_limits(tmp_path) -> None:
    dev = DeviceLB("n", devices=["eth0"], bpffs=tmp_path)
    source = dev.render()["ingress"].source
    assert "#define CY_NS_ICMP_PEER_INTERVAL_NS 1000000000ULL" in source
    assert "#define CY_NS_ICMP_NODE_BURST 50" in source and "#define CY_NS_ICMP_LIMITED_TYPE 1" in source
