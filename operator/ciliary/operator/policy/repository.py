"""The policy repository: valid policies by uid, with a monotonically increasing revision.

Owns :class:`PolicyRepository` (mutable, held by the operator shell) and
:class:`RepositorySnapshot` (immutable, handed to ``resolution``). Only valid
policies enter: :meth:`PolicyRepository.upsert` runs
``ciliary.operator.api.validation.validate_policy`` and, when it finds problems,
raises :class:`~ciliary.operator.api.errors.PolicyInvalidError` and leaves the
repository (and so enforcement) exactly as it was. Every change that alters the
stored content bumps the revision by one; a no-op upsert or a delete of an
unknown uid returns the current revision unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ciliary.operator.api.errors import PolicyInvalidError
from ciliary.operator.api.networkpolicy import NetworkPolicy, validate_network_policy
from ciliary.operator.api.policies import AnyPolicy
from ciliary.operator.api.validation import validate_policy
from ciliary.operator.intents import PolicyRef
from ciliary.operator.policy.compiling import CompiledRule, compile_policy, policy_ref
from ciliary.operator.policy.netpol_compiling import compile_network_policy


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    """One valid policy as resolution sees it."""

    ref: PolicyRef
    rules: tuple[CompiledRule, ...]

    @property
    def uid(self) -> str:
        return self.ref.uid


@dataclass(frozen=True, slots=True)
class RepositorySnapshot:
    """An immutable view of the repository at one revision."""

    revision: int = 0
    policies: Mapping[str, StoredPolicy] = field(default_factory=lambda: MappingProxyType({}))

    def rules(self) -> Iterator[CompiledRule]:
        """Every rule, in a deterministic order (by policy uid, then rule index)."""
        for uid in sorted(self.policies):
            yield from self.policies[uid].rules


class PolicyRepository:
    """Valid policies by uid; every content change bumps :attr:`revision`."""

    def __init__(self) -> None:
        self._policies: dict[str, StoredPolicy] = {}
        self._revision = 0
        self._snapshot: RepositorySnapshot | None = None

    @property
    def revision(self) -> int:
        return self._revision

    def __contains__(self, uid: str) -> bool:
        return uid in self._policies

    def __len__(self) -> int:
        return len(self._policies)

    def get(self, uid: str) -> StoredPolicy | None:
        return self._policies.get(uid)

    def upsert(self, policy: AnyPolicy | NetworkPolicy) -> int:
        """Add or replace ``policy`` (keyed by its uid, or kind/namespace/name without one).

        A CNP/CCNP and a Kubernetes NetworkPolicy compile into the same rules.
        Raises ``PolicyInvalidError`` for an invalid policy; the repository is then unchanged.
        """
        if isinstance(policy, NetworkPolicy):
            validate_network_policy(policy)
        else:
            problems = validate_policy(policy)
            if problems:
                raise PolicyInvalidError(policy.kind, policy.namespace, policy.name, problems)
        ref = policy_ref(policy)
        uid = ref.uid or _fallback_uid(ref)
        if not ref.uid:
            ref = ref.model_copy(update={"uid": uid})
        with_uid = policy.model_copy(update={"metadata": policy.metadata.model_copy(update={"uid": uid})})
        rules = compile_network_policy(with_uid) if isinstance(with_uid, NetworkPolicy) else compile_policy(with_uid)
        stored = StoredPolicy(ref=ref, rules=rules)
        if self._policies.get(uid) == stored:
            return self._revision
        self._policies[uid] = stored
        return self._bump()

    def delete(self, uid: str) -> int:
        """Remove the policy with ``uid``; unknown uids change nothing."""
        if self._policies.pop(uid, None) is None:
            return self._revision
        return self._bump()

    def snapshot(self) -> RepositorySnapshot:
        """The current content as an immutable value (cached until the next change)."""
        if self._snapshot is None:
            self._snapshot = RepositorySnapshot(self._revision, MappingProxyType(dict(self._policies)))
        return self._snapshot

    def _bump(self) -> int:
        self._revision += 1
        self._snapshot = None
        return self._revision


def _fallback_uid(ref: PolicyRef) -> str:
    return f"{ref.kind}.{ref.namespace}.{ref.name}"
