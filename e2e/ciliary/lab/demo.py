"""``make demo``: a lab of real kubelets, Ciliary installed by its Helm chart, and the Star Wars scene.

The lab is ``ciliary lab up --real-nodes``: containerd and a kubelet per node, then ``helm install`` of
both charts with the images the set-up built without docker. deathstar (org=empire, class=deathstar,
TCP 80) and xwing (org=alliance) on node-1, tiefighter (org=empire) on node-2, all three the lab app
image (``docker.io/lab/app``). Without a policy both ships land; with Cilium's L3/L4 ``rule1`` (only
org=empire into the deathstar on 80/TCP) the tiefighter lands, the xwing times out, and the policy's
status shows where it is enforced. Every step prints the command a user would type to do the same.
``ciliary observe`` shows the drop and ``ciliary policy trace`` explains both verdicts: on real nodes after
``eval $(ciliary lab env)``, which points the CLI at the chart's etcd (forwarded to a root-namespace port by
the lab's service forward; the operator's client certificate from the chart's Secret) and lets it reach each
node's agent through its pod (``kubectl exec``).
Then the L7 step (Cilium's ``sw_l3_l4_l7_policy``): ``rule1`` gains an HTTP rule, enforced by
node-1's Envoy: the tiefighter's ``POST /v1/request-landing`` lands, its ``PUT /v1/exhaust-port`` gets
``403 Access denied``, and both requests show as L7 flows, read by the real ``hubble`` CLI from the chart's
relay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ciliary.lab import reallab, tools
from ciliary.lab.lab import Lab, LabError


def real_manifest() -> str:
    """The same scene for real kubelets: the lab app image serving what each pod declares."""
    docs = []
    for name, node, labels, ports in (("deathstar", "node-1", "{org: empire, class: deathstar}", [80]),
                                      ("tiefighter", "node-2", "{org: empire, class: tiefighter}", []),
                                      ("xwing", "node-1", "{org: alliance, class: xwing}", [])):
        args = ", ".join(['"--name"', f'"default/{name}"', *(f'"--tcp", "{p}"' for p in ports)])
        declared = f", ports: [{{containerPort: {ports[0]}, name: http}}]" if ports else ""
        docs.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {labels}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers: [{{name: {name}, image: docker.io/lab/app:latest, imagePullPolicy: Never, args: [{args}]{declared}}}]
""")
    return "---\n".join(docs)


POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1, namespace: default}
spec:
  description: L3-L4 policy to restrict deathstar access to empire ships only
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""

L7_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1, namespace: default}
spec:
  description: L7 policy to restrict access to specific HTTP call
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: POST, path: /v1/request-landing}]
"""

BOLD, DIM, GREEN, RED, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m"


def step(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def show(cmd: str) -> None:
    print(f"{DIM}$ {cmd}{RESET}", flush=True)


def wait_running(lab: Lab, names: list[str], seconds: float = 90) -> dict[str, dict[str, object]]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pods = json.loads(lab.kubectl("get", "pods", "-n", "default", "-o", "json").stdout)["items"]
        running = {p["metadata"]["name"]: p for p in pods if p["status"].get("phase") == "Running"}
        if set(names) <= set(running):
            return running
        time.sleep(0.5)
    raise LabError("demo pods did not become Running; see `ciliary lab status`")


def land(lab: Lab, ship: str, ip: str, method: str = "POST", path: str = "/v1/request-landing") -> bool:
    """Cilium's getting-started check: POST /v1/request-landing to the deathstar."""
    show(f"kubectl exec {ship} -- curl -s -X{method} deathstar.default.svc{path}   "
         f"# here: ciliary lab exec {ship} -- probe http {ip} 80 --method {method} --path {path}")
    code = lab.exec([sys.executable, "-m", "ciliary.lab.probe", "http", ip, "80", "--timeout", "3",
                     "--method", method, "--path", path], pod=ship, namespace="default", world=False)
    print(f"   {GREEN}Ship landed{RESET}" if code == 0 else f"   {RED}no answer: the request timed out{RESET}",
          flush=True)
    return code == 0


def ciliary(*args: str) -> str:
    show("ciliary " + " ".join(args))
    out = subprocess.run([sys.executable, "-m", "ciliary.cli.main", *args], capture_output=True, text=True,
                         timeout=60)
    text = (out.stdout + out.stderr).rstrip()
    print(text, flush=True)
    return text


def wait_enforced(lab: Lab, seconds: float = 60) -> None:
    show("kubectl wait --for=condition=Enforced cnp/rule1")
    done = lab.kubectl("wait", "--for=condition=Enforced", f"--timeout={int(seconds)}s", "cnp/rule1", check=False)
    print((done.stdout or done.stderr).strip(), flush=True)


def l7_step(lab: Lab, ip: str) -> bool:
    """rule1 with an HTTP rule: the deathstar's node's Envoy answers what the rule does not allow."""
    step("Apply an L7 policy: empire ships may only POST /v1/request-landing (enforced by node-1's Envoy)")
    show("kubectl apply -f sw_l3_l4_l7_policy.yaml")
    print(lab.kubectl("apply", "-f", "-", input=L7_POLICY).stdout.strip())
    wait_enforced(lab)
    ok = land(lab, "tiefighter", ip)
    show(f"ciliary lab exec tiefighter -- probe http {ip} 80 --method PUT --path /v1/exhaust-port")
    out = subprocess.run([sys.executable, "-m", "ciliary.cli.main", "lab", "exec", "tiefighter", "--",
                          sys.executable, "-m", "ciliary.lab.probe", "http", ip, "80", "--timeout", "3",
                          "--method", "PUT", "--path", "/v1/exhaust-port"], capture_output=True, text=True,
                         timeout=60)
    answer = out.stdout.strip()
    print(f"   {RED}{answer}{RESET}" if answer else f"   {RED}no answer{RESET}", flush=True)
    ok &= answer == "HTTP/1.1 403 Forbidden Access denied"
    step("Each request is an L7 flow: method, path, status and the deciding rule")
    deadline = time.monotonic() + 15
    text = ""
    while time.monotonic() < deadline:
        text = hubble_l7_lines(lab)
        if "PUT /v1/exhaust-port => 403" in text and "POST /v1/request-landing => 200" in text:
            break
        time.sleep(1)
    show("hubble observe --pod default/deathstar --last 500 -o json   # the L7 flows, through the chart's relay")
    print("\n".join(text.splitlines()[-2:]), flush=True)
    return ok and "PUT /v1/exhaust-port => 403" in text and "POST /v1/request-landing => 200" in text


def hubble_l7_lines(lab: Lab) -> str:
    """The deathstar's HTTP responses as ``METHOD PATH => CODE VERDICT``, read by the real hubble CLI from the
    chart's relay (forwarded to this shell by the real-node lab, as ``HUBBLE_SERVER``)."""
    out = subprocess.run([str(tools.built_path("hubble")), "observe", "--server", f"127.0.0.1:{lab.relay_port()}",
                          "--pod", "default/deathstar", "--last", "500", "-o", "json"],
                         capture_output=True, text=True, timeout=60)
    lines = []
    for line in out.stdout.splitlines():
        try:
            flow = json.loads(line)["flow"]
            http = flow["l7"]["http"]
        except (ValueError, KeyError, TypeError):
            continue
        if http.get("code"):
            path = "/" + str(http.get("url", "")).split("://", 1)[-1].partition("/")[2]
            lines.append(f"{http.get('method')} {path} => {http['code']} {flow.get('verdict', '')}")
    return "\n".join(lines)


def run() -> int:
    t0 = time.monotonic()
    lab = Lab.from_env()
    step("Bringing the lab up: control plane, 2 nodes with containerd and kubelet, Ciliary by its Helm chart")
    show("ciliary lab up --real-nodes --nodes 2")
    reallab.up_command(lab, 2)
    show("kubectl get pods -n kube-system -o wide")
    print(lab.kubectl("get", "pods", "-n", "kube-system", "-o", "wide").stdout.strip())
    step("A long time ago, in a container cluster far, far away... (Star Wars demo, as in Cilium's guide)")
    show("kubectl apply -f starwars.yaml")
    print(lab.kubectl("apply", "-f", "-", input=real_manifest()).stdout.strip())
    pods = wait_running(lab, ["deathstar", "tiefighter", "xwing"], 180)
    show("kubectl get pods -o wide")
    print(lab.kubectl("get", "pods", "-o", "wide", "-L", "org,class").stdout.strip())
    ip = str(pods["deathstar"]["status"]["podIP"])  # type: ignore[index]
    ok = True
    step("Without a policy every ship may land")
    ok &= land(lab, "tiefighter", ip)
    ok &= land(lab, "xwing", ip)
    step("Apply an L3/L4 policy: only org=empire may reach the deathstar, on TCP port 80")
    show("kubectl apply -f rule1.yaml")
    print(lab.kubectl("apply", "-f", "-", input=POLICY).stdout.strip())
    wait_enforced(lab)
    show("kubectl get cnp rule1")
    print(lab.kubectl("get", "cnp", "rule1").stdout.strip())
    step("The tiefighter (org=empire) lands; the xwing (org=alliance) times out")
    ok &= land(lab, "tiefighter", ip)
    ok &= not land(lab, "xwing", ip)
    step("The CLI reaches the chart's etcd (a forwarded port, mutual TLS) and each node's agent (its pod)")
    show("eval $(ciliary lab env)")
    os.environ.update(lab.env())
    step("Every verdict is a flow: the drop, seen by the deathstar's node")
    text = ciliary("observe", "--verdict", "DROPPED", "--pod", "default/deathstar", "--last", "3")
    ok &= "DROPPED" in text
    step("Why? The same entries the kernel holds, explained")
    text = ciliary("policy", "trace", "--src", "default/xwing", "--dst", "default/deathstar", "--dport", "80/tcp")
    ok &= text.startswith("DENIED")
    text = ciliary("policy", "trace", "--src", "default/tiefighter", "--dst", "default/deathstar", "--dport",
                   "80/tcp")
    ok &= text.startswith("ALLOWED")
    ok &= l7_step(lab, ip)
    step("Where the policy is enforced, per node, in its status")
    show("kubectl get cnp rule1 -o jsonpath='{.status}'")
    status = lab.kubectl("get", "cnp", "rule1", "-o", "json").stdout
    print(json.dumps(json.loads(status).get("status", {}), indent=2))
    print(f"\n{BOLD}Try it yourself:{RESET} eval $(ciliary lab env); kubectl get cnp; "
          "ciliary observe --follow; ciliary lab exec xwing -- curl -m 2 http://" + ip)
    print("Remove everything with: ciliary lab down")
    print(f"{DIM}demo: lab and scene in {time.monotonic() - t0:.0f} s{RESET}", flush=True)
    if not ok:
        print(f"{RED}demo: something did not behave as shown above{RESET}", file=sys.stderr)
    return 0 if ok else 1


def check_args(args: list[str]) -> None:
    """``--real-nodes`` (the only lab, kept for old scripts) or nothing; the process-lab demo is gone."""
    if "--process" in args:
        raise LabError("the process-lab demo is gone: `make demo` runs the scene on real kubelets")
    if [a for a in args if a != "--real-nodes"]:
        raise LabError(f"usage: python -m ciliary.lab.demo [--real-nodes] (got {' '.join(args)})")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        check_args(args)
        return run()
    except LabError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
