"""Static checks of the deployment files: Dockerfile, .dockerignore, skaffold.yaml, the charts.

No image can be built here (no registry access for base images) and skaffold is not built
(its module has replace directives), so these tests check by reading: the Dockerfile's
targets, stages and COPY sources; skaffold.yaml against the Dockerfile and the chart's
values; the CRD copies against crds/; every chart value documented; RBAC without wildcards.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import CHART, CRDS_CHART, ROOT, Helm, documents, find

pytestmark = pytest.mark.integration

DOCKERFILE = ROOT / "Dockerfile"


# --- Dockerfile ---------------------------------------------------------------------------------

def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and heredoc bodies skipped."""
    out: list[tuple[str, str]] = []
    lines = iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        heredoc = re.search(r"<<-?'?\"?(\w+)'?\"?", rest)
        if heredoc and word.upper() in ("COPY", "RUN"):
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
    return out


def _dockerignore() -> list[str]:
    return [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
            if p.strip() and not p.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.strip("/").split("/")
    for pattern in patterns:
        pattern = pattern.strip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pattern) or (pattern.startswith("**/") and
                                                     fnmatch.fnmatch(parts[i - 1], pattern[3:])):
                return True
    return False


def test_dockerfile_has_operator_and_agent_targets_on_bookworm() -> None:
    instructions = _instructions(DOCKERFILE.read_text())
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in instructions if i == "ARG" and "=" in a}
    stages: dict[str, str] = {}
    for word, rest in instructions:
        if word == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            stages[m.group(2)] = m.group(1)
    assert {"operator", "agent"} <= stages.keys()
    assert args["DEBIAN_IMAGE"].startswith("debian:bookworm")
    # every stage derives from a named stage or the bookworm base
    for name, parent in stages.items():
        assert parent in stages or parent == "${DEBIAN_IMAGE}", (name, parent)
    # --from= refers to stages defined earlier
    seen: list[str] = []
    for word, rest in instructions:
        if word == "FROM":
            seen.append(rest.split()[-1])
        m = re.search(r"--from=(\S+)", rest)
        if word == "COPY" and m:
            assert m.group(1) in seen[:-1], f"COPY --from={m.group(1)} before that stage"


def test_dockerfile_copy_sources_exist_in_the_build_context() -> None:
    ignore = _dockerignore()
    checked = 0
    for word, rest in _instructions(DOCKERFILE.read_text()):
        if word != "COPY" or "--from=" in rest or "<<" in rest:
            continue
        words = [w for w in rest.split() if not w.startswith("--")]
        for source in words[:-1]:
            path = ROOT / source
            assert path.exists(), f"COPY source {source} missing"
            assert not _ignored(source, ignore), f"COPY source {source} excluded by .dockerignore"
            checked += 1
    assert checked >= 6


def test_agent_image_carries_bcc_headers_cni_runtime_and_datapath() -> None:
    text = DOCKERFILE.read_text()
    agent = text[text.index("AS agent"):]
    for package in ("python3-bpfcc", "libbpf1", "bpftool", "iproute2", "linux-headers-amd64"):
        assert package in agent
    assert "COPY --from=cni-runtime /opt/ciliary-cni /opt/ciliary-cni" in agent
    assert "BCC_KERNEL_SOURCE" in agent
    assert "COPY datapath_c/ datapath_c/" in text
    # the chart's commands exist in the image
    assert "/usr/local/bin/ciliary-agent-entrypoint" in agent
    rendered = (CHART / "templates" / "agent" / "daemonset.yaml").read_text()
    assert "command: [ciliary-agent-entrypoint]" in rendered
    assert "command: [python3, /etc/ciliary/cni/install-cni.py]" in rendered


def test_dockerignore_keeps_the_context_small() -> None:
    ignore = _dockerignore()
    for heavy in (".venv", ".git", ".lab", ".lab-integration", "tests", "bench", "build"):
        assert _ignored(heavy, ignore), heavy
    for needed in ("operator", "nodeagent", "e2e", "datapath_c", "pyproject.toml", "setup/requirements-lock.txt"):
        assert not _ignored(needed, ignore), needed


# --- skaffold.yaml ------------------------------------------------------------------------------

def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_skaffold_builds_both_targets_and_deploys_the_charts_with_them() -> None:
    config = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    assert config["apiVersion"].startswith("skaffold/v4")
    artifacts = {a["image"]: a for a in config["build"]["artifacts"]}
    assert {a["docker"]["target"] for a in artifacts.values()} == {"operator", "agent"}
    for artifact in artifacts.values():
        assert (ROOT / artifact.get("context", ".") / artifact["docker"]["dockerfile"]).exists()
    releases = config["deploy"]["helm"]["releases"]
    assert [r["name"] for r in releases] == ["ciliary-crds", "ciliary"], "CRDs are installed first"
    for release in releases:
        assert (ROOT / release["chartPath"] / "Chart.yaml").exists()
    values = _flatten(yaml.safe_load((CHART / "values.yaml").read_text()))
    templates = releases[1]["setValueTemplates"]
    for key in templates:
        assert key in values, f"skaffold sets {key}, which values.yaml does not have"
    for image in artifacts:
        key = image.replace("-", "_")
        component = image.removeprefix("ciliary-")
        assert templates[f"{component}.image.repository"] == f"{{{{.IMAGE_REPO_{key}}}}}"
        assert f".IMAGE_TAG_{key}" in templates[f"{component}.image.tag"]
    local = next(p for p in config["profiles"] if p["name"] == "local")
    assert local["build"]["local"]["push"] is False
    for patch in local.get("patches", []):
        assert patch["path"].startswith("/deploy/helm/releases/1/"), patch


# --- charts -------------------------------------------------------------------------------------

def test_crds_in_the_crds_chart_are_byte_identical_to_crds_folder() -> None:
    source = sorted((ROOT / "crds").glob("*.cilium.io.yaml"))
    copies = sorted((CRDS_CHART / "files").glob("*.yaml"))
    assert [p.name for p in copies] == [p.name for p in source]
    for original, copy in zip(source, copies, strict=True):
        assert copy.read_bytes() == original.read_bytes(), f"{copy} drifted from {original}: copy it again"
    assert not (CHART / "crds").exists(), "CRDs live in the ciliary-crds chart only"


def _leaf_keys_without_doc(path: Path) -> list[str]:
    """Keys lacking a `# --` comment block above them, except sections (mappings of further keys)
    and everything inside a documented key (a documented mapping is one value, e.g. resources)."""
    lines = path.read_text().splitlines()
    missing = []
    documented_indent: int | None = None
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if not m or line.lstrip().startswith("- "):
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        if documented_indent is not None:
            if indent > documented_indent:
                continue
            documented_indent = None
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        if j >= 0 and lines[j].strip().startswith("# --"):
            documented_indent = indent
            continue
        if not rest:
            following = next((ln for ln in lines[i + 1:] if ln.strip() and not ln.lstrip().startswith("#")), "")
            if len(following) - len(following.lstrip()) > indent and not following.lstrip().startswith("- "):
                continue  # a section: its keys carry the documentation
        missing.append(key)
    return missing


@pytest.mark.parametrize("chart", [CHART, CRDS_CHART], ids=lambda p: p.name)
def test_every_value_is_documented(chart: Path) -> None:
    assert _leaf_keys_without_doc(chart / "values.yaml") == []


def test_every_value_is_listed_in_the_chart_readme() -> None:
    readme = (CHART / "README.md").read_text()
    values = _flatten(yaml.safe_load((CHART / "values.yaml").read_text()))
    def listed(key: str) -> bool:
        parts = key.split(".")
        return any(f"`{'.'.join(parts[:i])}`" in readme for i in range(1, len(parts) + 1))

    missing = [key for key in values if not listed(key)]
    assert missing == []


def test_helm_lint_is_clean(helm: Helm) -> None:
    for chart in (CHART, CRDS_CHART):
        done = helm.run("lint", "--strict", str(chart))
        assert "0 chart(s) failed" in done.stdout
        assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout
    external = helm.run("lint", "--strict", str(CHART), "--set", "etcd.enabled=false",
                        "--set", "etcd.external.endpoints={https://etcd-0.example:2379}",
                        "--set", "etcd.external.tls.secretName=etcd-client")
    assert "0 chart(s) failed" in external.stdout


def test_rendered_rbac_has_no_wildcards(helm: Helm) -> None:
    for sets in ((), ("agent.directStatus=true",)):
        for doc in documents(helm.template(CHART, *sets)):
            if doc["kind"] not in ("ClusterRole", "Role"):
                continue
            for rule in doc["rules"]:
                for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                    assert "*" not in rule.get(field, []), (doc["metadata"]["name"], rule)
                assert "nonResourceURLs" not in rule


def test_agent_is_not_privileged_and_only_mount_bpf_fs_is(helm: Helm) -> None:
    ds = find(documents(helm.template()), "DaemonSet", "-agent")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and not spec.get("hostPID")
    assert spec["automountServiceAccountToken"] is False
    privileged = [c["name"] for c in spec["initContainers"] + spec["containers"]
                  if c.get("securityContext", {}).get("privileged")]
    assert privileged == ["mount-bpf-fs"]
    agent = spec["containers"][0]
    caps = agent["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert set(caps["add"]) == {"BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "NET_BIND_SERVICE", "SYS_RESOURCE"}
    env = {e["name"]: e for e in agent["env"]}
    assert env["CILIARY_AGENT_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/sys/fs/bpf", "/lib/modules", "/usr/src", "/run/ciliary", "/var/lib/ciliary/agent"} <= mounts
    assert "/var/run/secrets/kubernetes.io/serviceaccount" not in mounts, "no API token in the agent"
    install = next(c for c in spec["initContainers"] if c["name"] == "install-cni")
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in {m["mountPath"] for m in install["volumeMounts"]}
    # a busy agent (a large load-balancing apply) answers its probes late, not never: not killed for 1 s
    assert agent["livenessProbe"]["timeoutSeconds"] == agent["readinessProbe"]["timeoutSeconds"] == 5
    assert agent["livenessProbe"]["periodSeconds"] * agent["livenessProbe"]["failureThreshold"] >= 60


def test_cni_conflist_template_matches_the_plugin_config_model(helm: Helm) -> None:
    from ciliary.cni import config as cni_config

    cm = find(documents(helm.template()), "ConfigMap", "-cni")
    conflist = cm["data"]["conflist.template"].replace("__POD_CIDR__", "10.244.7.0/24")
    document = json.loads(conflist)
    plugin = {"cniVersion": document["cniVersion"], "name": document["name"], **document["plugins"][0]}
    parsed = cni_config.parse_network_config(json.dumps(plugin).encode())
    assert str(parsed.ipam.subnet) == "10.244.7.0/24"
    assert cm["data"]["install-cni.py"] == (CHART / "files" / "install-cni.py").read_text()


def test_more_than_one_operator_needs_leader_election(helm: Helm) -> None:
    refused = helm.run("template", "x", str(CHART), "--set", "operator.replicas=2", check=False)
    assert refused.returncode != 0 and "leaderElection" in refused.stderr
    docs = documents(helm.template(CHART, "operator.replicas=2", "operator.leaderElection.enabled=true"))
    deployment = find(docs, "Deployment", "-operator")
    assert deployment["spec"]["replicas"] == 2
    assert "--leader-election" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert find(docs, "PodDisruptionBudget", "-operator")["spec"]["minAvailable"] == 1
    single = find(documents(helm.template()), "Deployment", "-operator")
    assert single["spec"]["strategy"]["type"] == "Recreate"


def test_the_operators_lb_mode_comes_from_the_value(helm: Helm, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``operator.lbMode`` reaches the operator as CILIARY_OPERATOR_LB_MODE, which its parser reads; a value that
    is neither snat nor dsr is refused by the operator at start (argparse's choices), never taken as snat."""
    from ciliary.operator.main import build_parser, main

    for sets, wanted in (((), "snat"), (("operator.lbMode=dsr",), "dsr")):
        operator = find(documents(helm.template(CHART, *sets)), "Deployment", "-operator")["spec"]["template"]
        env = {e["name"]: e.get("value") for e in operator["spec"]["containers"][0]["env"]}
        assert env["CILIARY_OPERATOR_LB_MODE"] == wanted
        monkeypatch.setenv("CILIARY_OPERATOR_LB_MODE", wanted)
        assert build_parser().parse_args([]).lb_mode == wanted
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--lb-mode", "direct"])
    monkeypatch.setenv("CILIARY_OPERATOR_LB_MODE", "direct")  # the chart's path: the environment
    with pytest.raises(SystemExit):
        main([])
    assert "--lb-mode: 'direct' (from the environment) is not one of snat, dsr" in capsys.readouterr().err


def test_external_etcd_replaces_the_bundled_one(helm: Helm) -> None:
    docs = documents(helm.template(CHART, "etcd.enabled=false",
                                   "etcd.external.endpoints={https://e1:2379,https://e2:2379}",
                                   "etcd.external.tls.secretName=etcd-client"))
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    operator = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]
    assert "--etcd-endpoints=https://e1:2379,https://e2:2379" in operator["containers"][0]["args"]
    agent = find(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]
    for pod in (operator, agent):
        assert {"name": "etcd-tls", "secret": {"secretName": "etcd-client", "defaultMode": 0o400}} in pod["volumes"]
    env = {e["name"]: e.get("value") for e in agent["containers"][0]["env"]}
    assert env["CILIARY_AGENT_ETCD_ENDPOINTS"] == "https://e1:2379,https://e2:2379"
    assert env["CILIARY_AGENT_ETCD_CERT_FILE"] == "/etc/ciliary/etcd-tls/tls.crt"
    missing = helm.run("template", "x", str(CHART), "--set", "etcd.enabled=false", check=False)
    assert missing.returncode != 0 and "etcd.external.endpoints" in missing.stderr


PINNED = "etcd.nodeSelector.kubernetes\\.io/hostname=node-1"


def test_without_kube_proxy_the_components_dial_the_apiserver_and_etcd_without_a_cluster_ip(helm: Helm) -> None:
    """k8sServiceHost and etcd.clientHostAlias: every container that talks to the apiserver or etcd before the
    agents' load balancer is programmed gets the direct addresses; by default nothing changes."""
    docs = documents(helm.template(CHART, "k8sServiceHost=198.51.100.1", "k8sServicePort=6443",
                                   "etcd.clientHostAlias=192.0.2.11", PINNED))
    operator = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]
    agent = find(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]
    etcd = find(docs, "Service", "-etcd")["metadata"]
    alias = [{"ip": "192.0.2.11", "hostnames": [f"{etcd['name']}.{etcd['namespace']}.svc"]}]
    for pod in (operator, agent):
        assert pod["hostAliases"] == alias
        for c in pod.get("initContainers", []) + pod["containers"]:
            if c["name"] == "mount-bpf-fs":
                continue
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert (env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")) == \
                ("198.51.100.1", "6443"), c["name"]
            assert env.get("GRPC_DNS_RESOLVER") == "native", c["name"]
    plain = documents(helm.template())
    for kind, suffix in (("Deployment", "-operator"), ("DaemonSet", "-agent")):
        pod = find(plain, kind, suffix)["spec"]["template"]["spec"]
        assert "hostAliases" not in pod
        assert not [e for c in pod.get("initContainers", []) + pod["containers"] for e in c.get("env", [])
                    if e["name"] in ("KUBERNETES_SERVICE_HOST", "GRPC_DNS_RESOLVER")]
    refused = helm.run("template", "x", str(CHART), "--set", "etcd.clientHostAlias=192.0.2.11", "--set", PINNED,
                       "--set", "etcd.hostNetwork=false", check=False)
    assert refused.returncode != 0 and "etcd.hostNetwork" in refused.stderr
    # not pinned to the node whose address it is: etcd could run elsewhere, the alias then reaches no etcd
    unpinned = helm.run("template", "x", str(CHART), "--set", "etcd.clientHostAlias=192.0.2.11", check=False)
    assert unpinned.returncode != 0 and "kubernetes.io/hostname" in unpinned.stderr, unpinned.stderr
    named = helm.run("template", "x", str(CHART), "--set", "etcd.clientHostAlias=etcd.example", "--set", PINNED,
                     check=False)
    assert named.returncode != 0 and "is not an IPv4 address" in named.stderr, named.stderr


def test_the_agent_sees_the_pods_network_namespaces_read_only(helm: Helm) -> None:
    """For the cookie of a pod an older CNI plugin registered without it: the runtime's namespace directory,
    read-only, at /host/netns, whole (a subPath mount would not carry the namespaces' own mounts), the agent told
    where (a sub-directory per node when set); nothing when turned off."""
    def agent_of(*sets: str) -> tuple[dict[str, Any], dict[str, Any]]:
        spec = find(documents(helm.template(CHART, *sets)), "DaemonSet", "-agent")["spec"]["template"]["spec"]
        return spec, spec["containers"][0]

    spec, agent = agent_of()
    mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == "/host/netns")
    assert mount["readOnly"] is True and "subPathExpr" not in mount
    assert "mountPropagation" not in mount  # the runtime refuses propagation from a directory that is not shared
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"]["path"] == "/var/run/netns"
    assert {"name": "CILIARY_AGENT_POD_NETNS_DIR", "value": "/host/netns"} in agent["env"]
    _, agent = agent_of("agent.podNetnsDir=/run/nodes", "agent.podNetnsSubdir=$(CILIARY_AGENT_NODE_NAME)/netns")
    mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == "/host/netns")
    assert "subPath" not in mount and "subPathExpr" not in mount
    names = [e["name"] for e in agent["env"]]  # the kubelet expands only variables defined before
    assert names.index("CILIARY_AGENT_NODE_NAME") < names.index("CILIARY_AGENT_POD_NETNS_DIR")
    assert {"name": "CILIARY_AGENT_POD_NETNS_DIR", "value": "/host/netns/$(CILIARY_AGENT_NODE_NAME)/netns"} in \
        agent["env"]
    spec, agent = agent_of("agent.podNetnsDir=")
    assert "/host/netns" not in {m["mountPath"] for m in agent["volumeMounts"]}
    assert "CILIARY_AGENT_POD_NETNS_DIR" not in {e["name"] for e in agent["env"]}
