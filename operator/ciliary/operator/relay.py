"""``ciliary-relay``: one Hubble Observer address for the whole cluster (what Hubble Relay is to Cilium).

Its own process, not a part of the operator: the operator may run as several replicas of which
only the elected leader works, while the relay is stateless, serves clients from any replica and
must not stop when leadership moves; it needs only read access to the node registrations: its own
etcd user (``access.RELAY_USER``) can read them and nothing else.

Peers: the agents' registration records in etcd (``observerAddr``), re-read every
``--refresh`` seconds, or a fixed ``--peer NAME=HOST:PORT`` list. Peers are dialled with mutual TLS
(``--hubble-tls-*``: the relay's client certificate; the agent's certificate checked against the server CA
for ``<node>.<cluster>.hubble-grpc.cilium.io``, ``observer_tls``); without certificates only loopback peers
are dialled (plaintext), unless ``--hubble-insecure``. Served (plaintext, ``--listen``):

- ``observer.Observer/GetFlows``: the request (validated here first: a malformed filter is
  INVALID_ARGUMENT before any node is asked) goes to every node; without ``follow`` the answers
  are merged in time order (``number`` is per node, as with Hubble Relay); with ``follow`` every node's
  stream is forwarded as it arrives (history per node first), and a node that joins while a client
  follows is followed from then on. A node that cannot be reached is
  reported in-stream as a ``node_status`` NODE_UNAVAILABLE event and the others still answer;
- ``ServerStatus`` (sums, connected and unavailable nodes), ``GetNodes``, ``GetNamespaces`` (union);
- ``peer.Peer/Notify`` (every node, then changes) and ``grpc.health.v1.Health``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from ciliary.hubbleapi import observer_pb2, observer_pb2_grpc, peer_pb2, peer_pb2_grpc, relay_pb2
from ciliary.nodeagent import hubble_filter, hubble_query, observer_server, observer_tls
from ciliary.operator import relay_merge
from ciliary.operator.store import keyspace
from ciliary.operator.store.etcdclient import EtcdConfigError, EtcdStore, connection_settings

log = logging.getLogger("ciliary.relay")
CALL_TIMEOUT_S = 5.0
PEERS_CHANGED = "peers-changed"
"""Queued by a following GetFlows when the peer set changes."""


class Peers:
    """The current peer set and a channel per address."""

    def __init__(self, tls: observer_tls.ClientTLS | None = None, *, insecure: bool = False) -> None:
        self.current: dict[str, str] = {}
        self.changed = asyncio.Condition()
        self.tls = tls
        self.insecure = insecure
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._credentials = observer_tls.channel_credentials(tls) if tls is not None else None

    async def set(self, peers: dict[str, str]) -> None:
        if peers == self.current:
            return
        log.info("Relay peers", extra={"peers": ",".join(f"{n}={a}" for n, a in sorted(peers.items()))})
        for key in set(self._channels) - set(peers.items()):
            await self._channels.pop(key).close()
        async with self.changed:
            self.current = dict(peers)
            self.changed.notify_all()

    def stub(self, name: str, address: str) -> observer_pb2_grpc.ObserverStub:
        """A stub of node ``name`` at ``address``; ObserverTLSError when it may not be dialled as configured."""
        key = (name, address)
        if key not in self._channels:
            mode = observer_tls.dial_mode(address, self.tls, insecure=self.insecure)
            if mode is observer_tls.Mode.TLS and self._credentials is not None and self.tls is not None:
                options = [("grpc.ssl_target_name_override", observer_tls.server_name(name, self.tls.cluster))]
                self._channels[key] = grpc.aio.secure_channel(address, self._credentials, options=options)
            else:
                self._channels[key] = grpc.aio.insecure_channel(address)
        return observer_pb2_grpc.ObserverStub(self._channels[key])

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def unavailable_event(nodes: Sequence[str], message: str) -> observer_pb2.GetFlowsResponse:
    return observer_pb2.GetFlowsResponse(node_status=relay_pb2.NodeStatusEvent(
        state_change=relay_pb2.NODE_UNAVAILABLE, node_names=sorted(nodes), message=message))


class RelayObserver(observer_pb2_grpc.ObserverServicer):
    def __init__(self, peers: Peers) -> None:
        self.peers = peers

    async def _each(self, call: Callable[[observer_pb2_grpc.ObserverStub], Any]) -> tuple[dict[str, Any], list[str]]:
        """``call`` on every peer at once: (answers by node, unreachable nodes)."""
        peers = dict(self.peers.current)

        async def one(name: str, address: str) -> Any:
            return await asyncio.wait_for(call(self.peers.stub(name, address)), CALL_TIMEOUT_S)

        results = await asyncio.gather(*(one(n, a) for n, a in peers.items()), return_exceptions=True)
        answers, down = {}, []
        for name, result in zip(peers, results, strict=True):
            if isinstance(result, BaseException):
                log.debug("Peer call failed", extra={"node": name, "error": repr(result)})
                down.append(name)
            else:
                answers[name] = result
        return answers, down

    async def GetFlows(self, request: observer_pb2.GetFlowsRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[observer_pb2.GetFlowsResponse]:
        try:
            hubble_query.plan(request)
        except hubble_filter.FilterError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        peers = dict(self.peers.current)
        if not request.follow:
            async def collect(stub: observer_pb2_grpc.ObserverStub) -> list[observer_pb2.GetFlowsResponse]:
                return [r async for r in stub.GetFlows(request)]

            answers, down = await self._each(collect)
            if down:
                yield unavailable_event(down, "node unreachable")
            for response in relay_merge.merge_history(answers.values()):
                yield response
            return
        queue: asyncio.Queue[observer_pb2.GetFlowsResponse | BaseException | str | None] = asyncio.Queue(
            maxsize=4096)

        async def pump(name: str, address: str) -> None:
            try:
                async for response in self.peers.stub(name, address).GetFlows(request):
                    await queue.put(response)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    await queue.put(exc)
                else:
                    await queue.put(unavailable_event([name], exc.details() or exc.code().name))
            except observer_tls.ObserverTLSError as exc:
                await queue.put(unavailable_event([name], str(exc)))
            await queue.put(None)  # this node's stream ended (``until`` passed, or the node went away)

        async def watch_peers() -> None:
            """Wake the loop below whenever the peer set changes: nodes that join later are followed too."""
            while True:
                async with self.peers.changed:
                    await self.peers.changed.wait()
                await queue.put(PEERS_CHANGED)

        streams: dict[tuple[str, str], asyncio.Task[None]] = {}

        def start_new(current: dict[str, str]) -> int:
            started = 0
            for name, address in current.items():
                task = streams.get((name, address))
                if task is None or task.done():
                    streams[(name, address)] = asyncio.create_task(pump(name, address))
                    started += 1
            return started

        running = start_new(peers)
        watcher = asyncio.create_task(watch_peers())
        try:
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, str):  # PEERS_CHANGED
                    running += start_new(dict(self.peers.current))
                    continue
                if isinstance(item, BaseException):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
                    return
                yield item
        finally:
            watcher.cancel()
            for task in streams.values():
                task.cancel()
            await asyncio.gather(watcher, *streams.values(), return_exceptions=True)

    async def ServerStatus(self, request: observer_pb2.ServerStatusRequest,
                           context: grpc.aio.ServicerContext) -> observer_pb2.ServerStatusResponse:
        answers, down = await self._each(lambda stub: stub.ServerStatus(request))
        return relay_merge.merge_status(answers, down, observer_server.version())

    async def GetNodes(self, request: observer_pb2.GetNodesRequest,
                       context: grpc.aio.ServicerContext) -> observer_pb2.GetNodesResponse:
        answers, down = await self._each(lambda stub: stub.GetNodes(request))
        nodes: list[observer_pb2.Node] = [n for answer in answers.values() for n in answer.nodes]
        nodes += [observer_pb2.Node(name=name, address=self.peers.current.get(name, ""),
                                    state=relay_pb2.NODE_UNAVAILABLE) for name in down]
        nodes.sort(key=lambda n: n.name)
        return observer_pb2.GetNodesResponse(nodes=nodes)

    async def GetNamespaces(self, request: observer_pb2.GetNamespacesRequest,
                            context: grpc.aio.ServicerContext) -> observer_pb2.GetNamespacesResponse:
        answers, _down = await self._each(lambda stub: stub.GetNamespaces(request))
        names = sorted({ns.namespace for answer in answers.values() for ns in answer.namespaces})
        return observer_pb2.GetNamespacesResponse(namespaces=[observer_pb2.Namespace(namespace=n) for n in names])


class RelayPeers(peer_pb2_grpc.PeerServicer):
    def __init__(self, peers: Peers) -> None:
        self.peers = peers

    async def Notify(self, request: peer_pb2.NotifyRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[peer_pb2.ChangeNotification]:
        known: dict[str, str] = {}
        while True:
            for change in relay_merge.peer_changes(known, self.peers.current):
                yield change
            known = dict(self.peers.current)
            async with self.peers.changed:
                await self.peers.changed.wait_for(lambda seen=known: self.peers.current != seen)  # type: ignore[misc]


async def start(peers: Peers, address: str) -> grpc.aio.Server:
    server = grpc.aio.server()
    observer_pb2_grpc.add_ObserverServicer_to_server(RelayObserver(peers), server)
    peer_pb2_grpc.add_PeerServicer_to_server(RelayPeers(peers), server)
    await observer_server.set_serving(observer_server.add_health(server))
    observer_server.listen(server, address, "Hubble relay")
    await server.start()
    log.info("Hubble relay serving", extra={"address": address})
    return server


async def watch_etcd(store: EtcdStore, peers: Peers, stop: asyncio.Event, refresh: float) -> None:
    while not stop.is_set():
        try:
            rows = await store.get_prefix(keyspace.NODES_PREFIX.encode())
            await peers.set(relay_merge.peers_from_records(kv.value for kv in rows))
        except Exception as exc:  # noqa: BLE001 (keep serving the last known peers; retry)
            log.warning("Reading node records failed", extra={"error": repr(exc)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), refresh)


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="ciliary-relay", description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--listen", default=env("CILIARY_RELAY_LISTEN", "127.0.0.1:4245"), metavar="HOST:PORT")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=HOST:PORT",
                   help="a fixed peer (repeatable); without any, peers come from etcd's node records")
    p.add_argument("--etcd-endpoints", default=env("CILIARY_RELAY_ETCD_ENDPOINTS", "https://127.0.0.1:2379"))
    p.add_argument("--etcd-ca-file", default=env("CILIARY_RELAY_ETCD_CA_FILE", ""))
    p.add_argument("--etcd-cert-file", default=env("CILIARY_RELAY_ETCD_CERT_FILE", ""))
    p.add_argument("--etcd-key-file", default=env("CILIARY_RELAY_ETCD_KEY_FILE", ""))
    p.add_argument("--etcd-insecure", action="store_true", help="accept plain http:// etcd (tests only)")
    p.add_argument("--hubble-tls-cert-file", default=env("CILIARY_RELAY_HUBBLE_TLS_CERT_FILE", ""),
                   help="the relay's client certificate towards the agents' Observer APIs")
    p.add_argument("--hubble-tls-key-file", default=env("CILIARY_RELAY_HUBBLE_TLS_KEY_FILE", ""))
    p.add_argument("--hubble-tls-server-ca-file", default=env("CILIARY_RELAY_HUBBLE_TLS_SERVER_CA_FILE", ""),
                   help="CA that must have signed every agent's server certificate")
    p.add_argument("--hubble-tls-cluster", default=env("CILIARY_RELAY_HUBBLE_TLS_CLUSTER", observer_tls.DEFAULT_CLUSTER),
                   help="an agent's certificate must name <node>.<cluster>.hubble-grpc.cilium.io")
    p.add_argument("--hubble-insecure", action="store_true",
                   default=env("CILIARY_RELAY_HUBBLE_INSECURE", "") in ("1", "true", "on", "yes"),
                   help="dial non-loopback agents in plaintext (tests only; warned on every start)")
    p.add_argument("--refresh", type=float, default=2.0, help="seconds between reads of the node records")
    p.add_argument("--log-level", default=env("CILIARY_RELAY_LOG_LEVEL", "INFO"))
    return p


async def run(args: argparse.Namespace, stop: asyncio.Event) -> None:
    peers = Peers(args.hubble_tls, insecure=args.hubble_insecure)
    store: EtcdStore | None = None
    tasks: list[asyncio.Task[None]] = []
    if args.peer:
        await peers.set(dict(p.split("=", 1) for p in args.peer))
    else:
        first, *others = args.etcd[0]
        store = EtcdStore(first, tls=args.etcd[1], fallbacks=others)
        tasks.append(asyncio.create_task(watch_etcd(store, peers, stop, args.refresh)))
    server = await start(peers, args.listen)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await peers.close()
        if store is not None:
            await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if any("=" not in p for p in args.peer):
        parser.error("--peer must look like NAME=HOST:PORT")
    try:
        found = observer_tls.files(args.hubble_tls_cert_file, args.hubble_tls_key_file,
                                   args.hubble_tls_server_ca_file, what="--hubble-tls-*")
    except ValueError as exc:
        parser.error(str(exc))
    args.hubble_tls = observer_tls.ClientTLS(*found, cluster=args.hubble_tls_cluster) if found else None
    if args.hubble_insecure and args.hubble_tls is None:
        log.warning("Relay dials non-loopback agents in plaintext (--hubble-insecure): their flows cross the network "
                    "unencrypted, and the agents serve them to anyone; for tests only")
    if not args.peer:
        try:
            args.etcd = connection_settings(args.etcd_endpoints, ca_file=args.etcd_ca_file,
                                            cert_file=args.etcd_cert_file, key_file=args.etcd_key_file,
                                            insecure=args.etcd_insecure)
        except EtcdConfigError as exc:
            parser.error(str(exc))

    async def amain() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(args, stop)

    try:
        asyncio.run(amain())
    except OSError as exc:
        log.error("Relay failed", extra={"error": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
