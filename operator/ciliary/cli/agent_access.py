"""How the CLI reaches node N's agent, and the proof that the answer came from node N's agent.

Every agent registers the address of its API listener in etcd (``/ciliary/nodes/v1/<node>``,
``healthAddr``). A chart install registers the node's own loopback (``agent.healthAddr``,
127.0.0.1:9876: the endpoint API must never be reachable off the node), which only a client on
that node reaches; anywhere else the same address reaches nothing, or another node's agent.

Three ways (``--agent-access``, ``CILIARY_AGENT_ACCESS``):

``direct``  HTTP to the registered address.
``exec``    ``kubectl exec`` into the node's agent pod (``--agent-namespace``, default
            ``kube-system``; pods ``app.kubernetes.io/part-of=ciliary,app.kubernetes.io/component=agent``
            whose ``spec.nodeName`` is the node; container ``agent``) and GET the loopback address there,
            as Cilium users run ``cilium-dbg`` in the agent pod. Needs the right to exec into those pods,
            nothing new listens anywhere. kubectl is ``CILIARY_KUBECTL`` or ``kubectl`` on PATH.
``auto``    (default) direct; when that fails or another node's agent answers and the registered
            address is loopback, exec.

Whatever the way, every answer names the node it describes (``node`` in each document and flow);
an answer for another node is refused (:class:`WrongAgentError`), never shown as node N's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp

MODES = ("auto", "direct", "exec")
AGENT_SELECTOR = "app.kubernetes.io/part-of=ciliary,app.kubernetes.io/component=agent"
AGENT_CONTAINER = "agent"
DEFAULT_NAMESPACE = "kube-system"

#: run inside the agent pod (its python3): GET http://<addr><path>, print the status on the first line,
#: then the body as it arrives (flows stream)
_FETCH = ("import sys, urllib.request, urllib.error\n"
          "t = float(sys.argv[3])\n"
          "try:\n"
          "    o = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
          "    r = o.open('http://' + sys.argv[1] + sys.argv[2], timeout=t or None)\n"
          "except urllib.error.HTTPError as e:\n"
          "    r = e\n"
          "o = sys.stdout.buffer\n"
          "o.write(b'%d\\n' % r.getcode()); o.flush()\n"
          "for line in r:\n"
          "    o.write(line); o.flush()\n")


class AgentUnreachableError(RuntimeError):
    """Node ``node``'s agent could not be asked; ``why`` says what was tried and what to do."""

    def __init__(self, node: str, why: str) -> None:
        super().__init__(why)
        self.node = node


class WrongAgentError(AgentUnreachableError):
    """The agent reached for ``node`` answered as ``answered``: its answer is not node ``node``'s."""

    def __init__(self, node: str, answered: str, via: str) -> None:
        super().__init__(node, f"the agent {via} answers as node {answered!r}, not {node!r}: refusing to "
                               f"show its view as that of node {node!r}")
        self.answered, self.via = answered, via


def is_loopback(address: str) -> bool:
    """Is ``address`` node-local: a loopback address, or the unspecified one (an agent listening on every
    address of its node registers ``0.0.0.0``, which from elsewhere reaches some other host's port)?"""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
        return ip.is_loopback or ip.is_unspecified
    except ValueError:
        return False


def check_node(node: str, answer: Mapping[str, Any], via: str) -> None:
    """Raise :class:`WrongAgentError` unless ``answer`` names ``node`` (a missing name is refused too)."""
    answered = answer.get("node")
    if answered != node:
        raise WrongAgentError(node, str(answered) if answered else "<no node name>", via)


def loopback_hint(node: str, address: str) -> str:
    return (f"node {node!r} registered its agent at {address}, a loopback address only reachable on {node!r} "
            "itself (a chart install's agent.healthAddr): run ciliary on that node, or let it reach the agent "
            "through its pod with --agent-access exec (kubectl exec into the agent pod; needs pods/exec in "
            f"{DEFAULT_NAMESPACE!r} or --agent-namespace)")


@dataclass(frozen=True)
class Answer:
    """One agent's answer, with how it was reached."""

    status: int
    body: Any
    via: str


@dataclass
class AgentAccess:
    """Reaches registered agents directly or through their pods; one per CLI invocation."""

    mode: str = "auto"
    namespace: str = DEFAULT_NAMESPACE
    kubectl: str = ""
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        self._pods: dict[str, str] | None = None

    @classmethod
    def from_args(cls, args: Any, timeout_s: float = 10.0) -> AgentAccess:
        mode = getattr(args, "agent_access", None) or os.environ.get("CILIARY_AGENT_ACCESS") or "auto"
        if mode not in MODES:
            raise ValueError(f"agent access {mode!r}: expected one of {', '.join(MODES)}")
        namespace = (getattr(args, "agent_namespace", None) or os.environ.get("CILIARY_AGENT_NAMESPACE")
                     or DEFAULT_NAMESPACE)
        return cls(mode, namespace, os.environ.get("CILIARY_KUBECTL") or shutil.which("kubectl") or "", timeout_s)

    # --- one-shot GET --------------------------------------------------------------------------------
    async def get_json(self, session: aiohttp.ClientSession, node: str, address: str | None, path: str,
                       params: Mapping[str, str] | None = None) -> Answer:
        """GET ``path`` from node's agent; the JSON answer is checked to name ``node``."""
        if address is None:
            raise AgentUnreachableError(node, "no agent is registered for the node (is it running?)")
        errors: list[str] = []
        for way in self._ways(address):
            try:
                if way == "direct":
                    answer = await self._direct_json(session, node, address, path, params)
                else:
                    answer = await self._exec_json(node, address, path, params)
            except AgentUnreachableError as exc:
                errors.append(str(exc))
                continue
            if not isinstance(answer.body, dict):
                errors.append(f"the agent {answer.via} sent no JSON object")
                continue
            try:
                check_node(node, answer.body, answer.via)
            except WrongAgentError as exc:
                errors.append(str(exc))
                continue
            return answer
        raise AgentUnreachableError(node, self._explain(node, address, errors))

    async def _direct_json(self, session: aiohttp.ClientSession, node: str, address: str, path: str,
                           params: Mapping[str, str] | None) -> Answer:
        via = f"at http://{address}"
        try:
            async with session.get(f"http://{address}{path}", params=params) as resp:
                return Answer(resp.status, await resp.json(content_type=None), via)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise AgentUnreachableError(node, f"the agent {via} did not answer: {exc or type(exc).__name__}") from exc

    async def _exec_json(self, node: str, address: str, path: str, params: Mapping[str, str] | None) -> Answer:
        lines = [item async for item in self._exec_lines(node, address, path, params, self.timeout_s)]
        via = lines[0][0]
        try:
            status = int(lines[0][1])
            return Answer(status, json.loads(b"".join(line for _v, line in lines[1:]) or b"null"), via)
        except ValueError as exc:
            raise AgentUnreachableError(node, f"the agent {via} sent an unreadable answer: {exc}") from exc

    # --- streaming (flows) ------------------------------------------------------------------------
    async def stream_lines(self, session: aiohttp.ClientSession, node: str, address: str, path: str,
                           params: Mapping[str, str], *, follow: bool) -> AsyncGenerator[tuple[str, bytes], None]:
        """(via, line) of a 200 answer, line by line; the caller checks each record's node.

        ``auto`` picks the way with a one-shot probe of ``/v1/flows/stats`` (checked to name ``node``)."""
        via = (await self.get_json(session, node, address, "/v1/flows/stats")).via
        if via.startswith("at "):
            try:
                async with session.get(f"http://{address}{path}", params=params) as resp:
                    if resp.status != 200:
                        raise AgentUnreachableError(node, f"the agent {via} answered {resp.status}: "
                                                          f"{(await resp.text()).strip()}")
                    async for line in resp.content:
                        yield via, line
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise AgentUnreachableError(node, f"the agent {via} did not answer: {exc}") from exc
            return
        first = True
        async for got_via, line in self._exec_lines(node, address, path, params, 0 if follow else self.timeout_s):
            if first:
                first = False
                if line.strip() != b"200":
                    raise AgentUnreachableError(node, f"the agent {got_via} answered {line.strip()!r}")
                continue
            yield got_via, line

    # --- kubectl exec ------------------------------------------------------------------------------
    async def _exec_lines(self, node: str, address: str, path: str, params: Mapping[str, str] | None,
                          timeout_s: float) -> AsyncIterator[tuple[str, bytes]]:
        """Lines the fetch script prints in node's agent pod: the status first, then the body."""
        pod = await self.agent_pod(node)
        via = f"in pod {self.namespace}/{pod} on node {node} (kubectl exec, {address})"
        query = f"?{urlencode(dict(params))}" if params else ""
        try:
            proc = await asyncio.create_subprocess_exec(
                self.kubectl, "exec", "-n", self.namespace, pod, "-c", AGENT_CONTAINER, "--", "python3", "-c",
                _FETCH, address, path + query, str(timeout_s),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise AgentUnreachableError(node, f"could not run {self.kubectl!r}: {exc}") from exc
        assert proc.stdout is not None and proc.stderr is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s + 20 if timeout_s else None
        got_any = False
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    line = await asyncio.wait_for(proc.stdout.readline(), left)
                except TimeoutError as exc:
                    raise AgentUnreachableError(node, f"the agent {via} did not answer in "
                                                      f"{timeout_s:.0f} s") from exc
                if not line:
                    break
                got_any = True
                yield via, line
            err = (await asyncio.wait_for(proc.stderr.read(), 10)).decode(errors="replace").strip()
            rc = await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if rc != 0 or not got_any:
            raise AgentUnreachableError(node, f"the agent {via} did not answer: {err[-300:] or f'exit {rc}'}")

    async def agent_pod(self, node: str) -> str:
        """The Running agent pod on ``node`` (one ``kubectl get pods`` per invocation)."""
        if not self.kubectl:
            raise AgentUnreachableError(node, "kubectl not found (install it or set CILIARY_KUBECTL) to reach "
                                              "the agent through its pod")
        if self._pods is None:
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.kubectl, "get", "pods", "-n", self.namespace, "-l", AGENT_SELECTOR, "-o", "json",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            except OSError as exc:
                raise AgentUnreachableError(node, f"could not run {self.kubectl!r} (CILIARY_KUBECTL): {exc}") from exc
            try:
                out, err = await asyncio.wait_for(proc.communicate(), 30)
            except TimeoutError as exc:
                proc.kill()
                raise AgentUnreachableError(node, "kubectl get pods did not answer in 30 s") from exc
            if proc.returncode != 0:
                raise AgentUnreachableError(node, f"kubectl could not list the agent pods in {self.namespace!r}: "
                                                  f"{err.decode(errors='replace').strip()[-300:]}")
            try:
                self._pods = agent_pods_by_node(json.loads(out))
            except (ValueError, KeyError, AttributeError) as exc:
                raise AgentUnreachableError(node, f"kubectl's pod list was not understood: {exc}") from exc
        pod = self._pods.get(node)
        if pod == AMBIGUOUS:
            raise AgentUnreachableError(node, f"more than one Running agent pod ({AGENT_SELECTOR}, owned by a "
                                              f"DaemonSet) on node {node!r} in namespace {self.namespace!r}: "
                                              "refusing to pick one")
        if pod is None:
            raise AgentUnreachableError(node, f"no Running agent pod ({AGENT_SELECTOR}) on node {node!r} in "
                                              f"namespace {self.namespace!r} (--agent-namespace)")
        return pod

    # --- choosing and explaining -------------------------------------------------------------------
    def _ways(self, address: str) -> tuple[str, ...]:
        if self.mode == "auto":
            return ("direct", "exec") if is_loopback(address) else ("direct",)
        return (self.mode,)

    def _explain(self, node: str, address: str, errors: list[str]) -> str:
        tried = "; then ".join(errors)
        if self.mode == "direct" and is_loopback(address):
            return f"{tried}. {loopback_hint(node, address)}"
        return tried


AMBIGUOUS = "\0ambiguous"
"""What :func:`agent_pods_by_node` gives a node with more than one candidate pod (the CLI then refuses)."""


def agent_pods_by_node(pod_list: Mapping[str, Any]) -> dict[str, str]:
    """node -> the name of its Running agent pod owned by a DaemonSet, from a ``kubectl get pods -o json`` list;
    :data:`AMBIGUOUS` for a node with several (another release, or a look-alike pod: never guessed)."""
    out: dict[str, str] = {}
    for pod in pod_list.get("items", []):
        node = pod.get("spec", {}).get("nodeName")
        owners = pod["metadata"].get("ownerReferences") or []
        if not node or pod.get("status", {}).get("phase") != "Running" or pod["metadata"].get("deletionTimestamp") \
                or not any(o.get("kind") == "DaemonSet" and o.get("controller") for o in owners):
            continue
        out[node] = AMBIGUOUS if node in out else pod["metadata"]["name"]
    return out


def add_arguments(parser: Any) -> None:
    parser.add_argument("--agent-access", choices=MODES, default=None,
                        help="how to reach each node's agent: direct (its registered address), exec (kubectl exec "
                             "into its agent pod) or auto (direct, then exec for a loopback address another node's "
                             "agent holds; default, or CILIARY_AGENT_ACCESS)")
    parser.add_argument("--agent-namespace", default=None,
                        help="namespace of the agent pods for --agent-access exec (default: CILIARY_AGENT_NAMESPACE "
                             f"or {DEFAULT_NAMESPACE})")
