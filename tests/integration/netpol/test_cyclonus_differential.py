"""Ciliary's NetworkPolicy verdicts against cyclonus, a reference no one here wrote.

For many policy sets (hypothesis, ``netpol_cases``) on the x/y/z x a/b/c model,
``cyclonus analyze --mode probe`` computes the expected reachability offline on
ports 80/81 TCP and UDP, and Ciliary answers each (source, destination, port) with
the pure evaluator behind ``ciliary policy trace`` (resolution + ``tracing.trace``).
Ciliary is given each policy as written; cyclonus, which reads files, as the API
server stores it (``policyTypes`` defaulted). The case count is printed.

Ciliary must always agree with the independent oracle (``netpol_oracle``, the
Kubernetes documentation read directly), and every disagreement with cyclonus must
be one of the two documented in the README ("NetworkPolicy"), reproduced by the
oracle's switches:

- an ``ipBlock`` covering pod addresses: the Kubernetes documentation says ipBlock
  "should be cluster-external IPs, since Pod IPs are ephemeral and unpredictable";
  cyclonus (like upstream's e2e) matches pod addresses against it, Ciliary (like
  Cilium) matches pods by labels only (``ipblock_matches_pods``);
- a named port on a pod serving the same number on TCP and UDP: cyclonus's probe
  model names the probed port after the first container port with that number,
  whatever its protocol (``probe.Pod.ResolveNumberedPort``), so it blocks UDP 80 for
  ``port: serve-80-udp``; the documentation names a container port, which has one
  protocol, and Ciliary allows it (``name_by_number``).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from ciliary.operator.policy import tracing
from ciliary.operator.policy.resolution import resolve_cluster
from netpol_cases import ORACLE, ORACLE_PODS, POLICY_SETS, defaulted, state_of
from netpol_oracle import allowed

pytestmark = pytest.mark.integration

PROBES = [(80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")]
POLICY_SETS_PER_RUN = 400
COUNTS = {"sets": 0, "cases": 0, "agree": 0, "ipblock_pods": 0, "port_name_by_number": 0, "both": 0}
ROW = re.compile(r"^\|\s*([a-z]/[a-z])\s*\|(.*)\|\s*$")


def probe_model() -> dict[str, Any]:
    return {
        "Probes": [{"Port": port, "Protocol": proto} for port, proto in PROBES],
        "Resources": {
            "Namespaces": dict(ORACLE.namespaces),
            "Pods": [{"Namespace": p.namespace, "Name": p.name, "Labels": dict(p.labels), "IP": p.ip,
                      "Containers": [{"Name": f"cont-{port}-{proto.lower()}", "Port": port, "Protocol": proto,
                                      "PortName": name} for name, port, proto in p.ports if proto != "SCTP"]}
                     for p in ORACLE_PODS],
        },
    }


def summary() -> str:
    """The case count line (conftest prints it in the run's summary)."""
    return (f"cyclonus differential: {COUNTS['cases']} cases over {COUNTS['sets']} policy sets; "
            f"{COUNTS['agree']} agree; documented differences: {COUNTS['ipblock_pods']} ipBlock covering pod "
            f"addresses, {COUNTS['port_name_by_number']} cyclonus naming a port by number alone, "
            f"{COUNTS['both']} both")


def parse_combined(output: str) -> dict[tuple[int, str], dict[tuple[str, str], bool]]:
    """cyclonus's ``Combined:`` tables, one per probe, in probe order: (src, dst) -> allowed."""
    tables: list[dict[tuple[str, str], bool]] = []
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "Combined:":
            continue
        header = [c.strip().lower() for c in lines[i + 2].strip("|").split("|")]
        table: dict[tuple[str, str], bool] = {}
        for row in lines[i + 4:]:
            match = ROW.match(row)
            if match is None:
                break
            cells = [c.strip() for c in match.group(2).split("|")]
            for dst, cell in zip(header[1:], cells, strict=True):
                if cell not in (".", "X"):
                    raise AssertionError(f"cyclonus cell {cell!r} for {match.group(1)} -> {dst}:\n{output}")
                table[(match.group(1), dst)] = cell == "."
        if table:  # after the model's probes cyclonus probes the (here: no) pods read from a cluster
            tables.append(table)
    if len(tables) != len(PROBES):
        raise AssertionError(f"expected {len(PROBES)} Combined tables from cyclonus, got {len(tables)}:\n{output}")
    return dict(zip(PROBES, tables, strict=True))


@pytest.fixture(scope="module")
def cyclonus(tool: Callable[[str], Path],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[list[dict[str, Any]]], Any]]:
    binary = tool("cyclonus")
    work = tmp_path_factory.mktemp("cyclonus")
    model = work / "model.json"
    model.write_text(json.dumps(probe_model()))
    policies = work / "policies.json"

    def run(policy_set: list[dict[str, Any]]) -> dict[tuple[int, str], dict[tuple[str, str], bool]]:
        policies.write_text(json.dumps({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicyList",
                                        "items": policy_set}))
        done = subprocess.run([str(binary), "analyze", "--mode", "probe", "--policy-path", str(policies),
                               "--probe-path", str(model)], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return parse_combined(done.stdout)

    yield run


def test_model_parser_reads_cyclonus_tables(cyclonus: Callable[[list[dict[str, Any]]], Any]) -> None:
    """No policy: everything is reachable; one deny-all policy in x: nothing reaches x."""
    open_all = cyclonus([])
    assert all(all(table.values()) for table in open_all.values())
    assert len(open_all[(80, "TCP")]) == len(ORACLE_PODS) ** 2
    deny = cyclonus([defaulted({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                "metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}}})])
    assert not any(ok for (src, dst), ok in deny[(81, "UDP")].items() if dst.startswith("x/"))
    assert all(ok for (src, dst), ok in deny[(81, "UDP")].items() if not dst.startswith("x/"))


@settings(max_examples=POLICY_SETS_PER_RUN, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(POLICY_SETS)
def test_ciliary_agrees_with_cyclonus(cyclonus: Callable[[list[dict[str, Any]]], Any],
                                      policies: tuple[dict[str, Any], ...]) -> None:
    expected = cyclonus([defaulted(p) for p in policies])
    intents = resolve_cluster(state_of(*policies))
    COUNTS["sets"] += 1
    for (port, proto), table in expected.items():
        for (src, dst), theirs in table.items():
            src_ip = next(p.ip for p in ORACLE_PODS if f"{p.namespace}/{p.name}" == src)
            dst_ip = next(p.ip for p in ORACLE_PODS if f"{p.namespace}/{p.name}" == dst)
            got = tracing.trace(intents, src_ip, dst_ip, port, proto).allowed
            COUNTS["cases"] += 1
            if got is theirs:
                COUNTS["agree"] += 1
                continue
            assert allowed(list(policies), ORACLE, src_ip, dst_ip, port, proto) is got, \
                f"Ciliary disagrees with the Kubernetes reading: {src} -> {dst} {port}/{proto}: {got}; " \
                f"cyclonus {theirs}; policies {json.dumps(policies)}"
            COUNTS[explain(policies, src_ip, dst_ip, port, proto, theirs)] += 1


def explain(policies: tuple[dict[str, Any], ...], src_ip: str, dst_ip: str, port: int, proto: str,
            theirs: bool) -> str:
    """Which documented difference explains cyclonus's answer (the test fails when none does)."""
    for key, ipblock, by_number in (("ipblock_pods", True, False), ("port_name_by_number", False, True),
                                    ("both", True, True)):
        if allowed(list(policies), ORACLE, src_ip, dst_ip, port, proto, ipblock_matches_pods=ipblock,
                   name_by_number=by_number) is theirs:
            return key
    raise AssertionError(f"unexplained disagreement with cyclonus: {src_ip} -> {dst_ip} {port}/{proto}: "
                         f"cyclonus {theirs}; policies {json.dumps(policies)}")
