"""The status bench's cluster resolves to real intents: an endpoint with entries on every node, every policy listed."""

from __future__ import annotations

import sys
from pathlib import Path

from ciliary.operator.policy.resolution import Resolver

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench import status_cluster


def objects(ns: str, count: int) -> list[dict[str, object]]:
    out = []
    for k in range(count):
        body = status_cluster.policy(ns, k)
        body["metadata"] = {**body["metadata"], "uid": f"uid-{k}", "generation": 1}
        out.append(body)
    return out


def test_every_node_gets_an_enforced_endpoint_and_every_policy() -> None:
    nodes = [f"node-{i:04}" for i in range(6)]
    items = objects("ns", 3)
    state, repo = status_cluster.build("ns", nodes, items)
    resolution = Resolver().update(state)
    assert sorted(resolution.intents) == nodes
    for node, intent in resolution.intents.items():
        assert [e.pod for e in intent.endpoints] == [f"web-{nodes.index(node)}"]
        ingress = intent.endpoints[0].ingress
        assert ingress.enforced
        assert {e.port_low for e in ingress.entries} >= {8000, 8001, 8002}
        assert sorted(p.uid for p in intent.policies) == ["uid-0", "uid-1", "uid-2"]
        assert len(intent.ipcache) >= 2 * len(nodes)  # every pod and every node address


def test_an_edit_changes_every_node_and_carries_the_new_generation() -> None:
    nodes = [f"node-{i}" for i in range(4)]
    items = objects("ns", 2)
    state, repo = status_cluster.build("ns", nodes, items)
    resolver = Resolver()
    before = resolver.update(state)
    after = resolver.update(status_cluster.edited(state, repo, items[0], status_cluster.policy("ns", 0, "v2")["spec"], 2))
    assert after.changed == frozenset(nodes)
    for node in nodes:
        assert before.intents[node].content_hash() != after.intents[node].content_hash()
        assert {p.uid: p.generation for p in after.intents[node].policies}["uid-0"] == 2
