"""Bring up the lab, whose nodes are real (containerd + kubelet), in one call: ``ciliary lab up``.

Order: images (cached) → node namespaces on the underlay and the world host → each node's containerd,
importing the images, side by side with: the control plane with the real-node apiserver flags → each
node's Ciliary agent (as a process, without the chart) → lab registry, node gateway, kube-scheduler →
each node's kubelet once its images are in → all nodes Ready. ``Lab.down`` removes all of it
(``kubeletnode.teardown_all`` runs first). A state directory the removed process lab left running is refused
before anything starts (``ciliary lab down`` removes it).

With ``chart=True`` Ciliary is installed by its Helm charts instead of running as lab processes:
no agent process; the project's images and the etcd image are built and imported too; every node
namespace gets the ``kubernetes`` Service and cluster DNS addresses (``ciliary.lab.nodeservices``: gateway
relay and a CoreDNS per node); the nodes run in private mount namespaces (``kubeletnode`` chart mode);
``helm install`` (``ciliary.lab.chartinstall``) before the kubelets start (its objects wait for them), and
the wait for every agent, the operator and etcd. Nodes are Ready only once the chart's install-cni wrote their CNI
configuration.

With ``kube_proxy_replacement=True`` (``lab up --kube-proxy-replacement``) no kube-proxy runs:
the chart's agents load-balance every Service (socket level, north-south on the nodes' devices, kube-proxy's
health ports), and the chart reaches the apiserver and etcd without a ClusterIP (``kube_proxy_free_values``).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ciliary.lab import (
    chartinstall,
    controlplane,
    images,
    kubeletnode,
    nodehost,
    nodeservices,
    peerproxy,
    processes,
    projectimages,
    realcluster,
    serviceforward,
    topology,
)
from ciliary.lab.lab import PROCESS_LAB_GONE, Lab, LabError, is_process_lab, mode_of
from ciliary.lab.layout import LB_IP_POOL, Binaries, LabLayout, node_index, node_name, pod_cidr
from ciliary.lab.nodebins import NodeBinaries

#: every real node runs containerd, kubelet, kube-proxy and CoreDNS on a shared machine
MAX_REAL_NODES = 8
#: images only pods of users and tests run: imported while the chart's pods start
WORKLOAD_IMAGES = (images.APP_IMAGE, images.AGNHOST_IMAGE)


def lab_images(chart: bool) -> list[images.BuiltImage]:
    built = images.build_all(log=False)
    if chart:
        built += [*projectimages.project_images(repository_root(), images.debian_suite()),
                  chartinstall.etcd_image()]
    return built


def repository_root() -> Path:
    """The checkout this lab runs from (``setup/versions.env`` is found from the working directory)."""
    from ciliary.lab import tools

    return tools.versions_file().resolve().parents[1]


def pinned_images(built: Sequence[images.BuiltImage], into: Path) -> list[images.BuiltImage]:
    """The archives hard-linked into the lab's state directory (removed with it by ``lab down``).

    The image cache is shared by every checkout and session on the machine, and a build elsewhere may
    remove an older entry while this lab still imports it; the lab's own link keeps the file. Where the
    cache is on another filesystem the cache's path is used as it is.
    """
    into.mkdir(parents=True, exist_ok=True)
    pinned = []
    for image in built:
        link = into / f"{image.archive.parent.name}.tar"
        if not link.exists():
            try:
                os.link(image.archive, link)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                pinned.append(image)
                continue
        pinned.append(dataclasses.replace(image, archive=link))
    return pinned


def deferred_images(built: Sequence[images.BuiltImage]) -> tuple[list[images.BuiltImage], list[images.BuiltImage]]:
    """(what a node needs before its kubelet starts, what only workloads use and may follow)."""
    later = [b for b in built if b.reference in WORKLOAD_IMAGES]
    return [b for b in built if b.reference not in WORKLOAD_IMAGES], later


LAB_POOL = f"""apiVersion: cilium.io/v2
kind: CiliumLoadBalancerIPPool
metadata: {{name: lab-pool}}
spec:
  blocks: [{{cidr: {LB_IP_POOL}}}]
"""
"""LB IPAM's pool in the lab: LoadBalancer Services get their IPs from it (the world host routes it)."""


def install_chart(lab: Lab, root: Path | None = None) -> None:
    """``helm upgrade --install`` of both charts as this lab's mode needs them (again after an uninstall),
    then the lab's CiliumLoadBalancerIPPool."""
    config = lab.config()
    chartinstall.install(root or repository_root(), lab.layout.kubeconfig, lab.layout.state_dir,
                         cgroup_prefix=chartinstall.node_cgroup_prefix(lab.layout.prefix),
                         kube_proxy_free=chartinstall.kube_proxy_free(lab.node_names())
                         if config.get("kube_proxy_replacement") else None,
                         load_balancing=not config.get("kube_proxy"),
                         pod_netns=kubeletnode.pod_netns_mount(lab.layout))
    for _ in range(60):  # bounded: the CRD the chart just installed may take a moment to be served
        if lab.kubectl("apply", "-f", "-", input=LAB_POOL, check=False).returncode == 0:
            return
        time.sleep(0.5)
    lab.kubectl("apply", "-f", "-", input=LAB_POOL)  # the last try raises with kubectl's message


def _timed(step: Callable[[], object]) -> float:
    t = time.monotonic()
    step()
    return time.monotonic() - t


def up(lab: Lab, nodes: Sequence[str], *, chart: bool = False, ready_seconds: float = 180,
       kube_proxy_replacement: bool = False, kube_proxy: str | None = None,
       say: Callable[[str], None] = lambda _: None) -> list[kubeletnode.RealNode]:
    """Start (or complete) a real-node lab with ``nodes``; returns the nodes once all are Ready.

    The image import into each node's containerd is most of the time, so it starts first, side by side
    on every node, while the control plane, the cluster services and (chart mode) the chart's objects
    come up; each kubelet starts once its node holds the sandbox and chart images, and the workload
    images (lab app, agnhost) follow while the chart's pods start. Returns once every node is Ready
    and holds every image.
    """
    layout = lab.layout
    bins = NodeBinaries.discover().require()
    t0 = time.monotonic()

    def stamp(what: str) -> None:
        say(f"lab: {what} ({time.monotonic() - t0:.1f} s)")

    config = lab.config()
    if is_process_lab(config):
        raise LabError(PROCESS_LAB_GONE)
    if kube_proxy_replacement and not chart:
        raise LabError("--kube-proxy-replacement needs Ciliary installed by its chart")
    if kube_proxy and (kube_proxy_replacement or not chart):
        raise LabError("--kube-proxy (the peer: kube-proxy alone, Ciliary's load balancer off) needs Ciliary "
                       "installed by its chart and no --kube-proxy-replacement")
    wanted = mode_of({"real_nodes": True, "kube_proxy_replacement": kube_proxy_replacement, "kube_proxy": kube_proxy})
    if config.get("real_nodes") and lab.node_names() and mode_of(config) != wanted:
        raise LabError(f"this lab runs with {mode_of(config)}: `ciliary lab down` first to change it")
    if kube_proxy:
        try:
            peerproxy.check(kube_proxy)
        except peerproxy.PeerProxyError as exc:
            raise LabError(str(exc)) from exc
    try:
        built = pinned_images(lab_images(chart), layout.state_dir / "images")
    except FileNotFoundError:  # removed from the shared cache between build and link: build it again
        built = pinned_images(lab_images(chart), layout.state_dir / "images")
    stamp(f"{len(built)} images ready")
    ports = lab.ports()
    controlplane.save_config(layout, ports, max(node_index(n) for n in nodes))
    layout.config_file.write_text(json.dumps({**lab.config(), "real_nodes": True, "chart": chart,
                                              "kube_proxy_replacement": kube_proxy_replacement,
                                              "kube_proxy": kube_proxy}))
    apiserver_args = realcluster.apiserver_args(layout, static_kubernetes_endpoints=chart)  # makes the lab CA
    topology.ensure_underlay(layout)
    for node in nodes:
        topology.ensure_node(layout, node, nodes)
    topology.ensure_world(layout, nodes)
    stamp("node namespaces")
    registry = realcluster.registry_port(layout)
    host = nodehost.detect_host()
    cgroups = nodehost.cgroup_layout()
    real = [kubeletnode.RealNode(layout, node, bins, lab.bins, host, cgroups, chart=chart) for node in nodes]
    plugin = kubeletnode.cni_plugin_path()
    first, later = deferred_images(built)

    def runtime(n: kubeletnode.RealNode) -> tuple[float, float]:
        return (_timed(lambda: n.start_runtime(pod_cidr(node_index(n.node)), plugin, registry_port=registry)),
                _timed(lambda: n.import_images(first)))

    with ThreadPoolExecutor(max_workers=len(real)) as pool:
        runtimes = {n.node: pool.submit(runtime, n) for n in real}
        try:
            controlplane.start(layout, lab.bins, ports, apiserver_args=apiserver_args, pod_tokens=chart)
            stamp("control plane")
            lab.create_nodes(nodes)
            lab.start_world()
            if not chart:
                for node in nodes:
                    lab.start_agent(node, ports)
            realcluster.start_registry(layout, bins)
            if chart:
                for node in nodes:
                    nodeservices.add_service_address(layout.node_netns(node))
            realcluster.start_gateway(layout, ports, nodes, registry_port=registry, kubernetes_service=chart)
            realcluster.start_scheduler(layout, bins, ports)
            stamp("registry, gateway, scheduler")
            if chart:
                lab.kubectl("apply", "-f", "-", input=nodeservices.SERVICES)
                for node in nodes:
                    if not kube_proxy_replacement:
                        nodeservices.start_kube_proxy(layout, bins.kube_proxy, node, kube_proxy or "iptables")
                    nodeservices.start_coredns(layout, bins.coredns, node)
                stamp("CoreDNS" if kube_proxy_replacement else "kube-proxy and CoreDNS")
                # the chart's objects wait in the apiserver for the kubelets
                install_chart(lab)
                stamp("helm install ciliary-crds, ciliary")
            workloads = {}
            for n in real:
                containerd, imported = runtimes[n.node].result()
                n.start_kubelet()
                stamp(f"{n.node}: kubelet started (containerd {containerd:.1f} s, sandbox and chart images "
                      f"{imported:.1f} s)")
                workloads[n.node] = pool.submit(n.import_images, later)
            if chart:
                chartinstall.wait_ready(lambda *a, **k: lab.kubectl(*a, **k), nodes, ready_seconds, say=say)
                stamp("Ciliary agents, operator and etcd ready")
                if restart_on_new_images(lab, first):
                    chartinstall.wait_ready(lambda *a, **k: lab.kubectl(*a, **k), nodes, ready_seconds, say=say)
                    stamp("Ciliary's pods restarted on the images this lab up imported")
                if start_service_forward(lab, nodes[0]):
                    stamp("hubble-relay and hubble-ui reachable from this shell (HUBBLE_SERVER, CILIARY_UI_URL)")
            for name, pending in workloads.items():
                pending.result()
                stamp(f"{name}: workload images imported")
        finally:
            for started in runtimes.values():
                started.cancel()
    wait_ready(lab, real, ready_seconds)
    say(f"lab: {len(real)} real nodes Ready in {time.monotonic() - t0:.1f} s")
    return real


CHART_IMAGES_FILE = "chart-images.json"
"""In a lab's state directory: the images its last ``lab up`` imported into the nodes, by manifest digest."""


def image_digests(built: Sequence[images.BuiltImage]) -> dict[str, str]:
    """Each image's manifest digest, from its OCI layout's index ("" when unreadable)."""
    out = {}
    for image in built:
        try:
            out[image.reference] = str(json.loads((image.layout / "index.json").read_text())["manifests"][0]["digest"])
        except (OSError, ValueError, KeyError, IndexError):
            out[image.reference] = ""
    return out


def images_changed(before: dict[str, str] | None, now: dict[str, str]) -> bool:
    """Whether a lab up again imported another image under a name an earlier one used (a fresh lab: no).
    Pure."""
    return before is not None and any(before.get(ref) not in (None, digest) for ref, digest in now.items())


def restart_on_new_images(lab: Lab, built: Sequence[images.BuiltImage]) -> bool:
    """A ``lab up`` of a lab already up: its pods keep the images they started on, and the project's images keep
    their name (the chart's tag) when their content changes, so the chart's DaemonSets and Deployments are
    restarted when the imported images differ from the last ``lab up``'s; True if they were."""
    record = lab.layout.state_dir / CHART_IMAGES_FILE
    try:
        before = json.loads(record.read_text())
    except (OSError, ValueError):
        before = None
    now = image_digests(built)
    changed = images_changed(before, now)
    if changed:
        lab.kubectl("rollout", "restart", "daemonset,deployment", "-n", chartinstall.NAMESPACE, "-l",
                    "app.kubernetes.io/part-of=ciliary")
    record.write_text(json.dumps(now, sort_keys=True))
    return changed


SERVICE_FORWARD = "service-forward"
"""The lab process giving the chart's hubble-relay and hubble-ui Services a root-namespace port each."""


def start_service_forward(lab: Lab, node: str, seconds: float = 20) -> bool:
    """(Re)start ``serviceforward`` for the chart's ``hubble-relay``, ``hubble-ui`` and etcd Services (dialled
    from ``node``'s namespace) on the lab's relay, UI and etcd-forward ports; False when the chart deploys none.
    The etcd port is mutual TLS as inside the cluster: ``ciliary lab env`` gives the CLI a certificate."""
    forwards = [serviceforward.Forward(port, chartinstall.NAMESPACE, service)
                for service, port in (("hubble-relay", lab.relay_port()), ("hubble-ui", lab.ui_port()),
                                      (chartinstall.ETCD_SERVICE, lab.etcd_forward_port()))
                if lab.kubectl("get", "service", service, "-n", chartinstall.NAMESPACE, check=False).returncode == 0]
    if not forwards:
        return False
    processes.stop(lab.layout, SERVICE_FORWARD)
    argv = [sys.executable, "-m", "ciliary.lab.serviceforward", "--netns", lab.layout.node_netns(node),
            "--kubectl", str(lab.bins.kubectl), "--kubeconfig", str(lab.layout.kubeconfig),
            *(a for f in forwards for a in ("--forward", f.flag()))]
    unified = nodehost.cgroup_layout().unified
    if unified is not None:
        # a process of the node: in its cgroup, where the chart's socket load balancer translates ClusterIPs
        # (the only translation without kube-proxy); the group goes with the node's cgroup root at `lab down`
        group = unified / kubeletnode.node_paths(lab.layout, node).cgroup_root.lstrip("/") / SERVICE_FORWARD
        group.mkdir(parents=True, exist_ok=True)
        argv = ["sh", "-c", 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"', "sh", str(group), *argv]
    processes.spawn(lab.layout, SERVICE_FORWARD, argv, env={"PYTHONUNBUFFERED": "1"})
    if not processes.wait_for_line(lab.layout, SERVICE_FORWARD, "forward ready", seconds):
        raise LabError(f"{SERVICE_FORWARD} not ready after {seconds:.0f} s; see {lab.layout.log_dir}")
    return True


def ready_nodes(node_list: dict[str, object]) -> set[str]:
    """Names of Nodes whose Ready condition is True and whose runtime is containerd (a real kubelet)."""
    ready = set()
    items = node_list.get("items", [])
    for n in items if isinstance(items, list) else []:
        status = n.get("status", {})
        if status.get("nodeInfo", {}).get("containerRuntimeVersion", "").startswith("containerd://") and any(
                c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])):
            ready.add(n["metadata"]["name"])
    return ready


def wait_ready(lab: Lab, real: Sequence[kubeletnode.RealNode], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    names = {n.node for n in real}
    while time.monotonic() < deadline:
        out = lab.kubectl("get", "nodes", "-o", "json", check=False)
        if out.returncode == 0 and names <= ready_nodes(json.loads(out.stdout)):
            return
        for node in real:
            for what, alive in node.alive().items():
                if not alive:
                    raise processes.ProcessStartError(node.proc_name(what),
                                                      lab.layout.log_dir / f"{node.proc_name(what)}.log")
        time.sleep(0.5)
    raise LabError(f"real nodes not Ready after {seconds:.0f} s; see {lab.layout.log_dir}")


def attached(state_dir: str | Path) -> Lab:
    """A real-node lab with the chart that is already up, by its state directory, under the prefix its
    ``lab.json`` records (``CILIARY_LAB_PREFIX``, if set, must agree: namespaces are found by it)."""
    path = Path(state_dir).resolve()
    recorded = Lab(LabLayout(state_dir=path, prefix="cy"), Binaries.discover()).config().get("prefix")
    wanted = os.environ.get("CILIARY_LAB_PREFIX")
    if recorded and wanted and recorded != wanted:
        raise LabError(f"{state_dir}: that lab's prefix is {recorded}, CILIARY_LAB_PREFIX says {wanted}")
    lab = Lab(LabLayout(state_dir=path, prefix=str(recorded or wanted or "cy")), Binaries.discover())
    config = lab.config()
    if not (config.get("real_nodes") and config.get("chart")):
        raise LabError(f"{state_dir}: no real-node lab with the chart there (`ciliary lab up`, with "
                       "CILIARY_LAB_DIR and CILIARY_LAB_PREFIX if not the default)")
    return lab


def up_command(lab: Lab, count: int, *, kube_proxy_replacement: bool = False, kube_proxy: str | None = None,
               say: Callable[[str], None] = print) -> float:
    """``ciliary lab up [--kube-proxy-replacement | --kube-proxy MODE]``: ``count`` real nodes with
    Ciliary installed by its charts; with the replacement no kube-proxy runs and Ciliary's load balancer serves
    every Service; with ``--kube-proxy`` (the peer) kube-proxy in MODE alone serves them."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, mounts, eBPF): run as root")
    config = lab.config()
    if is_process_lab(config):  # before anything is built or started
        raise LabError(PROCESS_LAB_GONE)
    if not 1 <= count <= MAX_REAL_NODES:
        raise LabError(f"--nodes must be between 1 and {MAX_REAL_NODES}")
    t0 = time.monotonic()
    if config.get("real_nodes") and not (kube_proxy_replacement or kube_proxy):
        # no mode asked: a running lab keeps the one it was brought up with
        kube_proxy_replacement = bool(config.get("kube_proxy_replacement"))
        kube_proxy = str(config["kube_proxy"]) if config.get("kube_proxy") else None
    up(lab, [node_name(i) for i in range(1, count + 1)], chart=True, ready_seconds=420,
       kube_proxy_replacement=kube_proxy_replacement, kube_proxy=kube_proxy, say=say)
    say(f"lab: Services: {mode_of(lab.config())}")
    elapsed = time.monotonic() - t0
    say("lab: run `eval $(ciliary lab env)` to use kubectl and helm against it; `ciliary lab down` removes it")
    return elapsed
