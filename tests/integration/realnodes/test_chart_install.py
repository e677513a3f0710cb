"""Ciliary installed by its own Helm charts on a lab of two real nodes, enforcing policy on real traffic.

``ciliary.lab.reallab.up(chart=True)``: containerd and kubelet per node (each in its own mount
namespace), kube-proxy and CoreDNS per node, then ``helm install`` of charts/ciliary-crds and
charts/ciliary with the locally built images: the operator Deployment, the agent DaemonSet (its
install-cni init container installs ciliary-cni into each node's /opt/cni/bin and /etc/cni/net.d) and
the bundled etcd (TLS, per-node enrollment). Then, on agnhost pods the kubelets start through that
plugin: traffic flows before any policy; a CiliumNetworkPolicy admits only the ``role=frontend`` client
to the servers on both nodes; its ``.status.nodes`` shows both nodes enforcing; the other client is
dropped on the same node and across nodes, which the real ``hubble`` CLI sees through the chart's relay
(Service ``hubble-relay``) on both nodes, and the chart's service map (Service ``hubble-ui``) draws. ``skaffold run -p lab`` rebuilds both images with the
project's own builder, pushes them to the lab registry and upgrades both releases with them (the agents
on both nodes then run the pushed images by digest). ``helm uninstall`` removes the release's objects. The lab
is the session's (``chart_lab``, tests/realnode_lab.py), torn down at the end of the session, also on
failure: no namespace, mount, cgroup or process left, nothing written to the host's /opt/cni, /etc/cni or
/opt/ciliary, no address in the root namespace.

Last, one ``skaffold dev -p lab`` iteration from a copy of the repository: it installs both releases
afresh (after the uninstall above), a change to a source file rebuilds both images and rolls the agent
DaemonSet onto a new digest on every node, and SIGINT ends it with both releases removed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ciliary.lab import cgroups, chartinstall, kubeletnode, nodehost, tools
from ciliary.lab.layout import pod_cidr
from realnode_lab import NODES, ROOT, ChartLab, wait_for

pytestmark = pytest.mark.integration
NS = "chartdemo"


def connects(lab: ChartLab, client: str, ip: str) -> bool:
    out = lab.kubectl("exec", "-n", NS, client, "--", "/agnhost", "connect", f"{ip}:8080", "--timeout=3s",
                      timeout=30)
    return out.returncode == 0


def test_the_chart_runs_operator_agents_and_etcd_and_installs_the_cni_plugin(chart_installed: ChartLab) -> None:
    lab = chart_installed
    pods = json.loads(lab.kubectl("get", "pods", "-n", chartinstall.NAMESPACE, "-o", "json").stdout)["items"]
    agents = {p["spec"]["nodeName"]: p for p in pods if p["metadata"]["labels"].get(
        "app.kubernetes.io/component") == "agent"}
    assert set(agents) == set(NODES), sorted(agents)
    for pod in agents.values():
        init = {c["name"]: c for c in pod["status"]["initContainerStatuses"]}
        assert {"install-cni", "etcd-enroll", "mount-bpf-fs"} <= set(init)
        assert all(c["state"].get("terminated", {}).get("exitCode") == 0 for c in init.values()), init
        assert pod["status"]["phase"] == "Running"
    components = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods
                  if p["status"]["phase"] == "Running"}
    assert {"operator", "etcd", "agent"} <= components, components
    for node in lab.nodes:
        # written by install-cni inside the node's mount namespace: /opt/cni/bin and /etc/cni/net.d are the
        # node's own directories
        wrapper = node.paths.cni_bin_dir / "ciliary-cni"
        assert "installed by ciliary install-cni" in wrapper.read_text()
        conf = json.loads((node.paths.cni_conf_dir / "05-ciliary.conflist").read_text())
        assert conf["plugins"][0]["ipam"]["subnet"] == pod_cidr(NODES.index(node.node) + 1)


def pod(name: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, "containers": [{
                "name": "agnhost", "image": "registry.k8s.io/e2e-test-images/agnhost:2.56",
                "imagePullPolicy": "Never", "args": ["netexec", "--http-port=8080"]}]}}


POLICY = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "frontend-only", "namespace": NS},
    "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
             "ingress": [{"fromEndpoints": [{"matchLabels": {"role": "frontend"}}],
                          "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]},
}


def test_pods_get_their_network_from_the_chart_and_policy_is_enforced(chart_installed: ChartLab) -> None:
    lab = chart_installed
    assert lab.kubectl("create", "namespace", NS).returncode == 0
    # pods are admitted once the namespace's default ServiceAccount exists (token volumes are on here)
    wait_for("the default ServiceAccount", lambda: lab.kubectl("get", "serviceaccount", "default", "-n", NS)
             .returncode == 0, 30, lambda: "")
    pods = [pod("server-1", "node-1", {"app": "server"}), pod("server-2", "node-2", {"app": "server"}),
            pod("frontend", "node-1", {"role": "frontend"}), pod("other", "node-2", {"role": "other"})]
    applied = lab.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": pods}))
    assert applied.returncode == 0, applied.stderr

    def ips() -> dict[str, str] | None:
        out = lab.kubectl("get", "pods", "-n", NS, "-o", "json")
        items = json.loads(out.stdout)["items"] if out.returncode == 0 else []
        found = {p["metadata"]["name"]: p["status"] for p in items}
        if len(found) == 4 and all(s.get("phase") == "Running" and s.get("podIP") for s in found.values()):
            return {n: str(s["podIP"]) for n, s in found.items()}
        return None

    addresses = wait_for("four pods Running", ips, 180, lambda: lab.kubectl("get", "pods", "-A", "-o", "wide").stdout)
    servers = [addresses["server-1"], addresses["server-2"]]
    # before any policy both clients reach both servers (so the denials below are the policy's doing)
    for client in ("frontend", "other"):
        for ip in servers:
            assert wait_for(f"{client} → {ip} before policy", lambda c=client, i=ip: connects(lab, c, i), 30,
                            lambda: "")

    applied = lab.kubectl("apply", "-f", "-", input=json.dumps(POLICY))
    assert applied.returncode == 0, applied.stderr

    def enforced_on_both() -> dict[str, Any] | None:
        out = lab.kubectl("get", "cnp", "-n", NS, "frontend-only", "-o", "json")
        status = json.loads(out.stdout).get("status", {}) if out.returncode == 0 else {}
        nodes = status.get("nodes", {})
        conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
        if set(nodes) == set(NODES) and all(n.get("enforcing") and n.get("ok") for n in nodes.values()) \
                and conditions.get("Enforced") == "True":
            return status
        return None

    status = wait_for("policy Enforced on both nodes", enforced_on_both, 120, lambda: lab.kubectl(
        "get", "cnp", "-n", NS, "frontend-only", "-o", "yaml").stdout)
    assert status["enforcement"] == "2/2 nodes"

    for ip in servers:
        assert connects(lab, "frontend", ip), f"frontend → {ip} denied under a policy that allows it"
        assert not connects(lab, "other", ip), f"other → {ip} allowed under a policy that denies it"

    relay_and_service_map_show_the_drops(lab, servers)
    assert lab.kubectl("delete", "namespace", NS, "--wait=true", "--timeout=120s", timeout=150).returncode == 0


def in_node(lab: ChartLab, node: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``argv`` as a process of ``node``: its network namespace and a cgroup below the node's cgroup root, where
    the chart's socket load balancer is attached (the ClusterIPs then answer with or without kube-proxy)."""
    unified = nodehost.cgroup_layout().unified
    assert unified is not None, "real nodes need cgroup v2"
    group = unified / kubeletnode.node_paths(lab.lab.layout, node).cgroup_root.lstrip("/") / f"test-{os.getpid()}"
    group.mkdir(exist_ok=True)

    def enter() -> None:
        (group / "cgroup.procs").write_text(str(os.getpid()))

    try:
        return subprocess.run(["ip", "netns", "exec", lab.lab.layout.node_netns(node), *argv], capture_output=True,
                              text=True, timeout=timeout, preexec_fn=enter)
    finally:
        cgroups.kill_all(group)
        group.rmdir()


def relay_and_service_map_show_the_drops(lab: ChartLab, servers: list[str]) -> None:
    """The chart's relay (a container of the operator pod, Service hubble-relay) merges both nodes' Observer
    APIs: the real ``hubble`` CLI sees the denied connections at each server's node; the chart's service map
    (Service hubble-ui) draws the other -> server edge as dropped."""
    hubble = str(tools.find("hubble"))
    pods = json.loads(lab.kubectl("get", "pods", "-n", chartinstall.NAMESPACE, "-o", "json").stdout)["items"]
    operator = next(p for p in pods if p["metadata"]["labels"].get("app.kubernetes.io/component") == "operator")
    node = operator["spec"]["nodeName"]
    relay = json.loads(lab.kubectl("get", "service", "hubble-relay", "-n", chartinstall.NAMESPACE, "-o",
                                   "json").stdout)["spec"]["clusterIP"]

    def drops() -> dict[str, str] | None:
        out = in_node(lab, node, hubble, "observe", "--server", f"{relay}:80", "--namespace", NS, "--verdict",
                      "DROPPED", "--last", "100", "-o", "json")
        flows = [json.loads(line)["flow"] for line in out.stdout.splitlines() if '"flow"' in line]
        seen = {f["IP"]["destination"]: f["node_name"] for f in flows
                if "k8s:role=other" in f.get("source", {}).get("labels", [])}
        return seen if set(servers) <= set(seen) else None

    seen = wait_for("hubble observe through hubble-relay shows both drops", drops, 60,
                    lambda: in_node(lab, node, hubble, "status", "--server", f"{relay}:80").stdout)
    assert set(seen.values()) == set(NODES), f"drops observed on {seen}: the relay reaches both agents"
    status = in_node(lab, node, hubble, "status", "--server", f"{relay}:80")
    assert "Connected Nodes: 2/2" in status.stdout, status.stdout + status.stderr

    ui = json.loads(lab.kubectl("get", "service", "hubble-ui", "-n", chartinstall.NAMESPACE, "-o",
                                "json").stdout)["spec"]["clusterIP"]

    def dropped_edge() -> list[Any] | None:
        out = in_node(lab, node, "curl", "-sf", "--max-time", "10",
                      f"http://{ui}/api/service-map?namespace={NS}&verdict=DROPPED&window=600")
        if out.returncode != 0:
            return None
        edges = json.loads(out.stdout)["edges"]
        return [e for e in edges if e.get("state") == "dropped" and e.get("dropped", 0) > 0] or None

    wait_for("the chart's service map draws a dropped edge", dropped_edge, 120,
             lambda: lab.kubectl("get", "pods", "-n", chartinstall.NAMESPACE, "-o", "wide").stdout)

    # as a user does, from the root namespace: `eval $(ciliary lab env)` then the real CLI (HUBBLE_SERVER is
    # the lab's forward of Service hubble-relay, ciliary.lab.serviceforward) and the service map's URL
    env = skaffold_env(lab)
    assert env.get("HUBBLE_SERVER", "").startswith("127.0.0.1:"), "ciliary lab env exports HUBBLE_SERVER"
    status = subprocess.run([hubble, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert "Connected Nodes: 2/2" in status.stdout, status.stdout + status.stderr
    observed = subprocess.run([hubble, "observe", "--namespace", NS, "--verdict", "DROPPED", "--last", "100",
                               "-o", "json"], env=env, capture_output=True, text=True, timeout=60)
    assert any('"flow"' in line for line in observed.stdout.splitlines()), observed.stdout + observed.stderr
    page = urllib.request.urlopen(f"{env['CILIARY_UI_URL']}/api/service-map?namespace={NS}&window=600", timeout=20)
    assert "edges" in json.loads(page.read())


def skaffold_env(lab: ChartLab) -> dict[str, str]:
    """The environment ``eval $(ciliary lab env)`` gives a shell, plus a private HOME for skaffold."""
    env = {**os.environ, **lab.lab.env()}  # as the shell reads the lines (quoted values taken literally)
    assert env["SKAFFOLD_DEFAULT_REPO"].startswith("localhost:")
    env.update(SKAFFOLD_UPDATE_CHECK="false", SKAFFOLD_INTERACTIVE="false", HOME=str(lab.lab.layout.state_dir))
    return env


def test_skaffold_run_builds_pushes_to_the_lab_registry_and_deploys_the_charts(chart_lab: ChartLab) -> None:
    """``skaffold run -p lab``: the project's own builder, the lab registry, helm upgrade of both releases."""
    lab = chart_lab
    env = skaffold_env(lab)
    repo = env["SKAFFOLD_DEFAULT_REPO"]
    t0 = time.monotonic()
    assert shutil.which("skaffold", path=env["PATH"]) == str(tools.built_path("skaffold"))  # eval $(ciliary lab env)
    run = subprocess.run(["skaffold", "run", "-p", "lab", "--default-repo", repo,
                          "--kube-context", "ciliary-lab", "--update-check=false", "--interactive=false"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print(f"skaffold run in {time.monotonic() - t0:.1f} s")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + lab.kubectl(
        "get", "pods,events", "-n", chartinstall.NAMESPACE, "-o", "wide").stdout[-4000:]
    # the DaemonSet and the Deployment now run the images skaffold pushed, by digest, on every node
    # (skaffold's status check covers the Deployment; the DaemonSet's rollout is waited for here)
    for kind, name in (("daemonset", "ciliary-agent"), ("deployment", "ciliary-operator")):
        def get(kind: str = kind, name: str = name) -> dict[str, Any]:
            return dict(json.loads(lab.kubectl("get", kind, name, "-n", chartinstall.NAMESPACE, "-o", "json").stdout))

        obj = get()
        images_used = {c["image"] for c in obj["spec"]["template"]["spec"]["containers"]}
        assert all(i.startswith(f"{repo}/{name}:") and "@sha256:" in i for i in images_used), images_used
        if kind == "daemonset":  # the lab's values as `lab up` installs them: each node's pod namespaces
            agent_env = {e["name"]: e.get("value") for e in obj["spec"]["template"]["spec"]["containers"][0]["env"]}
            netns_dir, subdir = kubeletnode.pod_netns_mount(lab.lab.layout)
            assert agent_env["CILIARY_AGENT_POD_NETNS_DIR"] == f"/host/netns/{subdir}", agent_env
            volumes = {v["name"]: v for v in obj["spec"]["template"]["spec"]["volumes"]}
            assert volumes["pod-netns"]["hostPath"]["path"] == netns_dir
        wait_for(f"{kind} {name} rolled out", lambda g=get: chartinstall.workload_ready(g()), 300,
                 lambda g=get: str(g()["status"]) + lab.kubectl("get", "pods", "-A", "-o", "wide").stdout)
    catalog = json.loads(urllib.request.urlopen(f"http://{repo}/v2/_catalog", timeout=10).read())
    assert {"ciliary-operator", "ciliary-agent"} <= set(catalog["repositories"]), catalog
    agents = json.loads(lab.kubectl("get", "pods", "-n", chartinstall.NAMESPACE, "-l",
                                    "app.kubernetes.io/component=agent", "-o", "json").stdout)["items"]
    assert {p["spec"]["nodeName"] for p in agents if p["status"]["phase"] == "Running"} == set(NODES)


def release_gone(lab: ChartLab) -> bool:
    """No object of the ``ciliary`` release is left, in the namespace or cluster-wide."""
    label = f"app.kubernetes.io/instance={chartinstall.RELEASE}"
    out = lab.kubectl("get", "daemonsets,deployments,statefulsets,pods,services,configmaps,secrets,"
                      "serviceaccounts,roles,rolebindings", "-n", chartinstall.NAMESPACE, "-l", label, "-o", "name")
    cluster = lab.kubectl("get", "clusterroles,clusterrolebindings", "-l", label, "-o", "name")
    return out.returncode == 0 and cluster.returncode == 0 and not out.stdout.strip() and not cluster.stdout.strip()


def test_helm_uninstall_removes_the_release(chart_lab: ChartLab) -> None:
    lab = chart_lab
    chartinstall.uninstall(lab.lab.layout.kubeconfig)
    label = f"app.kubernetes.io/instance={chartinstall.RELEASE}"
    wait_for("the release's objects deleted", lambda: release_gone(lab), 120,
             lambda: lab.kubectl("get", "all", "-n", chartinstall.NAMESPACE, "-l", label).stdout)
    # the CRDs stay (the crds chart's default keep: true), as the chart's README says
    assert lab.kubectl("get", "crd", "ciliumnetworkpolicies.cilium.io").returncode == 0


def repository_copy(into: Path) -> Path:
    """The checkout's files (tracked and new, not ignored) under ``into``, sharing the checkout's venv."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
                            capture_output=True, text=True, check=True, timeout=60).stdout
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    (into / ".venv").symlink_to(ROOT / ".venv")  # skaffold.yaml's buildCommand is .venv/bin/python
    return into


def agent_image(lab: ChartLab) -> str:
    out = lab.kubectl("get", "daemonset", "ciliary-agent", "-n", chartinstall.NAMESPACE, "-o", "json")
    if out.returncode != 0:
        return ""
    return str(json.loads(out.stdout)["spec"]["template"]["spec"]["containers"][0]["image"])


def agents_running(lab: ChartLab, image: str) -> bool:
    """The agent DaemonSet rolled out with ``image`` and a Ready agent pod of that image on every node."""
    out = lab.kubectl("get", "daemonset", "ciliary-agent", "-n", chartinstall.NAMESPACE, "-o", "json")
    if out.returncode != 0 or not chartinstall.workload_ready(json.loads(out.stdout)):
        return False
    pods = json.loads(lab.kubectl("get", "pods", "-n", chartinstall.NAMESPACE, "-l",
                                  "app.kubernetes.io/component=agent", "-o", "json").stdout)["items"]
    on = {p["spec"]["nodeName"] for p in pods if p["metadata"].get("deletionTimestamp") is None
          and p["spec"]["containers"][0]["image"] == image
          and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))}
    return on == set(NODES)


def test_skaffold_dev_redeploys_on_a_source_change_and_cleans_up_on_exit(chart_lab: ChartLab,
                                                                        tmp_path: Path) -> None:
    """One ``skaffold dev -p lab`` iteration: deploy, edit a source file, rebuild + redeploy, SIGINT, cleanup."""
    lab = chart_lab
    env = skaffold_env(lab)
    repo = env["SKAFFOLD_DEFAULT_REPO"]
    copy = repository_copy(tmp_path / "repo")
    transcript = tmp_path / "skaffold-dev.txt"
    argv = [str(tools.built_path("skaffold")), "dev", "-p", "lab", "--default-repo", repo, "--kube-context",
            "ciliary-lab", "--update-check=false", "--interactive=false", "--port-forward=off"]
    t0 = time.monotonic()
    with transcript.open("w") as out:
        dev = subprocess.Popen(argv, cwd=copy, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        def watching(since: int = 0) -> bool:
            """skaffold dev waits for changes after a build and deploy that began after offset ``since``."""
            if dev.poll() is not None:
                raise AssertionError(f"skaffold dev exited ({dev.returncode}):\n{transcript.read_text()[-4000:]}")
            text = transcript.read_text(errors="replace")[since:]
            built = max(text.find("Build [ciliary-agent] succeeded"), text.find("ciliary-agent: Found"))
            return built >= 0 and "Watching for changes..." in text[built:]

        def tail() -> str:
            return transcript.read_text(errors="replace")[-4000:] + lab.kubectl(
                "get", "pods", "-n", chartinstall.NAMESPACE, "-o", "wide").stdout

        wait_for("skaffold dev's first deploy", watching, 900, tail)
        first = agent_image(lab)
        assert first.startswith(f"{repo}/ciliary-agent:") and "@sha256:" in first, first
        wait_for("the agents on the first image", lambda: agents_running(lab, first), 300, tail)
        print(f"skaffold dev: deployed in {time.monotonic() - t0:.1f} s")

        t1 = time.monotonic()
        changed = copy / "nodeagent" / "ciliary" / "nodeagent" / "main.py"
        edited_at = len(transcript.read_text(errors="replace"))
        changed.write_text(changed.read_text() + "\n# changed by the skaffold dev test\n")
        wait_for("skaffold dev's rebuild and redeploy", lambda: watching(edited_at), 900, tail)
        rebuilt = transcript.read_text(errors="replace")[edited_at:]
        assert "Build [ciliary-agent] succeeded" in rebuilt, rebuilt[-4000:]
        second = agent_image(lab)
        assert second.startswith(f"{repo}/ciliary-agent:") and "@sha256:" in second, second
        assert second.split("@")[1] != first.split("@")[1], \
            f"a source change left the agent image's digest as it was:\n{rebuilt[-4000:]}"
        wait_for("the agents on the rebuilt image", lambda: agents_running(lab, second), 300, tail)
        print(f"skaffold dev: rebuilt and redeployed in {time.monotonic() - t1:.1f} s")
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGINT)
            try:
                dev.wait(timeout=300)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
                dev.wait(timeout=30)
                raise AssertionError(f"skaffold dev did not stop on SIGINT:\n{transcript.read_text()[-3000:]}") from None
    text = transcript.read_text(errors="replace")
    print(text[-6000:])
    assert "Cleaning up..." in text, text[-3000:]
    wait_for("the release's objects deleted by skaffold dev", lambda: release_gone(lab), 120,
             lambda: lab.kubectl("get", "all", "-n", chartinstall.NAMESPACE).stdout)
    helm = subprocess.run([str(tools.built_path("helm")), f"--kubeconfig={lab.lab.layout.kubeconfig}", "list", "-a",
                           "-n", chartinstall.NAMESPACE, "-q"], capture_output=True, text=True, timeout=60)
    assert helm.returncode == 0 and not helm.stdout.strip(), helm.stdout + helm.stderr
