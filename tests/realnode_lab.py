"""The session's real-node lab with Ciliary installed by its Helm charts, shared by every suite that needs it.

A pytest plugin (the root ``conftest.py`` loads it): the ``chart_lab`` fixture is session-scoped, so
``make test`` pays for one ``reallab.up(chart=True)`` (two nodes, containerd and kubelet each, kube-proxy,
CoreDNS, the lab registry, ``helm install`` of charts/ciliary-crds and charts/ciliary) however many
modules use it: the chart tests under ``tests/integration/realnodes``, the upstream conformance subset,
and the e2e modules that run on real pods. The lab is torn down at the end of the session, also on
failure, and the teardown checks that nothing is left (namespace, mount, cgroup, process, host
directory, root-namespace address).

The lab runs kube-proxy beside Ciliary unless a collected module says ``REAL_NODES_MODE =
"kube-proxy-replacement"`` (or ``CILIARY_E2E_REAL_NODES_MODE`` chooses): then no kube-proxy runs and Ciliary's
load balancer serves every Service (``ciliary lab up --real-nodes --kube-proxy-replacement``); a module that needs
that mode fails on a lab without it (``require_mode``).

``CILIARY_E2E_LAB=<state dir>`` attaches to a real-node lab that is already up (``CILIARY_LAB_DIR=<dir>
CILIARY_LAB_PREFIX=<prefix> ciliary lab up --real-nodes``; the prefix is taken from
``CILIARY_LAB_PREFIX``, default ``cy`` as ``ciliary lab up``'s): nothing is brought up or torn down, so
runs one module at a time reuse one lab.

Tests that need Ciliary itself (policy, conformance) ask for ``chart_installed``: an earlier test may
have uninstalled the release (``helm uninstall``, ``skaffold dev``'s cleanup); it is installed again with
the lab's images and waited for.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import suite_rules
from ciliary.lab import chartinstall, images, kubeletnode, nodehost, reallab, sessions, tools, topology
from ciliary.lab.lab import Lab, LabError
from ciliary.lab.layout import Binaries
from ciliary.lab.nodebins import NodeBinaries

ROOT = Path(__file__).resolve().parents[1]
NODES = ["node-1", "node-2"]
ATTACH_ENV = "CILIARY_E2E_LAB"
HOST_PATHS = (Path("/opt/cni"), Path("/etc/cni"), Path("/opt/ciliary"), Path("/var/lib/ciliary"))


@dataclass
class ChartLab:
    lab: Lab
    nodes: list[kubeletnode.RealNode]
    attached: bool = False

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.lab.bins.kubectl), f"--kubeconfig={self.lab.layout.kubeconfig}", *args],
                              input=input, capture_output=True, text=True, timeout=timeout)


def node_binaries() -> NodeBinaries:
    """Every real-node binary; a missing one fails under CI and skips elsewhere (tests/suite_rules.py)."""
    for tool in (*tools.NODE_TOOLS, "runc", "mmdebstrap"):
        suite_rules.require_tool(tool)
    return NodeBinaries.discover()


def lab_images() -> list[images.BuiltImage]:
    """The lab's images (built by the set-up; built here, cached, if the set-up has not yet)."""
    node_binaries()
    return images.build_all(log=False)


def root_addresses() -> str:
    return subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout + \
        subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout


def wait_for(what: str, check: Callable[[], Any], seconds: float, on_timeout: Callable[[], str]) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"{what} not reached within {seconds:.0f} s\n{on_timeout()}")


def attached_lab(state_dir: str) -> ChartLab:
    """A running real-node lab with the chart, as ``ciliary lab up --real-nodes`` left it."""
    try:
        lab = reallab.attached(state_dir)
    except LabError as exc:
        pytest.fail(f"{ATTACH_ENV}={exc}", pytrace=False)
    layout, config = lab.layout, lab.config()
    if config.get("kube_proxy"):
        pytest.fail(f"{ATTACH_ENV}={state_dir}: that lab is the peer (`--kube-proxy`: Ciliary's load balancer off); "
                    "the suites need `ciliary lab up` or `ciliary lab up --kube-proxy-replacement`", pytrace=False)
    bins, host, cgroups = node_binaries(), nodehost.detect_host(), nodehost.cgroup_layout()
    nodes = [kubeletnode.RealNode(layout, n, bins, lab.bins, host, cgroups, chart=True) for n in lab.node_names()]
    return ChartLab(lab, nodes, attached=True)


#: the real-node lab's Service modes: kube-proxy beside Ciliary's socket load balancer, or Ciliary alone
KUBE_PROXY, KUBE_PROXY_REPLACEMENT = "kube-proxy", "kube-proxy-replacement"
MODE_ENV = "CILIARY_E2E_REAL_NODES_MODE"
MODE_ATTR = "REAL_NODES_MODE"
"""A module-level ``REAL_NODES_MODE = "kube-proxy-replacement"`` says a module needs the lab without kube-proxy;
modules without it pass in either mode."""


def wanted_mode(modules: Iterable[object], environ: Mapping[str, str]) -> str:
    """The mode the session's lab comes up in: ``CILIARY_E2E_REAL_NODES_MODE`` if set, else the replacement when a
    collected module needs it, else kube-proxy. Pure."""
    if environ.get(MODE_ENV):
        if environ[MODE_ENV] not in (KUBE_PROXY, KUBE_PROXY_REPLACEMENT):
            raise ValueError(f"{MODE_ENV}={environ[MODE_ENV]!r}: {KUBE_PROXY} or {KUBE_PROXY_REPLACEMENT}")
        return environ[MODE_ENV]
    needed = {getattr(m, MODE_ATTR, None) for m in modules}
    return KUBE_PROXY_REPLACEMENT if KUBE_PROXY_REPLACEMENT in needed else KUBE_PROXY


def lab_mode(lab: Lab) -> str:
    return KUBE_PROXY_REPLACEMENT if lab.config().get("kube_proxy_replacement") else KUBE_PROXY


def require_mode(lab: Lab, module: object) -> None:
    """Fail (never skip) a module that needs the replacement on a lab with kube-proxy (an attached one)."""
    need = getattr(module, MODE_ATTR, None)
    if need and need != lab_mode(lab):
        pytest.fail(f"{getattr(module, '__name__', module)} needs the real-node lab in {need} mode; this one runs "
                    f"{lab_mode(lab)} (`ciliary lab up --real-nodes --kube-proxy-replacement`, or "
                    f"{MODE_ENV}={need})", pytrace=False)


@pytest.fixture(scope="session")
def chart_lab(request: pytest.FixtureRequest) -> Iterator[ChartLab]:
    if os.environ.get(ATTACH_ENV):
        yield attached_lab(os.environ[ATTACH_ENV])
        return
    mode = wanted_mode({item.module for item in request.session.items if getattr(item, "module", None)}, os.environ)
    node_binaries()
    lab_images()
    sessions.reap_stale(ROOT, "chartnode", "h")
    layout = sessions.session_layout(ROOT, "chartnode", "h")
    lab = Lab(layout, Binaries.discover())
    before = root_addresses()
    host_paths_before = {p: p.exists() for p in HOST_PATHS}
    try:
        t0 = time.monotonic()
        nodes = reallab.up(lab, NODES, chart=True, ready_seconds=420, say=print,
                           kube_proxy_replacement=mode == KUBE_PROXY_REPLACEMENT)
        print(f"chart lab ({mode}) up in {time.monotonic() - t0:.1f} s")
        yield ChartLab(lab, nodes)
        assert root_addresses() == before, "the root namespace gained an address or route"
    finally:
        lab.down(log=False)
        for name in NODES:
            paths = kubeletnode.node_paths(layout, name)
            assert not paths.state.exists() and not paths.run.exists()
            assert not kubeletnode.mounts_under([paths.state, paths.run], Path("/proc/self/mountinfo").read_text())
            assert not nodehost.pids_under(nodehost.cgroup_layout(), paths.cgroup_root)
            assert not topology.netns_exists(layout.node_netns(name))
        assert {p: p.exists() for p in HOST_PATHS} == host_paths_before, "a node wrote to the host's directories"


def release_deployed(lab: ChartLab) -> bool:
    helm = chartinstall.helm(tools.built_path("helm"), lab.lab.layout.kubeconfig, "status", chartinstall.RELEASE,
                             "-n", chartinstall.NAMESPACE, "-o", "json", timeout=60)
    return helm.returncode == 0 and json.loads(helm.stdout).get("info", {}).get("status") == "deployed"


def ensure_installed(lab: ChartLab, *, ready_seconds: float = 420) -> None:
    """Both releases installed (again, if an earlier test removed them) and every agent, operator, etcd Ready."""
    if not release_deployed(lab):
        reallab.install_chart(lab.lab, ROOT)
    chartinstall.wait_ready(lambda *a, **k: lab.lab.kubectl(*a, **k), lab.lab.node_names(), ready_seconds)


@pytest.fixture
def chart_installed(chart_lab: ChartLab) -> ChartLab:
    ensure_installed(chart_lab)
    return chart_lab
