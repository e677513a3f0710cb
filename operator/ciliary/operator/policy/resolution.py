"""Resolution: repository snapshot plus cluster facts to one ``NodeIntent`` per node.

Owns :class:`ClusterState` (the input), :class:`Resolution` (the output),
:class:`Resolver` (the incremental engine the operator shell keeps for its
lifetime) and :func:`resolve_cluster` (a one-shot full resolution).

``Resolver.update(state)`` diffs ``state`` against the previous one (policies
by uid, pods by uid, namespaces, nodes; unchanged objects are recognised by
identity first, then equality) and recomputes only what depends on the change:

- identities: a pod's identity is the allocator's number for its
  security-relevant labels (``identities.pod_labels``); pods on the host
  network, without an IP or without a node are not endpoints and are ignored;
- a selector cache (selector -> matching identities) updated per identity that
  appears or disappears, recording which subject identities used each selector,
  entity (``cluster``, ``world``), CIDR match or named port (``named_ports``
  holds the named container ports by identity);
- endpoint policies cached per (identity, named ports); only identities whose
  inputs changed are recomputed, and only nodes holding them are rebuilt;
- a pod's proxy-visibility tuples are laid over its endpoint's entries (``visibility``), per pod;
- the ipcache (pod /32 -> pod identity, node IP -> host on its own node and
  remote-node elsewhere, CIDR prefixes of rules -> local CIDR identities; a pod
  or node address wins over an equal CIDR prefix) is shared by every node.

Every returned intent carries the snapshot's revision; ``Resolution.changed``
names the nodes whose content (``NodeIntent.content_hash``) may differ from the
previous update, so the publisher can skip the others.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from types import MappingProxyType

from ciliary.operator.intents import (
    HOST_SIDE_ADDRESS,
    SCHEMA_VERSION,
    Direction,
    DirectionPolicy,
    DNSRule,
    EndpointIntent,
    IpcacheEntry,
    NodeIntent,
    PolicyRef,
)
from ciliary.operator.policy import entries, identities
from ciliary.operator.policy.compiling import CidrMatch, CompiledRule
from ciliary.operator.policy.identities import (
    IdentityAllocator,
    InMemoryIdentityAllocator,
    Reserved,
    fqdn_label,
)
from ciliary.operator.policy.inputs import NamespaceInfo, NodeInfo, PodInfo
from ciliary.operator.policy.named_ports import NamedPortIndex, NamedPorts, PortOwners
from ciliary.operator.policy.repository import RepositorySnapshot
from ciliary.operator.policy.selection import LabelSet, SelectionIndex, Selector
from ciliary.operator.policy.visibility import apply_visibility

Network = ipaddress.IPv4Network
PortsKey = tuple[tuple[str, tuple[tuple[str, int], ...]], ...]


@dataclass(frozen=True)
class ClusterState:
    """Everything resolution reads. Mappings are keyed by pod uid, namespace name and node name."""

    policies: RepositorySnapshot = field(default_factory=RepositorySnapshot)
    pods: Mapping[str, PodInfo] = field(default_factory=dict)
    namespaces: Mapping[str, NamespaceInfo] = field(default_factory=dict)
    nodes: Mapping[str, NodeInfo] = field(default_factory=dict)
    cluster_name: str = identities.DEFAULT_CLUSTER_NAME


@dataclass(frozen=True)
class ResolutionOptions:
    allow_host_ingress: bool = True
    """Always allow ingress from the local host (Kubernetes' allow-localhost=always)."""


@dataclass(frozen=True)
class Resolution:
    revision: int
    intents: Mapping[str, NodeIntent]
    changed: frozenset[str]
    """Nodes whose intent content may have changed (new nodes included)."""
    removed: frozenset[str]
    """Nodes that no longer exist (delete their intents)."""


@dataclass(frozen=True, slots=True)
class _EndpointPolicy:
    ingress: DirectionPolicy
    egress: DirectionPolicy
    policies: frozenset[PolicyRef]

    @property
    def uids(self) -> tuple[str, ...]:
        return tuple(sorted({p.uid for p in self.policies}))


def is_endpoint(pod: PodInfo) -> bool:
    return not pod.host_network and bool(pod.ipv4) and bool(pod.node)


class Resolver(entries.PeerSource):
    """Incremental resolution; keep one per operator process and feed it every new state."""

    def __init__(
        self, allocator: IdentityAllocator | None = None, options: ResolutionOptions | None = None
    ) -> None:
        self._allocator: IdentityAllocator = allocator or InMemoryIdentityAllocator()
        self._options = options or ResolutionOptions()
        self._reset()

    def _reset(self) -> None:
        self._state: ClusterState | None = None
        self._index = SelectionIndex()
        for number, labels in identities.RESERVED_LABELS.items():
            self._index.add(number, labels)
        self._pod_labels: dict[str, LabelSet] = {}
        self._pod_identity: dict[str, int] = {}
        self._pod_ports: dict[str, PortsKey] = {}
        self._identity_pods: dict[int, set[str]] = {}
        self._ports = NamedPortIndex()
        self._cidr_ids: dict[Network, int] = {}
        self._fqdn_ids: dict[DNSRule, int] = {}
        self._fqdn_selectors: dict[int, DNSRule] = {}
        self._rules: tuple[CompiledRule, ...] = ()
        self._subject_rules: dict[int, tuple[CompiledRule, ...]] = {}
        self._subject_rules_complete = False
        self._selections: dict[Selector, set[int]] = {}
        self._selector_users: dict[Selector, set[int]] = {}
        self._cidr_cache: dict[CidrMatch, frozenset[int]] = {}
        self._users: dict[str, set[int]] = {"cluster": set(), "world": set(), "cidr": set(), "ports": set(),
                                            "fqdn": set()}
        self._policy_cache: dict[tuple[int, PortsKey], _EndpointPolicy] = {}
        self._cache_keys: dict[int, set[tuple[int, PortsKey]]] = {}
        self._dirty: set[int] = set()
        self._node_pods: dict[str, set[str]] = {}
        self._endpoint_cache: dict[str, tuple[_EndpointPolicy, EndpointIntent]] = {}
        self._ipcache_dirty = True
        self._ipcache_base: list[IpcacheEntry] = []
        self._ipcache_order: list[str] | None = None
        self._ipcache_entries: dict[tuple[str, int], IpcacheEntry] = {}
        self._ipcache_node_pos: dict[str, int] = {}
        self._identity_labels: dict[int, tuple[str, ...]] = {}
        self._intents: dict[str, NodeIntent] = {}

    # ----------------------------------------------------------------- update

    def update(self, state: ClusterState) -> Resolution:
        """Bring the intents in line with ``state``; cheap when little changed."""
        old = self._state
        if old is not None and old.cluster_name != state.cluster_name:
            self._reset()
            old = None
        dirty_nodes: set[str] = set()
        if old is None or old.policies is not state.policies:
            self._apply_policies(old.policies if old else None, state.policies)
        old_ns = old.namespaces if old else {}
        changed_ns = {n for n in {*old_ns, *state.namespaces} if old_ns.get(n) != state.namespaces.get(n)}
        self._apply_pods(old.pods if old else {}, state, changed_ns, dirty_nodes)
        old_nodes = old.nodes if old else {}
        for name in {*old_nodes, *state.nodes}:
            before, after = old_nodes.get(name), state.nodes.get(name)
            if before is after or before == after:
                continue
            dirty_nodes.add(name)
            if (before and before.ipv4) != (after and after.ipv4):
                self._ipcache_dirty = True
        self._state = state
        for ident in self._dirty:
            for key in self._cache_keys.pop(ident, ()):
                self._policy_cache.pop(key, None)
            for uid in self._identity_pods.get(ident, ()):
                node = self._pod_node(uid)
                if node is not None:
                    dirty_nodes.add(node)
        self._dirty.clear()
        ipcache_changed = self._ipcache_dirty
        if ipcache_changed:
            self._rebuild_ipcache()
        revision = state.policies.revision
        removed = frozenset(n for n in self._intents if n not in state.nodes)
        for name in removed:
            del self._intents[name]
        changed: set[str] = set()
        for name in state.nodes:
            previous = self._intents.get(name)
            if previous is None or name in dirty_nodes or ipcache_changed:
                if previous is None or name in dirty_nodes:
                    intent = self._build_intent(name, revision)
                else:
                    intent = previous.model_copy(update={
                        "revision": revision, "ipcache": self._node_ipcache(name),
                        "identity_labels": self._identity_labels, "fqdn_selectors": self._fqdn_selectors,
                    })
                if previous is None or intent != previous.model_copy(update={"revision": revision}):
                    changed.add(name)
            elif previous.revision != revision:
                intent = previous.model_copy(update={"revision": revision})
            else:
                intent = previous
            self._intents[name] = intent
        return Resolution(revision, MappingProxyType(dict(self._intents)), frozenset(changed), removed)

    def _pod_node(self, uid: str) -> str | None:
        assert self._state is not None
        pod = self._state.pods.get(uid)
        return pod.node if pod is not None else None

    # --------------------------------------------------------------- policies

    def _apply_policies(self, old: RepositorySnapshot | None, new: RepositorySnapshot) -> None:
        old_policies = old.policies if old else {}
        for uid in {*old_policies, *new.policies}:
            before, after = old_policies.get(uid), new.policies.get(uid)
            if before is after or before == after:
                continue
            for stored in (before, after):
                for rule in stored.rules if stored else ():
                    self._dirty |= self._index.select(rule.subject)
        self._rules = tuple(new.rules())
        self._subject_rules.clear()
        self._subject_rules_complete = False
        used = {s for rule in self._rules for s in rule.selectors()}
        for selector in [s for s in self._selections if s not in used]:
            del self._selections[selector]
            self._selector_users.pop(selector, None)
        prefixes = [p for rule in self._rules for d in Direction for item in rule.items(d) for p in item.prefixes()]
        cidr_ids = identities.assign_cidr_identities(prefixes, self._cidr_ids)
        if cidr_ids != self._cidr_ids:
            for prefix, number in self._cidr_ids.items():
                if cidr_ids.get(prefix) != number:
                    self._identity_gone(number)
            for prefix, number in cidr_ids.items():
                if self._cidr_ids.get(prefix) != number:
                    self._identity_new(number, identities.cidr_labels(prefix), world=True)
            self._cidr_ids = cidr_ids
            self._cidr_cache.clear()
            self._dirty |= self._users["cidr"] | self._users["world"]
            self._users["cidr"].clear()
            self._users["world"].clear()
            self._ipcache_dirty = True
        fqdn_ids = identities.assign_fqdn_identities(
            (f for rule in self._rules for item in rule.egress for f in item.fqdns), self._fqdn_ids)
        if fqdn_ids != self._fqdn_ids:
            self._fqdn_ids = fqdn_ids
            self._fqdn_selectors = {number: selector for selector, number in sorted(fqdn_ids.items(),
                                                                                   key=lambda kv: kv[1])}
            self._dirty |= self._users["fqdn"]
            self._users["fqdn"].clear()
            self._ipcache_dirty = True  # every intent carries the selector table and its labels

    # ------------------------------------------------------------------- pods

    def _apply_pods(
        self, old: Mapping[str, PodInfo], state: ClusterState, changed_ns: Set[str], dirty_nodes: set[str]
    ) -> None:
        new = state.pods
        todo: list[str] = []
        if old is not new:
            todo = [uid for uid, pod in new.items() if (prev := old.get(uid)) is not pod and prev != pod]
            todo += [uid for uid in old if uid not in new]
        if changed_ns:
            todo += [uid for uid, pod in new.items() if pod.namespace in changed_ns]
        for uid in sorted(set(todo), key=lambda u: _pod_order(new.get(u) or old[u])):
            before, after = old.get(uid), new.get(uid)
            if before is not None and uid in self._pod_identity:
                self._remove_pod(before)
                dirty_nodes.add(before.node or "")
            if after is not None and is_endpoint(after):
                self._add_pod(after, state)
                dirty_nodes.add(after.node or "")

    def _add_pod(self, pod: PodInfo, state: ClusterState) -> None:
        labels = identities.pod_labels(pod, state.namespaces.get(pod.namespace), state.cluster_name)
        ident = self._allocator.allocate(labels)
        self._pod_labels[pod.uid] = labels
        self._pod_identity[pod.uid] = ident
        named = pod.named_ports()
        self._pod_ports[pod.uid] = tuple(sorted(named.items()))
        self._node_pods.setdefault(pod.node or "", set()).add(pod.uid)
        members = self._identity_pods.get(ident)
        if members is None:
            self._identity_pods[ident] = members = set()
            self._identity_new(ident, labels, world=False)
        members.add(pod.uid)
        self._count_ports(ident, named, +1)
        self._ipcache_dirty = True

    def _remove_pod(self, pod: PodInfo) -> None:
        ident = self._pod_identity.pop(pod.uid)
        labels = self._pod_labels.pop(pod.uid)
        ports = dict(self._pod_ports.pop(pod.uid))
        self._endpoint_cache.pop(pod.uid, None)
        self._node_pods.get(pod.node or "", set()).discard(pod.uid)
        members = self._identity_pods[ident]
        members.discard(pod.uid)
        self._count_ports(ident, ports, -1)
        if not members:
            del self._identity_pods[ident]
            self._identity_gone(ident)
            self._allocator.release(labels)
        self._ipcache_dirty = True

    def _count_ports(self, ident: int, named: NamedPorts, delta: int) -> None:
        if self._ports.count(ident, named, delta):
            self._dirty |= self._users["ports"]
            self._users["ports"].clear()

    # ------------------------------------------------------------- identities

    def _identity_new(self, ident: int, labels: LabelSet, *, world: bool) -> None:
        self._index.add(ident, labels)
        for selector, members in self._selections.items():
            if selector.matches(labels):
                members.add(ident)
                self._dirty |= self._selector_users.get(selector, set())
        self._dirty |= self._users["world" if world else "cluster"]
        self._dirty.add(ident)
        if self._subject_rules_complete:
            self._subject_rules[ident] = tuple(r for r in self._rules if ident in self._members(r.subject))

    def _identity_gone(self, ident: int) -> None:
        self._index.remove(ident)
        for selector, members in self._selections.items():
            if ident in members:
                members.discard(ident)
                self._dirty |= self._selector_users.get(selector, set())
        self._dirty |= self._users["cluster"] | self._users["world"]
        self._subject_rules.pop(ident, None)
        self._dirty.add(ident)

    # ------------------------------------------- entries.PeerSource, for entries

    def select(self, selector: Selector, user: int) -> Set[int]:
        self._selector_users.setdefault(selector, set()).add(user)
        return self._members(selector)

    def _members(self, selector: Selector) -> set[int]:
        """Cached selection, without recording a user (an identity's own subject rules never change)."""
        members = self._selections.get(selector)
        if members is None:
            members = self._selections[selector] = set(self._index.select(selector))
        return members

    def entity(self, name: str, user: int) -> Set[int] | None:
        if name in ("cluster", "world", "world-ipv4"):
            self._users["world" if name.startswith("world") else "cluster"].add(user)
        return identities.entity_identities(
            name, pod_identities=self._identity_pods.keys(), cidr_identities=self._cidr_ids.values()
        )

    def cidr(self, match: CidrMatch, user: int) -> Set[int]:
        self._users["cidr"].add(user)
        found = self._cidr_cache.get(match)
        if found is None:
            ids = {number for prefix, number in self._cidr_ids.items() if match.covers(prefix)}
            if match.cidr.prefixlen == 0:
                ids.add(int(Reserved.WORLD))
            found = self._cidr_cache[match] = frozenset(ids)
        return found

    def fqdn(self, selector: DNSRule, user: int) -> int:
        self._users["fqdn"].add(user)
        return self._fqdn_ids[selector]

    def named_ports(self, peer: int, user: int) -> NamedPorts:
        self._users["ports"].add(user)
        return self._ports.of(peer)

    def port_owners(self, name: str, user: int) -> PortOwners:
        self._users["ports"].add(user)
        return self._ports.owners(name)

    # ------------------------------------------------------------ endpoints

    def _rules_for(self, ident: int) -> tuple[CompiledRule, ...]:
        if not self._subject_rules_complete:
            inverted: dict[int, list[CompiledRule]] = {}
            for rule in self._rules:
                for member in self._members(rule.subject):
                    inverted.setdefault(member, []).append(rule)
            self._subject_rules = {member: tuple(found) for member, found in inverted.items()}
            self._subject_rules_complete = True
            return self._subject_rules.setdefault(ident, ())
        return self._subject_rules.get(ident, ())

    def _endpoint_policy(self, ident: int, ports: PortsKey) -> _EndpointPolicy:
        key = (ident, ports)
        found = self._policy_cache.get(key)
        if found is None:
            rules = self._rules_for(ident)
            own = dict(ports)
            found = _EndpointPolicy(
                ingress=entries.direction_policy(
                    ident, rules, Direction.INGRESS, own_ports=own, source=self,
                    allow_host_ingress=self._options.allow_host_ingress,
                ),
                egress=entries.direction_policy(ident, rules, Direction.EGRESS, own_ports=own, source=self),
                policies=frozenset(r.policy for r in rules),
            )
            self._policy_cache[key] = found
            self._cache_keys.setdefault(ident, set()).add(key)
        return found

    def _endpoint(self, pod: PodInfo) -> tuple[_EndpointPolicy, EndpointIntent]:
        ident = self._pod_identity[pod.uid]
        policy = self._endpoint_policy(ident, self._pod_ports[pod.uid])
        cached = self._endpoint_cache.get(pod.uid)
        if cached is not None and cached[0] is policy and cached[1].identity == ident:
            return cached
        intent = EndpointIntent(
            namespace=pod.namespace, pod=pod.name, uid=pod.uid, ipv4=pod.ipv4 or "", identity=ident,
            ingress=apply_visibility(policy.ingress, pod.visibility, Direction.INGRESS),
            egress=apply_visibility(policy.egress, pod.visibility, Direction.EGRESS), policies=policy.uids,
        )
        self._endpoint_cache[pod.uid] = (policy, intent)
        return policy, intent

    def _build_intent(self, node: str, revision: int) -> NodeIntent:
        assert self._state is not None
        pods = sorted((self._state.pods[uid] for uid in self._node_pods.get(node, ())), key=_pod_order)
        endpoints = []
        refs: set[PolicyRef] = set()
        for pod in pods:
            policy, endpoint = self._endpoint(pod)
            endpoints.append(endpoint)
            refs |= policy.policies
        return NodeIntent.model_construct(
            schema_version=SCHEMA_VERSION,
            node=node,
            revision=revision,
            endpoints=tuple(endpoints),
            ipcache=self._node_ipcache(node),
            identity_labels=self._identity_labels,
            policies=tuple(sorted(refs, key=lambda r: (r.kind, r.namespace, r.name, r.uid))),
            fqdn_selectors=self._fqdn_selectors,
        )

    # ---------------------------------------------------------------- ipcache

    def _rebuild_ipcache(self) -> None:
        assert self._state is not None
        table: dict[str, int] = {_cidr_text(prefix): number for prefix, number in self._cidr_ids.items()}
        for uid, ident in self._pod_identity.items():
            table[f"{self._state.pods[uid].ipv4}/32"] = ident
        # the host side of every pod veth carries this link-local address (the CNI plugin's
        # gateway): a packet from it is the pod's own node, on whichever node it is seen
        table[f"{HOST_SIDE_ADDRESS}/32"] = int(Reserved.HOST)
        node_cidrs: dict[str, str] = {}
        for name, node in self._state.nodes.items():
            if node.ipv4:
                node_cidrs[name] = f"{node.ipv4}/32"
                table[node_cidrs[name]] = int(Reserved.REMOTE_NODE)
        if self._ipcache_order is None or len(self._ipcache_order) != len(table) or any(
            c not in table for c in self._ipcache_order
        ):
            self._ipcache_order = sorted(table, key=_cidr_sort_key)
        entry_cache = self._ipcache_entries
        fresh: dict[tuple[str, int], IpcacheEntry] = {}
        base = []
        for cidr in self._ipcache_order:
            key = (cidr, table[cidr])
            entry = entry_cache.get(key) or IpcacheEntry.model_construct(cidr=cidr, identity=key[1])
            fresh[key] = entry
            base.append(entry)
        position = {cidr: i for i, cidr in enumerate(self._ipcache_order)} if node_cidrs else {}
        self._ipcache_node_pos = {name: position[cidr] for name, cidr in node_cidrs.items()}
        for cidr in node_cidrs.values():
            key = (cidr, int(Reserved.HOST))
            fresh[key] = entry_cache.get(key) or IpcacheEntry.model_construct(cidr=cidr, identity=key[1])
        self._ipcache_entries = fresh
        self._ipcache_base = base
        labels = {ident: labels.strings() for ident, labels in self._index.items()}
        for number, selector in self._fqdn_selectors.items():
            labels[number] = (fqdn_label(selector),)
        if labels != self._identity_labels:
            self._identity_labels = dict(sorted(labels.items()))
        self._ipcache_dirty = False

    def _node_ipcache(self, node: str) -> tuple[IpcacheEntry, ...]:
        pos = self._ipcache_node_pos.get(node)
        if pos is None:
            return tuple(self._ipcache_base)
        own = list(self._ipcache_base)
        own[pos] = self._ipcache_entries[(own[pos].cidr, int(Reserved.HOST))]
        return tuple(own)


def _cidr_text(prefix: Network) -> str:
    return f"{prefix.network_address}/{prefix.prefixlen}"


def _cidr_sort_key(cidr: str) -> tuple[int, int]:
    address, _, length = cidr.partition("/")
    a, b, c, d = (int(x) for x in address.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d, int(length)


def _pod_order(pod: PodInfo) -> tuple[str, str, str]:
    return pod.namespace, pod.name, pod.uid


def resolve_cluster(
    state: ClusterState,
    allocator: IdentityAllocator | None = None,
    options: ResolutionOptions | None = None,
) -> dict[str, NodeIntent]:
    """One full resolution (a fresh :class:`Resolver`): node name -> intent."""
    return dict(Resolver(allocator, options).update(state).intents)
