"""Root-namespace addresses for in-cluster Services and node-local listeners of the real-node lab (the Hubble
relay, the service map; for e2e scrapes, the chart agents' and operator's metrics listeners).

On real nodes the chart's ``hubble-relay`` and ``hubble-ui`` Services have ClusterIPs that only the node
namespaces route (kube-proxy there), and no lab address may exist in the root namespace. This process,
run in the root namespace, listens on ``127.0.0.1:PORT`` for each ``--forward PORT=NAMESPACE/SERVICE`` and,
for every connection, dials the Service's ClusterIP and first port from inside ``--netns`` (a thread that
entered the namespace makes the socket: ``nodegateway.in_netns``), then copies bytes both ways. The
ClusterIP is read with ``--kubectl`` and kept until a dial fails (a re-installed chart gets new ones). So
``eval $(ciliary lab env)`` gives ``HUBBLE_SERVER`` and ``CILIARY_UI_URL`` that work from the user's
shell. ``--forward PORT=HOST:PORT`` dials that address as is from inside ``--netns`` (a
host-network pod's listener on the node's loopback, e.g. the chart agent's ``/metrics``), so a process of
the root namespace (a real Prometheus in e2e) can reach it; no kubectl is needed for those.

Run: ``python -m ciliary.lab.serviceforward --netns NETNS [--kubectl PATH --kubeconfig PATH] --forward
PORT=NAMESPACE/SERVICE|PORT=HOST:PORT [...]``; prints ``forward ready`` once every listener is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ciliary.lab.nodegateway import in_netns, splice

log = logging.getLogger("ciliary.lab.serviceforward")
DIAL_SECONDS = 5.0


@dataclass(frozen=True)
class Forward:
    """A root-namespace port and what it dials in the node namespace: a Service, or a fixed ``address``."""

    port: int
    namespace: str = ""
    service: str = ""
    address: tuple[str, int] | None = None

    @classmethod
    def parse(cls, text: str) -> Forward:
        """``PORT=NAMESPACE/SERVICE`` or ``PORT=HOST:PORT``; ValueError naming the text when malformed."""
        try:
            port, target = text.split("=", 1)
            if "/" not in target:
                host, target_port = target.rsplit(":", 1)
                if not host:
                    raise ValueError(text)
                return cls(int(port), address=(host, int(target_port)))
            namespace, service = target.split("/", 1)
            if not namespace or not service:
                raise ValueError(text)
            return cls(int(port), namespace, service)
        except ValueError as exc:
            raise ValueError(f"--forward {text!r}: want PORT=NAMESPACE/SERVICE or PORT=HOST:PORT") from exc

    def flag(self) -> str:
        if self.address is not None:
            return f"{self.port}={self.address[0]}:{self.address[1]}"
        return f"{self.port}={self.namespace}/{self.service}"


@dataclass(frozen=True)
class Cluster:
    netns: str
    kubectl: str
    kubeconfig: str

    def resolve(self, forward: Forward) -> tuple[str, int]:
        """The Service's ClusterIP and first port; OSError when it has none (absent, headless)."""
        out = subprocess.run([self.kubectl, "--kubeconfig", self.kubeconfig, "get", "service", forward.service,
                              "-n", forward.namespace, "-o", "json"], capture_output=True, text=True, timeout=20)
        if out.returncode != 0:
            raise OSError(f"service {forward.namespace}/{forward.service}: {out.stderr.strip()[-300:]}")
        spec = json.loads(out.stdout)["spec"]
        if spec.get("clusterIP") in (None, "", "None") or not spec.get("ports"):
            raise OSError(f"service {forward.namespace}/{forward.service} has no ClusterIP and port")
        return str(spec["clusterIP"]), int(spec["ports"][0]["port"])

    def dial(self, target: tuple[str, int]) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.create_connection(target, timeout=DIAL_SECONDS)
            sock.setblocking(False)
            return sock
        return in_netns(self.netns, make)


async def _serve_one(cluster: Cluster, forward: Forward) -> asyncio.Server:
    known: list[tuple[str, int]] = []

    def connect() -> socket.socket:
        if forward.address is not None:
            return cluster.dial(forward.address)
        for attempt in range(2):  # the known address, then (once) a fresh one
            if attempt or not known:
                known[:] = [cluster.resolve(forward)]
            try:
                return cluster.dial(known[0])
            except OSError:
                if attempt:
                    raise
        raise OSError("unreachable")  # pragma: no cover - the loop returns or raises

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = await asyncio.get_running_loop().run_in_executor(None, connect)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("forward %s: %s", forward.flag(), exc)
            writer.close()
            return
        upstream = await asyncio.open_connection(sock=sock)
        await splice((reader, writer), upstream)

    return await asyncio.start_server(handle, "127.0.0.1", forward.port)


async def serve(cluster: Cluster, forwards: Sequence[Forward]) -> None:
    servers = [await _serve_one(cluster, f) for f in forwards]
    print("forward ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ciliary.lab.serviceforward", description=__doc__.split("\n")[0])
    parser.add_argument("--netns", required=True, help="the node namespace to dial from")
    parser.add_argument("--kubectl", default="", help="kubectl binary (reads the Services' ClusterIPs)")
    parser.add_argument("--kubeconfig", default="")
    parser.add_argument("--forward", action="append", required=True, type=Forward.parse,
                        help="PORT=NAMESPACE/SERVICE or PORT=HOST:PORT (repeatable)")
    args = parser.parse_args(argv)
    if any(f.address is None for f in args.forward) and not (args.kubectl and args.kubeconfig):
        parser.error("a PORT=NAMESPACE/SERVICE forward needs --kubectl and --kubeconfig")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(Cluster(args.netns, args.kubectl, args.kubeconfig), args.forward))
    return 0


if __name__ == "__main__":
    sys.exit(main())
