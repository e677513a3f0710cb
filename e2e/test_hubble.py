"""The real ``hubble`` CLI (built from github.com/cilium/cilium, setup/build-hubble.sh) against the lab's
relay (``HUBBLE_SERVER`` of ``ciliary lab env``) and the agents' Observer APIs; a real Prometheus (Debian's)
scraping every agent's and the operator's metrics.

The Star Wars scene: deathstar and xwing on node-1, tiefighter on node-2, Cilium's ``rule1``
(only org=empire into the deathstar on 80/TCP). xwing's connections are dropped at the deathstar's
ingress; tiefighter's are forwarded, allowed by rule1.

Runs on the real-node lab: Ciliary installed by its chart. The relay is the chart's (the ``hubble-relay``
Service, a container of the operator pod), which the lab forwards to a loopback port of this shell
(``HUBBLE_SERVER``). The metrics are the chart's node-local listeners (host network): each agent's
``agent.healthAddr`` (``/metrics``) and the operator's ``operator.prometheusServeAddr``, read inside the
node's network namespace; Prometheus, run in this shell, scrapes them through a loopback forward per node
(``LabHandle.scrape_targets``).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ciliary.lab import demo
from lab_harness import LabHandle, ScrapeTargets

pytestmark = pytest.mark.e2e
#: real nodes: the real hubble CLI against the chart's relay (the hubble-relay Service the lab forwards to
#: HUBBLE_SERVER), and a real Prometheus scraping the chart's agents' and operator's node-local metrics
#: listeners (LabHandle.relay_address, agent_metrics, scrape_targets)
REAL_NODES = True

ROOT = Path(__file__).resolve().parents[1]
STAR_WARS = ("deathstar", "tiefighter", "xwing")
PODS = demo.real_manifest()  # the demo's Star Wars scene, the one `make demo` shows


def delete_scene(lab: LabHandle) -> None:
    lab.kubectl("delete", "pod", *STAR_WARS, "-n", "default", "--ignore-not-found", "--wait=true",
                "--timeout=60s", check=False)


@pytest.fixture(scope="module")
def scene(lab: LabHandle, tool: Any) -> Any:
    hubble = str(tool("hubble"))
    began = time.time()  # flows of other tests of the session (other placements) are older
    delete_scene(lab)  # another test of the session may have placed the same pods elsewhere
    lab.apply(PODS)
    deathstar = lab.wait_running("deathstar")["status"]["podIP"]
    lab.wait_running("tiefighter")
    lab.wait_running("xwing")
    lab.kubectl("apply", "-f", str(ROOT / "crds" / "examples" / "starwars-rule1.yaml"))
    lab.kubectl("wait", "--for=condition=Enforced", "--timeout=90s", "cnp/rule1")
    deadline = time.monotonic() + 60
    while lab.probe("http", deathstar, 80, pod="xwing", timeout=1.5).returncode == 0:  # enforced in the kernel
        assert time.monotonic() < deadline, "rule1 not enforced after 60 s"
        time.sleep(0.5)
    assert lab.probe("http", deathstar, 80, pod="tiefighter", timeout=3).returncode == 0
    server = lab.relay_address()
    try:
        yield hubble, server, deathstar, rfc3339(began)
    finally:
        delete_scene(lab)


def rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1e9):09d}Z"


def hubble_run(hubble: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([hubble, *args], capture_output=True, text=True, timeout=timeout)


def observe(hubble: str, server: str, *args: str) -> list[dict[str, Any]]:
    out = hubble_run(hubble, "observe", "--server", server, "-o", "json", *args)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def flows_of(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line["flow"] for line in lines if "flow" in line]


def test_env_exports_the_relay_and_the_cli(lab: LabHandle, scene: Any) -> None:
    hubble, server, _, since = scene
    script = "\n".join([*lab.lab.env_lines(), 'echo "$HUBBLE_SERVER"', "command -v hubble"])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == [server, hubble], out.stdout + out.stderr
    # no --server: the CLI takes HUBBLE_SERVER from the environment `ciliary lab env` prints
    script = "\n".join([*lab.lab.env_lines(), "hubble observe --pod default/deathstar --last 1 -o json"])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and '"deathstar"' in out.stdout, out.stdout + out.stderr


def test_observe_pod_dropped_json(lab: LabHandle, scene: Any) -> None:
    hubble, server, deathstar, since = scene
    lab.probe("http", deathstar, 80, pod="xwing", timeout=1)
    flows = flows_of(observe(hubble, server, "--pod", "default/deathstar", "--verdict", "DROPPED", "--since", since))
    assert flows, "no dropped flow for default/deathstar"
    print("\n$ hubble observe --pod default/deathstar --verdict DROPPED -o json  # one line\n" + json.dumps(flows[-1]))
    for flow in flows:
        assert flow["verdict"] == "DROPPED" and flow["drop_reason_desc"] == "POLICY_DENIED", flow
        assert flow["destination"]["pod_name"] == "deathstar" and flow["destination"]["namespace"] == "default"
        assert flow["source"]["pod_name"] == "xwing" and "k8s:org=alliance" in flow["source"]["labels"]
        assert flow["traffic_direction"] == "INGRESS" and flow["node_name"] == "node-1"
        assert flow["l4"]["TCP"]["destination_port"] == 80 and flow["is_reply"] is False
        assert flow["event_type"]["type"] == 1 and flow["Type"] == "L3_L4"
        assert flow["source"]["identity"] > 0 and flow["destination"]["identity"] > 0


def test_observe_forwarded_names_the_allowing_policy(lab: LabHandle, scene: Any) -> None:
    hubble, server, deathstar, since = scene
    assert lab.probe("http", deathstar, 80, pod="tiefighter", timeout=3).returncode == 0
    flows = flows_of(observe(hubble, server, "--to-pod", "default/deathstar", "--verdict", "FORWARDED",
                             "--from-label", "org=empire", "--since", since))
    syns = [f for f in flows if f["l4"]["TCP"]["flags"].get("SYN") and not f["l4"]["TCP"]["flags"].get("ACK")]
    assert syns, flows
    for flow in syns:
        assert [p["name"] for p in flow["ingress_allowed_by"]] == ["rule1"], flow
        assert flow["ingress_allowed_by"][0]["namespace"] == "default"
        # tiefighter runs on node-2: node-1 knows its identity and labels, not its pod name
        assert "pod_name" not in flow["source"] and "k8s:class=tiefighter" in flow["source"]["labels"]


def test_observe_namespace_to_port_and_since(lab: LabHandle, scene: Any) -> None:
    hubble, server, deathstar, _ = scene
    time.sleep(1.1)
    since = time.time()
    time.sleep(0.1)
    lab.probe("http", deathstar, 80, pod="xwing", timeout=1)
    recent = flows_of(observe(hubble, server, "--since", rfc3339(since), "--pod", "default/xwing"))
    assert recent, "nothing since the last probe"
    for flow in recent:
        sec, frac = flow["time"].rstrip("Z").split(".")
        assert time.mktime(time.strptime(sec, "%Y-%m-%dT%H:%M:%S")) - time.timezone + float("0." + frac) >= since
    in_default = flows_of(observe(hubble, server, "--namespace", "default", "--last", "100"))
    assert in_default and all("default" in (f["source"].get("namespace"), f["destination"].get("namespace"))
                              for f in in_default)
    to_80 = flows_of(observe(hubble, server, "--to-port", "80", "--last", "100"))
    assert to_80 and all(f["l4"]["TCP"]["destination_port"] == 80 for f in to_80)
    assert not flows_of(observe(hubble, server, "--to-port", "81", "--last", "100"))


def test_observe_follow_streams_new_drops(lab: LabHandle, scene: Any) -> None:
    hubble, server, deathstar, since = scene
    proc = subprocess.Popen([hubble, "observe", "--server", server, "-o", "json", "--follow", "--pod",
                             "default/xwing", "--verdict", "DROPPED", "--since", "1s"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # the stream is open
        lab.probe("http", deathstar, 80, pod="xwing", timeout=1)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "no flow streamed within 20 s"
        flow = json.loads(proc.stdout.readline())["flow"]
        assert flow["verdict"] == "DROPPED" and flow["source"]["pod_name"] == "xwing"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_status_and_list_nodes(scene: Any) -> None:
    hubble, server, _, since = scene
    status = hubble_run(hubble, "status", "--server", server)
    assert status.returncode == 0, status.stderr
    assert "Healthcheck (via " in status.stdout and "Ok" in status.stdout
    assert "Connected Nodes: 2/2" in status.stdout and "Current/Max Flows:" in status.stdout
    nodes = hubble_run(hubble, "list", "nodes", "--server", server)
    assert nodes.returncode == 0, nodes.stderr
    rows = [line.split() for line in nodes.stdout.splitlines()[1:] if line.strip()]
    assert [(r[0], r[1]) for r in rows] == [("node-1", "Connected"), ("node-2", "Connected")], nodes.stdout
    version = hubble_run(hubble, "version")
    assert version.returncode == 0 and version.stdout.startswith("hubble v1."), version.stdout  # built with -X


def test_malformed_filter_is_invalid_argument_and_the_relay_keeps_serving(scene: Any) -> None:
    hubble, server, _, since = scene
    # the CLI passes these through unchecked (--print-raw-filters shows them): the server refuses them
    for flag, value, field in (("--to-port", "not-a-port", "destination_port"), ("--protocol", "tcpp", "protocol"),
                               ("--to-label", "org=((", "destination_label")):
        bad = hubble_run(hubble, "observe", "--server", server, flag, value)
        assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and field in bad.stderr, bad.stderr
    assert hubble_run(hubble, "status", "--server", server).returncode == 0


def test_compact_output_and_agent_metrics(lab: LabHandle, scene: Any) -> None:
    hubble, server, deathstar, since = scene
    lab.probe("http", deathstar, 80, pod="xwing", timeout=1)
    out = hubble_run(hubble, "observe", "--server", server, "--pod", "default/deathstar", "--last", "6",
                     "--since", since)
    assert out.returncode == 0, out.stderr
    print("\n$ hubble observe --pod default/deathstar --last 6\n" + out.stdout)
    drops = [line for line in out.stdout.splitlines() if "DROPPED" in line]
    assert drops and all("default/xwing:" in line and "default/deathstar:80" in line and "Policy denied" in line
                         and "TCP Flags: SYN" in line for line in drops), out.stdout
    for args in (("status",), ("list", "nodes")):
        shown = hubble_run(hubble, *args, "--server", server)
        print(f"$ hubble {' '.join(args)}\n{shown.stdout}")
    # the node-1 agent counts the drops under Hubble's metric names
    metrics = lab.agent_metrics("node-1")
    drop_lines = [line for line in metrics.splitlines()
                  if line.startswith('hubble_drop_total{') and 'reason="POLICY_DENIED"' in line]
    assert drop_lines and float(drop_lines[0].rsplit(" ", 1)[1]) > 0, metrics
    # the same drops as policy verdicts of the default deny, and tiefighter's allowed request by port
    verdicts = [line for line in metrics.splitlines() if line.startswith("hubble_policy_verdicts_total{")
                and 'direction="ingress"' in line and 'match="none"' in line and 'action="dropped"' in line]
    assert verdicts and float(verdicts[0].rsplit(" ", 1)[1]) > 0, metrics
    # tiefighter's request was allowed by rule1's entry naming its identity and port 80: Hubble's "l3-l4"
    allowed = [line for line in metrics.splitlines() if line.startswith("hubble_policy_verdicts_total{")
               and 'direction="ingress"' in line and 'match="l3-l4"' in line and 'action="forwarded"' in line]
    assert allowed and float(allowed[0].rsplit(" ", 1)[1]) > 0, metrics
    ports = [line for line in metrics.splitlines() if line.startswith("hubble_port_distribution_total{")
             and 'port="80"' in line and 'protocol="TCP"' in line]
    assert ports and float(ports[0].rsplit(" ", 1)[1]) > 0, metrics


def test_prometheus_scrapes_the_agents_and_the_operator(lab: LabHandle, scene: Any, tool: Any,
                                                       tmp_path: Path) -> None:
    """A real Prometheus (Debian's) scrapes every agent's /metrics and the operator's; the drops of the
    scene are there, and the operator's reconcile passes, status writes and rule1 as a valid policy."""
    _, _, deathstar, _ = scene
    lab.probe("http", deathstar, 80, pod="xwing", timeout=1)
    with lab.scrape_targets(("node-1", "node-2")) as scrape:
        prometheus_checks(lab, scrape, tool, tmp_path)


def prometheus_checks(lab: LabHandle, scrape: ScrapeTargets, tool: Any, tmp_path: Path) -> None:
    operator = scrape.operator
    targets = list(scrape.agents.values())
    (tmp_path / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "ciliary-agents", "static_configs": [{"targets": targets}]},
                           {"job_name": "ciliary-operator", "static_configs": [{"targets": [operator]}]}]}))
    port = socket_port()
    proc = subprocess.Popen([str(tool("prometheus")), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        promql = urllib.parse.quote('sum by (instance) (hubble_drop_total{reason="POLICY_DENIED"})')
        query = f"http://127.0.0.1:{port}/api/v1/query?query={promql}"
        # deathstar's node (node-1) counts the drops; wait for its series, not for the first instance
        # Prometheus happens to scrape (it scrapes the two targets independently)
        wanted = scrape.agents[lab.pod("deathstar")["spec"]["nodeName"]]
        by_instance: dict[str, float] = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(query, timeout=5) as r:
                    result = json.loads(r.read())["data"]["result"]
                by_instance = {row["metric"]["instance"]: float(row["value"][1]) for row in result}
            except OSError:
                by_instance = {}
            if by_instance.get(wanted, 0) > 0:
                break
            time.sleep(1)
        assert by_instance.get(wanted, 0) > 0, f"no POLICY_DENIED drops from {wanted} after 90 s: {by_instance}"
        up = f"http://127.0.0.1:{port}/api/v1/query?query=up"
        ups: dict[str, str] = {}
        for _ in range(30):  # every target scraped and up (each on its own schedule)
            with urllib.request.urlopen(up, timeout=5) as r:
                ups = {row["metric"]["instance"]: row["value"][1] for row in json.loads(r.read())["data"]["result"]}
            if ups == dict.fromkeys([*targets, operator], "1"):
                break
            time.sleep(1)
        assert ups == dict.fromkeys([*targets, operator], "1"), ups

        def value(expression: str) -> float:
            url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expression)}"
            with urllib.request.urlopen(url, timeout=5) as r:
                result = json.loads(r.read())["data"]["result"]
            assert len(result) == 1, (expression, result)
            return float(result[0]["value"][1])

        job = '{job="ciliary-operator"}'
        assert value('cilium_operator_reconcile_runs_total{job="ciliary-operator",loop="policy"}') >= 1
        assert value('cilium_operator_reconcile_duration_seconds_count{job="ciliary-operator",loop="policy"}') >= 1
        assert value(f'sum(cilium_operator_intents_written_total{job})') >= 1
        assert value('cilium_operator_status_handover_writes_total{job="ciliary-operator",outcome="success"}') >= 1
        assert value('cilium_operator_policies{kind="CiliumNetworkPolicy",valid="true"}') >= 1  # rule1
        assert value(f'cilium_policy{job}') >= 1 and value(f'cilium_identity{job}') >= 3
        assert value(f'cilium_nodes_all_num{job}') == 2
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def socket_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_more_filters_through_the_cli(lab: LabHandle, scene: Any) -> None:
    hubble, server, deathstar, since = scene
    lab.probe("http", deathstar, 80, pod="xwing", timeout=1)
    drops = flows_of(observe(hubble, server, "--type", "drop", "--node-name", "node-1", "--traffic-direction",
                             "ingress", "--tcp-flags", "SYN", "--from-label", "org=alliance", "--since", since))
    assert drops and all(f["verdict"] == "DROPPED" and f["node_name"] == "node-1" for f in drops)
    identity = drops[0]["destination"]["identity"]
    by_identity = flows_of(observe(hubble, server, "--to-identity", str(identity), "--last", "50"))
    assert by_identity and all(f["destination"]["identity"] == identity for f in by_identity)
    traces = flows_of(observe(hubble, server, "--type", "trace:from-endpoint", "--from-pod", "default/xwing",
                              "--last", "50"))
    assert traces and all(f["verdict"] == "FORWARDED" and f["traffic_direction"] == "EGRESS" for f in traces)
    assert not flows_of(observe(hubble, server, "--node-name", "node-9", "--last", "50"))
    # a blacklist: everything to the deathstar except the drops
    rest = flows_of(observe(hubble, server, "--to-pod", "default/deathstar", "--not", "--verdict", "DROPPED",
                            "--last", "50"))
    assert all(f["verdict"] != "DROPPED" for f in rest)


SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: deathstar-svc, namespace: default}
spec:
  selector: {org: empire, class: deathstar}
  ports: [{port: 8080, targetPort: 80}]
"""


def probe_as_pod(lab: LabHandle, pod: str, ip: str, port: int, timeout: float) -> int:
    """``ciliary.lab.probe http`` in the pod's network namespace *and cgroup* (where the socket load balancer's
    programs are attached, as for the pod's own processes); its return code (0: answered)."""
    netns, cgroup = lab.lab.pod_target(pod, "default")
    assert cgroup is not None, "every pod has a cgroup v2 group (the socket programs' attach point)"

    def enter() -> None:  # between fork and exec
        with open(cgroup / "cgroup.procs", "w") as procs:
            procs.write(str(os.getpid()))

    argv = ["nsenter", f"--net={netns}", sys.executable, "-m", "ciliary.lab.probe", "http", ip, str(port),
            "--timeout", str(timeout)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, preexec_fn=enter).returncode


def test_flows_through_a_service_name_it(lab: LabHandle, scene: Any) -> None:
    """A pod's connection to a ClusterIP: its flows on the client's node name the Service (the real CLI's
    ``--to-service`` / ``--from-service``), from tiefighter on node-2 (allowed) and xwing on node-1 (dropped at
    the deathstar's ingress, forwarded at its own egress); the deathstar's address and port, not the frontend's,
    stay the flow's destination; connections straight to the pod's address name no Service."""
    hubble, server, deathstar, _ = scene
    if lab.kubectl("get", "service", "deathstar-svc", "--ignore-not-found", "-o", "name").stdout.strip():
        lab.kubectl("delete", "service", "deathstar-svc", "--wait=true")
    lab.apply(SERVICE)
    try:
        cluster_ip = lab.kubectl("get", "service", "deathstar-svc", "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
        deadline = time.monotonic() + 30
        while probe_as_pod(lab, "tiefighter", cluster_ip, 8080, 2) != 0:
            assert time.monotonic() < deadline, "deathstar-svc not answering from tiefighter after 30 s"
            time.sleep(0.5)
        since = rfc3339(time.time() - 0.2)
        assert probe_as_pod(lab, "tiefighter", cluster_ip, 8080, 3) == 0
        assert probe_as_pod(lab, "tiefighter", deathstar, 80, 3) == 0  # straight to the pod
        assert probe_as_pod(lab, "xwing", cluster_ip, 8080, 1) != 0  # rule1 drops it
        time.sleep(1)
        named = flows_of(observe(hubble, server, "--to-service", "default/deathstar-svc", "--since", since))
        print("\n$ hubble observe --to-service default/deathstar-svc -o json  # one line\n" + json.dumps(named[-1]))
        clients = {f["source"].get("pod_name") for f in named}
        assert clients == {"tiefighter", "xwing"}, named
        for flow in named:
            assert flow["destination_service"] == {"name": "deathstar-svc", "namespace": "default"}, flow
            assert flow["IP"]["destination"] == deathstar and flow["l4"]["TCP"]["destination_port"] == 80, flow
            assert flow["traffic_direction"] == "EGRESS" and flow["is_reply"] is False, flow
            node = "node-2" if flow["source"]["pod_name"] == "tiefighter" else "node-1"
            assert flow["node_name"] == node, flow
        replies = flows_of(observe(hubble, server, "--from-service", "default/deathstar-svc", "--since", since))
        assert replies and all(f["is_reply"] is True and f["source_service"]["name"] == "deathstar-svc"
                               and f["destination"]["pod_name"] == "tiefighter" for f in replies), replies
        direct = flows_of(observe(hubble, server, "--from-pod", "default/tiefighter", "--to-ip", deathstar,
                                  "--since", since))
        plain = [f for f in direct if "destination_service" not in f]
        assert plain and len(plain) < len(direct), direct  # the straight connection's flows, beside the Service's
        assert not flows_of(observe(hubble, server, "--to-service", "default/xwing", "--since", since))
    finally:
        lab.kubectl("delete", "service", "deathstar-svc", "--ignore-not-found", "--wait=true", check=False)
