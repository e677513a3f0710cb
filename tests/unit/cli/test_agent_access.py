"""The CLI never answers for node N from another node's agent (``ciliary.cli.agent_access``).

Fake agents are aiohttp servers on loopback that answer as a given node; a fake ``kubectl`` (a script)
lists agent pods and, for ``kubectl exec``, runs the CLI's fetch script against the agent of the pod's
node, as the real one runs it inside that node's agent pod.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ciliary.cli import agent_access, datapath_client, observe_commands
from ciliary.cli.agent_access import AgentAccess, AgentUnreachableError, WrongAgentError


async def _serve(node: str, *, intent_node: str | None = None, flow_node: str | None = None) -> web.AppRunner:
    async def datapath(_r: web.Request) -> web.Response:
        return web.json_response({"node": node, "source": "datapath",
                                  "intent": {"node": intent_node or node, "revision": 3}})

    async def stats(_r: web.Request) -> web.Response:
        return web.json_response({"node": node, "seen": 1, "lost": 0})

    async def flows(r: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(r)
        for i in range(2):
            flow = {"node": flow_node or node, "time": f"2026-12-06T00:00:0{i}Z", "verdict": "DROPPED",
                    "src": {"ip": "10.0.0.1"}, "dst": {"ip": "10.0.0.2"}, "q": r.query.get("verdict", "")}
            await resp.write(json.dumps(flow).encode() + b"\n")
        return resp

    async def broken(_r: web.Request) -> web.Response:
        return web.json_response({"node": node, "error": "no datapath"}, status=503)

    app = web.Application()
    app.router.add_get("/v1/datapath", datapath)
    app.router.add_get("/v1/flows/stats", stats)
    app.router.add_get("/v1/flows", flows)
    app.router.add_get("/v1/services", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def _address(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"{host}:{port}"


@pytest.fixture
async def agents() -> AsyncIterator[dict[str, str]]:
    """node-1 and node-2's agents (addresses), plus impostors: node-2's address answered by node-1's agent."""
    runners = {"node-1": await _serve("node-1"), "node-2": await _serve("node-2"),
               "node-2-intent-of-1": await _serve("node-2", intent_node="node-1"),
               "node-2-flows-of-1": await _serve("node-2", flow_node="node-1")}
    try:
        yield {name: _address(r) for name, r in runners.items()}
    finally:
        for r in runners.values():
            await r.cleanup()


DS = [{"kind": "DaemonSet", "name": "ciliary-agent", "controller": True}]


def _fake_kubectl(tmp_path: Path, pod_agents: dict[str, str], calls: Path) -> str:
    """A kubectl: ``get pods`` lists one Running agent pod per node (and a terminating one); ``exec`` runs
    the given python3 script with the address of the pod's node's agent instead of the loopback asked."""
    pods = {"items": [
        {"metadata": {"name": f"ciliary-agent-{node}", "ownerReferences": DS}, "spec": {"nodeName": node},
         "status": {"phase": "Running"}}
        for node in pod_agents] + [
        {"metadata": {"name": "ciliary-agent-old", "deletionTimestamp": "x", "ownerReferences": DS},
         "spec": {"nodeName": "node-1"}, "status": {"phase": "Running"}}]}
    script = tmp_path / "kubectl"
    script.write_text(f"""#!{sys.executable}
import json, subprocess, sys
args = sys.argv[1:]
open({str(calls)!r}, "a").write(json.dumps(args) + "\\n")
if args[0] == "get":
    print(json.dumps({pods!r}))
    sys.exit(0)
assert args[0] == "exec" and args[1:3] == ["-n", "kube-system"] and args[4:6] == ["-c", "agent"], args
pod, rest = args[3], args[args.index("--") + 1:]
assert rest[0] == "python3" and rest[1] == "-c", rest
where = {json.dumps({f"ciliary-agent-{n}": a for n, a in pod_agents.items()})}[pod]
sys.exit(subprocess.run([sys.executable, "-c", rest[2], where, *rest[4:]]).returncode)
""")
    script.chmod(0o755)
    return str(script)


async def _get(access: AgentAccess, node: str, address: str | None, path: str = "/v1/datapath") -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        return await access.get_json(session, node, address, path)


@pytest.mark.parametrize("address,loopback", [
    ("127.0.0.1:9876", True), ("127.1.2.3:1", True), ("localhost:9876", True), ("[::1]:9876", True),
    ("0.0.0.0:9876", True), ("[::]:9876", True),
    ("192.0.2.12:9876", False), ("[2001:db8::1]:1", False), ("agent.example:1", False)])
def test_loopback_addresses_are_recognised(address: str, loopback: bool) -> None:
    assert agent_access.is_loopback(address) is loopback


def test_an_answer_must_name_the_node_asked_for() -> None:
    agent_access.check_node("node-2", {"node": "node-2"}, "at x")
    with pytest.raises(WrongAgentError) as err:
        agent_access.check_node("node-2", {"node": "node-1"}, "at http://127.0.0.1:9876")
    assert (err.value.node, err.value.answered) == ("node-2", "node-1")
    assert "answers as node 'node-1', not 'node-2'" in str(err.value)
    with pytest.raises(WrongAgentError, match="<no node name>"):
        agent_access.check_node("node-2", {"seen": 1}, "at x")


def test_agent_pods_by_node_keeps_running_pods_not_terminating_ones() -> None:
    listed = {"items": [
        {"metadata": {"name": "a1", "ownerReferences": DS}, "spec": {"nodeName": "node-1"},
         "status": {"phase": "Running"}},
        {"metadata": {"name": "a1-old", "deletionTimestamp": "t", "ownerReferences": DS},
         "spec": {"nodeName": "node-1"}, "status": {"phase": "Running"}},
        {"metadata": {"name": "a2", "ownerReferences": DS}, "spec": {"nodeName": "node-2"},
         "status": {"phase": "Pending"}},
        # a look-alike pod with the agent's labels but no DaemonSet: never chosen
        {"metadata": {"name": "fake"}, "spec": {"nodeName": "node-3"}, "status": {"phase": "Running"}}]}
    assert agent_access.agent_pods_by_node(listed) == {"node-1": "a1"}
    # two DaemonSet pods on one node (another release): ambiguous, and the CLI refuses to pick
    listed["items"].append({"metadata": {"name": "a1-other", "ownerReferences": DS}, "spec": {"nodeName": "node-1"},
                            "status": {"phase": "Running"}})
    assert agent_access.agent_pods_by_node(listed) == {"node-1": agent_access.AMBIGUOUS}


async def test_a_kubectl_that_cannot_run_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    missing = AgentAccess("exec", kubectl=str(tmp_path / "no-such-kubectl"))
    with pytest.raises(AgentUnreachableError, match="could not run"):
        await _get(missing, "node-2", "127.0.0.1:9876")


async def test_direct_reading_of_another_nodes_agent_is_refused_with_what_to_do(agents) -> None:
    # node-2 registered a loopback address at which node-1's agent answers (the CLI runs on node-1)
    with pytest.raises(AgentUnreachableError) as err:
        await _get(AgentAccess("direct"), "node-2", agents["node-1"])
    text = str(err.value)
    assert err.value.node == "node-2" and "answers as node 'node-1', not 'node-2'" in text, text
    assert "only reachable on 'node-2'" in text and "--agent-access exec" in text, text
    answer = await _get(AgentAccess("direct"), "node-2", agents["node-2"])
    assert answer.body["node"] == "node-2" and answer.via == f"at http://{agents['node-2']}"


async def test_a_non_loopback_address_is_never_read_through_a_pod(agents, tmp_path) -> None:
    calls = tmp_path / "calls"
    kubectl = _fake_kubectl(tmp_path, {"node-2": agents["node-2"]}, calls)
    # a routable address (here one that resolves to nothing) is only asked directly, never through a pod
    address = "agent.invalid:9876"
    with pytest.raises(AgentUnreachableError, match="did not answer"):
        await _get(AgentAccess("auto", kubectl=kubectl), "node-2", address)
    assert not calls.exists()


async def test_auto_reads_another_nodes_loopback_through_that_nodes_agent_pod(agents, tmp_path) -> None:
    calls = tmp_path / "calls"
    kubectl = _fake_kubectl(tmp_path, {"node-1": agents["node-1"], "node-2": agents["node-2"]}, calls)
    access = AgentAccess("auto", kubectl=kubectl)
    # node-1's own loopback answers as node-1: read directly
    here = await _get(access, "node-1", agents["node-1"])
    assert here.via == f"at http://{agents['node-1']}" and not calls.exists()
    # node-2's registered loopback reaches node-1's agent here: refused, then read in node-2's agent pod
    there = await _get(access, "node-2", agents["node-1"])
    assert there.status == 200 and there.body["node"] == "node-2", there
    assert there.via == f"in pod kube-system/ciliary-agent-node-2 on node node-2 (kubectl exec, {agents['node-1']})"
    execs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [c[0] for c in execs] == ["get", "exec"] and execs[1][3] == "ciliary-agent-node-2", execs
    # an error status comes through the pod too, with its body
    broken = await _get(access, "node-2", agents["node-1"], "/v1/services")
    assert broken.status == 503 and broken.body == {"node": "node-2", "error": "no datapath"}
    assert [json.loads(line)[0] for line in calls.read_text().splitlines()] == ["get", "exec", "exec"]


async def test_exec_refuses_a_pod_whose_agent_answers_as_another_node(agents, tmp_path) -> None:
    kubectl = _fake_kubectl(tmp_path, {"node-2": agents["node-1"]}, tmp_path / "calls")
    with pytest.raises(AgentUnreachableError) as err:
        await _get(AgentAccess("exec", kubectl=kubectl), "node-2", "127.0.0.1:9876")
    assert "in pod kube-system/ciliary-agent-node-2" in str(err.value)
    assert "answers as node 'node-1', not 'node-2'" in str(err.value)


async def test_exec_without_an_agent_pod_or_kubectl_says_so(agents, tmp_path) -> None:
    kubectl = _fake_kubectl(tmp_path, {"node-1": agents["node-1"]}, tmp_path / "calls")
    with pytest.raises(AgentUnreachableError, match="no Running agent pod .* on node 'node-2' in namespace"):
        await _get(AgentAccess("exec", kubectl=kubectl), "node-2", "127.0.0.1:9876")
    with pytest.raises(AgentUnreachableError, match="kubectl not found"):
        await _get(AgentAccess("exec", kubectl=""), "node-2", "127.0.0.1:9876")
    with pytest.raises(AgentUnreachableError, match="no agent is registered"):
        await _get(AgentAccess("auto"), "node-2", None)


async def test_a_datapath_whose_intent_names_another_node_is_refused(agents) -> None:
    access = AgentAccess("direct")
    async with aiohttp.ClientSession() as session:
        good = await datapath_client._read_one(access, session, "node-2", agents["node-2"])
        bad = await datapath_client._read_one(access, session, "node-2", agents["node-2-intent-of-1"])
        wrong = await datapath_client._read_one(access, session, "node-2", agents["node-1"])
    assert isinstance(good, datapath_client.HeldState) and good.intent.node == "node-2", good
    assert isinstance(bad, str) and "answers as node 'node-1', not 'node-2'" in bad, bad
    assert isinstance(wrong, str) and "answers as node 'node-1', not 'node-2'" in wrong, wrong


async def _observe(access: AgentAccess, node: str, address: str, follow: bool = False) -> list[tuple]:
    queue: asyncio.Queue = asyncio.Queue()
    params = {"last": "20", "verdict": "DROPPED", **({"follow": "1"} if follow else {})}
    async with aiohttp.ClientSession() as session:
        await observe_commands._stream(access, session, node, address, params, queue)
    return [queue.get_nowait() for _ in range(queue.qsize())]


async def test_observe_streams_flows_directly_and_through_the_pod(agents, tmp_path) -> None:
    direct = await _observe(AgentAccess("auto"), "node-2", agents["node-2"])
    assert [(n, f["node"], f["q"]) for n, f, _ in direct[:2]] == [("node-2", "node-2", "DROPPED")] * 2
    assert direct[2] == ("node-2", None, "")
    kubectl = _fake_kubectl(tmp_path, {"node-2": agents["node-2"]}, tmp_path / "calls")
    through = await _observe(AgentAccess("auto", kubectl=kubectl), "node-2", agents["node-1"], follow=True)
    assert [(n, f["node"], f["q"]) for n, f, _ in through[:2]] == [("node-2", "node-2", "DROPPED")] * 2
    assert through[2] == ("node-2", None, "")


async def test_observe_refuses_a_flow_that_names_another_node(agents) -> None:
    got = await _observe(AgentAccess("direct"), "node-2", agents["node-2-flows-of-1"])
    assert len(got) == 1 and got[0][1] is None and "answers as node 'node-1', not 'node-2'" in got[0][2], got


def test_access_settings_come_from_flags_then_environment(monkeypatch) -> None:
    monkeypatch.setenv("CILIARY_AGENT_ACCESS", "exec")
    monkeypatch.setenv("CILIARY_AGENT_NAMESPACE", "ciliary")
    monkeypatch.setenv("CILIARY_KUBECTL", "/opt/kubectl")
    got = AgentAccess.from_args(argparse.Namespace(agent_access=None, agent_namespace=None))
    assert (got.mode, got.namespace, got.kubectl) == ("exec", "ciliary", "/opt/kubectl")
    got = AgentAccess.from_args(argparse.Namespace(agent_access="direct", agent_namespace="x"))
    assert (got.mode, got.namespace) == ("direct", "x")
    monkeypatch.setenv("CILIARY_AGENT_ACCESS", "ssh")
    with pytest.raises(ValueError, match="agent access 'ssh'"):
        AgentAccess.from_args(argparse.Namespace())
