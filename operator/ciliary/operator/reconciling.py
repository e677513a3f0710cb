"""The operator's reconcile loop: cluster model -> identities -> resolution -> etcd.

Waits for the model's ``dirty`` flag, lets a short burst of changes settle, makes
sure every endpoint's label set has an identity in etcd, runs the incremental
resolver (pure) and publishes the intents whose content changed. Identities no
pod uses any more are garbage-collected after their grace period.

TLS interception and header values from Secrets: before publishing, the intents get the items
of the Secrets their TLS contexts name (``policy.tls_secrets.attach``) and the values of those
their header matches name (``policy.header_secrets.attach``); a Secret named for the first time is read
once (``fetch_secret``), later changes come from the Secret watch (``ClusterModel.set_secret``).
The problems found (a Secret or item missing, a key not matching, a bad header value) go to ``report_tls``
(policy uid -> message naming the Secret, never its content).

Every finished pass logs ``reconcile pass <n> complete at revision <r>: <k> intents
written`` (INFO), and ``stats`` holds the same numbers: the positive signal that the
operator has compared the cluster with etcd, which a test waits for before it
asserts that nothing changed (e.g. after a restart).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from ciliary.operator.intents import NodeIntent
from ciliary.operator.kube.cluster_model import ClusterModel
from ciliary.operator.operator_metrics import LoopStats
from ciliary.operator.policy import header_secrets, identities, tls_secrets
from ciliary.operator.policy.resolution import Resolution, Resolver, is_endpoint
from ciliary.operator.store.identities import EtcdIdentityAllocator
from ciliary.operator.store.publishing import IntentPublisher

log = logging.getLogger(__name__)


@dataclass
class ReconcileStats:
    passes: int = 0
    last_duration_ms: float = 0.0
    last_written: list[str] = field(default_factory=list)
    last_revision: int = 0


class Reconciler:
    def __init__(self, model: ClusterModel, allocator: EtcdIdentityAllocator, publisher: IntentPublisher,
                 *, settle_seconds: float = 0.05, gc_interval: float = 30.0,
                 fetch_secret: Callable[[str, str], Awaitable[Mapping[str, bytes] | None]] | None = None,
                 report_tls: Callable[[Mapping[str, str]], Awaitable[None]] | None = None) -> None:
        self.model = model
        self.allocator = allocator
        self.publisher = publisher
        self.resolver = Resolver(allocator)
        self.settle_seconds = settle_seconds
        self.gc_interval = gc_interval
        self.stats = ReconcileStats()
        self.loop_stats = LoopStats()
        """Every pass since start (the Prometheus metrics' source)."""
        self.synced = asyncio.Event()
        self.last: Resolution | None = None
        self._pod_identities: dict[str, tuple[object, object, int]] = {}
        self.fetch_secret = fetch_secret
        self.report_tls = report_tls
        self._plain: dict[str, NodeIntent] = {}
        """Nodes whose intent (this very object) names no TLS context."""
        self._tls_cache: dict[str, tuple[NodeIntent, int, NodeIntent, list[tls_secrets.TlsProblem]]] = {}
        self.resolved: dict[str, int] = {}
        """Policy uid -> metadata.generation as of the last published resolution (status handover reads it)."""
        self.intents_revision = 0
        """The etcd revision by which the intents of that resolution were written (status handover reads it)."""

    async def run_once(self) -> Resolution:
        t0 = time.perf_counter()
        state = self.model.snapshot()
        in_use: set[int] = set()
        known: dict[str, tuple[object, object, int]] = {}
        for uid, pod in state.pods.items():
            if not is_endpoint(pod):
                continue
            namespace = state.namespaces.get(pod.namespace)
            cached = self._pod_identities.get(uid)
            if cached is not None and cached[0] is pod and cached[1] is namespace:
                number = cached[2]  # same pod and namespace objects: same labels, same identity
            else:
                labels = identities.pod_labels(pod, namespace, state.cluster_name)
                number = await self.allocator.ensure(labels)
            known[uid] = (pod, namespace, number)
            in_use.add(number)
        self._pod_identities = known
        self.allocator.mark_in_use(in_use)
        resolution = self.resolver.update(state)
        written = await self.publisher.publish(await self.with_tls(resolution.intents))
        self.resolved = {uid: stored.ref.generation for uid, stored in state.policies.policies.items()}
        self.intents_revision = self.publisher.latest_mod_revision()
        self.stats.passes += 1
        self.stats.last_duration_ms = (time.perf_counter() - t0) * 1000
        self.loop_stats.record(self.stats.last_duration_ms / 1000, len(written))
        self.stats.last_written = written
        self.stats.last_revision = resolution.revision
        self.last = resolution
        log.info("reconcile pass %d complete at revision %d: %d intents written%s in %.1f ms",
                 self.stats.passes, resolution.revision, len(written),
                 f" ({','.join(written)})" if written else "", self.stats.last_duration_ms)
        return resolution

    async def with_tls(self, intents: Mapping[str, NodeIntent]) -> Mapping[str, NodeIntent]:
        """The intents with their TLS material (see the module docstring); unchanged when none names a Secret."""
        plain = self._plain
        self._plain = {node: intent for node, intent in intents.items()
                       if plain.get(node) is intent or not (any(True for _ in tls_secrets.contexts(intent))
                                                            or header_secrets.names_secrets(intent))}
        with_contexts = {node: header_secrets.fill_namespaces(tls_secrets.fill_namespaces(intent))
                         for node, intent in intents.items() if node not in self._plain}
        wanted = tls_secrets.references(with_contexts.values()) | header_secrets.references(with_contexts.values())
        self.model.want_secrets(wanted)
        for key in sorted(wanted - self.model.secrets.keys()):
            try:
                data = await self.fetch_secret(*key) if self.fetch_secret is not None else None
            except Exception as exc:  # noqa: BLE001 - read again next pass; until then the port fails closed
                log.warning("could not read Secret %s/%s: %s %s %s", *key, type(exc).__name__,
                            getattr(exc, "status", ""), getattr(exc, "reason", ""))
                continue
            if key not in self.model.secrets:  # a watch event may have come first, with newer data
                self.model.secrets[key] = data
                self.model.secrets_generation += 1
        out = dict(intents)
        problems: dict[str, list[str]] = {}
        cache: dict[str, tuple[NodeIntent, int, NodeIntent, list[tls_secrets.TlsProblem]]] = {}
        for node in with_contexts:
            held = self._tls_cache.get(node)
            if held is not None and held[0] is intents[node] and held[1] == self.model.secrets_generation:
                attached, found = held[2], held[3]
            else:
                attached, found = tls_secrets.attach(intents[node], self.model.secrets)
                attached, more = header_secrets.attach(attached, self.model.secrets)
                found = found + more
            cache[node] = (intents[node], self.model.secrets_generation, attached, found)
            out[node] = attached
            for problem in found:
                problems.setdefault(problem.policy_uid, []).append(problem.message)
        self._tls_cache = cache
        if self.report_tls is not None:
            await self.report_tls({uid: "; ".join(dict.fromkeys(messages)) for uid, messages in problems.items()})
        return out

    def resolved_generation(self, uid: str) -> int | None:
        return self.resolved.get(uid)

    async def run(self, ready: asyncio.Event) -> None:
        """Loop forever; the first pass waits for ``ready`` (every watch has listed once)."""
        await ready.wait()
        last_gc = time.monotonic()
        while True:
            self.model.dirty.clear()
            await self.run_once()
            self.synced.set()
            try:
                await asyncio.wait_for(self.model.dirty.wait(), timeout=self.gc_interval)
                await asyncio.sleep(self.settle_seconds)
            except TimeoutError:
                pass
            if time.monotonic() - last_gc >= self.gc_interval:
                last_gc = time.monotonic()
                await self.allocator.collect_garbage()
