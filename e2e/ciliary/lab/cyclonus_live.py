"""``make conformance-cyclonus``: cyclonus's live ``generate`` run against a real-node lab.

cyclonus (``CYCLONUS_VERSION``, built by the set-up) creates namespaces x, y, z with pods a, b, c
(``registry.k8s.io/e2e-test-images/agnhost:2.43`` serving 80 and 81), applies each generated set of
NetworkPolicies, probes every pod pair through ``pods/exec`` (``/agnhost connect``) and compares what it
saw with its own truth table; a case passes when every probe matches. The generator's tags the run
includes and excludes come from a list kept in the repository (``e2e/conformance/cyclonus.txt``, the
format of the focus lists in ``ciliary.lab.conformance``: ``!tag`` excludes, a comment says why).

The lab's agnhost image is offered under cyclonus's name too (a second tag in each node's containerd:
the same agnhost, whose ``connect`` and ``serve-hostname`` take the flags cyclonus passes). Like
``e2e.test``, cyclonus runs in the first node's network namespace against the gateway's apiserver
relay. Probes go to pod addresses by default (``--destination-type pod-ip``): the policy decision
alone, without the lab's DNS and Service translation on the path (the upstream Netpol specs probe
through ClusterIPs). A pod's probe of itself is left out of the verdict (``--ignore-loopback``): it
goes over the pod's loopback and never reaches a datapath (README "Kubernetes NetworkPolicy").
``--dry-run`` lists the selected cases offline (cyclonus's mock cluster).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ciliary.lab import cyclonus_witness, images, tools, topology
from ciliary.lab.conformance import FocusList, parse_focus, uncommented_skips
from ciliary.lab.kubeconfigs import write_kubeconfig
from ciliary.lab.kubeletnode import node_paths
from ciliary.lab.lab import Lab, LabError
from ciliary.lab.nodebins import NodeBinaries
from ciliary.lab.nodeconfig import APISERVER_RELAY_PORT

#: the image the pinned cyclonus (setup/versions.env) runs its pods from (``--image-registry`` + this path)
CYCLONUS_AGNHOST_IMAGE = "registry.k8s.io/e2e-test-images/agnhost:2.43"
#: every generator tag the pinned cyclonus (setup/versions.env) accepts (``cyclonus generate --help``)
VALID_TAGS = frozenset((
    "action", "all-namespaces", "all-pods", "allow-all", "any-peer", "any-port", "any-port-protocol", "conflict",
    "create-namespace", "create-pod", "create-policy", "delete-namespace", "delete-pod", "delete-policy",
    "deny-all", "direction", "egress", "end-port", "example", "ingress", "ip-block-no-except",
    "ip-block-with-except", "miscellaneous", "multi-peer", "multi-port/protocol", "named-port",
    "namespaces-by-default-label", "namespaces-by-label", "numbered-port", "pathological", "peer-ipblock",
    "peer-pods", "pods-by-label", "policy-namespace", "policy-stack", "port", "protocol", "rule", "sctp",
    "set-namespace-labels", "set-pod-labels", "target", "target-namespace", "target-pod-selector", "tcp", "udp",
    "update-policy", "upstream-e2e"))
#: what cyclonus excludes when ``--exclude`` is not given; a list replaces it, so it must decide on each
CYCLONUS_DEFAULT_EXCLUDES = ("multi-peer", "upstream-e2e", "example", "end-port", "namespaces-by-default-label")
#: namespaces the generator makes (the model's three and the one an action case creates and deletes)
NAMESPACES = ("x", "y", "z", "y-2")
DEFAULT_LIST = Path("e2e/conformance/cyclonus.txt")


class TagListError(ValueError):
    """A tag list names a tag cyclonus does not know, or leaves an exclusion without a reason."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(frozen=True)
class Settings:
    """How cyclonus probes; the defaults are what the recorded runs used."""

    destination_type: str = "pod-ip"
    perturbation_wait_seconds: int = 5
    pod_creation_timeout_seconds: int = 300
    retries: int = 1
    job_timeout_seconds: int = 3
    server_protocols: tuple[str, ...] = ("TCP", "UDP")
    server_ports: tuple[int, ...] = (80, 81)
    #: a pod's connection to its own address stays inside its network namespace (over lo), where no
    #: datapath of Ciliary's (nor Cilium's) sees it: cyclonus's truth table would judge it by policy
    ignore_loopback: bool = True


@dataclass(frozen=True)
class Case:
    number: int
    description: str
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunResult:
    passed: int
    failed: int
    seconds: float
    failures: tuple[Case, ...]
    #: probe cells of the cases' last tries: observed differently from cyclonus's truth table / as it says
    wrong_cells: int = 0
    correct_cells: int = 0
    #: cases selected; more than passed + failed when the run was stopped before its end
    selected: int = 0
    #: what the datapath's flows say of each wrong cell of every try (``cyclonus_witness``)
    witness: tuple[str, ...] = ()

    def line(self) -> str:
        done = self.passed + self.failed
        stopped = f" (stopped: {done} of {self.selected} cases finished)" if self.selected > done else ""
        return (f"cyclonus generate: {done} cases, {self.passed} passed, {self.failed} failed; probe cells "
                f"{self.correct_cells} correct, {self.wrong_cells} wrong ({self.seconds:.0f} s){stopped}")


def read_tags(path: Path) -> FocusList:
    """The list's included (``focus``) and excluded (``skip``) tags, checked against cyclonus's."""
    text = path.read_text()
    tags = parse_focus(text)
    if not tags.focus:
        raise TagListError(path, "includes no tag (cyclonus would then run every case)")
    unknown = sorted(set(tags.focus + tags.skip) - VALID_TAGS)
    if unknown:
        raise TagListError(path, f"unknown cyclonus tags {unknown}")
    if bare := uncommented_skips(text):
        raise TagListError(path, f"exclusions without a reason: {bare}")
    return tags


def generate_argv(binary: Path, tags: FocusList, settings: Settings, *, junit: Path | None = None,
                  dry_run: bool = False) -> list[str]:
    argv = [str(binary), "generate",
            f"--include={','.join(tags.focus)}",
            f"--exclude={','.join(tags.skip)}",  # always given: an empty value clears cyclonus's defaults
            f"--server-protocol={','.join(settings.server_protocols)}",
            f"--server-port={','.join(str(p) for p in settings.server_ports)}",
            f"--perturbation-wait-seconds={settings.perturbation_wait_seconds}",
            f"--pod-creation-timeout-seconds={settings.pod_creation_timeout_seconds}",
            f"--retries={settings.retries}",
            f"--job-timeout-seconds={settings.job_timeout_seconds}"]
    if settings.destination_type:
        argv.append(f"--destination-type={settings.destination_type}")
    if settings.ignore_loopback:
        argv.append("--ignore-loopback")
    if dry_run:
        argv += ["--mock", "--dry-run"]
    else:
        argv.append("--cleanup-namespaces")
    if junit is not None:
        argv.append(f"--junit-results-file={junit}")
    return argv


def listed_cases(output: str) -> list[Case]:
    """The cases cyclonus announces before running (``test #N: description`` then `` - tags: a, b``)."""
    return [Case(int(m.group(1)), m.group(2).strip(), tuple(t.strip() for t in m.group(3).split(",") if t.strip()))
            for m in re.finditer(r"^test #(\d+): (.*)\n - tags: (.*)$", output, re.MULTILINE)]


def case_verdicts(output: str) -> dict[int, tuple[int, int]]:
    """Each finished case's probe cells, summed over its steps' last tries: (wrong, correct). cyclonus prints
    ``N wrong, M ignored, K correct`` after each step and ``finished policy #N`` after each case."""
    verdicts: dict[int, tuple[int, int]] = {}
    wrong = correct = 0
    for line in output.splitlines():
        if re.match(r"^starting test case #\d+$", line):
            wrong = correct = 0
        elif step := re.search(r"(\d+) wrong, \d+ ignored, (\d+) correct$", line):
            wrong, correct = wrong + int(step.group(1)), correct + int(step.group(2))
        elif finished := re.match(r"^finished policy #(\d+)$", line):
            verdicts[int(finished.group(1))] = (wrong, correct)
    return verdicts


def run_result(output: str, seconds: float, junit: str | None = None) -> RunResult:
    """Counts of a (possibly stopped) run from its output; cyclonus's JUnit report, written only at the
    end, must agree with it (one testcase per case, in order, with ``<failure>`` if it failed)."""
    cases = {c.number: c for c in listed_cases(output)}
    verdicts = case_verdicts(output)
    failures = tuple(cases.get(n, Case(n, "?")) for n, (wrong, _) in sorted(verdicts.items()) if wrong)
    if junit is not None:
        reported = [c.find("failure") is not None for c in ET.fromstring(junit).iter("testcase")]
        if [n for n, failed in enumerate(reported, start=1) if failed] != [c.number for c in failures]:
            raise LabError(f"cyclonus's JUnit report ({sum(reported)} of {len(reported)} failed) disagrees with "
                           f"its output ({len(failures)} of {len(verdicts)} failed)")
    return RunResult(len(verdicts) - len(failures), len(failures), seconds, failures,
                     sum(w for w, _ in verdicts.values()), sum(c for _, c in verdicts.values()), len(cases))


def provide_agnhost(lab: Lab) -> None:
    """Tag the lab's agnhost image with cyclonus's name in every node's containerd."""
    ctr = NodeBinaries.discover().ctr
    for node in lab.node_names():
        proc = subprocess.run([str(ctr), "--address", str(node_paths(lab.layout, node).containerd_socket),
                               "--namespace", "k8s.io", "images", "tag", "--force", images.AGNHOST_IMAGE,
                               CYCLONUS_AGNHOST_IMAGE], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise LabError(f"{node}: cannot tag {images.AGNHOST_IMAGE} as {CYCLONUS_AGNHOST_IMAGE}: "
                           f"{proc.stderr.strip()}")


def remove_namespaces(lab: Lab) -> None:
    lab.kubectl("delete", "namespace", "--ignore-not-found", "--wait=false", *NAMESPACES, check=False)


def run(lab: Lab, tags: FocusList, settings: Settings, *, log_dir: Path | None = None,
        timeout: float = 3600) -> RunResult:
    if not lab.config().get("real_nodes"):
        raise LabError("cyclonus needs a running lab of real nodes: `ciliary lab up` first")
    out = lab.layout.state_dir / "conformance" / "cyclonus"
    if out.exists():
        shutil.rmtree(out)  # an earlier run's report must not be counted again
    out.mkdir(parents=True)
    kubeconfig = out / "cyclonus.kubeconfig"
    write_kubeconfig(kubeconfig, server=f"https://127.0.0.1:{APISERVER_RELAY_PORT}", pki=lab.layout.pki_dir,
                     user="admin")
    junit = out / "junit.xml"
    provide_agnhost(lab)
    node = lab.node_names()[0]
    argv = ["nsenter", f"--net={topology.NETNS_DIR / lab.layout.node_netns(node)}",
            *generate_argv(tools.built_path("cyclonus"), tags, settings, junit=junit)]
    log_path = out / "cyclonus.log"
    recorder = cyclonus_witness.FlowRecorder(
        out, lab.node_names(), {n: ["nsenter", f"--net={topology.NETNS_DIR / lab.layout.node_netns(n)}"]
                                for n in lab.node_names()}, NAMESPACES)
    t0 = time.monotonic()
    try:
        with log_path.open("w") as log:
            log.write(f"# {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=out,
                                    env={**os.environ, "KUBECONFIG": str(kubeconfig)})
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.write(f"\n# stopped by ciliary.lab.cyclonus_live after {timeout:.0f} s\n")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        flow_files = recorder.stop()
        remove_namespaces(lab)  # also after a failure or a timeout (cyclonus cleans up only when it ends)
    seconds = time.monotonic() - t0
    output = log_path.read_text(errors="replace")
    flows = cyclonus_witness.read_flows(flow_files)
    checked, disagree = cyclonus_witness.self_check(output, flows, ignore_loopback=settings.ignore_loopback)
    witness = (f"flows of x, y, z recorded: {len(flows)} ({', '.join(p.name for p in flow_files)}); self-check: "
               f"{checked} probes of the correct steps, {len(disagree)} the flows disagree with",
               *(f"self-check disagrees: {line}" for line in disagree),
               *cyclonus_witness.witness(output, flows, ignore_loopback=settings.ignore_loopback))
    (out / "witness.txt").write_text("\n".join(witness) + "\n")
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log_path, log_dir / "conformance-cyclonus.log")
        shutil.copyfile(out / "witness.txt", log_dir / "conformance-cyclonus-witness.txt")
    if not listed_cases(output):
        raise LabError(f"cyclonus stopped (exit {proc.returncode}) before its first case; see {log_path}")
    result = run_result(output, seconds, junit.read_text() if junit.exists() else None)
    return replace(result, witness=witness)


def dry_run(tags: FocusList, settings: Settings) -> list[Case]:
    """The cases the list selects, from cyclonus's offline mock cluster (no lab needed)."""
    proc = subprocess.run(generate_argv(tools.built_path("cyclonus"), tags, settings, dry_run=True),
                          capture_output=True, text=True, timeout=300, check=True)
    return listed_cases(proc.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ciliary.lab.cyclonus_live",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--tags-file", type=Path, default=DEFAULT_LIST,
                        help=f"the generator tags to include/exclude (default {DEFAULT_LIST})")
    parser.add_argument("--log-dir", type=Path, help="copy cyclonus's output to DIR/conformance-cyclonus.log")
    parser.add_argument("--dry-run", action="store_true", help="list the selected cases offline; run nothing")
    parser.add_argument("--timeout", type=float, default=3600, help="stop cyclonus after SECONDS (default 3600)")
    defaults = Settings()
    for field in fields(Settings):
        if field.type == "int":
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=int,
                                default=getattr(defaults, field.name), help="(default %(default)s)")
    parser.add_argument("--destination-type", default=defaults.destination_type,
                        choices=("pod-ip", "service-ip", "service-name", ""),
                        help="what probes connect to (default pod-ip; '' keeps each case's own: service-name)")
    parser.add_argument("--ignore-loopback", action=argparse.BooleanOptionalAction, default=defaults.ignore_loopback,
                        help="leave a pod's probe of itself out of the verdict (default: yes; it never reaches "
                             "the datapath)")
    args = parser.parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)
                           if f.type in ("int", "str", "bool")})
    try:
        tags = read_tags(args.tags_file)
        if args.dry_run:
            cases = dry_run(tags, settings)
            for case in cases:
                print(f"#{case.number}: {case.description} [{', '.join(case.tags)}]")
            print(f"cyclonus generate: {len(cases)} cases selected by {args.tags_file}")
            return 0
        result = run(Lab.from_env(), tags, settings, log_dir=args.log_dir, timeout=args.timeout)
    except (LabError, TagListError) as exc:
        print(f"cyclonus: {exc}", file=sys.stderr)
        return 1
    print(result.line(), flush=True)
    for case in result.failures:
        print(f"  FAILED #{case.number}: {case.description} [{', '.join(case.tags)}]", flush=True)
    for line in result.witness:
        print(f"  witness: {line}", flush=True)
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
