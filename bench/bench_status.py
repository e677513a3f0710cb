"""Policy status at scale: operator handover vs agents writing directly, 10 / 100 / 1,000 nodes.

Run from the repository root, as root (it starts its own etcd + kube-apiserver
under ``.lab-benchstatus-<pid>/``, and removes them afterwards)::

    PYTHONPATH=operator:nodeagent:e2e .venv/bin/python -m bench.bench_status [--nodes 10,100,1000]

Per size and mode: 50 CNPs applied to the apiserver; the bench plays the
reconciler with the operator's own code: a ``ClusterState`` with one selected
pod on every node (``bench/status_cluster.py``) resolved by the real
``Resolver`` (``ciliary.operator.policy.resolution``: endpoints, policy
entries, the shared ipcache) and published with the real ``IntentPublisher``;
simulated agents (asyncio tasks, no
kernel) that hold a lease, watch their own intent key and, per intent, write
the PolicyReports of policies whose generation changed in one transaction bound
to their lease — in direct mode they also patch ``.status.nodes.<node>``
with ``DirectStatusWriter``. The operator side runs in a child process: kopf
with the operator's real handlers (validation) feeding the real
``StatusHandover`` (handover: writes everything; direct: conditions only).
Then one policy is edited (generation 2) and the bench resolves the edit
incrementally and publishes the intents that changed (every node's). Measured for that one update: status PATCHes served by kube-apiserver
(its ``apiserver_request_total``, all codes), watch events delivered (to the
handover's mirrors and to the agents), time from the edit until ``Enforced=True``
at generation 2, and the operator child's peak RSS. Figures only; nothing here
asserts. Targets: handover <= 2 status writes per policy update at every size
(the Valid condition travels in the handover's write), direct grows with nodes;
Enforced within 3 s at 1,000 nodes. The clock starts just before the edit's
PATCH (the apiserver's answer, not kubectl's start-up, is the edit); the
breakdown shows when the bench had resolved and published the 1,000 intents and
when the last simulated agent had reported. The 1,000 simulated agents parse
their (real-sized) intents in this one process, which a real cluster spreads
over 1,000 machines. ``--smoke``: 10 nodes, 5 policies, handover only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
POLICIES = 50
INTERVAL = 1.0
AGENTS_PER_CLIENT = 100


class CaseFailed(RuntimeError):
    """One size/mode could not be measured (reported in the table, the other cases still run)."""


# ---------------------------------------------------------------- operator child


async def child_main(args: argparse.Namespace) -> None:
    import logging

    import kopf

    from ciliary.operator.kube import handlers, kubeapi
    from ciliary.operator.kube.cluster_model import ClusterModel
    from ciliary.operator.main import list_with_retries
    from ciliary.operator.status.handover import StatusHandover
    from ciliary.operator.store.etcdclient import EtcdEndpoint, EtcdStore

    logging.basicConfig(level=os.environ.get("BENCH_CHILD_LOG", "WARNING"),
                        format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kopf").setLevel(logging.ERROR)
    os.environ["KUBECONFIG"] = args.kubeconfig
    from ciliary.lab.etcdsecurity import EtcdPKI
    from ciliary.operator.store.access import OPERATOR_USER

    store = EtcdStore(EtcdEndpoint.parse(args.etcd), tls=EtcdPKI(Path(args.etcd_pki)).client(OPERATOR_USER))
    api = await kubeapi.api_client(args.kubeconfig)
    model = ClusterModel()
    handover = StatusHandover(store, api, interval=args.interval, write_nodes=args.mode == "handover")
    write_times: list[float] = []
    plain_write = handover._write

    async def timed_write(view: Any, patch: dict[str, Any]) -> None:
        await plain_write(view, patch)
        write_times.append(time.time())
        del write_times[:-20]

    handover._write = timed_write  # type: ignore[method-assign]
    registry = kopf.OperatorRegistry()
    handlers.register(registry, model, handover)
    await list_with_retries(api, model, handover)
    handover.policies_listed.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    settings = kopf.OperatorSettings()
    settings.posting.enabled = False
    tasks = [asyncio.create_task(kopf.operator(registry=registry, settings=settings, standalone=True,
                                               clusterwide=True, stop_flag=stop)),
             asyncio.create_task(handover.run())]
    stats_path = Path(args.stats)
    while not stop.is_set():
        stats = {"report_events": handover.report_mirror.events, "intent_events": handover.intent_mirror.events,
                 "writes": handover.stats.writes, "failures": handover.stats.failures,
                 "held": handover.stats.held,
                 "started": handover.started.is_set(),
                 "write_times": write_times}
        stats_path.write_text(json.dumps(stats))
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await api.close()
    await store.close()


# ---------------------------------------------------------------- simulated agents


@dataclass
class AgentFleet:
    etcd: str
    api: Any
    namespace: str
    direct: bool
    clients: list[Any] = field(default_factory=list)
    leases: list[Any] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    intent_events: int = 0
    direct_writes: int = 0
    last_report: float = 0.0
    """Wall time of the latest report transaction."""
    writers: dict[str, Any] = field(default_factory=dict)
    tls: Any = None
    """etcd credentials of the simulated agents: the lab's root (one etcd user per simulated node
    would cost a certificate each; the real agents' per-node roles are tested in tests/integration/store)."""

    async def start(self, nodes: list[str], meta: dict[str, tuple[str, str]],
                    seed: dict[str, Any] | None = None) -> None:
        """``seed``: the entry already in every policy's status (direct mode: agents do not rewrite it)."""
        from ciliary.nodeagent.direct_status import DirectStatusWriter
        from ciliary.operator.store.etcdclient import EtcdEndpoint, make_client

        ep = EtcdEndpoint.parse(self.etcd)
        for i in range(0, len(nodes), AGENTS_PER_CLIENT):
            client = make_client(ep, self.tls, 30)
            self.clients.append(client)
            for node in nodes[i:i + AGENTS_PER_CLIENT]:
                if self.direct:
                    self.writers[node] = DirectStatusWriter(self.api, node)
                    if seed is not None:
                        self.writers[node].written = {uid: dict(seed) for uid, _ in meta.values()}
                lease = await client.lease(120)
                self.leases.append(lease)
                watch = await client.watch(f"/ciliary/intents/v1/{node}".encode())
                self.tasks.append(asyncio.create_task(self._agent(client, node, lease, watch, meta)))
        if self.direct:
            self.tasks.append(asyncio.create_task(self._retry_ticks()))

    async def _retry_ticks(self) -> None:
        """The agents' reporting tick (1 s): failed direct writes are sent again after their backoff."""
        while True:
            await asyncio.sleep(1.0)
            for writer in self.writers.values():
                self.direct_writes += await writer.retry()

    async def _agent(self, client: Any, node: str, lease: Any, watch: Any, meta: dict[str, tuple[str, str]]) -> None:
        from ciliary.operator.status.reports import PolicyReport
        from ciliary.operator.store.keyspace import node_intent_key, report_key

        reported: dict[str, int] = {}
        refresh = asyncio.create_task(self._keepalive(lease))

        async def apply(raw: bytes) -> None:
            # The real agent validates the intent with pydantic; 1,000 simulated agents share this
            # process's one core, so they read the two fields they need (same bytes, same etcd calls).
            intent = json.loads(raw)
            changed = []
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            for ref in intent["policies"]:
                if reported.get(ref["uid"]) != ref["generation"]:
                    changed.append(PolicyReport(node=node, policy_uid=ref["uid"], kind=ref["kind"],
                                                namespace=ref["namespace"], name=ref["name"],
                                                generation=ref["generation"], ok=True, enforcing=True,
                                                last_updated=now, local_policy_revision=intent["revision"]))
            if not changed:
                return
            ops = [client.transactions.put(report_key(r.policy_uid, node).encode(), r.to_wire(), lease=lease)
                   for r in changed]
            await client.transaction(compare=[], success=ops, failure=[])
            self.last_report = time.time()
            for r in changed:
                reported[r.policy_uid] = r.generation
            if self.direct:
                for r in changed:
                    if await self.writers[node].write(r):
                        self.direct_writes += 1

        try:
            current = await client.get(node_intent_key(node).encode())
            if current is not None:
                await apply(current.value)
            async for event in watch:
                self.intent_events += 1
                if event.kind == "PUT":
                    await apply(event.kv.value)
        finally:
            refresh.cancel()

    async def _keepalive(self, lease: Any) -> None:
        while True:
            await asyncio.sleep(40)
            await lease.refresh()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for lease in self.leases:
            try:
                await lease.revoke()
            except Exception:  # noqa: BLE001 - best-effort clean-up of a bench
                pass
        for client in self.clients:
            await client.close()


# ---------------------------------------------------------------- parent


def status_patches(layout: Any, url: str) -> int:
    pki = layout.pki_dir
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    with urllib.request.urlopen(f"{url}/metrics", context=ctx, timeout=30) as resp:
        text = resp.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("apiserver_request_total{") and 'resource="ciliumnetworkpolicies"' in line
               and 'subresource="status"' in line and 'verb="PATCH"' in line)


def rss_kb(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


async def run_case(lab: Any, ports: Any, n: int, mode: str, policies: int,
                   quiet: float = 3 * INTERVAL) -> dict[str, Any]:
    """One size and mode; ``quiet``: seconds of calm before and after the measured update."""
    from bench import status_cluster
    from kubernetes_asyncio import client as kclient

    from ciliary.operator.kube import kubeapi
    from ciliary.operator.policy.resolution import Resolver
    from ciliary.operator.store.access import OPERATOR_USER, ROOT_USER
    from ciliary.operator.store.etcdclient import EtcdEndpoint, EtcdStore
    from ciliary.operator.store.keyspace import node_intent_key
    from ciliary.operator.store.publishing import IntentPublisher

    ns = f"bench-{mode}-{n}"
    layout = lab.layout
    lab.kubectl("create", "namespace", ns, check=False)
    docs = "\n---\n".join(json.dumps(status_cluster.policy(ns, k)) for k in range(policies))
    lab.kubectl("apply", "-f", "-", input=docs)
    items = json.loads(lab.kubectl("get", "cnp", "-n", ns, "-o", "json").stdout)["items"]
    meta = {i["metadata"]["name"]: (i["metadata"]["uid"], i["metadata"]["generation"]) for i in items}
    nodes = [f"node-{i:04}" for i in range(n)]
    state, repo = status_cluster.build(ns, nodes, items)
    resolver = Resolver()
    edited_obj = next(i for i in items if i["metadata"]["name"] == "p-0")
    store = EtcdStore(EtcdEndpoint.parse(ports.etcd_endpoint), tls=lab.etcd_certs().client(OPERATOR_USER),
                      timeout=30)
    api = await kubeapi.api_client(layout.kubeconfig)
    api.configuration.connection_pool_maxsize = 64
    custom = kclient.CustomObjectsApi(api)

    publisher = IntentPublisher(store)
    await publisher.load()
    resolution = resolver.update(state)
    await publisher.publish(resolution.intents)
    sizes = [len(intent.to_wire()) for intent in resolution.intents.values()]
    intent_kb = sum(sizes) / len(sizes) / 1024
    entries = sum(len(e.ingress.entries) + len(e.egress.entries)
                  for intent in resolution.intents.values() for e in intent.endpoints) / len(sizes)
    fleet = AgentFleet(ports.etcd_endpoint, api, ns, direct=mode == "direct",
                       tls=lab.etcd_certs().client(ROOT_USER))
    if fleet.direct:
        # steady state before the measured update: every entry present (one patch per policy, not N)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entry = {"ok": True, "enforcing": True, "lastUpdated": stamp, "localPolicyRevision": resolution.revision}
        for name in meta:
            await custom.patch_namespaced_custom_object_status(  # type: ignore[call-arg]
                "cilium.io", "v2", ns, "ciliumnetworkpolicies", name,
                {"status": {"nodes": {node: entry for node in nodes}}}, _content_type="application/merge-patch+json")
    t_setup = time.perf_counter()
    await fleet.start(nodes, {k: (u, str(g)) for k, (u, g) in meta.items()},
                      seed=entry if fleet.direct else None)

    stats_path = layout.state_dir / f"child-{mode}-{n}.json"
    stats_path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(ROOT / p) for p in ("operator", "nodeagent", "e2e")))
    child = subprocess.Popen([sys.executable, "-m", "bench.bench_status", "--child", "--mode", mode,
                              "--kubeconfig", str(layout.kubeconfig), "--etcd", ports.etcd_endpoint,
                              "--etcd-pki", str(lab.etcd_certs().directory),
                              "--stats", str(stats_path), "--interval", str(INTERVAL)], cwd=ROOT, env=env)

    def child_stats() -> dict[str, Any]:
        try:
            return dict(json.loads(stats_path.read_text()))
        except (OSError, ValueError):
            return {}

    async def enforced(name: str, generation: int) -> bool:
        body = await custom.get_namespaced_custom_object("cilium.io", "v2", ns, "ciliumnetworkpolicies", name)
        if (body.get("status") or {}).get("enforcement") != f"{n}/{n} nodes":
            return False  # every agent reported (not a premature NoEndpoints before the intents are seen)
        for cond in (body.get("status") or {}).get("conditions") or []:
            if cond["type"] == "Enforced":
                return bool(cond["status"] == "True" and cond.get("observedGeneration") == generation)
        return False

    try:
        setup_timeout = float(os.environ.get("BENCH_SETUP_TIMEOUT", "300"))
        deadline = time.monotonic() + setup_timeout
        while time.monotonic() < deadline:
            done = await asyncio.gather(*(enforced(name, 1) for name in meta))
            if all(done):
                break
            if child.poll() is not None:
                raise CaseFailed(f"the operator child exited ({child.returncode})")
            await asyncio.sleep(0.5)
        else:
            raise CaseFailed(f"the {policies} policies were not all Enforced within the set-up timeout "
                             f"({setup_timeout:.0f} s, BENCH_SETUP_TIMEOUT)")
        setup_s = time.perf_counter() - t_setup
        await asyncio.sleep(quiet)
        before = status_patches(layout, ports.apiserver_url)
        s0, agent_events0, direct0 = child_stats(), fleet.intent_events, fleet.direct_writes
        failed0 = sum(w.failures for w in fleet.writers.values())

        t0, wall0 = time.perf_counter(), time.time()
        await custom.patch_namespaced_custom_object(  # type: ignore[call-arg]
            "cilium.io", "v2", ns, "ciliumnetworkpolicies", "p-0",
            {"spec": status_cluster.policy(ns, 0, "v2")["spec"]},
            _content_type="application/merge-patch+json")
        t_applied = time.perf_counter() - t0
        state = status_cluster.edited(state, repo, edited_obj, status_cluster.policy(ns, 0, "v2")["spec"], 2)
        update = resolver.update(state)
        t_resolved = time.perf_counter() - t0
        written = await publisher.publish(update.intents)
        t_published = time.perf_counter() - t0
        t_enf = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if await enforced("p-0", 2):
                t_enf = time.perf_counter() - t0
                break
            await asyncio.sleep(0.05)
        # settle: every agent wrote, then a few intervals of quiet
        deadline = time.monotonic() + 120
        while fleet.direct and (fleet.direct_writes - direct0 < n or any(w.pending for w in fleet.writers.values())) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(quiet)
        after = status_patches(layout, ports.apiserver_url)
        s1 = child_stats()
        rss, hwm = rss_kb(child.pid)
        writes_after = [round(t - wall0, 2) for t in s1.get("write_times", []) if t > wall0]
        return {"nodes": n, "mode": mode, "status_writes": after - before,
                "handover_writes": s1.get("writes", 0) - s0.get("writes", 0),
                "agent_writes": fleet.direct_writes - direct0,
                "agent_failures": sum(w.failures for w in fleet.writers.values()) - failed0,
                "agent_errors": sorted({w.last_error for w in fleet.writers.values() if w.last_error}),
                "agent_pending": sum(len(w.pending) for w in fleet.writers.values()),
                "handover_events": (s1.get("report_events", 0) + s1.get("intent_events", 0))
                - (s0.get("report_events", 0) + s0.get("intent_events", 0)),
                "agent_events": fleet.intent_events - agent_events0,
                "enforced_s": t_enf, "applied_s": round(t_applied, 2), "resolved_s": round(t_resolved, 2),
                "published_s": round(t_published, 2),
                "agents_reported_s": round(fleet.last_report - wall0, 2), "handover_write_at_s": writes_after,
                "rss_mb": rss / 1024, "peak_rss_mb": hwm / 1024, "setup_s": setup_s,
                "intent_kb": round(intent_kb, 1), "entries_per_intent": entries, "intents_written": len(written)}
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(5)  # kopf may take 30 s to stop its watches; the child keeps nothing worth waiting for
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        await fleet.stop()
        for node in nodes:
            await store.delete(node_intent_key(node).encode())
        await store.close()
        admin = EtcdStore(EtcdEndpoint.parse(ports.etcd_endpoint), tls=lab.etcd_certs().client(ROOT_USER), timeout=30)
        try:  # the simulated agents' reports (bound to their revoked leases, mostly gone already)
            await admin.call(lambda c: c.delete_prefix(b"/ciliary/reports/v1/"))
        finally:
            await admin.close()
        await api.close()
        lab.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'nodes':>6} {'mode':>9} {'status PATCH':>12} {'handover':>8} {'agents (failed)':>15} "
            f"{'watch ev (op/agents)':>20} {'resolved s':>10} {'published s':>11} {'reported s':>10} {'Enforced s':>10} "
            f"{'op RSS MB':>9} {'direct/handover':>15} {'intent KiB':>10} {'entries':>7}")
    out = [head, "-" * len(head)]
    by = {(r["nodes"], r["mode"]): r for r in rows}
    for r in rows:
        if r.get("error"):
            out.append(f"{r['nodes']:>6} {r['mode']:>9} did not finish: {r['error']}")
            continue
        other = by.get((r["nodes"], "handover"))
        ratio = f"{r['status_writes'] / max(other['status_writes'], 1):.1f}x" if other and r["mode"] == "direct" \
            and not other.get("error") else ""
        enf = f"{r['enforced_s']:.2f}" if r["enforced_s"] is not None else "never"
        out.append(f"{r['nodes']:>6} {r['mode']:>9} {r['status_writes']:>12} {r['handover_writes']:>8} "
                   f"{str(r['agent_writes']) + ' (' + str(r.get('agent_failures', 0)) + ')':>15} "
                   f"{str(r['handover_events']) + '/' + str(r['agent_events']):>20} "
                   f"{r['resolved_s']:>10.2f} {r['published_s']:>11.2f} {r['agents_reported_s']:>10.2f} {enf:>10} "
                   f"{r['peak_rss_mb']:>9.0f} {ratio:>15} {r['intent_kb']:>10.1f} {r['entries_per_intent']:>7.0f}")
    return "\n".join(out)


def parent_main(args: argparse.Namespace) -> None:
    import logging

    from kubernetes_asyncio.client.rest import ApiException

    from ciliary.lab import controlplane, sessions
    from ciliary.lab.lab import Lab
    from ciliary.lab.layout import Binaries

    logging.getLogger("ciliary.nodeagent.direct_status").setLevel(logging.ERROR)  # counted in the table
    sessions.reap_stale(ROOT, "benchstatus", "s")
    layout = sessions.session_layout(ROOT, "benchstatus", "s")
    lab = Lab(layout, Binaries.discover())
    lab.down(log=False)
    ports = controlplane.load_or_choose_ports(layout)
    controlplane.save_config(layout, ports, 0)
    rows: list[dict[str, Any]] = []
    try:
        controlplane.start(layout, lab.bins, ports)
        for crd in sorted((ROOT / "crds").glob("*.cilium.io.yaml")):
            lab.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
        for _ in range(30):
            if lab.kubectl("wait", "--for", "condition=Established", "--timeout=30s",
                           "crd/ciliumnetworkpolicies.cilium.io", check=False).returncode == 0:
                break
            time.sleep(1)
        for n in (int(x) for x in args.nodes.split(",")):
            for mode in args.modes.split(","):
                try:
                    row = asyncio.run(run_case(lab, ports, n, mode, args.policies,
                                                   INTERVAL if args.smoke else 3 * INTERVAL))
                except CaseFailed as exc:
                    row = {"nodes": n, "mode": mode, "error": str(exc)}
                except ApiException as exc:
                    row = {"nodes": n, "mode": mode, "error": f"the apiserver answered {exc.status} {exc.reason}"}
                print(json.dumps(row), flush=True)
                rows.append(row)
        print()
        print(f"one policy update, {args.policies} policies, status interval {INTERVAL:.0f} s; intents resolved by the "
              f"operator's resolver (one selected pod per node), intent KiB and entries are per node")
        print(table(rows))
    finally:
        lab.down(log=False)
    if any(r.get("error") for r in rows):
        raise SystemExit("some cases did not finish (see the table)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="10,100,1000")
    p.add_argument("--modes", default="handover,direct")
    p.add_argument("--policies", type=int, default=POLICIES)
    p.add_argument("--smoke", action="store_true", help="10 nodes, handover only: checks the bench runs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="handover", help=argparse.SUPPRESS)
    p.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    p.add_argument("--etcd", help=argparse.SUPPRESS)
    p.add_argument("--etcd-pki", help=argparse.SUPPRESS)
    p.add_argument("--stats", help=argparse.SUPPRESS)
    p.add_argument("--interval", type=float, default=INTERVAL, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.nodes, args.modes, args.policies = "10", "handover", 5
    if args.child:
        asyncio.run(child_main(args))
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
