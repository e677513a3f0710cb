"""The lab's kube-proxy switch: the flag, and kube-proxy's command line per mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciliary.cli.main import build_parser
from ciliary.lab import nodeservices, peerproxy


def test_lab_up_takes_kube_proxy_with_iptables_as_the_default_mode() -> None:
    parser = build_parser()
    assert parser.parse_args(["lab", "up"]).kube_proxy is None
    assert parser.parse_args(["lab", "up", "--kube-proxy"]).kube_proxy == "iptables"
    assert parser.parse_args(["lab", "up", "--kube-proxy", "nftables"]).kube_proxy == "nftables"
    with pytest.raises(SystemExit):
        parser.parse_args(["lab", "up", "--kube-proxy", "ipvs"])


@pytest.mark.parametrize("mode", nodeservices.KUBE_PROXY_MODES)
def test_kube_proxy_runs_in_the_requested_mode_on_the_node_address(mode: str) -> None:
    argv = nodeservices.kube_proxy_argv(Path("/bin/kube-proxy"), Path("/k.conf"), "node-2", mode)
    assert argv[0] == "/bin/kube-proxy"
    assert f"--proxy-mode={mode}" in argv and "--hostname-override=node-2" in argv
    assert "--bind-address=192.0.2.12" in argv  # node-2's underlay address: its NodePorts and node IP
    assert "--conntrack-max-per-core=0" in argv  # no machine-wide sysctl written


def test_an_unknown_mode_is_refused_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="ipvs"):
        nodeservices.kube_proxy_argv(Path("/bin/kube-proxy"), Path("/k.conf"), "node-1", "ipvs")
    with pytest.raises(peerproxy.PeerProxyError, match="ipvs"):
        peerproxy.check("ipvs")


def test_the_operator_resolves_services_unless_told_another_proxy_serves_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from ciliary.operator.main import build_parser as operator_parser

    monkeypatch.delenv("CILIARY_OPERATOR_LOAD_BALANCING", raising=False)
    assert operator_parser().parse_args([]).load_balancing is True
    assert operator_parser().parse_args(["--no-load-balancing"]).load_balancing is False
    monkeypatch.setenv("CILIARY_OPERATOR_LOAD_BALANCING", "false")
    assert operator_parser().parse_args([]).load_balancing is False
