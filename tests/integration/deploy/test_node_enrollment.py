"""Per-node etcd enrollment against the real kube-apiserver and the real TLS etcd with auth on.

The chart's RBAC objects (agent ServiceAccount and ClusterRole, operator ServiceAccount, the
etcd-enroller ClusterRole) are applied as rendered. The real enroller
(``python -m ciliary.operator.kube.enroller``) runs as the operator's ServiceAccount with the
lab's etcd root certificate and etcd CA. For a Node and a Pod bound to it (never run: no kubelet),
a token is minted for the agent ServiceAccount bound to that Pod (TokenRequest, boundObjectRef
kind Pod), as the kubelet mints the projected token, and the agent's real enroll step runs with it.

Checked: the CSR carries the node-name extra the apiserver derives from such a token; the issued
certificate is etcd user ``ciliary-node-<node>`` and gets exactly that node's access; asking for
another node's CN, or asking from another ServiceAccount, is Denied with the reason (and an Event);
deleting the Node removes its etcd user, after which its certificate opens nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aetcd
import pytest
import yaml
from deploy_helpers import NAMESPACE, ROOT, Helm, documents, ensure_namespace, find, kubectl_ok

from ciliary.lab import processes
from ciliary.nodeagent import enroll
from ciliary.operator.kube.enrollment import NODE_NAME_EXTRA, SIGNER_NAME
from ciliary.operator.store import access, accounts, keyspace
from ciliary.operator.store.etcdclient import EtcdEndpoint, EtcdTLS, make_client

pytestmark = pytest.mark.integration
PYTHONPATH = os.pathsep.join(str(ROOT / d) for d in ("operator", "nodeagent", "e2e"))
AGENT_SA = "cy-ciliary-agent"
OPERATOR_SA = "cy-ciliary-operator"

#: (apiGroup, resource, verb) the enroller uses, read from kube/enroller.py: resync -> list CSRs;
#: watch_once -> watch CSRs; _write -> read (get) one, then replace its approval (Approved, Denied) or
#: status (certificate, Failed) subresource (update), which the apiserver allows only with approve or
#: sign on the signer; _event -> create Events; sweep -> list Nodes.
ENROLLER_USES = frozenset({
    ("certificates.k8s.io", "certificatesigningrequests", "get"),
    ("certificates.k8s.io", "certificatesigningrequests", "list"),
    ("certificates.k8s.io", "certificatesigningrequests", "watch"),
    ("certificates.k8s.io", "certificatesigningrequests/approval", "update"),
    ("certificates.k8s.io", "certificatesigningrequests/status", "update"),
    ("certificates.k8s.io", "signers", "approve"),
    ("certificates.k8s.io", "signers", "sign"),
    ("", "events", "create"),
    ("", "nodes", "list"),
})


def pairs(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> list[dict[str, Any]]:
    return documents(helm.template())


def test_chart_grants_the_enroller_exactly_what_it_uses(rendered: list[dict[str, Any]]) -> None:
    rules = find(rendered, "ClusterRole", "-etcd-enroller")["rules"]
    assert pairs(rules) == ENROLLER_USES
    signers = [r for r in rules if r["resources"] == ["signers"]]
    assert signers == [{"apiGroups": ["certificates.k8s.io"], "resources": ["signers"],
                        "resourceNames": [SIGNER_NAME], "verbs": ["approve", "sign"]}]
    binding = find(rendered, "ClusterRoleBinding", "-etcd-enroller")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": NAMESPACE}]
    agent = pairs(find(rendered, "ClusterRole", "-agent")["rules"])
    assert {p for p in agent if p[0] == "certificates.k8s.io"} == {
        ("certificates.k8s.io", "certificatesigningrequests", "create"),
        ("certificates.k8s.io", "certificatesigningrequests", "get")}


def test_only_the_enroller_holds_the_ca_key_and_only_enroll_steps_hold_tokens(
        rendered: list[dict[str, Any]]) -> None:
    operator = find(rendered, "Deployment", "-operator")["spec"]["template"]["spec"]
    ca_secret = find(rendered, "Secret", "-etcd-ca")["metadata"]["name"]
    holders = [v["name"] for v in operator["volumes"] if v.get("secret", {}).get("secretName") == ca_secret]
    assert holders == ["etcd-ca"]
    mounting = [c["name"] for c in operator["initContainers"] + operator["containers"]
                if "etcd-ca" in {m["name"] for m in c.get("volumeMounts", [])}]
    assert mounting == ["etcd-enroller"]
    main = next(c for c in operator["containers"] if c["name"] == "operator")
    assert {m["name"] for m in main["volumeMounts"]} == {"tmp", "etcd-tls"}  # its own certificate only
    bootstrap = operator["initContainers"][0]
    assert "--shared-agents" not in bootstrap["command"]
    agent = find(rendered, "DaemonSet", "-agent")["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"] for v in agent["volumes"] if "secret" in v}
    # no etcd material (a kubelet may read the Secrets of its pods): only the agents' shared Hubble server pair
    # and the relay's client CA, which every node holds by design (README: one server certificate per cluster)
    hubble = find(rendered, "Secret", "-hubble-server-certs")
    assert secrets == {hubble["metadata"]["name"]}, secrets
    assert set(hubble["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    token_holders = [c["name"] for c in agent["initContainers"] + agent["containers"]
                     if "kube-api-access" in {m["name"] for m in c.get("volumeMounts", [])}]
    assert token_holders == ["install-cni", "etcd-enroll"]
    node_volume = next(v for v in agent["volumes"] if v["name"] == "etcd-node")
    assert node_volume["emptyDir"]["medium"] == "Memory"
    tls = find(rendered, "Secret", "-etcd-tls")["data"]
    assert "agent.crt" not in tls and "agent.key" not in tls


# --- against the apiserver and etcd ---------------------------------------------------------


class EnrollerRun:
    def __init__(self, kube: Any, kubeconfig: Path, log: Path) -> None:
        certs = kube.lab.etcd_certs()
        root = kube.etcd_tls(access.ROOT_USER)
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ciliary.operator.kube.enroller", "--kubeconfig", str(kubeconfig),
             "--etcd-endpoints", kube.etcd_endpoint, "--etcd-ca-file", str(root.ca_file),
             "--etcd-cert-file", str(root.cert_file), "--etcd-key-file", str(root.key_file),
             "--signing-ca-file", str(certs.ca_file), "--signing-key-file", str(certs.directory / "ca.key"),
             "--agent-service-account", f"system:serviceaccount:{NAMESPACE}:{AGENT_SA}",
             "--sweep-interval", "1", "--resync", "20", "--log-level", "DEBUG"],
            stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": PYTHONPATH}, cwd=ROOT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        processes.terminate(self.proc, timeout=15)
        self._out.close()


class Setup:
    """Names of this run's objects (unique, so nothing of an earlier run counts)."""

    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:6]
        self.node_a, self.node_b = f"enr-{suffix}-a", f"enr-{suffix}-b"
        self.intruder = f"enr-intruder-{suffix}"


def api_access(kube: Any, token: str, tmp_path: Path) -> enroll.ApiAccess:
    admin = yaml.safe_load(Path(kube.kubeconfig).read_text())
    cluster = admin["clusters"][0]["cluster"]
    ca = tmp_path / "kube-ca.crt"
    if "certificate-authority-data" in cluster:
        import base64
        ca.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    else:
        ca.write_bytes(Path(cluster["certificate-authority"]).read_bytes())
    return enroll.ApiAccess(cluster["server"], token, ca)


def pod(kube: Any, name: str, node: str, account: str) -> str:
    """A Pod bound to ``node`` running as ``account`` (never started); returns its UID."""
    kubectl_ok(kube, "apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"nodeName": node, "serviceAccountName": account, "automountServiceAccountToken": False,
                 "containers": [{"name": "c", "image": "example.invalid/none"}]}}))
    return kubectl_ok(kube, "get", "pod", name, "-n", NAMESPACE, "-o", "jsonpath={.metadata.uid}").strip()


def pod_token(kube: Any, account: str, pod_name: str) -> str:
    """What the kubelet projects into the pod: a token for ``account`` bound to the Pod object."""
    return kubectl_ok(kube, "create", "token", account, "-n", NAMESPACE, "--bound-object-kind", "Pod",
                      "--bound-object-name", pod_name, "--duration", "10m").strip()


def etcd_allowed(kube: Any, tls: EtcdTLS, key: str, *, write: bool) -> bool:
    async def go() -> bool:
        client = make_client(EtcdEndpoint.parse(kube.etcd_endpoint), tls, 5)
        try:
            if write:
                await client.put(key.encode(), b"{}")
            else:
                await client.get(key.encode())
            return True
        except aetcd.ClientError as exc:
            if "permission denied" in str(exc) or "user name not found" in str(exc):
                return False
            raise
        finally:
            await client.close()

    return asyncio.run(go())


def etcd_users(kube: Any) -> list[str]:
    async def go() -> list[str]:
        client = make_client(EtcdEndpoint.parse(kube.etcd_endpoint), kube.etcd_tls(access.ROOT_USER), 5)
        try:
            return await accounts.list_users(client)
        finally:
            await client.close()

    return asyncio.run(go())


def csr(kube: Any, name: str) -> dict[str, Any]:
    return dict(json.loads(kubectl_ok(kube, "get", "csr", name, "-o", "json")))


@pytest.fixture(scope="module")
def enrolling(kube: Any, rendered: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Any, Setup, EnrollerRun]]:
    from deploy_helpers import service_account_kubeconfig

    ensure_namespace(kube, NAMESPACE)
    wanted = [d for d in rendered if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")
              and d["metadata"]["name"].endswith(("-agent", "-etcd-enroller", "-operator"))
              and not (d["kind"] != "ServiceAccount" and d["metadata"]["name"].endswith("-operator"))]
    assert len(wanted) == 6  # agent SA, role, binding; operator SA; enroller role, binding
    kubectl_ok(kube, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": wanted}))
    setup = Setup()
    intruder_rbac = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": setup.intruder, "namespace": NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": setup.intruder},
         "rules": [{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
                    "verbs": ["create", "get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": setup.intruder},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": setup.intruder},
         "subjects": [{"kind": "ServiceAccount", "name": setup.intruder, "namespace": NAMESPACE}]},
        *({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}} for n in (setup.node_a, setup.node_b)),
    ]
    kubectl_ok(kube, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                           "items": intruder_rbac}))
    tmp = tmp_path_factory.mktemp("enroll")
    kubeconfig = service_account_kubeconfig(kube, tmp / "operator.kubeconfig", account=OPERATOR_SA,
                                            namespace=NAMESPACE)
    run = EnrollerRun(kube, kubeconfig, tmp / "enroller.log")
    try:
        yield kube, setup, run
    finally:
        run.stop()
        for n in (setup.node_a, setup.node_b):
            kube.kubectl("delete", "pod", "-n", NAMESPACE, f"{n}-agent", f"{n}-intruder", "--ignore-not-found",
                         "--wait=false", "--grace-period=0", "--force")
            kube.kubectl("delete", "node", n, "--ignore-not-found", "--wait=false")
        kube.kubectl("delete", "clusterrolebinding,clusterrole", setup.intruder, "--ignore-not-found")
        kube.kubectl("delete", "serviceaccount", setup.intruder, "-n", NAMESPACE, "--ignore-not-found")


def test_an_agent_enrolls_for_exactly_its_own_node(enrolling: tuple[Any, Setup, EnrollerRun],
                                                   tmp_path: Path) -> None:
    kube, setup, run = enrolling
    uid = pod(kube, f"{setup.node_a}-agent", setup.node_a, AGENT_SA)
    token = pod_token(kube, AGENT_SA, f"{setup.node_a}-agent")
    api = api_access(kube, token, tmp_path)
    (tmp_path / "token").write_text(token)
    # the real init-container command, as the chart runs it (environment from the downward API)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": PYTHONPATH, "CILIARY_NODE_NAME": setup.node_a,
           "CILIARY_POD_UID": uid, "CILIARY_ENROLL_DIR": str(tmp_path / "etcd-node"),
           "CILIARY_ENROLL_WAIT_SECONDS": "60", "CILIARY_API_SERVER": api.server,
           "CILIARY_API_TOKEN_FILE": str(tmp_path / "token"), "CILIARY_API_CA_FILE": str(api.ca_file)}
    done = subprocess.run([sys.executable, "-m", "ciliary.nodeagent.enroll"], env=env, capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0, f"{done.stderr}\n--- enroller ---\n{run.text()[-4000:]}"
    node_dir = tmp_path / "etcd-node"
    assert sorted(p.name for p in node_dir.iterdir()) == ["tls.crt", "tls.key"]
    assert (node_dir / "tls.key").stat().st_mode & 0o777 == 0o600

    # the CSR as the apiserver recorded it: requester and the node its token is bound to
    name = next(c["metadata"]["name"] for c in json.loads(kubectl_ok(kube, "get", "csr", "-o", "json"))["items"]
                if c["metadata"]["name"].startswith(f"ciliary-etcd-{setup.node_a}-{uid[:8]}-"))
    obj = csr(kube, name)
    assert obj["spec"]["username"] == f"system:serviceaccount:{NAMESPACE}:{AGENT_SA}"
    assert obj["spec"]["extra"][NODE_NAME_EXTRA] == [setup.node_a]
    assert {c["type"] for c in obj["status"]["conditions"]} == {"Approved"}

    from cryptography import x509
    cert = x509.load_pem_x509_certificate((node_dir / "tls.crt").read_bytes())
    assert cert.subject.rfc4514_string() == f"CN={access.node_user(setup.node_a)}"

    # etcd: the certificate is node A's user, with node A's access and nothing more
    async def publish_intents() -> None:
        operator = kube.etcd_store()
        try:
            for n in (setup.node_a, setup.node_b):
                await operator.put(keyspace.node_intent_key(n).encode(), b"{}")
        finally:
            await operator.close()

    asyncio.run(publish_intents())
    tls = EtcdTLS(kube.lab.etcd_certs().ca_file, node_dir / "tls.crt", node_dir / "tls.key")
    assert etcd_allowed(kube, tls, keyspace.node_intent_key(setup.node_a), write=False)
    assert not etcd_allowed(kube, tls, keyspace.node_intent_key(setup.node_b), write=False)
    assert not etcd_allowed(kube, tls, keyspace.node_intent_key(setup.node_a), write=True)
    assert etcd_allowed(kube, tls, keyspace.node_key(setup.node_a), write=True)
    assert not etcd_allowed(kube, tls, keyspace.node_key(setup.node_b), write=True)
    assert etcd_allowed(kube, tls, keyspace.report_key("p", setup.node_a), write=True)
    assert not etcd_allowed(kube, tls, keyspace.report_key("p", setup.node_b), write=True)

    # the Node leaves: its etcd user goes, and its certificate opens nothing any more
    kubectl_ok(kube, "delete", "pod", f"{setup.node_a}-agent", "-n", NAMESPACE, "--grace-period=0", "--force")
    kubectl_ok(kube, "delete", "node", setup.node_a)
    deadline = time.monotonic() + 30
    while access.node_user(setup.node_a) in etcd_users(kube):
        assert time.monotonic() < deadline, f"etcd user not removed\n{run.text()[-3000:]}"
        time.sleep(0.5)
    assert not etcd_allowed(kube, tls, keyspace.node_intent_key(setup.node_a), write=False)
    assert "etcd user of a removed node deleted" in run.text()


def _denied(kube: Any, run: EnrollerRun, exc: enroll.EnrollmentError, reason: str) -> None:
    assert "denied" in str(exc) and reason in str(exc), f"{exc}\n{run.text()[-3000:]}"
    obj = csr(kube, exc.csr)
    denied = [c for c in obj["status"]["conditions"] if c["type"] == "Denied"]
    assert len(denied) == 1 and reason in denied[0]["message"] and "certificate" not in obj["status"]
    events = json.loads(kubectl_ok(kube, "get", "events", "-n", "default", "-o", "json", "--field-selector",
                                   f"involvedObject.name={exc.csr},reason=EtcdCertificateDenied"))
    assert events["items"], "a Warning Event for the denied request"


def test_asking_for_another_nodes_user_is_denied(enrolling: tuple[Any, Setup, EnrollerRun], tmp_path: Path) -> None:
    kube, setup, run = enrolling
    uid = pod(kube, f"{setup.node_b}-agent", setup.node_b, AGENT_SA)
    api = api_access(kube, pod_token(kube, AGENT_SA, f"{setup.node_b}-agent"), tmp_path)
    other = access.node_user("some-other-node")
    with pytest.raises(enroll.EnrollmentError) as caught:
        enroll.enroll(api, node=setup.node_b, pod_uid=uid, directory=tmp_path / "out", wait_seconds=60,
                      common_name=other, poll=0.3)
    _denied(kube, run, caught.value, f"CN {other!r} is not {access.node_user(setup.node_b)!r}")
    assert not (tmp_path / "out").exists()
    assert access.node_user("some-other-node") not in etcd_users(kube)


def test_another_service_account_is_denied(enrolling: tuple[Any, Setup, EnrollerRun], tmp_path: Path) -> None:
    kube, setup, run = enrolling
    uid = pod(kube, f"{setup.node_b}-intruder", setup.node_b, setup.intruder)
    api = api_access(kube, pod_token(kube, setup.intruder, f"{setup.node_b}-intruder"), tmp_path)
    with pytest.raises(enroll.EnrollmentError) as caught:
        enroll.enroll(api, node=setup.node_b, pod_uid=uid, directory=tmp_path / "out", wait_seconds=60, poll=0.3)
    _denied(kube, run, caught.value, "not the agent ServiceAccount")
    # the token bound to the pod did carry the node: only the ServiceAccount made the difference
    assert csr(kube, caught.value.csr)["spec"]["extra"][NODE_NAME_EXTRA] == [setup.node_b]


def test_a_token_not_bound_to_a_pod_names_no_node(enrolling: tuple[Any, Setup, EnrollerRun], tmp_path: Path) -> None:
    kube, setup, run = enrolling
    token = kubectl_ok(kube, "create", "token", AGENT_SA, "-n", NAMESPACE, "--duration", "10m").strip()
    with pytest.raises(enroll.EnrollmentError) as caught:
        enroll.enroll(api_access(kube, token, tmp_path), node=setup.node_b, pod_uid="00000000-unbound",
                      directory=tmp_path / "out", wait_seconds=60, poll=0.3)
    _denied(kube, run, caught.value, "not bound to exactly one node")


def test_the_chart_grant_was_enough_for_everything_above(enrolling: tuple[Any, Setup, EnrollerRun]) -> None:
    _, _, run = enrolling
    assert "etcd certificate issued" in run.text() and "etcd certificate request denied" in run.text()
    assert not re.search(r"Forbidden|forbidden|\(403\)", run.text()), run.text()[-3000:]
    assert run.proc.poll() is None, "the enroller kept running"
