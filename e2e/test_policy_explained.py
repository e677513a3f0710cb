"""Why a packet was dropped, explained by the CLI and the agents: ``ciliary policy trace``, ``ciliary policy
get --node``, the agent's flow API and ``ciliary observe``, on the pods of test_policy_enforcement under its
``deny-wins`` policy (deny beats allow).

Runs on the real-node lab (``REAL_NODES`` below). The chart's agents register their node-local loopback
listener (``agent.healthAddr`` 127.0.0.1:9876), which from the CLI's node (the chart etcd's) reaches that
node's agent only; the CLI reaches every other node's agent through its agent pod (``kubectl exec``,
``ciliary.cli.agent_access``) and refuses any answer that names another node. Every answer here is checked
to come from its own node's agent (a pod that kubectl places on that node, or the CLI's own node's loopback),
and reading node-2 "directly" from another node is refused.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from test_policy_enforcement import (  # noqa: F401  (pods, policies: the module's fixtures, reused here)
    CLIENT,
    NS_A,
    OTHER,
    SERVER,
    agent_get,
    enforce_deny_wins,
    http,
    pods,
    policies,
    trace,
)

pytestmark = pytest.mark.e2e
#: on the session's real-node lab: the CLI reaches each node's agent through that node's agent pod, and the
#: test checks which agent answered (docstring)
REAL_NODES = True


#: every agent through its pod (the CLI's own node's too), so each answer's pod is checked
EVERY_AGENT_BY_EXEC = ("--agent-access", "exec")


def test_deny_wins_is_explained_by_trace_policy_get_and_flows(lab, pods, policies):  # noqa: F811
    enforce_deny_wins(pods, policies)
    # the trace evaluates what node-2's datapath holds (read by its agent) and names the deny rule
    out = trace(lab, OTHER, SERVER, "80/tcp", "-o", "json", *EVERY_AGENT_BY_EXEC)
    assert out.returncode == 0, out.stderr
    explained = json.loads(out.stdout)
    assert explained["verdict"] == "DENIED" and explained["source"] == "datapath", out.stdout
    assert sorted(explained["agents"]) == ["node-1", "node-2"], out.stdout
    for node, via in explained["agents"].items():
        lab.assert_own_agent(node, via)
    assert explained["differences"] == [] and explained["intentVerdict"] == "DENIED", out.stdout
    ingress = next(d for d in explained["directions"] if d["direction"] == "ingress")
    assert ingress["verdict"] == "DENIED" and ingress["node"] == "node-2", out.stdout
    assert ingress["source"] == "datapath" and ingress["reason"] == "denied-by-rule", out.stdout
    rules = ingress["rules"]
    assert any(r.get("name") == "deny-wins" and r.get("namespace") == NS_A for r in rules), out.stdout
    text = trace(lab, OTHER, SERVER, "80/tcp").stdout  # the default way (auto): the same answers
    assert text.startswith("DENIED (from the datapath of node-1, node-2)") and "deny-wins" in text, text
    assert "WARNING" not in text, text
    read = dict(re.findall(r"^  (node-\d)'s datapath read by its agent (.+)$", text, re.M))
    assert sorted(read) == ["node-1", "node-2"], text
    for node, via in read.items():
        lab.assert_own_agent(node, via)
    # node-2's registered loopback, asked from another node, answers as that node: refused
    here = lab.chart_etcd_node()
    away = "node-2" if here == "node-1" else "node-1"
    direct = trace(lab, OTHER, SERVER, "80/tcp", "-o", "json", "--agent-access", "direct")
    assert direct.returncode == 2, direct.stdout + direct.stderr
    refused = json.loads(direct.stdout)
    assert refused["verdict"] == "UNKNOWN" and sorted(refused["agents"]) == [here], direct.stdout
    assert f"answers as node {here!r}, not {away!r}" in refused["unreachable"][away], direct.stdout
    allowed = json.loads(trace(lab, CLIENT, SERVER, "8081/tcp", "-o", "json").stdout)
    assert allowed["verdict"] == "ALLOWED" and allowed["differences"] == [], allowed

    # `policy get` shows node-2's maps: the server's ingress is enforced and holds the deny entries
    got = lab.ciliary("policy", "get", "--node", "node-2", "-o", "json", "--etcd-endpoints",
                      lab.etcd_endpoint)
    assert got.returncode == 0, got.stderr
    held = json.loads(got.stdout)
    assert held["source"] == "datapath" and held["differences"] == [], got.stdout[:3000]
    assert held["node"] == "node-2", got.stdout[:3000]
    lab.assert_own_agent("node-2", held["agent"])
    served = next(e for e in held["endpoints"] if e["pod"] == "server" and e["namespace"] == NS_A)
    assert served["ingress"]["enforced"], served
    denies = [e for e in served["ingress"]["entries"] if e["verdict"] == "deny"]
    assert any(any(r["name"] == "deny-wins" for r in e["rules"]) for e in denies), served

    # the datapath reported the drop: node-2's flow API (and `ciliary observe`, once it exists)
    other_ip, server_ip = pods.ip(OTHER), pods.ip(SERVER)
    flows: list[dict] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        body = agent_get(lab, "node-2", f"/v1/flows?verdict=DROPPED&ip={server_ip}&last=200")
        flows = [json.loads(line) for line in body.splitlines() if line.startswith("{")]
        flows = [f for f in flows if f["src"]["ip"] == other_ip and f["dst"]["ip"] == server_ip
                 and f["direction"] == "ingress"]
        if flows:
            break
        pods.dropped(http(OTHER, SERVER))
    assert flows, f"no DROPPED flow {other_ip} -> {server_ip} on node-2: {body[:2000]}"
    flow = flows[-1]
    assert flow["drop_reason"] == "POLICY_DENY_RULE", flow
    assert flow["dst"]["pod"] == "server" and flow["dst"]["namespace"] == NS_A, flow
    assert any("deny-wins" in json.dumps(r) for r in flow["policy"]), flow

    if "observe" in lab.ciliary("--help").stdout:  # the CLI over the same flows
        observed: list[dict] = []
        deadline = time.monotonic() + 10
        while not observed and time.monotonic() < deadline:
            out = lab.ciliary("observe", "--etcd-endpoints", lab.etcd_endpoint,
                              "--node", "node-2", "--pod", SERVER, "--verdict", "DROPPED",
                              "--protocol", "tcp", "--port", "80",
                              "--last", "200", "-o", "json")
            lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
            observed = [f for f in lines if f["src"]["ip"] == other_ip and f["dst"]["ip"] == server_ip]
            if not observed:
                pods.dropped(http(OTHER, SERVER))
        assert observed, out.stdout + out.stderr
        assert observed[-1]["node"] == "node-2", observed[-1]
        assert observed[-1]["drop_reason"] == "POLICY_DENY_RULE", observed[-1]
        assert any("deny-wins" in json.dumps(r) for r in observed[-1]["policy"]), observed[-1]


