"""Cluster Services in a chart-mode lab: kube-proxy per node, and the apiserver and DNS as Services.

Ciliary's chart needs Services before any pod network exists (its agents reach the bundled etcd
through a ClusterIP Service, every in-cluster client reaches the apiserver through ``kubernetes``), so:

- kube-proxy (iptables mode, built from the Kubernetes wrapper module) runs in every node namespace,
  as user ``system:kube-proxy`` (bound to ``system:node-proxier`` by the apiserver's defaults), through
  the node's apiserver relay; its rules live in the node namespace only. Not in a lab up with
  ``--kube-proxy-replacement``: there the chart's agents serve every Service.
- ``default/kubernetes`` (10.96.0.1:443) and ``kube-system/kube-dns`` (10.96.0.10:53) get one static
  endpoint each, ``NODE_SERVICES_IP`` (a TEST-NET-2 address local to every node namespace): there the
  node gateway relays :443 to the apiserver on the root namespace's loopback
  (``ciliary.lab.nodegateway --service``), and the node's CoreDNS answers :53. The apiserver runs with
  ``--endpoint-reconciler-type=none`` so it does not publish 127.0.0.1 instead.
- CoreDNS (built from Go modules) per node namespace with the ``kubernetes`` plugin, reading Services and
  EndpointSlices as ``system:lab-coredns`` (list and watch only, ClusterRole below).

None of these addresses exists in the root namespace; they vanish with the node namespaces.
"""

from __future__ import annotations

from pathlib import Path

from ciliary.lab import pki, processes, topology
from ciliary.lab.kubeconfigs import write_kubeconfig
from ciliary.lab.layout import WORLD_IP, LabLayout, node_index, node_ip
from ciliary.lab.nodeconfig import APISERVER_RELAY_PORT, CLUSTER_DNS_IP, NODE_SERVICES_IP

COREDNS_USER = "system:lab-coredns"
SERVICE_CIDR = "10.96.0.0/16"  # as the control plane's --service-cluster-ip-range
SKIP_MIRROR = "endpointslice.kubernetes.io/skip-mirror"
SERVICES = f"""
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {{k8s-app: kube-dns, kubernetes.io/name: CoreDNS}}
spec:
  clusterIP: {CLUSTER_DNS_IP}
  ports:
  - {{name: dns, port: 53, protocol: UDP}}
  - {{name: dns-tcp, port: 53, protocol: TCP}}
---
apiVersion: v1
kind: Endpoints
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {{"{SKIP_MIRROR}": "true"}}
subsets:
- addresses: [{{ip: {NODE_SERVICES_IP}}}]
  ports:
  - {{name: dns, port: 53, protocol: UDP}}
  - {{name: dns-tcp, port: 53, protocol: TCP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-lab
  namespace: kube-system
  labels: {{kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: lab.ciliary.io}}
addressType: IPv4
endpoints:
- addresses: [{NODE_SERVICES_IP}]
  conditions: {{ready: true}}
ports:
- {{name: dns, port: 53, protocol: UDP}}
- {{name: dns-tcp, port: 53, protocol: TCP}}
---
apiVersion: v1
kind: Endpoints
metadata:
  name: kubernetes
  namespace: default
  labels: {{"{SKIP_MIRROR}": "true"}}
subsets:
- addresses: [{{ip: {NODE_SERVICES_IP}}}]
  ports: [{{name: https, port: 443, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels: {{kubernetes.io/service-name: kubernetes, endpointslice.kubernetes.io/managed-by: lab.ciliary.io}}
addressType: IPv4
endpoints:
- addresses: [{NODE_SERVICES_IP}]
  conditions: {{ready: true}}
ports:
- {{name: https, port: 443, protocol: TCP}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "lab:coredns"}}
rules:
- apiGroups: [""]
  resources: [services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "lab:coredns"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "lab:coredns"}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: "{COREDNS_USER}"}}
"""


class DnsStartError(RuntimeError):
    """A node's CoreDNS did not come up; carries the node."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"{node}: {message}")
        self.node = node


def add_service_address(netns: str) -> None:
    """``NODE_SERVICES_IP``, local to the node namespace, and a route for the service CIDR (idempotent).

    The route lets the node's own clients (host-network pods) connect to a ClusterIP at all: a locally
    made packet is routed before kube-proxy's DNAT (and re-routed after it), and a node namespace has no
    default route. Pods' packets are translated on arrival, before routing. The route goes through the
    world host, as a node's default route goes through its network's router: a packet to an address no
    proxy serves leaves towards it and is not answered (the world host does not forward). On-link instead,
    every such address would get a neighbour entry of its own, and the kernel's neighbour table (1,024
    entries by default) is shared by every namespace of the machine: probing thousands of unserved
    ClusterIPs (bench/frontend_probe.py) would overflow it for the whole host.
    """
    if f" {NODE_SERVICES_IP}/32 " not in topology.ip("-o", "addr", "show", "dev", "lo", netns=netns).stdout:
        topology.ip("addr", "add", f"{NODE_SERVICES_IP}/32", "dev", "lo", netns=netns)
    topology.ip("route", "replace", SERVICE_CIDR, "via", WORLD_IP, "dev", "eth0", netns=netns)


def corefile(kubeconfig: Path) -> str:
    """One server on the cluster DNS address: cluster.local from the apiserver, nothing forwarded."""
    return f"""cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {NODE_SERVICES_IP}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
}}
"""


def coredns_name(node: str) -> str:
    return f"coredns-{node}"


def start_coredns(layout: LabLayout, coredns: Path, node: str, *, seconds: float = 20) -> None:
    """CoreDNS in ``node``'s namespace on ``NODE_SERVICES_IP`` (apiserver through the node relay)."""
    name = coredns_name(node)
    if processes.running_pid(layout, name):
        return
    pki.ensure_cert(layout.pki_dir, "lab-coredns", f"/CN={COREDNS_USER}")
    base = layout.node_dir(node)
    base.mkdir(parents=True, exist_ok=True)
    kubeconfig = base / "coredns.kubeconfig"
    write_kubeconfig(kubeconfig, server=f"https://127.0.0.1:{APISERVER_RELAY_PORT}", pki=layout.pki_dir,
                     user="lab-coredns")
    config = base / "Corefile"
    config.write_text(corefile(kubeconfig))
    processes.spawn(layout, name, ["nsenter", f"--net={topology.NETNS_DIR / layout.node_netns(node)}",
                                   str(coredns), "-conf", str(config)])
    if not processes.wait_for_line(layout, name, "CoreDNS-", seconds, poll=0.2):
        raise DnsStartError(node, f"CoreDNS not started after {seconds:.0f} s; see {layout.log_dir / name}.log")


def kube_proxy_name(node: str) -> str:
    return f"kube-proxy-{node}"


#: kube-proxy's proxy modes the lab can run (``--proxy-mode``); nftables needs Debian's ``nft``
KUBE_PROXY_MODES = ("iptables", "nftables")


def kube_proxy_argv(kube_proxy: Path, kubeconfig: Path, node: str, mode: str = "iptables") -> list[str]:
    """kube-proxy's command line for ``node`` (run inside the node's namespace). Pure.

    It touches no machine-wide sysctl (conntrack limits off); metrics and healthz on the node's loopback.
    """
    if mode not in KUBE_PROXY_MODES:
        raise ValueError(f"kube-proxy mode {mode!r}: one of {', '.join(KUBE_PROXY_MODES)}")
    return [str(kube_proxy), f"--kubeconfig={kubeconfig}", f"--hostname-override={node}", f"--proxy-mode={mode}",
            f"--bind-address={node_ip(node_index(node))}", "--cluster-cidr=10.244.0.0/16",
            "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0s",
            "--conntrack-tcp-timeout-close-wait=0s", "--metrics-bind-address=127.0.0.1:10249",
            "--healthz-bind-address=127.0.0.1:10256", "--v=1"]


def start_kube_proxy(layout: LabLayout, kube_proxy: Path, node: str, mode: str = "iptables") -> None:
    """kube-proxy (``mode``: iptables or nftables) in ``node``'s namespace, through the node's apiserver relay."""
    name = kube_proxy_name(node)
    if processes.running_pid(layout, name):
        return
    pki.ensure_cert(layout.pki_dir, "kube-proxy", "/CN=system:kube-proxy")
    kubeconfig = layout.node_dir(node) / "kube-proxy.kubeconfig"
    kubeconfig.parent.mkdir(parents=True, exist_ok=True)
    write_kubeconfig(kubeconfig, server=f"https://127.0.0.1:{APISERVER_RELAY_PORT}", pki=layout.pki_dir,
                     user="kube-proxy")
    processes.spawn(layout, name, ["nsenter", f"--net={topology.NETNS_DIR / layout.node_netns(node)}",
                                   *kube_proxy_argv(kube_proxy, kubeconfig, node, mode)])
    processes.wait_alive(layout, name, 2.0)
