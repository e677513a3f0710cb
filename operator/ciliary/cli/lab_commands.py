"""``ciliary lab …`` subcommands: thin argument handling over ``ciliary.lab.lab`` and ``ciliary.lab.reallab``."""

from __future__ import annotations

import argparse
from typing import Any

from ciliary.cli.errors import UserError
from ciliary.lab import processes
from ciliary.lab.controlplane import ControlPlaneError
from ciliary.lab.lab import Lab, LabError
from ciliary.lab.topology import TopologyError


def register(sub: Any) -> None:
    lab = sub.add_parser(
        "lab", help="run a local lab: real control plane, kubelets and pods in network namespaces",
        description="A local lab on this machine: etcd, kube-apiserver and kube-controller-manager on "
                    "loopback, one network namespace per node with containerd and a kubelet, Ciliary installed "
                    "by its Helm charts, pods wired by Ciliary's CNI plugin, and a 'world' host outside the "
                    "cluster (192.0.2.100). Nothing in it can reach the machine's real network. State lives in "
                    "./.lab (CILIARY_LAB_DIR).")
    cmds = lab.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)

    up = cmds.add_parser("up", help="start the lab (safe to repeat; adds nodes if asked for more)",
                         description="Start the lab, or complete it if parts are missing. Safe to run twice. "
                                     "Nodes run containerd and kubelet (plus kube-proxy and CoreDNS), and Ciliary "
                                     "is installed by its Helm charts (operator Deployment, agent DaemonSet, "
                                     "bundled etcd).")
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    up.add_argument("--real-nodes", action="store_true",
                    help="accepted for old scripts and changes nothing: every lab runs real nodes")
    up.add_argument("--kube-proxy-replacement", action="store_true",
                    help="no kube-proxy; Ciliary's chart serves every Service (socket load "
                         "balancing, NodePorts and external IPs on the nodes' devices, kube-proxy's health ports)")
    up.add_argument("--kube-proxy", nargs="?", const="iptables", default=None, choices=("iptables", "nftables"),
                    metavar="MODE",
                    help="the real kube-proxy (MODE iptables, the default, or nftables) proxies Services instead "
                         "of Ciliary's load balancer: the peer for comparisons (the chart with its load balancer "
                         "off in agents and operator); a running lab keeps its mode")
    up.set_defaults(func=_up)

    down = cmds.add_parser("down", help="remove everything the lab created",
                           description="Stop every lab process and remove its namespaces, veths, bridge, "
                                       "cgroups, bpffs pins, node mounts and state. Works after a crashed "
                                       "`lab up`, and on a lab the removed process lab left running.")
    down.set_defaults(func=_down)

    status = cmds.add_parser("status", help="show nodes, pods and lab processes with their memory",
                             description="Show the lab's processes (pid, RSS), nodes and pods.")
    status.set_defaults(func=_status)

    env = cmds.add_parser("env", help="print shell exports for kubectl, etcdctl and the world IP",
                          description="Print `export` lines; use as: eval $(ciliary lab env)")
    env.set_defaults(func=_env)

    ex = cmds.add_parser("exec", help="run a command inside a pod (or the world host)",
                         description="Run a command inside a pod's network namespace and cgroup, e.g. "
                                     "`ciliary lab exec tiefighter -- curl -s http://10.244.1.2/`, or on "
                                     "the world host with --world.")
    ex.add_argument("pod", nargs="?", help="pod name")
    ex.add_argument("-n", "--namespace", default="default", help="pod namespace (default: default)")
    ex.add_argument("--world", action="store_true", help="run on the world host instead of a pod")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    ex.set_defaults(func=_exec)


def _run(fn: Any) -> int:
    try:
        result = fn()
    except (LabError, ControlPlaneError, TopologyError, processes.ProcessStartError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    return int(result or 0)


def _up(args: argparse.Namespace) -> int:
    if args.kube_proxy and args.kube_proxy_replacement:
        raise UserError("--kube-proxy (kube-proxy alone) and --kube-proxy-replacement (no kube-proxy) exclude "
                        "each other")
    from ciliary.lab import reallab  # it imports the image builders: only when a lab comes up

    return _run(lambda: reallab.up_command(Lab.from_env(), args.nodes,
                                           kube_proxy_replacement=args.kube_proxy_replacement,
                                           kube_proxy=args.kube_proxy) and 0)


def _down(args: argparse.Namespace) -> int:
    return _run(lambda: Lab.from_env().down())


def _status(args: argparse.Namespace) -> int:
    return _run(lambda: print(Lab.from_env().status()))


def _env(args: argparse.Namespace) -> int:
    return _run(lambda: print("\n".join(Lab.from_env().env_lines())))


def _exec(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if args.world and args.pod:  # `exec --world CMD...`: the first word is not a pod
        cmd = [args.pod, *cmd]
    return _run(lambda: Lab.from_env().exec(cmd, pod=args.pod, namespace=args.namespace, world=args.world))
