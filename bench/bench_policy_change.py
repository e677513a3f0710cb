"""Policy change to enforced, end to end: apply of a CNP edit -> operator -> etcd -> agent -> kernel map.

Run as root from the repository root. It brings up its own real-node lab (two kubelet nodes, Ciliary
installed by its Helm chart, as ``ciliary lab up``; under ``.lab-benchpc-<pid>``, prefix ``q<pid>``) and
takes it down afterwards, also on failure; ``--lab DIR`` runs it on a real-node lab already up instead:

    .venv/bin/python bench/bench_policy_change.py [--changes 120] [--gap 0.3] [--kubectl] [--lab .lab]
    .venv/bin/python bench/bench_policy_change.py --smoke     # a few changes: proves the bench still runs

Set-up: the chart's operator and agents; a server pod and a client pod on
node-1 and one CiliumNetworkPolicy allowing client -> server:80. Each change
is an apply of an edit of that CNP (server-side apply, the request
``kubectl apply --server-side`` sends; ``--kubectl`` runs ``kubectl apply``
instead and starts the clock before the process starts) that alternately adds
and removes either 1 port (1 map entry) or 1,000 ports (1,000 entries). A watcher
inside node-1's mount namespace (its own bpffs) polls the agent's pinned ``cy_policy``
map through libbpf until the entries appear or are gone: that moment is "enforced".
p50/p99 over ``--changes`` changes per size. Target: p99 < 250 ms for 1 entry.

Per-stage timestamps of each change: the apply returned (apiserver answered),
the operator had written the node's intent to etcd (its "reconcile pass N
complete at revision R: K intents written (<nodes>) in <ms> ms" log line, read from the
operator pod's log, logged when the write returned; ms resolution) and how long that
reconcile pass took, the map shows the change. Nothing here talks to etcd.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import ctypes as ct
import dataclasses
import functools
import json
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "nodeagent"), str(ROOT / "e2e"), str(ROOT / "bench")]

import real_node_lab  # noqa: E402
from ciliary.lab import labimage  # noqa: E402
from ciliary.lab.lab import Lab  # noqa: E402
from ciliary.nodeagent import planning  # noqa: E402

NS = "bench-pc"
NODE = "node-1"
POLICY = "bench-pc"
BASE_PORT = 80
ONE_PORT = 9000
MANY_FIRST = 10000
WAIT_S = 30.0


class BenchFailed(RuntimeError):
    """The set-up or one change did not complete within its bound."""


# ---------------------------------------------------------------- the lab side


def cnp(ports: list[int]) -> dict[str, Any]:
    chunks = [ports[i:i + 40] for i in range(0, len(ports), 40)]  # 40 ports per PortRule at most
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": POLICY, "namespace": NS},
            "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                                  "toPorts": [{"ports": [{"port": str(p), "protocol": "TCP"} for p in chunk]}
                                              for chunk in chunks]}]}}


def pod(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "lab",
                                                       "ports": [{"containerPort": BASE_PORT}]}]}}


class Applier:
    """Server-side apply over HTTPS with the lab's admin certificate (or ``kubectl apply``)."""

    def __init__(self, lab: Lab, use_kubectl: bool) -> None:
        self.lab = lab
        self.use_kubectl = use_kubectl
        pki = lab.layout.pki_dir
        self.ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self.url = (f"{lab.ports().apiserver_url}/apis/cilium.io/v2/namespaces/{NS}/ciliumnetworkpolicies/"
                    f"{POLICY}?fieldManager=bench&force=true")

    def apply(self, body: dict[str, Any]) -> None:
        if self.use_kubectl:
            self.lab.kubectl("apply", "-f", "-", input=json.dumps(body))
            return
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="PATCH",
                                     headers={"Content-Type": "application/apply-patch+yaml"})
        with urllib.request.urlopen(req, context=self.ctx, timeout=30) as resp:
            resp.read()


# ---------------------------------------------------------------- the kernel side


class PolicyMap:
    """The agent's pinned ``cy_policy`` map on ``node``, read by a watcher inside the node's mount namespace.

    The watcher (this file, ``--watch-map``) opens the pin through libbpf and answers JSON lines on its
    stdin. A wait is sent *before* the apply it times, so the watcher is already polling when the change
    lands; it answers with the ``CLOCK_MONOTONIC`` instant it saw the map change (the same clock as this
    process's ``time.monotonic()``).
    """

    def __init__(self, lab: Lab, node: str) -> None:
        argv = [*real_node_lab.node_mounts_argv(lab, node), sys.executable, str(Path(__file__).resolve()),
                "--watch-map", node]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        try:
            self.ask({"op": "open"})
        except BaseException:
            self.close()
            raise

    def send(self, request: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise BenchFailed(f"the map watcher exited ({self.proc.wait(5)})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise BenchFailed(reply["error"])
        return reply

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(request)
        return self.answer()

    def read(self) -> list[planning.PolicyKey]:
        return [key_of(k) for k in self.ask({"op": "keys"})["keys"]]

    def count(self, ep_id: int) -> int:
        """Entries of the endpoint ``ep_id``."""
        return sum(1 for k in self.read() if k.ep_id == ep_id)

    def start_wait(self, what: str, keys: list[planning.PolicyKey], present: bool, baseline: int,
                   seconds: float = WAIT_S, step: float = 0.001) -> None:
        """Ask for the instant the map holds all ``keys`` (``present``) or none; ``baseline``: the entries of
        their endpoint without them."""
        self.send({"op": "wait", "what": what, "keys": [list(dataclasses.astuple(k)) for k in keys],
                   "present": present, "baseline": baseline, "seconds": seconds, "step": step})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def base_entry(pmap: PolicyMap, before: set[planning.PolicyKey], seconds: float = 60) -> planning.PolicyKey:
    """The server's ingress entry for the base policy's port: a key that was not in the map ``before``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        new = [k for k in pmap.read() if k not in before and k.port == BASE_PORT and k.port_bits == 16
               and k.direction == planning.MapDirection.INGRESS]
        if len({k.ep_id for k in new}) == 1:
            return new[0]
        if len({k.ep_id for k in new}) > 1:
            raise BenchFailed(f"the base policy's entry appeared for several endpoints: {new}")
        time.sleep(0.05)
    raise BenchFailed(f"the base policy in the map: not seen within {seconds:.0f} s")


def key_of(fields: list[int]) -> planning.PolicyKey:
    ep_id, direction, identity, protocol, port, bits = fields
    return planning.PolicyKey(ep_id, planning.MapDirection(direction), identity, protocol, port, bits)


def watch_map(node: str) -> None:
    """The watcher: inside the node's mount namespace, answer the bench's requests about ``cy_policy``."""
    from ciliary.nodeagent.datapath import libbpf, maps

    def reply(body: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(body) + "\n")
        sys.stdout.flush()

    fd = -1
    root = Path("/sys/fs/bpf/ciliary") / node  # the chart agent's pin directory (its bpffs is the node's)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "open":
                wait_until(f"a pinned cy_policy under {root} on {node}", lambda: any(root.glob("**/cy_policy")),
                           180, 0.2)
                fd = libbpf.obj_get(sorted(root.glob("**/cy_policy"))[0])
                reply({"ok": True})
            elif request["op"] == "keys":
                held = maps.read_map(fd, maps.POLICY)
                reply({"keys": [list(dataclasses.astuple(k)) for k in held], "count": len(held)})
            else:
                keys = [key_of(k) for k in request["keys"]]
                check = functools.partial(shows, fd, keys, request["present"], request["baseline"])
                reply({"t": wait_until(request["what"], check, request["seconds"], request["step"])})
        except BenchFailed as exc:
            reply({"error": str(exc)})


def wait_until(what: str, predicate: Callable[[], bool], seconds: float = WAIT_S, step: float = 0.001) -> float:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(step)
    raise BenchFailed(f"{what}: not seen within {seconds:.0f} s")


# ---------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Write:
    """One "reconcile pass ... intents written (<nodes>) in <ms> ms" line of the operator's log."""

    wall: float
    """When the intents were written (the line's timestamp, ms resolution, truncated)."""
    nodes: tuple[str, ...]
    pass_ms: float


@dataclass
class Sample:
    wall0: float
    total_ms: float
    returned_ms: float
    written_ms: float | None = None
    """Apply request sent -> the operator had written the node's intent (its log)."""
    pass_ms: float | None = None
    """Duration of that reconcile pass (snapshot, identities, resolution, etcd writes)."""


@dataclass
class Series:
    size: int
    samples: list[Sample] = field(default_factory=list)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def shows(fd: int, keys: list[planning.PolicyKey], present: bool, baseline: int) -> bool:
    """The map holds all ``keys`` (``present``) or none of them (one key: one lookup; many: the entries of
    their endpoint counted first, ``baseline`` without them; other endpoints' entries are not looked at)."""
    from ciliary.nodeagent.datapath import libbpf, maps

    if len(keys) == 1:
        value = maps.PolicyValueC()
        found = libbpf.lib.bpf_map_lookup_elem(fd, ct.byref(maps.encode_policy_key(keys[0])), ct.byref(value)) == 0
        if found:  # an LPM lookup may answer a shorter prefix: confirm the exact key
            found = keys[0] in maps.read_map(fd, maps.POLICY)
        return found == present
    ep_id = keys[0].ep_id
    held = {k for k in maps.read_map(fd, maps.POLICY) if k.ep_id == ep_id}
    if len(held) != (baseline + len(keys) if present else baseline):
        return False
    return all((k in held) == present for k in keys)


def measure(size: int, changes: int, gap: float, applier: Applier, pmap: PolicyMap,
            template: planning.PolicyKey, baseline: int) -> Series:
    extra = [ONE_PORT] if size == 1 else [MANY_FIRST + 2 * i for i in range(size)]  # not adjacent: no merging
    keys = [planning.PolicyKey(template.ep_id, template.direction, template.identity, template.protocol, p, 16)
            for p in extra]
    series = Series(size)
    for r in range(changes):
        adding = r % 2 == 0
        pmap.start_wait(f"change {r}", keys, adding, baseline, step=0.001 if size == 1 else 0.002)
        wall0, t0 = time.time(), time.monotonic()
        applier.apply(cnp([BASE_PORT, *extra] if adding else [BASE_PORT]))
        t_returned = time.monotonic()
        t_map = float(pmap.answer()["t"])
        series.samples.append(Sample(wall0, (t_map - t0) * 1000, (t_returned - t0) * 1000))
        time.sleep(gap)
    return series


WRITE_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ \S+ reconcile pass \d+ complete at "
                        r"revision \d+: \d+ intents written \((\S+)\) in ([0-9.]+) ms", re.M)


def operator_writes(lab: Lab) -> list[Write]:
    """The operator's intent writes, from its pod's log (the container's clock is UTC)."""
    text = real_node_lab.operator_log(lab)
    return [Write(calendar.timegm(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000,
                  tuple(m[3].split(",")), float(m[4])) for m in WRITE_LINE.finditer(text)]


def attribute(series: list[Series], writes: list[Write]) -> None:
    """Each sample's first write of the node's intent after its apply and before the next change.

    The log line is written when the operator's etcd call returned, which on a busy
    machine can be after the agent (woken by the same write) already changed the
    map: then "operator wrote" shows later than "map shows". The log's ms are truncated.
    """
    samples = [x for s in series for x in s.samples]
    for x, following in zip(samples, samples[1:] + [None], strict=True):
        end = following.wall0 if following is not None else float("inf")
        w = next((w for w in writes if NODE in w.nodes and x.wall0 - 0.001 <= w.wall < end), None)
        if w is not None:
            x.written_ms, x.pass_ms = max(0.0, (w.wall - x.wall0) * 1000), w.pass_ms


def report(series: list[Series], via: str) -> None:
    print(f"\n# policy change -> enforced, end to end ({via}; clock starts before the apply request)")
    print(f"{'entries':>8} {'changes':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} | stages p50 / p99 (ms from the "
          f"start): apply returned; operator wrote the intent (its reconcile pass); map shows the change")
    for s in series:
        total = [x.total_ms for x in s.samples]
        returned = [x.returned_ms for x in s.samples]
        written = [x.written_ms for x in s.samples if x.written_ms is not None]
        passes = [x.pass_ms for x in s.samples if x.pass_ms is not None]
        stages = f"{pct(returned, .5):.1f} / {pct(returned, .99):.1f}; "
        stages += (f"{pct(written, .5):.1f} / {pct(written, .99):.1f} ({pct(passes, .5):.1f} / "
                   f"{pct(passes, .99):.1f}; {len(written)} of {len(total)} found in the log); " if written else
                   "operator log lines not found; ")
        stages += f"{pct(total, .5):.1f} / {pct(total, .99):.1f}"
        print(f"{s.size:>8} {len(total):>8} {pct(total, .5):>8.1f} {pct(total, .99):>8.1f} {max(total):>8.1f} | "
              f"{stages}")
    one = next((s for s in series if s.size == 1), None)
    if one is not None:
        p99 = pct([x.total_ms for x in one.samples], .99)
        print(f"# target p99 < 250 ms for 1 entry: {'met' if p99 < 250 else 'NOT met'} ({p99:.1f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=120, help="changes per size (alternately add/remove)")
    parser.add_argument("--sizes", default="1,1000", help="entries per change (comma separated)")
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between a change enforced and the next")
    parser.add_argument("--kubectl", action="store_true", help="apply with the kubectl process (clock includes it)")
    parser.add_argument("--lab", metavar="DIR", help="run on this real-node lab, already up (its state directory)")
    parser.add_argument("--smoke", action="store_true", help="a few changes: checks the bench runs")
    parser.add_argument("--watch-map", metavar="NODE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.watch_map:
        watch_map(args.watch_map)
        return
    if args.smoke:
        args.changes, args.sizes, args.gap = 4, "1,100", 0.1
    with real_node_lab.real_lab("benchpc", "q", args.lab) as lab:
        pmap: PolicyMap | None = None
        try:
            real_node_lab.ensure_ready(lab)
            lab.kubectl("create", "namespace", NS)
            manifest = {"apiVersion": "v1", "kind": "List", "items": [pod("server"), pod("client")]}
            lab.kubectl("apply", "-f", "-", input=labimage.manifest_for_real_nodes(json.dumps(manifest)))
            lab.kubectl("wait", "--for=condition=Ready", "--timeout=180s", "-n", NS, "pod/server", "pod/client")
            applier = Applier(lab, args.kubectl)
            pmap = PolicyMap(lab, NODE)
            before = set(pmap.read())  # other endpoints' entries (an attached lab may hold other policies)
            applier.apply(cnp([BASE_PORT]))
            template = base_entry(pmap, before)
            baseline = pmap.count(template.ep_id)
            time.sleep(1.0)  # the status writes of the set-up are done
            series = [measure(int(size), args.changes, args.gap, applier, pmap, template, baseline)
                      for size in args.sizes.split(",")]
            attribute(series, operator_writes(lab))
            report(series, "kubectl apply" if args.kubectl else "server-side apply")
        finally:
            if pmap is not None:
                pmap.close()
            if args.lab:  # an own lab goes as a whole
                real_node_lab.delete_namespace(lab, NS)


if __name__ == "__main__":
    main()
