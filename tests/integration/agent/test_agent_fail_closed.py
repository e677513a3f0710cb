"""A real agent whose enforcement is broken for real: what its reports, /readyz and /healthz then say.

One private node (dp_topology: pods a, b, c; b serves TCP 8080), a real etcd that the
test stops and restarts, and a real agent with its datapath. Each test breaks one
thing in the kernel or around the agent and checks that nothing claims more than the
kernel does: an endpoint deleted from the pinned ``cy_endpoints`` map turns the
policy's report to not enforcing; an intent that cannot be applied makes the agent
unready; a stopped etcd (a dead intent watch) makes it unready at once and failing
/healthz after the grace; a program detached from a veth, or its pin removed, fails
/healthz. Everything created (etcd, netns, pins, processes) is removed afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("agent_enforce_it", Path(__file__).with_name("test_agent_enforce.py"))
assert _spec is not None and _spec.loader is not None
it = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(it)

from ciliary.nodeagent.datapath import libbpf, loading, maps  # noqa: E402
from ciliary.operator.store import keyspace  # noqa: E402

pytestmark = pytest.mark.integration
GRACE_S = 10.0  # health.WATCH_GRACE_S


class RestartableEtcd(it.Etcd):  # type: ignore[name-defined,misc]
    """The enforce test's TLS etcd, which this test can stop and start again on the same ports and data."""

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


def probe(agent: Any, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://{agent.health}{path}", timeout=3) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())
    except OSError:
        return 0, {}


@pytest.fixture(scope="module")
def env(tool: Any) -> Iterator[Any]:
    workdir = Path(tempfile.mkdtemp(prefix="cyt-failclosed-"))
    tool("ip")  # the pods' topology is built with iproute2
    etcd = RestartableEtcd(tool("etcd"))
    topo = it.Topology(pods=3)
    agent = None
    try:
        topo.up()
        topo.serve(topo.pods[1], [8080], [])
        agent = it.Agent(etcd, topo, workdir)
        agent.start()
        agent.register()
        yield it.Env(etcd, topo, agent)
    finally:
        if agent is not None:
            agent.kill()
            with contextlib.suppress(OSError):
                sys.stderr.write(agent.log_path.read_text()[-3000:])
            shutil.rmtree(agent.bpffs, ignore_errors=True)
        topo.down()
        with contextlib.suppress(Exception):
            etcd.close()
        shutil.rmtree(workdir, ignore_errors=True)


def enforced_and_ready(env: Any) -> int:
    revision = env.intent(it.allow_from(it.ID_A))
    env.wait_applied(revision)
    it.wait_until(lambda: (r := env.report()) and r[0]["ok"] and r[0]["enforcing"]
                  and r[0]["localPolicyRevision"] == revision, 15, "report enforcing")
    it.wait_until(lambda: probe(env.agent, "/readyz")[0] == 200, 15, "ready")
    assert probe(env.agent, "/healthz")[0] == 200
    return int(revision)


def test_endpoint_missing_from_the_kernel_map_is_not_enforcing(env: Any) -> None:
    revision = enforced_and_ready(env)
    state = env.agent.enforcement()
    assert state["kernel_endpoints"] == {p.ip: revision for p in env.topo.pods}  # read back from the kernel
    pin = env.agent.bpffs / "ciliary" / env.agent.node / "cy_endpoints"
    fd = loading.open_pinned(pin)
    try:
        key = maps.EndpointKeyC(maps.addr_to_u32(IPv4Address(env.b.ip)))
        assert libbpf.lib.bpf_map_delete_elem(fd, ctypes.byref(key)) == 0
    finally:
        os.close(fd)
    # b is no longer enforced by the kernel (its packets pass untouched): the report must say so
    report, _ = it.wait_until(lambda: (r := env.report()) and not r[0]["enforcing"] and r, 15,
                              "report not enforcing")
    assert report["ok"] and f"t/{env.b.name} ({env.b.ip})" in report["error"], report
    assert f"revision {revision}" in report["error"]
    assert env.cc.tcp(env.b.ip, 8080) == "ok"  # the kernel really passes it now: nothing was overstated
    # the next revision stamps every endpoint again: b is back, and so is the claim
    enforced_and_ready(env)
    assert env.cc.tcp(env.b.ip, 8080) == "timeout"
    assert not env.report()[0].get("error")


def test_an_intent_that_cannot_be_applied_makes_the_agent_unready(env: Any) -> None:
    revision = enforced_and_ready(env)
    env.etcd.put(keyspace.node_intent_key(env.agent.node),
                 json.dumps({"schema_version": 99, "node": env.agent.node, "revision": revision + 1}).encode())
    code, body = it.wait_until(lambda: (p := probe(env.agent, "/readyz"))[0] == 503 and p, 15, "unready")
    assert any("unknown schema version 99" in problem for problem in body["problems"]), body
    assert probe(env.agent, "/healthz")[0] == 200  # alive: the last good state keeps enforcing
    assert env.cc.tcp(env.b.ip, 8080) == "timeout"
    enforced_and_ready(env)


def test_a_stopped_etcd_makes_the_agent_unready_then_failing(env: Any) -> None:
    enforced_and_ready(env)
    env.etcd.stop()
    try:
        began = time.monotonic()
        code, body = it.wait_until(lambda: (p := probe(env.agent, "/readyz"))[0] == 503 and p, 15, "unready")
        assert "intent watch broken" in body["problems"] or "not registered in etcd" in body["problems"], body
        code, body = it.wait_until(lambda: (p := probe(env.agent, "/healthz"))[0] == 503 and p, GRACE_S + 20,
                                   "healthz failing")
        assert time.monotonic() - began >= GRACE_S - 1
        assert any(problem.startswith("intent watch broken for") for problem in body["problems"]), body
        assert env.cc.tcp(env.b.ip, 8080) == "timeout"  # the kernel keeps enforcing meanwhile
    finally:
        env.etcd.start()
    it.wait_until(lambda: probe(env.agent, "/healthz")[0] == 200, 30, "healthz back")
    enforced_and_ready(env)


def test_a_detached_program_fails_health_and_a_restart_reattaches_it(env: Any) -> None:
    enforced_and_ready(env)
    veth = env.b.host_ifname
    out = subprocess.run(["tc", "-n", env.topo.node_ns, "filter", "del", "dev", veth, "egress", "pref",
                          str(loading.TC_PRIO), "handle", hex(loading.TC_HANDLE), "bpf"],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    code, body = it.wait_until(lambda: (p := probe(env.agent, "/healthz"))[0] == 503 and p, 15, "healthz failing")
    assert f"datapath: cy_to_pod is not attached to {veth}" in body["problems"], body
    assert probe(env.agent, "/readyz")[0] == 503
    assert env.cc.tcp(env.b.ip, 8080) == "ok"  # really unenforced: that is why health fails
    # the remedy a liveness probe applies: a restarted agent observes the kernel and attaches again
    env.agent.kill()
    env.agent.start()
    it.wait_until(lambda: probe(env.agent, "/healthz")[0] == 200, 60, "healthz back after restart")
    enforced_and_ready(env)
    assert env.cc.tcp(env.b.ip, 8080) == "timeout"


def test_another_program_in_our_filter_s_place_fails_health_and_a_restart_puts_ours_back(env: Any) -> None:
    """Same kind, handle, prio and even name as our filter, but another program: the check compares
    the attached program's id with the loaded one, not just the filter's shape."""
    from bcc import BPF

    enforced_and_ready(env)
    veth = env.b.host_ifname
    impostor = BPF(text="#include <uapi/linux/pkt_cls.h>\nint pass_all(struct __sk_buff *skb) { return TC_ACT_OK; }")
    try:
        fn = impostor.load_func("pass_all", BPF.SCHED_CLS)
        loading.attach(env.topo.node_ns, env.b.host_ifindex, "to_pod", fn.fd, "cy_to_pod")
        code, body = it.wait_until(lambda: (p := probe(env.agent, "/healthz"))[0] == 503 and p, 15,
                                   "healthz failing")
        assert any(problem.startswith(f"datapath: {veth} runs program id ") and "not the loaded cy_to_pod" in problem
                   for problem in body["problems"]), body
        assert env.cc.tcp(env.b.ip, 8080) == "ok"  # really unenforced: that is why health fails
        env.agent.kill()
        env.agent.start()
        it.wait_until(lambda: probe(env.agent, "/healthz")[0] == 200, 60, "healthz back after restart")
        enforced_and_ready(env)
        assert env.cc.tcp(env.b.ip, 8080) == "timeout"
    finally:
        impostor.cleanup()


def test_an_unpinned_program_fails_health(env: Any) -> None:
    enforced_and_ready(env)
    pin_dir = env.agent.bpffs / "ciliary" / env.agent.node
    pinned = sorted(pin_dir.glob("prog_from_pod_*"))
    assert len(pinned) == 1
    pinned[0].unlink()
    code, body = it.wait_until(lambda: (p := probe(env.agent, "/healthz"))[0] == 503 and p, 15, "healthz failing")
    assert f"datapath: program pin {pinned[0].name} is gone" in body["problems"], body
    assert probe(env.agent, "/readyz")[0] == 503
