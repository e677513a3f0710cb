"""Ciliary's kube-proxy replacement vs the real kube-proxy v1.34 (iptables, nftables), in one run, as ratios.

Run as root from the repository root:

    .venv/bin/python bench/bench_kube_proxy.py [--services 1000,5000,10000] [--modes ciliary,iptables,nftables]
                                               [--crr-n 2000] [--rr-n 10000] [--reps 3] [--lab MODE=DIR ...]
    .venv/bin/python bench/bench_kube_proxy.py --smoke     # tiny sizes: proves the bench still runs

The lab is the real-node lab (two kubelet nodes, Ciliary installed by its Helm chart), the same for every
proxy apart from the mode ``ciliary lab up`` is given: ``--kube-proxy-replacement`` for Ciliary (no
kube-proxy: the agents serve every Service) and ``--kube-proxy MODE`` for the peer (each node runs the real
kube-proxy in MODE; the chart's agents run without Ciliary's load balancer, the operator without Service
intents). Every size gets a fresh lab (so each bulk create starts from an almost empty cluster), taken
down afterwards, also on failure; ``--lab MODE=DIR`` runs MODE's sizes on a lab already up in that mode
instead (the bench removes only its namespace). The bulk Services take the first addresses of their range
no Service holds (``kpr_objects.free_window``). Pods (namespace ``kpb``): ``client`` on node-1; ``bk-1..3``
on node-2 (the lab app serving 8080, the C load generator ``bench/tcpload.c`` serving on 9000 in the pod's
network namespace).

- **Programming time**: N selector-less Services (fixed ClusterIPs, port 80) and one EndpointSlice each
  (the three backends, port 8080) are created through the apiserver (8 parallel clients); from the first
  create, the client pod probes every ClusterIP with TCP connects (``frontend_probe.py``) until each has
  answered once: "all answer" = the last first answer, so every frontend is checked, none sampled. Also
  shown: the same time counted from the last create's reply (the proxy's lag behind the apiserver).
- **One Service change at the largest size**: a Service's port 80 -> 81 (JSON patch); time from the
  patch until ClusterIP:81 answers (the prober starts a connect every 5 ms, each given 50 ms: the
  resolution is 5 ms for every proxy). ``--changes`` (5) Services change one after the other, 2 s
  apart; the median, the fastest and the slowest are shown.
- **CRR / RR** (``tcpload``: a new connection per 64 B request/response, resp. 64 B round trips on one
  connection) through the rate Service's ClusterIP from the client pod and through its NodePort (node-1's
  address, backends on node-2) from the world host, with 10 Services and with the largest size; median of
  ``--reps`` runs after one warm-up. Beside CRR: the CPU both nodes' agents (Ciliary: they read every
  connection's flow events) or kube-proxies (peers) spent per connection over those runs. Not a
  comparison: the peer labs' agents read the same flow events and are not counted there.
- **Memory** at the largest size × 3 backends: RSS of node-1's agent (Ciliary; its container's process) and
  of node-1's kube-proxy (peers); the agent's RSS in the peer labs (load balancer off) is shown beside it,
  and the chart's etcd's RSS and database size (it holds the load-balancing intents in Ciliary's lab only).
Ratios say how many times better Ciliary is (> 1: Ciliary faster / smaller). The machine is shared:
every figure carries the 1-minute load average at the time it was taken.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "nodeagent"), str(ROOT / "e2e"), str(ROOT / "bench")]

import kpr_objects as ko  # noqa: E402
import loadgen  # noqa: E402
import real_node_lab  # noqa: E402
from ciliary.lab import chartinstall, labimage, processes  # noqa: E402
from ciliary.lab.lab import Lab, mode_of  # noqa: E402
from ciliary.lab.topology import NETNS_DIR  # noqa: E402
from kpr_api import Api  # noqa: E402

NS = "kpb"
RATE_PORT, PROBE_PORT, NODE_PORT = 9000, 8080, 30900
NODE_1_IP = "192.0.2.11"
PROBER = ROOT / "bench" / "frontend_probe.py"
FATAL_EVERY_S = 5.0  # how often a running probe checks that the proxy under test can still get there
PODS = f"""
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS}}}
spec: {{nodeName: node-1, containers: [{{name: c, image: lab}}]}}
""" + "".join(f"""---
apiVersion: v1
kind: Pod
metadata: {{name: bk-{i}, namespace: {NS}}}
spec: {{nodeName: node-2, containers: [{{name: c, image: lab, ports: [{{containerPort: {PROBE_PORT}}}]}}]}}
""" for i in (1, 2, 3))


def load() -> float:
    return os.getloadavg()[0]


class BenchError(RuntimeError):
    """A step of the bench did not complete; carries the proxy mode."""

    def __init__(self, mode: str, message: str) -> None:
        super().__init__(f"{mode}: {message}")
        self.mode = mode


class Run:
    """One lab with one proxy: pods, servers, and the measurements made in it."""

    def __init__(self, mode: str, tcpload: Path, attach: str | None = None) -> None:
        self.mode = mode
        self.tcpload = tcpload
        self.attach = attach
        self.stack = contextlib.ExitStack()
        self.lab: Lab | None = None
        self.servers: list[loadgen.Server] = []
        self.checked = 0.0
        self.restarts: dict[str, int] = {}
        self.api: Api | None = None
        self.bulk_first = 0

    @property
    def the_lab(self) -> Lab:
        if self.lab is None:
            raise BenchError(self.mode, "no lab")
        return self.lab

    # --- set-up --------------------------------------------------------------------------------------
    def up(self) -> None:
        ciliary = self.mode == "ciliary"
        self.lab = lab = self.stack.enter_context(real_node_lab.real_lab(
            "benchkp", "k", self.attach, kube_proxy_replacement=ciliary, kube_proxy=None if ciliary else self.mode))
        wanted = "kube-proxy-replacement" if ciliary else f"kube-proxy-{self.mode}"
        if mode_of(lab.config()) != wanted:
            raise BenchError(self.mode, f"--lab {self.attach}: that lab's Services are {mode_of(lab.config())}, "
                                        f"this mode needs {wanted}")
        real_node_lab.ensure_ready(lab, 300)
        if self.attach:  # an own lab goes as a whole
            self.stack.callback(delete_namespace, lab)
        lab.kubectl("create", "namespace", NS)
        lab.kubectl("apply", "-f", "-", input=labimage.manifest_for_real_nodes(PODS))
        lab.kubectl("wait", "--for=condition=Ready", "--timeout=180s", "-n", NS,
                    "pod/client", "pod/bk-1", "pod/bk-2", "pod/bk-3")
        pods = json.loads(lab.kubectl("get", "pods", "-n", NS, "-o", "json").stdout)["items"]
        self.ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods}
        self.backends = [(self.ips[f"bk-{i}"], "node-2") for i in (1, 2, 3)]
        for i in (1, 2, 3):
            netns, _ = lab.pod_target(f"bk-{i}", NS)
            self.servers.append(loadgen.Server(self.tcpload, str(netns), RATE_PORT))
        self.client_netns, self.client_cgroup = lab.pod_target("client", NS)
        loadgen.tune_client_netns(str(self.client_netns))
        loadgen.tune_client_netns(lab.layout.world_netns)
        ports = lab.ports()
        pki = lab.layout.pki_dir
        self.api = Api("127.0.0.1", ports.apiserver, ca=pki / "ca.crt", cert=pki / "admin.crt", key=pki / "admin.key")
        self.restarts = self.container_restarts()
        rate = [(ko.service("rate", NS, ko.RATE_IP, RATE_PORT, node_port=NODE_PORT),
                 ko.endpoint_slice("rate", NS, self.backends, RATE_PORT))]
        fillers = [(ko.service(f"fill-{i}", NS, ko.filler_ip(i), PROBE_PORT),
                    ko.endpoint_slice(f"fill-{i}", NS, self.backends, PROBE_PORT)) for i in range(9)]
        self.api.create_pairs(rate + fillers)
        targets = [(ko.RATE_IP, ko.SERVICE_PORT)] + [(ko.filler_ip(i), ko.SERVICE_PORT) for i in range(9)]
        result = self.probe(targets, deadline=300)
        if result["answered"] != len(targets):
            raise BenchError(self.mode, f"the 10 first Services did not all answer within 300 s: {result}")
        # north-south programs attach after the socket ones: measure nothing before the NodePort answers
        result = self.probe([(NODE_1_IP, NODE_PORT)], deadline=300, world=True)
        if result["answered"] != 1:
            raise BenchError(self.mode, f"the NodePort did not answer the world host within 300 s: {result}")

    def container_restarts(self) -> dict[str, int]:
        """Restarts so far of every container of the chart's pods (``<pod>/<container>``)."""
        out = self.the_lab.kubectl("get", "pods", "-n", chartinstall.NAMESPACE, "-l",
                                   "app.kubernetes.io/part-of=ciliary", "-o", "json", check=False)
        if out.returncode != 0:
            return dict(self.restarts)
        return {f"{pod['metadata']['name']}/{c['name']}": int(c.get("restartCount", 0))
                for pod in json.loads(out.stdout)["items"] for c in pod.get("status", {}).get("containerStatuses", [])}

    def down(self) -> None:
        try:
            for server in self.servers:
                server.stop()
            self.servers.clear()
            if self.api:
                self.api.close()
        finally:
            self.stack.close()  # the lab (or the attached lab's namespace) goes whatever failed before
        if self.attach and self.restarts:  # a lab that stays: did deleting the Services restart anything?
            now = self.container_restarts()
            restarted = sorted(name for name, count in now.items() if count > self.restarts.get(name, count))
            if restarted:
                raise BenchError(self.mode, f"restarted while the bench's Services were deleted: "
                                            f"{', '.join(restarted)} (kubectl logs --previous)")

    # --- tools ------------------------------------------------------------------------------------------
    def in_client(self) -> Callable[[], None]:
        procs = self.client_cgroup / "cgroup.procs" if self.client_cgroup else None

        def enter() -> None:
            if procs:
                procs.write_text(str(os.getpid()))
        return enter

    def start_probe(self, targets: list[tuple[str, int]], deadline: float, gap: float = 0.2, *,
                    world: bool = False, attempt: float = 0.1) -> subprocess.Popen[str]:
        """The prober in the client pod (its namespace and cgroup), or on the world host."""
        with tempfile.NamedTemporaryFile("w", prefix="kpbench-targets-", suffix=".json", delete=False) as f:
            json.dump(targets, f)
        netns = NETNS_DIR / self.the_lab.layout.world_netns if world else self.client_netns
        try:
            proc = subprocess.Popen(["nsenter", f"--net={netns}", sys.executable, str(PROBER),
                                     "--targets", f.name, "--deadline", str(deadline), "--gap", str(gap),
                                     "--attempt", str(attempt)],
                                    stdout=subprocess.PIPE, text=True, preexec_fn=None if world else self.in_client())
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            if not ready or proc.stdout.readline().strip() != "READY":
                proc.kill()
                proc.communicate()
                raise BenchError(self.mode, "frontend prober did not start")
        finally:
            os.unlink(f.name)  # read before READY
        return proc

    def finish_probe(self, proc: subprocess.Popen[str], deadline: float) -> dict[str, Any]:
        """The prober's result; a lab process that died or an operator log line saying its intent was
        refused ends the wait early (no point probing for the rest of the deadline)."""
        end = time.monotonic() + deadline + 60
        while proc.poll() is None and time.monotonic() < end:
            if time.monotonic() - self.checked >= FATAL_EVERY_S:  # two kubectl calls: not every second
                self.checked = time.monotonic()
                fatal = self.fatal()
                if fatal:
                    proc.kill()
                    proc.communicate()
                    return {"answered": -1, "error": fatal}
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
            raise BenchError(self.mode, "frontend prober overran its deadline")
        out, _ = proc.communicate()
        return dict(json.loads(out.strip().splitlines()[-1]))

    def fatal(self) -> str:
        """Why the proxy under test can no longer get there ('' while nothing says so): a chart container
        restarted, a peer's kube-proxy exited, or the operator logged that an intent was refused."""
        lab = self.the_lab
        if self.mode != "ciliary":
            for name in ("kube-proxy-node-1", "kube-proxy-node-2"):
                if not processes.running_pid(lab.layout, name):
                    return f"{name} exited (see its log)"
        now = self.container_restarts()
        restarted = sorted(name for name, count in now.items() if count > self.restarts.get(name, count))
        if restarted:
            return f"restarted: {', '.join(restarted)} (kubectl logs --previous)"
        for line in real_node_lab.operator_log(lab, since=f"{FATAL_EVERY_S + 2:.0f}s").splitlines():
            if "too large" in line or "ResourceExhausted" in line:
                return "operator: " + line.strip()[-150:]
        return ""

    def probe(self, targets: list[tuple[str, int]], deadline: float, *, world: bool = False) -> dict[str, Any]:
        return self.finish_probe(self.start_probe(targets, deadline, world=world), deadline)

    def rss_mib(self, process: str) -> float:
        """RSS of node-1's agent (``agent``: its container's process) or of a lab process (kube-proxy)."""
        if process == "agent":
            return processes.rss_kib(real_node_lab.agent_pid(self.the_lab, "node-1")) / 1024
        pid = processes.running_pid(self.the_lab.layout, process)
        return processes.rss_kib(pid) / 1024 if pid else 0.0

    def log_counts(self) -> str:
        """How often the components acted so far (where the time went), from their logs."""
        lab = self.the_lab
        if self.mode == "ciliary":
            agent = real_node_lab.agent_log(lab, "node-1")
            return (f"operator published intents {real_node_lab.operator_log(lab).count('published ')} times, "
                    f"node-1's agent applied its LB intent {agent.count('Load-balancing intent applied')} times")
        out = subprocess.run(["ip", "netns", "exec", lab.layout.node_netns("node-1"), "curl", "-s", "-m", "5",
                              "http://127.0.0.1:10249/metrics"], capture_output=True, text=True, timeout=30).stdout
        metric: dict[str, float] = {}
        for line in out.splitlines():  # labelled series of one metric are summed
            if line.startswith(("kubeproxy_sync_proxy_rules_duration_seconds_",
                                "kubeproxy_sync_partial_proxy_rules_duration_seconds_")):
                name = line.split()[0].split("{")[0]
                metric[name] = metric.get(name, 0.0) + float(line.split()[-1])

        def syncs(kind: str) -> str:
            count, total = (metric.get(f"kubeproxy_sync_{kind}proxy_rules_duration_seconds_{x}") for x in ("count", "sum"))
            return "?" if count is None or total is None else f"{count:.0f} ({total:.1f} s)"
        return f"kube-proxy-node-1 full syncs {syncs('')}, partial syncs {syncs('partial_')}"

    # --- measurements ----------------------------------------------------------------------------------
    def program(self, count: int, deadline: float) -> tuple[ko.Figure, ko.Figure, float]:
        """Bulk-create ``count`` Services + slices; (time to all answer from the first create, from the last
        create's reply, seconds the creates took)."""
        assert self.api is not None
        services = json.loads(self.the_lab.kubectl("get", "services", "-A", "-o", "json").stdout)["items"]
        self.bulk_first = first = ko.free_window({svc["spec"].get("clusterIP", "") for svc in services}, count)
        targets = [(ko.bulk_ip(i), ko.SERVICE_PORT) for i in range(first, first + count)]
        prober = self.start_probe(targets, deadline)
        t0 = time.monotonic()
        try:
            self.api.create_pairs(ko.bulk_objects(count, NS, self.backends, PROBE_PORT, first))
        except Exception:
            prober.kill()
            prober.communicate()
            raise
        created = time.monotonic()
        result = self.finish_probe(prober, deadline)
        now = load()
        if result["answered"] != count:
            why = result.get("error") or f"{result['answered']} of {count} answered within {deadline:.0f} s"
            return ko.Figure(None, now, why), ko.Figure(None, now, why), created - t0
        return (ko.Figure(result["last"] - t0, now), ko.Figure(max(0.0, result["last"] - created), now),
                created - t0)

    def changes(self, count: int, times: int) -> list[ko.Figure]:
        """``times`` Services of ``count``, one after the other (2 s apart), change their port 80 -> 81:
        seconds from each patch until that ClusterIP:81 answers."""
        assert self.api is not None
        out = []
        step = max(1, count // times)  # distinct Services (k * step < count)
        for k in range(times):
            time.sleep(2.0)  # the proxy is idle again (kube-proxy syncs at most once a second)
            index = self.bulk_first + (count // 2 + k * step) % count
            prober = self.start_probe([(ko.bulk_ip(index), ko.SERVICE_PORT + 1)], 120, gap=0.005, attempt=0.05)
            t0 = time.monotonic()
            self.api.json_patch(f"/api/v1/namespaces/{NS}/services/svc-{index}",
                                [{"op": "replace", "path": "/spec/ports/0/port", "value": ko.SERVICE_PORT + 1}])
            result = self.finish_probe(prober, 120)
            if result["answered"] != 1:
                return [ko.Figure(None, load(), result.get("error") or "port 81 did not answer within 120 s")]
            out.append(ko.Figure(result["last"] - t0, load()))
        return out

    def rate(self, kind: str, mode: str, n: int, reps: int) -> tuple[ko.Figure, ko.Figure]:
        """Median transactions/s of ``reps`` tcpload runs (after one warm-up), ClusterIP from the client pod
        or NodePort from the world host; and the CPU the proxy's processes on both nodes spent per transaction
        over the measured runs (µs: ``real_node_lab.proxy_pids``)."""
        if kind == "clusterip":
            argv = ["nsenter", f"--net={self.client_netns}", str(self.tcpload), mode, ko.RATE_IP,
                    str(ko.SERVICE_PORT)]
            enter: Callable[[], None] | None = self.in_client()
        else:
            argv = ["ip", "netns", "exec", self.the_lab.layout.world_netns, str(self.tcpload), mode, NODE_1_IP,
                    str(NODE_PORT)]
            enter = None
        pids = real_node_lab.proxy_pids(self.the_lab, self.mode)
        rates, loads, cpu = [], [], 0.0
        for i in range(reps + 1):
            count = max(50, n // 10) if i == 0 else n
            before = sum(map(real_node_lab.cpu_seconds, pids.values()))
            out = subprocess.run([*argv, str(count), "64"], capture_output=True, text=True, timeout=60 + count * 0.02,
                                 preexec_fn=enter)
            words = out.stdout.split()
            if out.returncode != 0 or len(words) != 2 or words[0] != "ok":
                failed = ko.Figure(None, load(), f"tcpload {mode}: {out.stdout.strip()} {out.stderr.strip()}"[:120])
                return failed, failed
            if i:
                cpu += sum(map(real_node_lab.cpu_seconds, pids.values())) - before
                rates.append(count / float(words[1]))
                loads.append(load())
        return (ko.Figure(statistics.median(rates), statistics.median(loads)),
                ko.Figure(cpu / (n * reps) * 1e6, statistics.median(loads)))


def measure_mode(mode: str, sizes: tuple[int, ...], args: argparse.Namespace, tcpload: Path,
                 say: Callable[[str], None]) -> dict[str, ko.Figure]:
    """Every figure of one proxy, keyed by row name; a failed step becomes a failed figure, never a crash."""
    figures: dict[str, ko.Figure] = {}
    top = sizes[-1]
    failed_at = 0
    for size in sizes:
        if failed_at:  # a larger bulk create cannot succeed where a smaller one failed: not run
            figures[f"program {size}"] = ko.Figure(None, load(), f"not run: failed at {failed_at:,}")
            continue
        run = Run(mode, tcpload, args.labs.get(mode))
        try:
            run.up()
            say(f"{mode}: lab up for {size} Services (load {load():.0f})")
            if size == sizes[0]:
                for kind in ("clusterip", "nodeport"):
                    for m, n in (("crr", args.crr_n), ("rr", args.rr_n)):
                        figures[f"{m} {kind} 10"], figures[f"cpu {m} {kind} 10"] = run.rate(kind, m, n, args.reps)
                say(f"{mode}: rates at 10 Services done")
            total, lag, created = run.program(size, deadline=args.program_timeout)
            figures[f"program {size}"], figures[f"lag {size}"] = total, lag
            if total.value is None:
                failed_at = size
            figures[f"create {size}"] = ko.Figure(created, load())
            say(f"{mode}: {size} Services: {ko.show(total, ' s')}, creates took {created:.1f} s; {run.log_counts()}")
            if size == top and total.value is not None:
                each = run.changes(size, args.changes)
                done = sorted((f for f in each if f.value is not None), key=lambda f: f.value or 0.0)
                if len(done) != len(each):
                    figures[f"change {top}"] = each[-1]
                else:
                    figures[f"change {top}"] = ko.Figure(statistics.median(f.value or 0.0 for f in done),
                                                         max(f.load for f in done))
                    figures[f"change min {top}"], figures[f"change max {top}"] = done[0], done[-1]
                say(f"{mode}: {len(each)} changes: " + ", ".join(ko.show(f, " s") for f in each))
                for kind in ("clusterip", "nodeport"):
                    for m, n in (("crr", args.crr_n), ("rr", args.rr_n)):
                        figures[f"{m} {kind} {top}"], figures[f"cpu {m} {kind} {top}"] = run.rate(kind, m, n,
                                                                                                  args.reps)
                figures[f"rss {top}"] = ko.Figure(run.rss_mib("agent" if mode == "ciliary"
                                                               else "kube-proxy-node-1"), load())
                figures[f"agent rss {top}"] = ko.Figure(run.rss_mib("agent"), load())
                etcd_rss, etcd_db = real_node_lab.chart_etcd(run.the_lab)
                figures[f"etcd rss {top}"], figures[f"etcd db {top}"] = ko.Figure(etcd_rss, load()), ko.Figure(etcd_db, load())
        except Exception as exc:  # noqa: BLE001 - recorded as this proxy's failure, the other proxies still run
            say(f"{mode}: size {size} failed: {exc}")
            figures.setdefault(f"program {size}", ko.Figure(None, load(), str(exc)[:160]))
            failed_at = failed_at or size
        finally:
            try:
                run.down()
            except Exception as exc:  # noqa: BLE001 - the figures stand; the clean-up's failure is said
                say(f"{mode}: clean-up after {size} Services failed: {exc}")
                failed_at = failed_at or size  # a later size would run on a lab in an unknown state
    return figures


def delete_namespace(lab: Lab) -> None:
    """The bench's namespace off an attached lab: 10,000 Services and their EndpointSlices take the namespace
    controller minutes."""
    if not real_node_lab.delete_namespace(lab, NS, 900):
        raise BenchError("clean-up", f"namespace {NS} still there after 900 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", default=",".join(map(str, ko.DEFAULT_SIZES)), help="bulk sizes, e.g. 1000,5000,10000")
    ap.add_argument("--modes", default="ciliary,iptables,nftables", help="proxies to run, in order")
    ap.add_argument("--crr-n", type=int, default=2000)
    ap.add_argument("--rr-n", type=int, default=10000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--changes", type=int, default=5,
                    help="Service changes at the largest size, at least 1 (median shown)")
    ap.add_argument("--program-timeout", type=float, default=0.0,
                    help="seconds a bulk create may take to answer (default 120 + 0.06 per Service)")
    ap.add_argument("--lab", action="append", default=[], metavar="MODE=DIR",
                    help="run MODE on this real-node lab, already up in that mode (its state directory)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: proves the bench runs")
    args = ap.parse_args()
    args.labs = dict(item.split("=", 1) for item in args.lab if "=" in item)
    if len(args.labs) != len(args.lab):
        ap.error(f"--lab takes MODE=DIR, e.g. --lab ciliary=.lab (got {args.lab})")
    if args.smoke:
        args.services, args.modes, args.crr_n, args.rr_n, args.reps = "50", "ciliary,iptables", 100, 200, 1
        args.changes = 3
    if args.changes < 1 or args.changes > 100:
        ap.error(f"--changes takes 1 to 100 (got {args.changes})")
    sizes = ko.parse_sizes(args.services)
    modes = [m for m in args.modes.split(",") if m]
    if not args.program_timeout:
        args.program_timeout = 120 + 0.06 * sizes[-1]
    say: Callable[[str], None] = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)  # noqa: E731
    if set(args.labs) - set(modes):
        ap.error(f"--lab names modes that do not run: {sorted(set(args.labs) - set(modes))} (--modes {args.modes})")
    with tempfile.TemporaryDirectory(prefix="kpbench-") as tmp:
        tcpload = loadgen.build(Path(tmp))
        results = {mode: measure_mode(mode, sizes, args, tcpload, say) for mode in modes}
    peers = [m for m in modes if m != "ciliary"]
    top = sizes[-1]
    rows: list[tuple[str, str, bool, dict[str, ko.Figure]]] = []

    def row(what: str, unit: str, lower: bool, key: str) -> None:
        rows.append((what, unit, lower, {m: results[m][key] for m in modes if key in results[m]}))

    for size in sizes:
        row(f"program {size:,} Services, from first create", " s", True, f"program {size}")
        row("  of which after the last create returned", " s", True, f"lag {size}")
        row("  (apiserver creates took)", " s", True, f"create {size}")
    row(f"one Service change at {top:,} (median of {args.changes})", " s", True, f"change {top}")
    row("  fastest of them", " s", True, f"change min {top}")
    row("  slowest of them", " s", True, f"change max {top}")
    for size_key, label in (("10", "10"), (str(top), f"{top:,}")):
        for kind, where in (("clusterip", "ClusterIP from a pod"), ("nodeport", "NodePort from the world host")):
            row(f"CRR {where}, {label} Services", "/s", False, f"crr {kind} {size_key}")
            row("  CPU per connection: agents / kube-proxies only", " us", True, f"cpu crr {kind} {size_key}")
            row(f"RR {where}, {label} Services", "/s", False, f"rr {kind} {size_key}")
    row(f"RSS at {top:,} Services x 3: agent vs kube-proxy", " MiB", True, f"rss {top}")
    row("  node-1 agent RSS (LB off in peer labs)", " MiB", True, f"agent rss {top}")
    row("  Ciliary's etcd: RSS (Services not stored in peer labs)", " MiB", True, f"etcd rss {top}")
    row("  Ciliary's etcd: database size", " MiB", True, f"etcd db {top}")
    print()
    print(f"bench_kube_proxy: {', '.join(modes)}; sizes {', '.join(map(str, sizes))}; CRR n={args.crr_n}, "
          f"RR n={args.rr_n}, median of {args.reps}; ratio = how many times better Ciliary is")
    print(ko.table(rows, peers))
    print("command: .venv/bin/python bench/bench_kube_proxy.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
