"""One node's load-balancing intent on the wire: a manifest and shards, each far below etcd's value limit.

A :class:`~.intent.NodeLBIntent` at 10,000 Services x 3 backends is ~4.4 MB of JSON, and etcd refuses a
request over 1.5 MiB (``--max-request-bytes``), so the operator stores it as shards under the node's
prefix (``keyspace.node_lb_intent_prefix``)::

  /ciliary/lbintents/v2/<node>/manifest   {schema_version, node, shards: {name: sha256 of its value}}
  /ciliary/lbintents/v2/<node>/s<NN>      zlib({schema_version, node, shard, frontends, health_checks, problems})

**Fixed shard count by a stable hash of the Service key** (``SHARD_COUNT`` = 64, shard ``s`` +
``sha256(namespace/name) mod 64``), not size-bounded shards: a Service's frontends, health check and
problems always land in the same shard whatever else changes, so one Service change rewrites exactly
one shard (size-bounded packing moves Services between shards when a neighbour grows, rewriting
several), and the assignment needs no state. Values drop fields at their defaults.

**Shards are zlib-compressed JSON** (the manifest is plain JSON, so an agent of another schema version names
the version it found). At 10,000 Services x 3 backends a shard is ~58 KB of JSON and ~5 KB compressed
(``tests/unit/operator/services/test_lb_sharding.py``). Uncompressed, a bulk create of 10,000 Services
rewrote up to ~3.7 MB per node and pass (every shard gains Services) over ~150 passes: the chart's etcd
kept that as history and raft log and was OOM-killed (1 GiB limit) after two such creates, then again on
every start while replaying its log. The operator refuses to write a shard over ``SHARD_LIMIT_BYTES``
(1 MiB, compressed) or of more than ``SHARD_LIMIT_JSON_BYTES`` of JSON (:class:`LBShardTooLargeError`: the
node's previous intent stays, nothing is cut or widened); an agent refuses a value inflating beyond the
latter as malformed (``LBIntentSchemaError``). Empty shards are not stored.

**Consistency.** A change larger than one etcd transaction (``--max-txn-ops``, the request size) is
written in several; the agent may see shard A new and shard B old. It never applies such a mix: the
manifest is written last and names every shard with the digest of its value, and :class:`ShardAssembler`
yields an intent only while every shard the manifest names is present with exactly that digest (keys
the manifest does not name are ignored: stale shards are deleted after it). So the agent applies
either the previous complete intent or the new one, never a mixture (a mixture could, say, hold a
deleted Service's NodePort beside the new owner's). Within any one shard each Service is complete
anyway: it lives entirely in one shard.

**Assembling, again and again.** :class:`ShardAssembler` keeps parsed shards by digest, so an unchanged
shard's frontends are the same tuple in every intent (``shards``), and keeps the intent's sorted frontends
between versions (:class:`FrontendUnion`): one Service change costs the agent one shard's parse, not 10,000
frontends sorted again.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import Field

from ciliary.operator.services.intent import (
    LB_SCHEMA_VERSION,
    FrontendIntent,
    FrontendKey,
    HealthCheckIntent,
    LBIntentSchemaError,
    NodeLBIntent,
    ProblemIntent,
    _Frozen,
    frontend_key,
)

SHARD_COUNT = 64
SHARD_LIMIT_BYTES = 1 << 20
"""Largest shard value written, compressed (etcd refuses requests over 1.5 MiB by default)."""
SHARD_LIMIT_JSON_BYTES = 32 << 20
"""Largest shard JSON, before compression, written or read (an agent never inflates a value beyond it)."""
COMPRESSION_LEVEL = 6
MANIFEST = "manifest"


class LBShardTooLargeError(ValueError):
    """A shard of a node's LB intent exceeds :data:`SHARD_LIMIT_BYTES` compressed or :data:`SHARD_LIMIT_JSON_BYTES`
    as JSON; carries node, shard and size."""

    def __init__(self, node: str, shard: str, size: int, services: tuple[str, ...], *, what: str = "",
                 limit: int = SHARD_LIMIT_BYTES) -> None:
        super().__init__(f"load-balancing intent for {node!r}: shard {shard} is {size} bytes{what}, over the "
                         f"{limit}-byte limit (Services {', '.join(services[:5])}"
                         f"{', ...' if len(services) > 5 else ''}); the previous intent stays")
        self.node, self.shard, self.size, self.services = node, shard, size, services


class LBShard(_Frozen):
    schema_version: int = Field(default=LB_SCHEMA_VERSION)
    node: str
    shard: str
    frontends: tuple[FrontendIntent, ...] = ()
    health_checks: tuple[HealthCheckIntent, ...] = ()
    problems: tuple[ProblemIntent, ...] = ()


class LBManifest(_Frozen):
    schema_version: int = Field(default=LB_SCHEMA_VERSION)
    node: str
    shards: dict[str, str] = Field(default_factory=dict, description="shard name -> sha256 of its value")


@functools.lru_cache(maxsize=1 << 17)
def shard_of(service: str, count: int = SHARD_COUNT) -> str:
    """The shard of a Service (``namespace/name``): stable across processes and releases (remembered: a pass
    at 10,000 Services asks for every frontend's)."""
    number = int.from_bytes(hashlib.sha256(service.encode()).digest()[:8], "big") % count
    return f"s{number:02d}"


def digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _json(shard: LBShard) -> bytes:
    data = shard.model_dump(mode="json", exclude_defaults=True)
    # the header always travels, defaults or not: the schema version is what an agent checks first
    data.update(schema_version=shard.schema_version, node=shard.node, shard=shard.shard)
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _inflate(node: str, name: str, raw: bytes) -> bytes:
    """A shard value's JSON; :class:`LBIntentSchemaError` when it is not zlib data or inflates beyond
    :data:`SHARD_LIMIT_JSON_BYTES` (never inflated further)."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(raw, SHARD_LIMIT_JSON_BYTES)
    except zlib.error as exc:
        raise LBIntentSchemaError(node, f"shard {name}: not zlib-compressed JSON: {exc}") from exc
    if inflater.unconsumed_tail:
        raise LBIntentSchemaError(node, f"shard {name}: inflates beyond {SHARD_LIMIT_JSON_BYTES} bytes")
    if not inflater.eof:
        raise LBIntentSchemaError(node, f"shard {name}: truncated zlib data")
    return data


class ShardBody(NamedTuple):
    """What one shard of one node holds, each part in the order the whole intent has it."""

    frontends: tuple[FrontendIntent, ...] = ()
    health_checks: tuple[HealthCheckIntent, ...] = ()
    problems: tuple[ProblemIntent, ...] = ()

    @property
    def empty(self) -> bool:
        """Holds nothing (not stored)."""
        return not (self.frontends or self.health_checks or self.problems)


@dataclass(frozen=True)
class ShardedIntent:
    """A node's intent as etcd values: ``shards`` (name -> value) and the ``manifest`` naming them."""

    node: str
    shards: dict[str, bytes]
    digests: dict[str, str]
    manifest: bytes
    bodies: dict[str, ShardBody] = field(default_factory=dict)
    """Shard name -> what its value was made of (the next ``encode`` reuses the value of an equal body)."""
    schema_version: int = LB_SCHEMA_VERSION


def bodies_of(intent: NodeLBIntent, count: int = SHARD_COUNT) -> dict[str, ShardBody]:
    """``intent`` cut by Service into its non-empty shards."""
    parts: dict[str, tuple[list[Any], list[Any], list[Any]]] = {}

    def bucket(service: str) -> tuple[list[Any], list[Any], list[Any]]:
        return parts.setdefault(shard_of(service, count), ([], [], []))

    for fe in intent.frontends:
        bucket(fe.service)[0].append(fe)
    for hc in intent.health_checks:
        bucket(hc.service)[1].append(hc)
    for problem in intent.problems:
        bucket(problem.service)[2].append(problem)
    return {name: ShardBody(tuple(f), tuple(h), tuple(p)) for name, (f, h, p) in parts.items()}


def split(intent: NodeLBIntent, *, count: int = SHARD_COUNT, limit: int = SHARD_LIMIT_BYTES,
          previous: ShardedIntent | None = None) -> ShardedIntent:
    """Shard ``intent`` by Service (:func:`bodies_of`, then :func:`encode`)."""
    return encode(intent.node, bodies_of(intent, count), limit=limit, previous=previous,
                  schema_version=intent.schema_version)


def encode(node: str, bodies: Mapping[str, ShardBody], *, limit: int = SHARD_LIMIT_BYTES,
           previous: ShardedIntent | None = None, schema_version: int = LB_SCHEMA_VERSION) -> ShardedIntent:
    """A node's shards as etcd values and their manifest; raises :class:`LBShardTooLargeError` for a shard
    over ``limit``. Empty bodies are not stored.

    With ``previous`` (this node's last encoding), a body equal to the one a shard was made of keeps its value and
    digest without being serialised again (the comparison is by identity first: the operator's resolver hands an
    unchanged shard's body on as it was), so at 10,000 Services one change serialises one shard."""
    if previous is not None and (previous.node != node or previous.schema_version != schema_version):
        previous = None
    shards: dict[str, bytes] = {}
    digests: dict[str, str] = {}
    kept: dict[str, ShardBody] = {}
    for name in sorted(bodies):
        body = bodies[name]
        if body.empty:
            continue
        kept[name] = body
        before = previous.bodies.get(name) if previous is not None else None
        if previous is not None and before is not None and (before is body or before == body):
            shards[name], digests[name] = previous.shards[name], previous.digests[name]
            continue
        shard = LBShard.model_construct(schema_version=schema_version, node=node, shard=name,
                                        frontends=body.frontends, health_checks=body.health_checks,
                                        problems=body.problems)
        text = _json(shard)
        if len(text) > SHARD_LIMIT_JSON_BYTES:
            raise LBShardTooLargeError(node, name, len(text), _services(body), what=" of JSON",
                                       limit=SHARD_LIMIT_JSON_BYTES)
        raw = zlib.compress(text, COMPRESSION_LEVEL)
        if len(raw) > limit:
            raise LBShardTooLargeError(node, name, len(raw), _services(body), what=" compressed")
        shards[name] = raw
        digests[name] = digest(raw)
    manifest = LBManifest(schema_version=schema_version, node=node, shards=digests)
    return ShardedIntent(node=node, shards=shards, digests=digests, manifest=_wire_manifest(manifest),
                         bodies=kept, schema_version=schema_version)


def _services(body: ShardBody) -> tuple[str, ...]:
    """The Services a shard holds (named by a refusal)."""
    return tuple(sorted({item.service for items in body for item in items}))


def _wire_manifest(manifest: LBManifest) -> bytes:
    # the shards map is written even when empty: an empty manifest is "no Services", not "missing"
    return json.dumps(manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def _load(node: str, what: str, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise LBIntentSchemaError(node, f"{what}: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise LBIntentSchemaError(node, f"{what}: not a JSON object")
    if data.get("schema_version") != LB_SCHEMA_VERSION:
        raise LBIntentSchemaError(node, f"{what}: unknown schema version {data.get('schema_version')!r} "
                                        f"(this agent speaks {LB_SCHEMA_VERSION})")
    if data.get("node") != node:
        raise LBIntentSchemaError(node, f"{what} names node {data.get('node')!r}")
    return data


def parse_manifest(node: str, raw: bytes) -> LBManifest:
    data = _load(node, MANIFEST, raw)
    try:
        return LBManifest.model_validate(data)
    except ValueError as exc:
        raise LBIntentSchemaError(node, f"manifest: {exc}") from exc


def parse_shard(node: str, name: str, raw: bytes) -> LBShard:
    data = _load(node, f"shard {name}", _inflate(node, name, raw))
    try:
        shard = LBShard.model_validate(data)
    except ValueError as exc:
        raise LBIntentSchemaError(node, f"shard {name}: {exc}") from exc
    if shard.shard != name:
        raise LBIntentSchemaError(node, f"shard {name} holds shard {shard.shard!r}")
    return shard


def union(node: str, shards: list[LBShard], schema_version: int = LB_SCHEMA_VERSION, *,
          frontends: tuple[FrontendIntent, ...] | None = None) -> NodeLBIntent:
    """The intent the shards make up, ordered as ``resolution`` orders a whole intent (``frontends``: their
    frontends so ordered already, by a :class:`FrontendUnion`)."""
    if frontends is None:
        frontends = tuple(sorted((fe for s in shards for fe in s.frontends), key=frontend_key))
    health = sorted((h for s in shards for h in s.health_checks), key=lambda h: (h.port, h.service))
    problems = sorted((p for s in shards for p in s.problems), key=lambda p: p.service)  # stable: in order
    return NodeLBIntent.model_construct(schema_version=schema_version, node=node, frontends=frontends,
                                        health_checks=tuple(health), problems=tuple(problems))


class FrontendUnion:
    """The shards' frontends sorted by ``frontend_key`` (as :func:`union` orders them), kept from one intent to
    the next: only the frontends of shards whose tuple is new are looked at, and only keys that went or came
    move in the list (sorting all 10,000 frontends again took ~4 ms per change offline, and the whole assembly
    10-12 ms, now 2 ms). While a key appears twice (a malformed intent) the list is sorted from scratch, as
    :func:`union` does."""

    def __init__(self) -> None:
        self.shards: dict[str, tuple[FrontendIntent, ...]] = {}
        self.items: list[FrontendIntent] = []
        self.keys: list[FrontendKey] = []
        self.unique = True

    def update(self, shards: Mapping[str, tuple[FrontendIntent, ...]]) -> tuple[FrontendIntent, ...]:
        changed = [name for name in shards.keys() | self.shards.keys()
                   if shards.get(name) is not self.shards.get(name)]
        if not self.unique or not self._patch(changed, shards):
            self._rebuild(shards)
        self.shards = dict(shards)
        return tuple(self.items)

    def _rebuild(self, shards: Mapping[str, tuple[FrontendIntent, ...]]) -> None:
        self.items = sorted((fe for _name, fes in sorted(shards.items()) for fe in fes), key=frontend_key)
        self.keys = list(map(frontend_key, self.items))
        self.unique = len(set(self.keys)) == len(self.keys)

    def _patch(self, changed: list[str], shards: Mapping[str, tuple[FrontendIntent, ...]]) -> bool:
        """Move only what changed; False (and the list half-patched) when a key would appear twice."""
        went = {frontend_key(fe): fe for name in changed for fe in self.shards.get(name, ())}
        came: dict[FrontendKey, FrontendIntent] = {}
        for name in changed:
            for fe in shards.get(name, ()):
                key = frontend_key(fe)
                if key in came:
                    return False
                came[key] = fe
        keys, items = self.keys, self.items
        for key in went.keys() - came.keys():
            del items[(at := bisect.bisect_left(keys, key))], keys[at]
        for key in came.keys() & went.keys():
            items[bisect.bisect_left(keys, key)] = came[key]
        for key in sorted(came.keys() - went.keys()):
            at = bisect.bisect_left(keys, key)
            if at < len(keys) and keys[at] == key:
                return False  # an unchanged shard holds it too
            items.insert(at, came[key])
            keys.insert(at, key)
        return True


class ShardAssembler:
    """The keys of one node's prefix as they arrive (a range read, then watch events), and the intent they hold.

    :meth:`current` is the complete intent, or None while the values do not match the manifest (an
    update is half-written) or there is no manifest; it raises :class:`LBIntentSchemaError` for an
    unknown schema version or a malformed value. Parsed shards are cached by digest, so an unchanged
    shard's frontends are the very same tuple in every intent (``shards``; the agent's planner walks only
    the shards whose tuple is new).
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.raw: dict[str, bytes] = {}
        self.digests: dict[str, str] = {}
        self._parsed: dict[str, tuple[str, LBShard]] = {}
        self.shards: dict[str, tuple[FrontendIntent, ...]] = {}
        """Shard name -> frontends, of the intent :meth:`current` returned last."""
        self._union = FrontendUnion()

    def reset(self, values: Mapping[str, bytes]) -> None:
        self.raw, self.digests = {}, {}
        for part, raw in values.items():
            self.put(part, raw)

    def put(self, part: str, raw: bytes) -> None:
        self.raw[part] = raw
        self.digests[part] = digest(raw)

    def delete(self, part: str) -> None:
        self.raw.pop(part, None)
        self.digests.pop(part, None)
        self._parsed.pop(part, None)

    @property
    def empty(self) -> bool:
        return not self.raw

    def manifest_digest(self) -> str | None:
        return self.digests.get(MANIFEST)

    def current(self) -> NodeLBIntent | None:
        raw = self.raw.get(MANIFEST)
        if raw is None:
            return None
        manifest = parse_manifest(self.node, raw)
        if any(self.digests.get(name) != want for name, want in manifest.shards.items()):
            return None  # half-written: keep what is applied
        shards = []
        for name, want in sorted(manifest.shards.items()):
            cached = self._parsed.get(name)
            if cached is None or cached[0] != want:
                cached = (want, parse_shard(self.node, name, self.raw[name]))
                self._parsed[name] = cached
            shards.append(cached[1])
        self.shards = {shard.shard: shard.frontends for shard in shards}
        return union(self.node, shards, manifest.schema_version, frontends=self._union.update(self.shards))


def assemble(node: str, values: Mapping[str, bytes]) -> NodeLBIntent | None:
    """The intent a node's keys (part name -> value) hold; None when incomplete (see :class:`ShardAssembler`)."""
    assembler = ShardAssembler(node)
    assembler.reset(values)
    return assembler.current()
