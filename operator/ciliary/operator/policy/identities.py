"""Security identities: which labels make one, reserved numbers, entities, CIDR identities.

Owns
- the security-relevant labels of a pod (:func:`pod_labels`): its own labels
  minus well-known irrelevant ones (:data:`IRRELEVANT_LABEL_KEYS`,
  :data:`IRRELEVANT_LABEL_PREFIXES`), plus ``io.kubernetes.pod.namespace``,
  ``io.cilium.k8s.namespace.labels.<k>`` for every namespace label,
  ``io.cilium.k8s.policy.serviceaccount`` (when set) and
  ``io.cilium.k8s.policy.cluster``, all with source ``k8s``;
- the canonical form of a label set and its sha256 digest (the etcd allocation
  key ``keyspace.identity_labels_key``);
- Cilium's reserved identity numbers (:class:`Reserved`) and the entity names of
  ``fromEntities``/``toEntities`` (:func:`entity_identities`);
- the numbering plan: cluster identities are allocated from 256 to 65535
  (Cilium's ``MinimalAllocationIdentity``/``MaximumAllocationIdentity``); CIDR
  identities are *local-scope* numbers ``1<<24 | n`` starting at 16777217, held
  by the operator only (they never go through the etcd allocator); toFQDNs
  selector identities are ``2<<24 | n`` (:func:`assign_fqdn_identities`), also
  held by the operator; they name a selector in policy entries and never own an
  address in the operator's ipcache; ``3<<24 | n`` is left to the agents, which
  number the addresses they learn from DNS answers there;
- :class:`IdentityAllocator`, the interface of a cluster allocator, and
  :class:`InMemoryIdentityAllocator` for tests and benchmarks. The etcd
  compare-and-swap allocator lives in the async shell: it allocates (awaiting
  etcd) before resolution runs and exposes a synchronous ``allocate`` that
  answers from its local mirror.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from enum import IntEnum
from typing import Protocol, TypeVar

from ciliary.operator.intents import DNSRule
from ciliary.operator.policy.inputs import NamespaceInfo, PodInfo
from ciliary.operator.policy.selection import (
    CIDR_SOURCE,
    CLUSTER_KEY,
    K8S_SOURCE,
    NAMESPACE_KEY,
    NAMESPACE_LABELS_PREFIX,
    RESERVED_SOURCE,
    SERVICE_ACCOUNT_KEY,
    Label,
    LabelSet,
)

T = TypeVar("T")

MIN_CLUSTER_IDENTITY = 256
MAX_CLUSTER_IDENTITY = 65535
LOCAL_IDENTITY_FLAG = 1 << 24
FIRST_CIDR_IDENTITY = LOCAL_IDENTITY_FLAG + 1
MAX_CIDR_IDENTITY = (2 << 24) - 1
FIRST_FQDN_SELECTOR_IDENTITY = (2 << 24) + 1
MAX_FQDN_SELECTOR_IDENTITY = (3 << 24) - 1
FIRST_LEARNT_IDENTITY = (3 << 24) + 1
MAX_LEARNT_IDENTITY = (4 << 24) - 1
"""Agent-local: addresses learnt from DNS answers (``ciliary.nodeagent.fqdn_expansion``); never in an intent."""
FQDN_SOURCE = "fqdn"
DEFAULT_CLUSTER_NAME = "default"


class Reserved(IntEnum):
    """Cilium's reserved identity numbers (0 is "unknown", and "any peer" in policy entries)."""

    HOST = 1
    WORLD = 2
    UNMANAGED = 3
    HEALTH = 4
    INIT = 5
    REMOTE_NODE = 6
    KUBE_APISERVER = 7
    INGRESS = 8

    @property
    def label_name(self) -> str:
        return self.name.lower().replace("_", "-")


RESERVED_LABELS: dict[int, LabelSet] = {
    int(r): LabelSet([Label(RESERVED_SOURCE, r.label_name, "")]) for r in Reserved
}

IRRELEVANT_LABEL_KEYS = frozenset(
    {
        "pod-template-hash",
        "pod-template-generation",
        "controller-revision-hash",
        "controller-uid",
        "etcd_node",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
        "batch.kubernetes.io/job-completion-index",
        "batch.kubernetes.io/controller-uid",
    }
)
"""Pod label keys dropped from identities (they differ per pod or per rollout)."""

IRRELEVANT_LABEL_PREFIXES = ("io.kubernetes", "kubernetes.io", "k8s.io", "annotation.")
"""Pod label key prefixes dropped from identities (``app.kubernetes.io/*`` is kept)."""


def is_relevant_pod_label(key: str) -> bool:
    if key in IRRELEVANT_LABEL_KEYS or key.startswith(IRRELEVANT_LABEL_PREFIXES):
        return False
    return ".beta.kubernetes.io" not in key


def pod_labels(
    pod: PodInfo, namespace: NamespaceInfo | None, cluster_name: str = DEFAULT_CLUSTER_NAME
) -> LabelSet:
    """The security-relevant labels of a pod: the input of its identity."""
    labels = [Label(K8S_SOURCE, k, v) for k, v in pod.labels.items() if is_relevant_pod_label(k)]
    labels.append(Label(K8S_SOURCE, NAMESPACE_KEY, pod.namespace))
    if namespace is not None:
        labels.extend(Label(K8S_SOURCE, NAMESPACE_LABELS_PREFIX + k, v) for k, v in namespace.labels.items())
    if pod.service_account:
        labels.append(Label(K8S_SOURCE, SERVICE_ACCOUNT_KEY, pod.service_account))
    labels.append(Label(K8S_SOURCE, CLUSTER_KEY, cluster_name))
    return LabelSet(labels)


def canonical(labels: LabelSet) -> str:
    """``source:key=value;`` for every label, sorted: the allocation record of an identity."""
    return "".join(f"{label};" for label in labels)


def digest(labels: LabelSet) -> str:
    """sha256 of :func:`canonical` (hex): the etcd key of a label set."""
    return hashlib.sha256(canonical(labels).encode()).hexdigest()


def is_cidr_identity(identity: int) -> bool:
    return identity & LOCAL_IDENTITY_FLAG != 0 and identity < (2 << 24)


def cidr_labels(prefix: ipaddress.IPv4Network) -> LabelSet:
    """Labels of a CIDR identity: its prefix and ``reserved:world`` (CIDR peers are outside the cluster)."""
    return LabelSet([Label(CIDR_SOURCE, str(prefix), ""), Label(RESERVED_SOURCE, "world", "")])


ENTITY_RESERVED: dict[str, frozenset[int]] = {
    "host": frozenset({Reserved.HOST}),
    "remote-node": frozenset({Reserved.REMOTE_NODE}),
    "kube-apiserver": frozenset({Reserved.KUBE_APISERVER}),
    "health": frozenset({Reserved.HEALTH}),
    "init": frozenset({Reserved.INIT}),
    "unmanaged": frozenset({Reserved.UNMANAGED}),
    "ingress": frozenset({Reserved.INGRESS}),
    "world": frozenset({Reserved.WORLD}),
    "world-ipv4": frozenset({Reserved.WORLD}),
    "world-ipv6": frozenset(),
    "none": frozenset(),
    "cluster": frozenset(
        {
            Reserved.HOST,
            Reserved.REMOTE_NODE,
            Reserved.INIT,
            Reserved.UNMANAGED,
            Reserved.HEALTH,
            Reserved.KUBE_APISERVER,
            Reserved.INGRESS,
        }
    ),
}
ENTITY_NAMES = frozenset({*ENTITY_RESERVED, "all"})


def entity_identities(
    entity: str, *, pod_identities: Iterable[int], cidr_identities: Iterable[int]
) -> frozenset[int] | None:
    """Identities an entity stands for; ``None`` means every peer (``all``).

    ``world`` (and ``world-ipv4``) is the world identity plus every CIDR identity
    (addresses outside the cluster); ``world-ipv6`` selects nothing (IPv4 only); ``cluster`` is every pod identity plus host, remote-node, init,
    unmanaged, health, kube-apiserver and ingress. Unknown names select nothing.
    """
    if entity == "all":
        return None
    base = ENTITY_RESERVED.get(entity, frozenset())
    if entity in ("world", "world-ipv4"):
        return base | frozenset(cidr_identities)
    if entity == "cluster":
        return base | frozenset(pod_identities)
    return base


class IdentityExhaustedError(RuntimeError):
    """No free number left in an identity range."""


class IdentityAllocator(Protocol):
    """Cluster-wide label set -> identity number, stable while the label set is in use."""

    def allocate(self, labels: LabelSet) -> int:
        """The identity of ``labels``, allocating one in [256, 65535] if needed."""
        ...

    def release(self, labels: LabelSet) -> None:
        """The label set is no longer used by any pod (the number may be reused later)."""
        ...


class InMemoryIdentityAllocator:
    """A process-local :class:`IdentityAllocator` (tests, benchmarks, dry runs).

    Numbers are handed out lowest-free-first; a released number is reused only
    after every never-used number is gone, like a cluster allocator would.
    """

    def __init__(self, first: int = MIN_CLUSTER_IDENTITY, last: int = MAX_CLUSTER_IDENTITY) -> None:
        self._by_digest: dict[str, int] = {}
        self._labels: dict[int, LabelSet] = {}
        self._next = first
        self._last = last
        self._free: list[int] = []

    def allocate(self, labels: LabelSet) -> int:
        key = digest(labels)
        found = self._by_digest.get(key)
        if found is not None:
            return found
        if self._next <= self._last:
            number, self._next = self._next, self._next + 1
        elif self._free:
            number = self._free.pop(0)
        else:
            raise IdentityExhaustedError("no free cluster identity left")
        self._by_digest[key] = number
        self._labels[number] = labels
        return number

    def release(self, labels: LabelSet) -> None:
        number = self._by_digest.pop(digest(labels), None)
        if number is not None:
            del self._labels[number]
            self._free.append(number)

    def labels_of(self, identity: int) -> LabelSet | None:
        return self._labels.get(identity)


def assign_cidr_identities(
    prefixes: Iterable[ipaddress.IPv4Network], previous: Mapping[ipaddress.IPv4Network, int]
) -> dict[ipaddress.IPv4Network, int]:
    """Local CIDR identities for ``prefixes``: keep the previous numbers, give new prefixes the lowest free ones.

    ``0.0.0.0/0`` is the world identity and gets no CIDR identity.
    """
    wanted = sorted({p for p in prefixes if p.prefixlen > 0}, key=lambda p: (int(p.network_address), p.prefixlen))
    out = {p: previous[p] for p in wanted if p in previous}
    used = set(out.values())
    candidate = FIRST_CIDR_IDENTITY
    for prefix in wanted:
        if prefix in out:
            continue
        while candidate in used:
            candidate += 1
        if candidate > MAX_CIDR_IDENTITY:
            raise IdentityExhaustedError("no free local CIDR identity left")
        out[prefix] = candidate
        used.add(candidate)
    return out


def assign_fqdn_identities(selectors: Iterable[T], previous: Mapping[T, int]) -> dict[T, int]:
    """Identities for toFQDNs selectors: keep previous numbers, give new selectors the lowest free ones."""
    wanted = sorted(set(selectors), key=repr)
    out = {s: previous[s] for s in wanted if s in previous}
    used = set(out.values())
    candidate = FIRST_FQDN_SELECTOR_IDENTITY
    for selector in wanted:
        if selector in out:
            continue
        while candidate in used:
            candidate += 1
        if candidate > MAX_FQDN_SELECTOR_IDENTITY:
            raise IdentityExhaustedError("no free toFQDNs selector identity left")
        out[selector] = candidate
        used.add(candidate)
    return out


def fqdn_label(selector: DNSRule) -> str:
    """The label shown for a toFQDNs selector identity (flows, ``policy get``)."""
    if selector.match_name is not None:
        return f"{FQDN_SOURCE}:matchName={selector.match_name}"
    return f"{FQDN_SOURCE}:matchPattern={selector.match_pattern}"
