"""The ``ciliary`` command: one entry point for users, with a subcommand per task.

  ciliary lab up|down|status|env|exec   the local lab (real control plane, nodes in namespaces)
  ciliary policy get|trace              what a node enforces; why a packet passes or not
  ciliary service list                  frontends -> backends each node's load balancer holds
  ciliary observe                       every verdict of the datapath (flows), from any node
  ciliary version                       versions of Ciliary and of the lab's control plane

Every subcommand has ``--help``. Errors are one clear line on stderr and a
non-zero exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ciliary.cli import lab_commands, observe_commands, policy_commands, service_commands
from ciliary.cli.errors import UserError

VERSION = "0.1.0"

DESCRIPTION = """\
Ciliary — Kubernetes network security and observability, driven by eBPF.

Your CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy objects apply unchanged
and are enforced in the kernel of every node; each policy's status shows where.
"""

EPILOG = """\
Start here:
  ciliary lab up            start a local 2-node lab (real kubelets, Ciliary by its chart)
  eval $(ciliary lab env)   point kubectl and etcdctl at it
  ciliary lab status        see nodes, pods and processes
  ciliary policy trace --src default/a --dst default/b --dport 80/tcp
  ciliary observe --verdict DROPPED --follow
  ciliary lab down          remove everything the lab created
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ciliary", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ciliary {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    lab_commands.register(sub)
    policy_commands.register(sub)
    observe_commands.register(sub)
    service_commands.register(sub)
    version = sub.add_parser("version", help="show versions of Ciliary and the lab's control plane",
                             description="Show the version of Ciliary and of the control-plane binaries the lab runs.")
    version.set_defaults(func=_version)
    return parser


def _version(args: argparse.Namespace) -> int:
    from ciliary.lab import tools

    print(f"ciliary {VERSION}")
    try:
        versions = tools.pinned_versions()
    except tools.VersionsFileError as exc:
        print(f"lab control plane: unknown ({exc})")
        return 0
    print(f"kubernetes (lab) {versions.get('KUBERNETES_VERSION', 'unknown')}\n"
          f"etcd (lab) {versions.get('ETCD_VERSION', 'unknown')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"ciliary: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
