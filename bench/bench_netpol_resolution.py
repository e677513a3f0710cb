"""NetworkPolicy resolution at scale: 1,000 NetworkPolicies x 10,000 pods x 100 nodes.

Run from the repository root: ``PYTHONPATH=operator python -m bench.bench_netpol_resolution``
(``--smoke``: tiny sizes). The cluster (pods, namespaces, nodes) is the one of
``bench_resolution``; the policies are ``networking.k8s.io/v1`` NetworkPolicies using
the constructs (podSelector, namespaceSelector with podSelector, ipBlock with except,
ports with endPort and named ports, UDP, both policy types) with the selectivity of
that bench's CNPs, so the two compare. Prints the time of parsing +
compiling them, of a full resolution, of a no-op update, and of the update after one
NetworkPolicy edit, and the peak RSS. Targets: full < 10 s, one edit < 100 ms.
Figures only; nothing here asserts.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import replace
from typing import Any

from bench.bench_resolution import APPS, build, ms

from ciliary.operator.api.networkpolicy import parse_network_policy
from ciliary.operator.policy.repository import PolicyRepository
from ciliary.operator.policy.resolution import Resolver


def netpol(ns: str, k: int, port: int) -> dict[str, Any]:
    """The shape of ``bench_resolution``'s CNP (same selectivity), written as a NetworkPolicy, plus a
    namespaceSelector+podSelector peer and a UDP rule to one namespace's DNS pods."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"np-{k}", "namespace": ns, "uid": f"{ns}-np-{k}", "generation": 1},
        "spec": {
            "podSelector": {"matchLabels": {"app": f"a{k % APPS}"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": f"a{(k + 1) % APPS}"}}},
                          {"namespaceSelector": {"matchLabels": {"team": f"t{k % 5}"}},
                           "podSelector": {"matchLabels": {"app": f"a{(k + 1) % APPS}", "version": "v1"}}}],
                 "ports": [{"port": port}, {"port": "http"}]},
            ],
            "egress": [
                {"to": [{"podSelector": {"matchLabels": {"app": f"a{(k + 2) % APPS}"}}}],
                 "ports": [{"port": 8080, "endPort": 8090}]},
                {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-0"}},
                         "podSelector": {"matchLabels": {"app": "a0"}}}],
                 "ports": [{"port": 53, "protocol": "UDP"}]},
                {"to": [{"ipBlock": {"cidr": f"172.{16 + k % 8}.0.0/16",
                                     "except": [f"172.{16 + k % 8}.{k % 200}.0/24"]}}]},
            ],
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=10000)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite's check that it runs)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.policies, args.pods, args.nodes = 20, 200, 4

    state, _ = build(0, args.pods, args.nodes)
    # the API server labels every namespace with its name (NetworkPolicies select namespaces by it)
    state = replace(state, namespaces={name: replace(info, labels={**info.labels, "kubernetes.io/metadata.name": name})
                                       for name, info in state.namespaces.items()})
    ns_names = sorted(state.namespaces)
    t0 = time.perf_counter()
    repo = PolicyRepository()
    for k in range(args.policies):
        repo.upsert(parse_network_policy(netpol(ns_names[k % len(ns_names)], k, 9000 + k % 50)))
    t_build = time.perf_counter() - t0
    state = replace(state, policies=repo.snapshot())

    resolver = Resolver()
    t0, c0 = time.perf_counter(), time.process_time()
    result = resolver.update(state)
    t_full, c_full = time.perf_counter() - t0, time.process_time() - c0
    endpoints = sum(len(i.endpoints) for i in result.intents.values())
    entries = sum(len(e.ingress.entries) + len(e.egress.entries) for i in result.intents.values() for e in i.endpoints)
    enforced = sum(1 for i in result.intents.values() for e in i.endpoints if e.ingress.enforced)

    t0 = time.perf_counter()
    again = resolver.update(state)
    t_noop = time.perf_counter() - t0

    edited = netpol(ns_names[3 % len(ns_names)], 3, 9003)
    edited["metadata"]["generation"] = 2
    edited["spec"]["ingress"][0]["ports"][0]["port"] = 9999
    t0 = time.perf_counter()
    repo.upsert(parse_network_policy(edited))
    t_upsert = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    after_edit = resolver.update(replace(state, policies=repo.snapshot()))
    t_edit, c_edit = time.perf_counter() - t0, time.process_time() - c0

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"scale: {args.policies} NetworkPolicies, {args.pods} pods, {args.nodes} nodes "
          f"({endpoints} endpoints, {enforced} with ingress enforced, {entries} policy entries)")
    print(f"build policies (parse + validate + compile):    {ms(t_build)}")
    print(f"full resolution:                                {ms(t_full)}  (CPU {c_full * 1000:.0f} ms)  "
          f"target < 10 s: {'met' if t_full < 10 else 'NOT met'}")
    print(f"no-op update:                                   {ms(t_noop)}  changed nodes: {len(again.changed)}")
    print(f"incremental, one NetworkPolicy edit (upsert {t_upsert * 1000:.1f} ms): "
          f"{ms(t_edit)}  (CPU {c_edit * 1000:.0f} ms)  changed nodes: {len(after_edit.changed)}  target < 100 ms: "
          f"{'met' if t_edit + t_upsert < 0.1 else 'NOT met'}")
    print(f"peak RSS:                                       {rss_kb / 1024:9.1f} MB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
