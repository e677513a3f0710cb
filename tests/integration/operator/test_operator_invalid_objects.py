"""Every object in crds/invalid/ is refused where the user looks.

``schema`` objects are refused by ``kubectl apply`` (tested in
tests/integration/apiserver); ``operator`` objects are accepted by the apiserver
and then get ``Valid=False`` with their message and a ``PolicyInvalid`` Event from
the running operator. Every policy in crds/examples gets ``Valid=True``; the pool example
(a CiliumLoadBalancerIPPool) gets its counts from LB IPAM.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from op_harness import OperatorProcess, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
NS = "cy-op-invalid"


def _header(path: Path, key: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith(f"# {key}:"):
            return line.split(":", 1)[1].strip()
    return ""


OPERATOR_LAYER = sorted(p for p in (ROOT / "crds" / "invalid").glob("*.yaml") if _header(p, "expect") == "operator")
EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))
POOL_KIND = "CiliumLoadBalancerIPPool"


@pytest.fixture(scope="module")
def running(kube, crds, tmp_path_factory):
    kube.kubectl("create", "namespace", NS)
    proc = OperatorProcess(kube, tmp_path_factory.mktemp("op") / "operator.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        kube.kubectl("delete", "namespace", NS, "--wait=false")


def _object(path: Path) -> tuple[str, str, bool]:
    import yaml

    body = yaml.safe_load(path.read_text())
    return body["kind"], body["metadata"]["name"], body["kind"] in ("CiliumClusterwideNetworkPolicy", POOL_KIND)


def _pool_conditions(kube, name: str) -> dict:
    out = kube.kubectl("get", "ciliumloadbalancerippools", name, "-o", "json")
    if out.returncode != 0:
        return {}
    return {c["type"]: c for c in json.loads(out.stdout).get("status", {}).get("conditions", [])}


def _valid(kube, kind: str, name: str, clusterwide: bool):
    args = ["get", kind.lower(), name, "-o", "json"] + ([] if clusterwide else ["-n", NS])
    out = kube.kubectl(*args)
    if out.returncode != 0:
        return None
    return next((c for c in json.loads(out.stdout).get("status", {}).get("conditions", [])
                 if c["type"] == "Valid"), None)


@pytest.mark.parametrize("path", OPERATOR_LAYER, ids=lambda p: p.stem)
def test_operator_layer_invalid_gets_valid_false_and_an_event(kube, running, path):
    kind, name, clusterwide = _object(path)
    ns_args = [] if clusterwide else ["-n", NS]
    done = kube.kubectl("apply", *ns_args, "-f", str(path))
    assert done.returncode == 0, f"the apiserver should accept {path.name}: {done.stderr}"
    try:
        cond = wait_for(lambda: _valid(kube, kind, name, clusterwide), 30, f"Valid on {name}", running)
        assert cond["status"] == "False"
        assert _header(path, "message") in cond["message"]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            events = json.loads(kube.kubectl("get", "events", "-A", "-o", "json", "--field-selector",
                                             f"involvedObject.name={name}").stdout)["items"]
            if any(e["reason"] == "PolicyInvalid" and _header(path, "message") in e["message"] for e in events):
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"no PolicyInvalid event for {name}")
    finally:
        kube.kubectl("delete", *ns_args, "-f", str(path), "--wait=false")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_is_valid(kube, running, path):
    kind, name, clusterwide = _object(path)
    ns_args = [] if clusterwide else ["-n", NS]
    done = kube.kubectl("apply", "--server-side", *ns_args, "-f", str(path))
    assert done.returncode == 0, done.stderr
    try:
        if kind == POOL_KIND:  # 203.0.113.64/28 without its first and last (14) + 198.51.100.10-20 (11)
            conds = wait_for(lambda: _pool_conditions(kube, name).get("cilium.io/IPsTotal") and
                             _pool_conditions(kube, name), 30, f"IPsTotal on {name}", running)
            assert conds["cilium.io/IPsTotal"]["message"] == "25", conds
            assert conds["cilium.io/PoolConflict"]["status"] == "False", conds
            return
        cond = wait_for(lambda: _valid(kube, kind, name, clusterwide), 30, f"Valid on {name}", running)
        assert cond["status"] == "True", cond
    finally:
        kube.kubectl("delete", *ns_args, "-f", str(path), "--wait=false")
