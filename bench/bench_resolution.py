"""Policy resolution at scale: 1,000 policies x 10,000 pods x 100 nodes.

Run from the repository root: ``PYTHONPATH=operator python -m bench.bench_resolution``.
Prints the time of a full resolution, of an incremental update after one pod
relabel and after one policy edit, and the peak RSS. Targets: incremental
< 100 ms, full < 10 s, RSS < 300 MB. Figures only; nothing here asserts.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from dataclasses import replace
from typing import Any

from ciliary.operator.api.policies import parse_policy
from ciliary.operator.policy.inputs import ContainerPort, NamespaceInfo, NodeInfo, PodInfo
from ciliary.operator.policy.repository import PolicyRepository
from ciliary.operator.policy.resolution import ClusterState, Resolver

APPS = 10


def cnp(ns: str, k: int, port: int) -> dict[str, Any]:
    app = f"a{k % APPS}"
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": f"pol-{k}", "namespace": ns, "uid": f"{ns}-pol-{k}", "generation": 1},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": app}},
            "ingress": [
                {"fromEndpoints": [{"matchLabels": {"app": f"a{(k + 1) % APPS}"}}],
                 "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}, {"port": "http"}]}]},
            ],
            "egress": [
                {"toEndpoints": [{"matchLabels": {"app": f"a{(k + 2) % APPS}"}}],
                 "toPorts": [{"ports": [{"port": "8080", "endPort": 8090, "protocol": "TCP"}]}]},
                {"toCIDRSet": [{"cidr": f"172.{16 + k % 8}.0.0/16", "except": [f"172.{16 + k % 8}.{k % 200}.0/24"]}]},
            ],
        },
    }


def ccnp(k: int) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": f"cluster-{k}", "uid": f"cluster-{k}", "generation": 1},
        "spec": {
            "endpointSelector": {"matchLabels": {"io.cilium.k8s.namespace.labels.team": f"t{k % 5}"}},
            "egress": [{"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "ns-0", "app": "a0"}}],
                        "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]},
                       {"toEntities": ["kube-apiserver", "host"]}],
            "egressDeny": [{"toCIDR": ["169.254.169.254/32"]}],
            "ingress": [{"fromEntities": ["remote-node"]}],
        },
    }


def build(policies: int, pods: int, nodes: int, seed: int = 7) -> tuple[ClusterState, PolicyRepository]:
    rng = random.Random(seed)
    namespaces = {f"ns-{i}": NamespaceInfo(f"ns-{i}", {"team": f"t{i % 5}"}) for i in range(max(1, pods // 100))}
    node_infos = {f"node-{i}": NodeInfo(f"node-{i}", f"192.168.{i // 250}.{i % 250 + 1}") for i in range(nodes)}
    ns_names = sorted(namespaces)
    pod_infos: dict[str, PodInfo] = {}
    for i in range(pods):
        ns = ns_names[i % len(ns_names)]
        uid = f"pod-{i}"
        pod_infos[uid] = PodInfo(
            namespace=ns, name=f"p{i}", uid=uid, node=f"node-{rng.randrange(nodes)}",
            ipv4=f"10.{i // 65000}.{(i // 250) % 256}.{i % 250 + 1}",
            labels={"app": f"a{(i // 100) % APPS}", "version": f"v{(i // 1000) % 2}", "pod-template-hash": f"h{i}"},
            service_account="default", container_ports=(ContainerPort("http", 8080),),
        )
    repo = PolicyRepository()
    n_ccnp = max(1, policies // 100)
    for k in range(policies - n_ccnp):
        repo.upsert(parse_policy(cnp(ns_names[k % len(ns_names)], k, 9000 + k % 50)))
    for k in range(n_ccnp):
        repo.upsert(parse_policy(ccnp(k)))
    return ClusterState(repo.snapshot(), pod_infos, namespaces, node_infos), repo


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f} ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=10000)
    parser.add_argument("--nodes", type=int, default=100)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    state, repo = build(args.policies, args.pods, args.nodes)
    t_build = time.perf_counter() - t0

    resolver = Resolver()
    t0 = time.perf_counter()
    result = resolver.update(state)
    t_full = time.perf_counter() - t0
    endpoints = sum(len(i.endpoints) for i in result.intents.values())
    entries = sum(len(e.ingress.entries) + len(e.egress.entries) for i in result.intents.values() for e in i.endpoints)
    identities = len(next(iter(result.intents.values())).identity_labels)

    t0 = time.perf_counter()
    again = resolver.update(state)
    t_noop = time.perf_counter() - t0

    victim = state.pods["pod-1234"]
    pods = dict(state.pods)
    pods[victim.uid] = replace(victim, labels={**victim.labels, "app": "a7"})
    relabelled = replace(state, pods=pods)
    t0 = time.perf_counter()
    after_pod = resolver.update(relabelled)
    t_pod = time.perf_counter() - t0

    edited = cnp("ns-3", 3, 9003)
    edited["metadata"]["generation"] = 2
    edited["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] = "9999"
    t0 = time.perf_counter()
    repo.upsert(parse_policy(edited))
    t_upsert = time.perf_counter() - t0
    t0 = time.perf_counter()
    after_policy = resolver.update(replace(relabelled, policies=repo.snapshot()))
    t_policy = time.perf_counter() - t0

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"scale: {args.policies} policies, {args.pods} pods, {args.nodes} nodes "
          f"({endpoints} endpoints, {identities} identities, {entries} policy entries)")
    print(f"build inputs (parse + validate + compile):      {ms(t_build)}")
    print(f"full resolution:                                {ms(t_full)}")
    print(f"no-op update:                                   {ms(t_noop)}  changed nodes: {len(again.changed)}")
    print(f"incremental, one pod relabel:                   {ms(t_pod)}  changed nodes: {len(after_pod.changed)}")
    print(f"incremental, one policy edit (upsert {t_upsert * 1000:.1f} ms):  "
          f"{ms(t_policy)}  changed nodes: {len(after_policy.changed)}")
    print(f"peak RSS:                                       {rss_kb / 1024:9.1f} MB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
