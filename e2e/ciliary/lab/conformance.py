"""``make conformance``: the upstream ``e2e.test`` against a real-node lab, one run per focus list.

``e2e.test`` (built from ``k8s.io/kubernetes/test/e2e`` by setup/build-node-tools.sh) runs inside the
first node's network namespace, where the apiserver is the gateway's relay on 127.0.0.1:6443 and every
node and pod address is routed (the root namespace has no lab route, so NodePort and pod-IP probes made
by the suite itself would fail there). A focus list (``e2e/conformance.txt``, the short one; the areas
in ``e2e/conformance/``) holds one ginkgo regex per line, ``!`` marks a skip, ``#`` a comment saying
why. Each list is one *area*, named after its file: its run writes its JUnit report and ``e2e.log``
under ``<lab>/conformance/<area>/`` (copied to ``--log-dir`` as ``conformance-<area>.log``) and prints
the specs run, passed, failed and skipped (by the spec itself at run time) and the duration.

Run ``ciliary lab up --real-nodes`` first: its kube-proxy serves Services, Ciliary's operator and agents
enforce NetworkPolicy; with ``--kube-proxy-replacement`` no kube-proxy runs and Ciliary serves Services too.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ciliary.lab import tools, topology
from ciliary.lab.kubeconfigs import write_kubeconfig
from ciliary.lab.lab import Lab, LabError
from ciliary.lab.nodeconfig import APISERVER_RELAY_PORT

SUITE_NODE = re.compile(r"^\[\w*Suite\]")
#: ginkgo's JUnit message for a spec left out by --focus/--skip (a spec that skips itself adds " - why")
NOT_SELECTED = "skipped"
VERDICTS = ("passed", "failed", "skipped", "interrupted")
TOPIC = re.compile(r"\[sig-network\] ([\w-]+)")
SIG = re.compile(r"\[sig-[\w-]+\]")


@dataclass(frozen=True)
class FocusList:
    focus: tuple[str, ...]
    skip: tuple[str, ...]


@dataclass(frozen=True)
class AreaResult:
    area: str
    passed: int
    failed: int
    skipped: int
    seconds: float
    failures: tuple[str, ...]
    interrupted: int = 0
    specs: tuple[tuple[str, str], ...] = ()  # (spec name, verdict) of every spec counted

    @property
    def run(self) -> int:
        return self.passed + self.failed + self.skipped + self.interrupted

    def line(self) -> str:
        stopped = f", {self.interrupted} interrupted" if self.interrupted else ""
        return (f"conformance {self.area}: {self.run} specs run, {self.passed} passed, {self.failed} failed, "
                f"{self.skipped} skipped{stopped} ({self.seconds:.0f} s)")

    def topic_lines(self) -> list[str]:
        """One line per focus area inside this list (Services, Netpol, DNS, ...) with its counts."""
        lines = []
        for name, counts in per_topic(self.specs).items():
            stopped = f", {counts['interrupted']} interrupted" if counts["interrupted"] else ""
            lines.append(f"  {name}: {sum(counts.values())} run, {counts['passed']} passed, {counts['failed']} "
                         f"failed, {counts['skipped']} skipped{stopped}")
        return lines


def parse_focus(text: str) -> FocusList:
    focus: list[str] = []
    skip: list[str] = []
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        (skip if entry.startswith("!") else focus).append(entry.lstrip("!").strip())
    return FocusList(tuple(focus), tuple(skip))


def uncommented_skips(text: str) -> list[str]:
    """Skip lines with no reason: neither a trailing comment nor a comment line right above them."""
    missing = []
    previous = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("!") and "#" not in line and not previous.startswith(("#", "!")):
            missing.append(line)
        previous = line
    return missing


def selected(spec_names: Iterable[str], focus: FocusList) -> list[str]:
    """The specs ``focus`` runs, as ginkgo selects them (regexes here are also valid Python)."""
    want = re.compile("|".join(focus.focus))
    drop = re.compile("|".join(focus.skip)) if focus.skip else None
    return [s for s in spec_names if want.search(s) and not (drop and drop.search(s))]


def list_specs(e2e_test: Path) -> list[str]:
    """Every spec name ``e2e.test --list-tests`` prints (its lines are ``file:line: name``)."""
    out = subprocess.run([str(e2e_test), "--list-tests"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    return [m.group(1) for m in re.finditer(r"^\s*\S+\.go:\d+: (.*)$", out, re.MULTILINE)]


def verdicts(junit: str) -> list[tuple[str, str]]:
    """(spec name, verdict) of a ginkgo JUnit report: passed, failed, skipped (by the spec at run time) or
    interrupted (the run was stopped while it ran: no verdict). Specs not selected, or never started, are
    left out, and so are ginkgo's suite nodes ([SynchronizedBeforeSuite] and the like: set-up, not specs)."""
    found: list[tuple[str, str]] = []
    for case in ET.fromstring(junit).iter("testcase"):
        name = case.get("name", "")
        if SUITE_NODE.match(name):
            continue
        skipped = case.find("skipped")
        if skipped is not None:
            message = skipped.get("message", NOT_SELECTED)
            if message != NOT_SELECTED and "nterrupt" not in message:
                found.append((name, "skipped"))  # not selected, or not reached before an interrupt: left out
        elif _stopped(case):
            found.append((name, "interrupted"))
        elif case.find("failure") is not None or case.find("error") is not None:
            found.append((name, "failed"))
        else:
            found.append((name, "passed"))
    return found


def summarize(junit: str) -> dict[str, int]:
    """Counts of a ginkgo JUnit report's verdicts (see :func:`verdicts`)."""
    counts = dict.fromkeys(VERDICTS, 0)
    for _, verdict in verdicts(junit):
        counts[verdict] += 1
    return counts


def topic(spec: str) -> str:
    """The focus area a spec belongs to: the word after ``[sig-network]`` (Services, EndpointSlice,
    Networking, Netpol, DNS, ...), else its SIG."""
    found = TOPIC.search(spec)
    if found:
        return found.group(1)
    sig = SIG.search(spec)
    return sig.group(0) if sig else "other"


def per_topic(specs: Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """Verdict counts of ``specs`` (name, verdict) by :func:`topic`, topics in order of first appearance."""
    counts: dict[str, dict[str, int]] = {}
    for name, verdict in specs:
        counts.setdefault(topic(name), dict.fromkeys(VERDICTS, 0))[verdict] += 1
    return counts


def _stopped(case: ET.Element) -> bool:
    """The run was stopped while this spec ran (an interrupt, or ginkgo's whole-suite timeout)."""
    error, failure = case.find("error"), case.find("failure")
    return ((error is not None and error.get("type") == "interrupted")
            or (failure is not None and failure.get("type") == "timedout"
                and failure.get("message", "") in ("", "A suite timeout occurred")))


def failed_specs(junit: str) -> list[str]:
    return [case.get("name", "") for case in ET.fromstring(junit).iter("testcase")
            if not SUITE_NODE.match(case.get("name", "")) and not _stopped(case)
            and (case.find("failure") is not None or case.find("error") is not None)]


def area_name(focus_file: Path) -> str:
    return "short" if focus_file.name == "conformance.txt" else focus_file.stem


def go_regex_literal(text: str) -> str:
    """``text`` as a regex matching itself, escaping only what RE2 (Go) accepts escaped."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)


def shard_focus(names: Sequence[str], shards: int) -> list[FocusList]:
    """``names`` dealt round-robin into ``shards`` focus lists of exact spec names."""
    return [FocusList(("|".join(go_regex_literal(n) for n in names[i::shards]),), ())
            for i in range(shards) if names[i::shards]]


def e2e_argv(lab: Lab, out: Path, kubeconfig: Path, focus: FocusList) -> list[str]:
    node = lab.node_names()[0]
    return ["nsenter", f"--net={topology.NETNS_DIR / lab.layout.node_netns(node)}",
            str(tools.built_path("e2e.test")), f"--kubeconfig={kubeconfig}", f"--kubectl-path={lab.bins.kubectl}",
            "--provider=skeleton", f"--report-dir={out}", "--ginkgo.no-color", "--ginkgo.v",
            "--ginkgo.timeout=24h",  # ginkgo's default stops a whole suite after 1 h
            f"--ginkgo.focus={'|'.join(focus.focus)}",
            *([f"--ginkgo.skip={'|'.join(focus.skip)}"] if focus.skip else [])]


def run(lab: Lab, focus_file: Path, *, log_dir: Path | None = None, shards: int = 1,
        timeout: float = 4 * 3600) -> AreaResult:
    """One area: ``shards`` e2e.test processes side by side (each a share of the specs), counts merged."""
    if not lab.config().get("real_nodes"):
        raise LabError("the upstream suites need a running lab of real nodes: `ciliary lab up` first")
    focus = parse_focus(focus_file.read_text())
    if not focus.focus:
        raise LabError(f"{focus_file} focuses on nothing")
    area = area_name(focus_file)
    out = lab.layout.state_dir / "conformance" / area
    if out.exists():
        shutil.rmtree(out)  # a report of an earlier run must not be counted again
    out.mkdir(parents=True)
    kubeconfig = out / "e2e.kubeconfig"
    write_kubeconfig(kubeconfig, server=f"https://127.0.0.1:{APISERVER_RELAY_PORT}", pki=lab.layout.pki_dir,
                     user="admin")
    parts = [focus] if shards <= 1 else shard_focus(selected(list_specs(tools.built_path("e2e.test")), focus),
                                                    shards)
    dirs = [out] if len(parts) == 1 else [out / f"shard-{i + 1}" for i in range(len(parts))]
    t0 = time.monotonic()
    procs = []
    try:
        for part, where in zip(parts, dirs, strict=True):
            where.mkdir(parents=True, exist_ok=True)
            argv = e2e_argv(lab, where, kubeconfig, part)
            with (where / "e2e.log").open("w") as log:
                log.write(f"# {' '.join(argv)}\n")
                log.flush()
                procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=where))
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            with (log_dir / f"conformance-{area}.log").open("w") as merged:
                for where in dirs:
                    merged.write((where / "e2e.log").read_text(errors="replace"))
    seconds = time.monotonic() - t0
    counts = dict.fromkeys(VERDICTS, 0)
    failures: list[str] = []
    specs: list[tuple[str, str]] = []
    for where in dirs:
        reports = sorted(where.glob("junit*.xml"))
        if not reports:
            raise LabError(f"e2e.test wrote no JUnit report; see {where / 'e2e.log'}")
        junit = reports[-1].read_text()
        for key, value in summarize(junit).items():
            counts[key] += value
        failures += failed_specs(junit)
        specs += verdicts(junit)
    return AreaResult(area, counts["passed"], counts["failed"], counts["skipped"], seconds, tuple(failures),
                      counts["interrupted"], tuple(specs))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ciliary.lab.conformance",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--focus-file", type=Path, action="append",
                        help="a focus list; repeat for several areas (default e2e/conformance.txt)")
    parser.add_argument("--log-dir", type=Path, help="copy each area's e2e.test output to DIR/conformance-AREA.log")
    parser.add_argument("--shards", type=int, default=1,
                        help="run each area as N e2e.test processes side by side (default 1)")
    parser.add_argument("--list", action="store_true",
                        help="print the specs each list selects from e2e.test --list-tests; run nothing")
    args = parser.parse_args(argv)
    files: list[Path] = args.focus_file or [Path("e2e/conformance.txt")]
    if args.list:
        names = list_specs(tools.built_path("e2e.test"))
        for focus_file in files:
            chosen = selected(names, parse_focus(focus_file.read_text()))
            print(f"# {area_name(focus_file)}: {len(chosen)} specs")
            print("\n".join(chosen))
        return 0
    results: list[AreaResult] = []
    try:
        lab = Lab.from_env()
        for focus_file in files:
            result = run(lab, focus_file, log_dir=args.log_dir, shards=args.shards)
            results.append(result)
            print(result.line(), flush=True)
            print("\n".join(result.topic_lines()), flush=True)
            for name in result.failures:
                print(f"  FAILED {name}", flush=True)
    except LabError as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 1
    if len(results) > 1:
        total = AreaResult("total", sum(r.passed for r in results), sum(r.failed for r in results),
                           sum(r.skipped for r in results), sum(r.seconds for r in results), (),
                           sum(r.interrupted for r in results))
        print(total.line())
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
