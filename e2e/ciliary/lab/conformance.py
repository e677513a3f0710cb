"""``make conformance`` (scaffold): the upstream ``e2e.test`` against a real-node lab, with a focus list.

``e2e.test`` (built from ``k8s.io/kubernetes/test/e2e`` by setup/build-node-tools.sh) runs inside the
first node's network namespace, where the apiserver is the gateway's relay on 127.0.0.1:6443 and every
node and pod address is routed (the root namespace has no lab route, so NodePort and pod-IP probes made
by the suite itself would fail there). The focus and skip regexes come from ``e2e/conformance.txt``:
one per line, ``!`` marks a skip, ``#`` a comment saying why. The JUnit report lands in
``<lab>/conformance/``; the summary counts passed, failed and skipped specs.

Run ``ciliary lab up --real-nodes`` first. Until Ciliary replaces kube-proxy, the lab's kube-proxy
serves Services.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ciliary.lab import tools, topology
from ciliary.lab.kubeconfigs import write_kubeconfig
from ciliary.lab.lab import Lab, LabError
from ciliary.lab.nodeconfig import APISERVER_RELAY_PORT

SUITE_NODE = re.compile(r"^\[\w*Suite\]")


@dataclass(frozen=True)
class FocusList:
    focus: tuple[str, ...]
    skip: tuple[str, ...]


def parse_focus(text: str) -> FocusList:
    focus: list[str] = []
    skip: list[str] = []
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        (skip if entry.startswith("!") else focus).append(entry.lstrip("!").strip())
    return FocusList(tuple(focus), tuple(skip))


def summarize(junit: str) -> dict[str, int]:
    """Counts of a ginkgo JUnit report: passed, failed, skipped specs."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.fromstring(junit).iter("testcase"):
        if SUITE_NODE.match(case.get("name", "")):
            continue  # [SynchronizedBeforeSuite] and the like: set-up, not specs
        if case.find("skipped") is not None:
            counts["skipped"] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        else:
            counts["passed"] += 1
    return counts


def run(lab: Lab, focus_file: Path, *, timeout: float = 3600) -> dict[str, int]:
    if not lab.config().get("real_nodes"):
        raise LabError("the upstream suites need real nodes: `ciliary lab up --real-nodes` first")
    focus = parse_focus(focus_file.read_text())
    if not focus.focus:
        raise LabError(f"{focus_file} focuses on nothing")
    out = lab.layout.state_dir / "conformance"
    out.mkdir(parents=True, exist_ok=True)
    kubeconfig = out / "e2e.kubeconfig"
    write_kubeconfig(kubeconfig, server=f"https://127.0.0.1:{APISERVER_RELAY_PORT}", pki=lab.layout.pki_dir,
                     user="admin")
    node = lab.node_names()[0]
    argv = ["nsenter", f"--net={topology.NETNS_DIR / lab.layout.node_netns(node)}",
            str(tools.built_path("e2e.test")), f"--kubeconfig={kubeconfig}", f"--kubectl-path={lab.bins.kubectl}",
            "--provider=skeleton", f"--report-dir={out}", "--ginkgo.no-color",
            f"--ginkgo.focus={'|'.join(focus.focus)}",
            *([f"--ginkgo.skip={'|'.join(focus.skip)}"] if focus.skip else [])]
    with (out / "e2e.log").open("w") as log:
        subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=out)
    reports = sorted(out.glob("junit*.xml"))
    if not reports:
        raise LabError(f"e2e.test wrote no JUnit report; see {out / 'e2e.log'}")
    return summarize(reports[-1].read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ciliary.lab.conformance", description=__doc__.split("\n")[0])
    parser.add_argument("--focus-file", type=Path, default=Path("e2e/conformance.txt"))
    args = parser.parse_args(argv)
    try:
        counts = run(Lab.from_env(), args.focus_file)
    except LabError as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 1
    print(f"conformance: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
