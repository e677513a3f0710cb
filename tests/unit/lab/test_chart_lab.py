"""Pure parts of the chart-mode lab: readiness of the chart's workloads, the node services, the CNI runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ciliary.lab import (
    chartinstall,
    cniruntime,
    conformance,
    nodeconfig,
    nodeservices,
    registrypush,
    skaffoldbuild,
)

ROOT = Path(__file__).resolve().parents[3]


def ds(desired: int, ready: int, updated: int, generation: int = 1, observed: int = 1) -> dict[str, Any]:
    return {"kind": "DaemonSet", "metadata": {"generation": generation}, "status": {
        "observedGeneration": observed, "desiredNumberScheduled": desired, "numberReady": ready,
        "updatedNumberScheduled": updated}}


def test_workload_ready_needs_every_replica_of_the_current_generation() -> None:
    assert chartinstall.workload_ready(ds(2, 2, 2))
    assert not chartinstall.workload_ready(ds(2, 1, 2))
    assert not chartinstall.workload_ready(ds(2, 2, 1))
    assert not chartinstall.workload_ready(ds(0, 0, 0))  # nothing scheduled yet is not ready
    assert not chartinstall.workload_ready(ds(2, 2, 2, generation=2, observed=1))
    deploy = {"kind": "Deployment", "metadata": {"generation": 3}, "spec": {"replicas": 1},
              "status": {"observedGeneration": 3, "readyReplicas": 1, "updatedReplicas": 1}}
    assert chartinstall.workload_ready(deploy)
    assert not chartinstall.workload_ready({**deploy, "status": {"observedGeneration": 3, "readyReplicas": 0}})


def test_lab_values_replace_only_the_etcd_image_its_volume_and_the_load_balancers_cgroup() -> None:
    values = chartinstall.lab_values()
    assert set(values) == {"etcd", "agent"}
    ttl = [{"name": "CILIARY_AGENT_FQDN_MIN_TTL", "value": "1"}]  # the DNS answers' TTLs decide
    assert values["agent"] == {"loadBalancing": {"enabled": False}, "extraEnv": ttl}  # never the machine's root cgroup
    per_node = chartinstall.lab_values(cgroup_prefix="unified/ciliary-rd-")["agent"]
    assert per_node == {"loadBalancing": {"cgroupPath": "unified/ciliary-rd-$(CILIARY_AGENT_NODE_NAME)"}, "extraEnv": ttl}
    assert values["etcd"]["image"].startswith("docker.io/lab/etcd:v")
    assert values["etcd"]["persistence"] == {"enabled": False}


def test_node_services_point_both_services_at_the_node_local_address() -> None:
    docs = list(yaml.safe_load_all(nodeservices.SERVICES))
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert by[("Service", "kube-dns")]["spec"]["clusterIP"] == nodeconfig.CLUSTER_DNS_IP
    for name in ("kube-dns", "kubernetes"):
        endpoints = by[("Endpoints", name)]
        assert endpoints["subsets"][0]["addresses"] == [{"ip": nodeconfig.NODE_SERVICES_IP}]
        # the apiserver's mirroring must not add a second slice next to the lab's own
        assert endpoints["metadata"]["labels"]["endpointslice.kubernetes.io/skip-mirror"] == "true"
    slices = [d for d in docs if d["kind"] == "EndpointSlice"]
    assert {s["metadata"]["labels"]["kubernetes.io/service-name"] for s in slices} == {"kube-dns", "kubernetes"}
    assert all(s["endpoints"][0]["addresses"] == [nodeconfig.NODE_SERVICES_IP] for s in slices)
    role = by[("ClusterRole", "lab:coredns")]
    assert {v for rule in role["rules"] for v in rule["verbs"]} == {"list", "watch"}
    corefile = nodeservices.corefile(Path("/lab/kc"))
    assert f"bind {nodeconfig.NODE_SERVICES_IP}" in corefile and "kubeconfig /lab/kc" in corefile
    assert "forward" not in corefile  # the lab resolves cluster names only


def test_cni_runtime_takes_only_the_plugin_and_its_dependencies(tmp_path: Path) -> None:
    assert cniruntime.wheel_distribution("pydantic_core-2.41.5-cp311-cp311-manylinux.whl") == "pydantic_core"
    assert cniruntime.wheel_distribution("typing_extensions-4.15.0-py3-none-any.whl") == "typing_extensions"
    stdlib = tmp_path / "stdlib"
    for rel in ("os.py", "json/__init__.py", "test/test_os.py", "lib-dynload/_ctypes.so", "__pycache__/os.pyc",
                "config-3.11-x86_64-linux-gnu/Makefile"):
        (stdlib / rel).parent.mkdir(parents=True, exist_ok=True)
        (stdlib / rel).write_text("x")
    paths = {e.path for e in cniruntime.stdlib_entries(stdlib)}
    py = f"{cniruntime.PREFIX}/lib/{cniruntime._python_version()}"
    assert paths == {f"{py}/os.py", f"{py}/json/__init__.py", f"{py}/lib-dynload/_ctypes.so"}


def test_lab_drops_sys_resource_only_where_root_cannot_grant_it() -> None:
    assert chartinstall.lab_values(sys_resource=False)["agent"]["sysResource"] is False
    assert "sysResource" not in chartinstall.lab_values()["agent"]
    assert chartinstall.memlock_free_kernel("6.18.44-fc-v1252")
    assert chartinstall.memlock_free_kernel("5.11.0")
    assert not chartinstall.memlock_free_kernel("5.10.210")
    assert not chartinstall.memlock_free_kernel("weird")


def test_registry_references_split_into_host_name_and_tag() -> None:
    assert registrypush.split_reference("localhost:5000/ciliary-agent:abc") == ("localhost:5000", "ciliary-agent", "abc")
    assert registrypush.split_reference("localhost:5000/lab/app") == ("localhost:5000", "lab/app", "latest")
    assert registrypush.split_reference("localhost:5000/a:t@sha256:00") == ("localhost:5000", "a", "t")
    with pytest.raises(ValueError):
        registrypush.split_reference("ciliary-agent:abc")


def test_skaffold_custom_builder_maps_names_to_targets_and_only_pushes() -> None:
    assert skaffoldbuild.target_of("localhost:5000/ciliary-operator:x") == "operator"
    assert skaffoldbuild.target_of("localhost:5000/team/ciliary-agent:x") == "agent"
    with pytest.raises(skaffoldbuild.CustomBuildError):
        skaffoldbuild.target_of("localhost:5000/other:x")
    with pytest.raises(skaffoldbuild.CustomBuildError, match="only pushing"):
        skaffoldbuild.build({"IMAGE": "localhost:5000/ciliary-agent:x", "PUSH_IMAGE": "false"})


def test_skaffold_lab_profile_uses_the_custom_builder_and_the_lab_values() -> None:
    config = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    lab = next(p for p in config["profiles"] if p["name"] == "lab")
    artifacts = {a["image"]: a for a in lab["build"]["artifacts"]}
    assert set(artifacts) == {"ciliary-operator", "ciliary-agent"}
    assert all("ciliary.lab.skaffoldbuild" in a["custom"]["buildCommand"] for a in artifacts.values())
    assert lab["build"]["local"]["push"] is True
    patched = {p["path"].rsplit("/", 1)[-1]: p["value"] for p in lab["patches"]}
    assert patched["etcd.image"] == "{{.CILIARY_LAB_ETCD_IMAGE}}"  # exported by `ciliary lab env`
    assert patched["etcd.persistence.enabled"] is False


def test_conformance_focus_list_and_junit_summary() -> None:
    focus = conformance.parse_focus((ROOT / "e2e" / "conformance.txt").read_text())
    assert focus.focus and all(f.startswith(r"\[sig-network\]") for f in focus.focus)
    assert focus.skip == (r"\[Disruptive\]|\[Serial\]|\[Slow\]|\[Flaky\]",)
    # ginkgo reports a spec the focus did not select as skipped with the bare message "skipped", one that
    # skipped itself as "skipped - <why>": only the latter counts
    junit = ("<testsuites><testsuite><testcase name='[SynchronizedBeforeSuite]'/><testcase name='[ReportAfterSuite]"
             " Kubernetes e2e suite report'/><testcase name='a'/><testcase name='b'><failure/></testcase>"
             "<testcase name='c'><skipped message='skipped - need 3 zones'/></testcase>"
             "<testcase name='d'><skipped message='skipped'/></testcase></testsuite></testsuites>")
    assert conformance.summarize(junit) == {"passed": 1, "failed": 1, "skipped": 1, "interrupted": 0}
    assert conformance.failed_specs(junit) == ["b"]
    # a run stopped on purpose: the running spec has no verdict, the ones after it never started
    stopped = ("<testsuites><testsuite><testcase name='a'/><testcase name='e'><error type='interrupted'/></testcase>"
               "<testcase name='f'><skipped message='skipped - interrupted by user'/></testcase>"
               "<testcase name='g'><error type='panicked'/></testcase><testcase name='h'><failure type='timedout'"
               " message='A suite timeout occurred'/></testcase></testsuite></testsuites>")
    assert conformance.summarize(stopped) == {"passed": 1, "failed": 1, "skipped": 0, "interrupted": 2}
    assert conformance.failed_specs(stopped) == ["g"]


def test_a_lab_imports_its_own_links_to_the_image_archives(tmp_path: Path) -> None:
    """Another checkout's build may drop a cache entry while the lab imports it: the lab's link keeps it."""
    from ciliary.lab import images, reallab

    entry = tmp_path / "cache" / "lab_app_latest-0123456789abcdef"
    entry.mkdir(parents=True)
    (entry / "image.tar").write_bytes(b"archive")
    built = [images.BuiltImage("docker.io/lab/app:latest", entry / "layout", entry / "image.tar")]
    (pinned,) = reallab.pinned_images(built, tmp_path / "lab" / "images")
    assert pinned.archive == tmp_path / "lab" / "images" / "lab_app_latest-0123456789abcdef.tar"
    (entry / "image.tar").unlink()  # the cache entry goes
    assert pinned.archive.read_bytes() == b"archive"
    assert reallab.pinned_images(built, tmp_path / "lab" / "images") == [pinned]  # a second lab up reuses it


def test_lab_values_without_kube_proxy_bootstrap_the_chart_without_any_cluster_ip() -> None:
    free = chartinstall.KubeProxyFree(api_host="198.51.100.1", api_port=443, etcd_node="node-1",
                                      etcd_node_ip="192.0.2.11")
    values = chartinstall.lab_values(cgroup_prefix="unified/ciliary-h3-", kube_proxy_free=free)
    assert values["agent"]["loadBalancing"] == {"cgroupPath": "unified/ciliary-h3-$(CILIARY_AGENT_NODE_NAME)",
                                                "devices": "auto", "proxyHealthzAddr": "0.0.0.0:10256",
                                                "proxyStatusAddr": "127.0.0.1:10249"}
    assert (values["k8sServiceHost"], values["k8sServicePort"]) == ("198.51.100.1", 443)
    assert values["etcd"]["clientHostAlias"] == "192.0.2.11"
    assert values["etcd"]["nodeSelector"]["kubernetes.io/hostname"] == "node-1"
    # no per-node cgroup: the load balancer would be off, and nothing would serve Services
    with pytest.raises(chartinstall.ChartInstallError):
        chartinstall.lab_values(kube_proxy_free=free)
    assert "k8sServiceHost" not in chartinstall.lab_values(cgroup_prefix="unified/ciliary-h3-")


def test_kube_proxy_free_lab_pins_etcd_to_the_first_node_and_dials_the_node_gateway() -> None:
    from ciliary.lab.lab import mode_of

    free = chartinstall.kube_proxy_free(["node-2", "node-1"])
    assert (free.etcd_node, free.etcd_node_ip) == ("node-1", "192.0.2.11")
    assert (free.api_host, free.api_port) == (nodeconfig.NODE_SERVICES_IP, 443)
    assert mode_of({"real_nodes": True, "kube_proxy_replacement": True}) == "kube-proxy-replacement"
    assert mode_of({"real_nodes": True}) == "kube-proxy"
    assert mode_of({"real_nodes": True, "kube_proxy": "nftables"}) == "kube-proxy-nftables"


def test_the_real_node_peer_turns_ciliarys_load_balancer_off_in_agents_and_operator() -> None:
    from ciliary.lab.lab import mode_of

    values = chartinstall.lab_values(cgroup_prefix="unified/ciliary-y1-", load_balancing=False)
    assert values["agent"]["loadBalancing"] == {"enabled": False}
    assert values["operator"] == {"loadBalancing": False}
    assert "k8sServiceHost" not in values
    assert "operator" not in chartinstall.lab_values(cgroup_prefix="unified/ciliary-y1-")
    free = chartinstall.kube_proxy_free(["node-1"])
    with pytest.raises(chartinstall.ChartInstallError, match="nothing serves Services"):
        chartinstall.lab_values(cgroup_prefix="p-", kube_proxy_free=free, load_balancing=False)
    assert mode_of({"real_nodes": True, "kube_proxy": "iptables"}) == "kube-proxy-iptables"
    assert mode_of({"real_nodes": True, "kube_proxy": None}) == "kube-proxy"


def test_each_agent_sees_its_own_node_s_pod_namespaces() -> None:
    """The lab's nodes keep pods' network namespaces below their own run directories (containerd's
    ``netns_mounts_under_state_dir``): the chart mounts the lab's run root with a per-node sub-path."""
    from ciliary.lab import kubeletnode
    from ciliary.lab.layout import LabLayout

    layout = LabLayout(state_dir=Path("/tmp/lab-x"), prefix="rd")
    host_dir, sub_path = kubeletnode.pod_netns_mount(layout)
    node_1 = kubeletnode.node_paths(layout, "node-1")
    assert Path(host_dir) / sub_path.replace("$(CILIARY_AGENT_NODE_NAME)", "node-1") == \
        node_1.containerd_state / "io.containerd.grpc.v1.cri" / "netns"
    assert sub_path.startswith("$(CILIARY_AGENT_NODE_NAME)/")
    agent = chartinstall.lab_values(pod_netns=(host_dir, sub_path))["agent"]
    assert (agent["podNetnsDir"], agent["podNetnsSubdir"]) == (host_dir, sub_path)
    assert "podNetnsDir" not in chartinstall.lab_values()["agent"]


def test_a_lab_up_again_restarts_the_pods_only_when_an_image_changed(tmp_path: Path) -> None:
    """The project's images keep their name (the chart's tag) when their content changes: the pods of a lab that
    is up keep the old content unless restarted. A fresh lab (no record) restarts nothing."""
    from ciliary.lab import images, reallab

    layout = tmp_path / "agent" / "layout"
    layout.mkdir(parents=True)
    (layout / "index.json").write_text('{"manifests": [{"digest": "sha256:aa"}]}')
    built = [images.BuiltImage("ghcr.io/ciliary/ciliary-agent:0.1.0", layout, tmp_path / "agent.tar"),
             images.BuiltImage("lab:latest", tmp_path / "missing", tmp_path / "lab.tar")]
    now = reallab.image_digests(built)
    assert now == {"ghcr.io/ciliary/ciliary-agent:0.1.0": "sha256:aa", "lab:latest": ""}
    assert not reallab.images_changed(None, now)  # a fresh lab
    assert not reallab.images_changed(now, now)
    assert not reallab.images_changed({}, now)  # an image new to the lab is imported before any pod uses it
    assert reallab.images_changed({**now, "ghcr.io/ciliary/ciliary-agent:0.1.0": "sha256:bb"}, now)
