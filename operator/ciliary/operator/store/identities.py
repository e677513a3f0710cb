"""Security identities allocated in etcd with compare-and-swap.

Two keys per identity (``keyspace``): ``identities/v1/labels/<sha256>`` → number and
``identities/v1/id/<number>`` → canonical labels. A new label set takes the lowest
number free in this process's view, and both keys are created in one transaction
that succeeds only if neither exists; on a lost race the winner's number is read
back. So restarts and operator replicas see the same numbers.

The pure resolution core calls :meth:`EtcdIdentityAllocator.allocate`
synchronously: the operator first awaits :meth:`ensure` for every label set in
use, and ``allocate`` answers from the local mirror. Identities no pod uses are
garbage-collected after a grace period (:meth:`collect_garbage`).
"""

from __future__ import annotations

import json
import logging
import time

from ciliary.operator.policy.identities import (
    MAX_CLUSTER_IDENTITY,
    MIN_CLUSTER_IDENTITY,
    IdentityExhaustedError,
    canonical,
    digest,
)
from ciliary.operator.policy.selection import LabelSet
from ciliary.operator.store import keyspace
from ciliary.operator.store.etcdclient import EtcdStore

log = logging.getLogger(__name__)


class IdentityNotAllocatedError(KeyError):
    """``allocate`` was called for a label set nobody ensured first (a programming error)."""


class EtcdIdentityAllocator:
    def __init__(self, store: EtcdStore, *, grace_seconds: float = 300.0) -> None:
        self.store = store
        self.grace_seconds = grace_seconds
        self.by_digest: dict[str, int] = {}
        self.canonical_of: dict[int, str] = {}
        self.digest_of: dict[int, str] = {}
        self.unused_since: dict[int, float] = {}
        self.allocations = 0

    async def load(self) -> None:
        """Mirror every identity already in etcd."""
        rows = await self.store.get_prefix(keyspace.IDENTITY_ID_PREFIX.encode())
        for kv in rows:
            number = int(kv.key.decode().rsplit("/", 1)[1])
            record = json.loads(kv.value)
            self._remember(number, record["digest"], record["labels"])

    async def ensure(self, labels: LabelSet) -> int:
        """The identity of ``labels``, allocating it in etcd if nobody has yet."""
        key = digest(labels)
        found = self.by_digest.get(key)
        if found is not None:
            self.unused_since.pop(found, None)
            return found
        labels_key = keyspace.identity_labels_key(key).encode()
        for _ in range(64):  # bounded: each lost race removes one candidate
            existing = await self.store.get(labels_key)
            if existing is not None:
                number = int(existing.value)
                self._remember(number, key, canonical(labels))
                return number
            number = self._lowest_free()
            id_key = keyspace.identity_id_key(number).encode()
            record = json.dumps({"labels": canonical(labels), "digest": key}).encode()

            t = self.store.ops
            ok, _ = await self.store.transaction(
                [t.version(labels_key) == 0, t.version(id_key) == 0],
                [t.put(labels_key, str(number).encode()), t.put(id_key, record)],
            )
            if ok:
                self.allocations += 1
                self._remember(number, key, canonical(labels))
                log.info("allocated identity %d for %s", number, canonical(labels))
                return number
            # someone took the number (or the labels): learn it and try again
            taken = await self.store.get(id_key)
            if taken is not None:
                rec = json.loads(taken.value)
                self._remember(number, rec["digest"], rec["labels"])
        raise IdentityExhaustedError(f"could not allocate an identity for {canonical(labels)}")

    def allocate(self, labels: LabelSet) -> int:
        number = self.by_digest.get(digest(labels))
        if number is None:
            raise IdentityNotAllocatedError(canonical(labels))
        self.unused_since.pop(number, None)
        return number

    def release(self, labels: LabelSet) -> None:
        number = self.by_digest.get(digest(labels))
        if number is not None:
            self.unused_since.setdefault(number, time.monotonic())

    def mark_in_use(self, numbers: set[int]) -> None:
        """Start the grace clock for every identity not in ``numbers``; stop it for those in it."""
        now = time.monotonic()
        for number in self.canonical_of:
            if number in numbers:
                self.unused_since.pop(number, None)
            else:
                self.unused_since.setdefault(number, now)

    async def collect_garbage(self) -> list[int]:
        """Delete identities unused for longer than the grace period; return their numbers."""
        now = time.monotonic()
        removed = []
        for number, since in list(self.unused_since.items()):
            if now - since < self.grace_seconds:
                continue
            canon = self.canonical_of.get(number)
            key = self.digest_of.get(number)
            if canon is None or key is None:
                self.unused_since.pop(number, None)
                continue
            t = self.store.ops
            labels_key = keyspace.identity_labels_key(key).encode()
            # only if the labels still map to this number (another replica may have re-created it)
            await self.store.transaction([t.value(labels_key) == str(number).encode()],
                                         [t.delete(labels_key), t.delete(keyspace.identity_id_key(number).encode())])
            self.by_digest.pop(key, None)
            self.canonical_of.pop(number, None)
            self.digest_of.pop(number, None)
            self.unused_since.pop(number, None)
            removed.append(number)
            log.info("garbage-collected identity %d (%s)", number, canon)
        return removed

    def _remember(self, number: int, key: str, canon: str) -> None:
        self.by_digest[key] = number
        self.canonical_of[number] = canon
        self.digest_of[number] = key

    def _lowest_free(self) -> int:
        for number in range(MIN_CLUSTER_IDENTITY, MAX_CLUSTER_IDENTITY + 1):
            if number not in self.canonical_of:
                return number
        raise IdentityExhaustedError("no free cluster identity left in 256-65535")
