"""kopf glue: watch handlers for policies, pods, namespaces and nodes.

Every handler is a raw watch-event handler (``kopf.on.event``): it parses the body
once, updates the in-memory ``ClusterModel`` and returns; nothing is persisted on
the watched objects (no kopf annotations, no finalizers). Kubernetes
NetworkPolicies are watched too and go through the same repository (their
refusals and partial enforcement are Events; they have no status). Policy handlers also
compute the ``Valid`` condition (the status handover writes it, with
``Enforced``) and post an Event when a policy is refused, and tell the handover
which parts of a valid policy are not enforced as written (``policy.support``;
the policy then never reads ``Enforced=True``), with one Warning Event
``PolicyPartiallyEnforced`` per generation. An
invalid policy never changes enforcement: a new one is not added, and an edit
that breaks an enforced policy leaves the last valid version in force. Pods carrying a
proxy-visibility annotation get Events saying what it does (:func:`visibility_notices`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import kopf
from kubernetes_asyncio import client

from ciliary.operator.api import (
    PolicyInvalidError,
    PolicyParseError,
    PolicyProblem,
    parse_policy,
    visibility,
)
from ciliary.operator.api.networkpolicy import parse_network_policy
from ciliary.operator.kube.cluster_model import (
    ClusterModel,
    namespace_from_body,
    node_from_body,
    pod_from_body,
    secret_from_body,
)
from ciliary.operator.kube.kubeapi import (
    GROUP,
    NETPOL_GROUP,
    NETPOL_KIND,
    NETPOL_PLURAL,
    NETPOL_VERSION,
    POLICY_PLURALS,
    VERSION,
)
from ciliary.operator.policy import netpol_support, support
from ciliary.operator.status import validity

log = logging.getLogger(__name__)


@dataclass
class PolicyOutcome:
    problems: list[PolicyProblem]
    enforced_version: str  # "current", "previous" or "none"
    gaps: tuple[support.Gap, ...] = ()
    """Parts of the (valid) current version that are not enforced exactly as written."""

    @property
    def unenforced(self) -> str:
        """The gaps as one message; "" when everything is enforced as written."""
        return support.message(self.gaps) if self.gaps else ""


def ingest_policy(model: ClusterModel, body: Mapping[str, Any]) -> PolicyOutcome:
    """Parse, validate and record one policy body, CNP, CCNP or NetworkPolicy (pure apart from the model)."""
    uid = body.get("metadata", {}).get("uid", "")
    try:
        if body.get("kind") == NETPOL_KIND:
            netpol = parse_network_policy(body)
            model.upsert_policy(netpol)
            pod_cidrs = [n.pod_cidr for n in model.nodes.values() if n.pod_cidr]
            return PolicyOutcome([], "current", netpol_support.netpol_gaps(netpol, pod_cidrs))
        policy = parse_policy(body)
        model.upsert_policy(policy)
    except PolicyParseError as exc:
        problems = list(exc.problems) or [PolicyProblem(path="", message=exc.message)]
    except PolicyInvalidError as exc:
        problems = list(exc.problems)
    else:
        return PolicyOutcome([], "current", support.gaps(policy))
    return PolicyOutcome(problems, "previous" if uid in model.repository else "none")


class PolicyObserver(Protocol):
    """Told about every policy object and its validation outcome (the status handover, which writes both)."""

    def observe_policy(self, body: Mapping[str, Any]) -> None: ...

    def validated(self, uid: str, condition: Mapping[str, Any]) -> None: ...

    def assessed(self, uid: str, generation: int, unenforced: str) -> None: ...

    def forget_policy(self, uid: str) -> None: ...


def valid_condition(body: Mapping[str, Any], outcome: PolicyOutcome) -> dict[str, Any]:
    """The ``Valid`` condition for ``body``'s generation (without lastTransitionTime)."""
    wanted = validity.valid_condition(outcome.problems, int(body.get("metadata", {}).get("generation") or 0))
    if outcome.problems and outcome.enforced_version == "previous":
        wanted["message"] += "; the last valid version stays enforced"
    return wanted


def report_gaps(observer: PolicyObserver, uid: str, generation: int, outcome: PolicyOutcome) -> None:
    """Tell the observer what of a valid generation is not enforced (nothing to say of an invalid one)."""
    if not outcome.problems:
        observer.assessed(uid, generation, outcome.unenforced)


@dataclass(frozen=True)
class Notice:
    """One Event to post on a pod about its proxy-visibility annotation."""

    warning: bool
    reason: str
    message: str


def visibility_notices(body: Mapping[str, Any]) -> tuple[Notice, ...]:
    """The Events a pod's proxy-visibility annotation calls for (pure; none without the annotation).

    Warning ``VisibilityAnnotationInvalid``: the value is refused whole, nothing of the pod changes;
    Warning ``VisibilityAnnotationIgnored``: both keys are present, the older one is not read; Warning
    ``VisibilityNotApplied``: a host-network pod (not an endpoint); Normal ``VisibilityEnabled``: the
    ports whose traffic goes through the node's proxy to be observed."""
    meta, spec = body.get("metadata", {}) or {}, body.get("spec", {}) or {}
    found = visibility.pod_visibility(meta.get("annotations"))
    if not found.key:
        return ()
    out: list[Notice] = []
    if found.ignored:
        out.append(Notice(True, "VisibilityAnnotationIgnored",
                          f"{found.ignored} is ignored: {found.key} is present too and is the one read"))
    if found.problem:
        out.append(Notice(True, "VisibilityAnnotationInvalid",
                          f"{found.problem}; the annotation is not applied (no proxy redirect, policy unchanged)"))
    elif spec.get("hostNetwork"):
        out.append(Notice(True, "VisibilityNotApplied",
                          f"{found.key}: the pod is on the host network (not an endpoint): not applied"))
    else:
        out.append(Notice(False, "VisibilityEnabled",
                          f"L7 visibility: {found.describe()} go through the node's proxy to be observed "
                          f"(verdicts unchanged; visibility is not policy)"))
    return tuple(out)


def register(registry: kopf.OperatorRegistry, model: ClusterModel, observer: PolicyObserver, *,
             watch_secrets: bool = True) -> None:
    """Register every handler into ``registry`` (no module-level state); ``watch_secrets``: the Secrets TLS
    contexts name (rotation)."""

    warned: set[tuple[str, int]] = set()
    """(uid, generation) already given a PolicyPartiallyEnforced Event by this process."""

    async def policy_event(type: str | None, body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        uid = body.get("metadata", {}).get("uid", "")
        if type == "DELETED":
            model.delete_policy(uid)
            observer.forget_policy(uid)
            for seen in [w for w in warned if w[0] == uid]:
                warned.discard(seen)
            return
        observer.observe_policy(body)
        outcome = ingest_policy(model, body)
        generation = int(body.get("metadata", {}).get("generation") or 0)
        if outcome.problems:
            message = validity.problems_message(outcome.problems)
            kopf.warn(body, reason="PolicyInvalid", message=message)
            logger.warning("Refused invalid policy: %s", message)
        elif outcome.gaps and (uid, generation) not in warned:
            warned.add((uid, generation))
            scope = "Not enforced exactly as written" if body.get("kind") == NETPOL_KIND else \
                "Enforced at L3/L4 only; not enforced"
            kopf.warn(body, reason="PolicyPartiallyEnforced", message=f"{scope}: {outcome.unenforced}")
            logger.warning("Policy only partly enforced: %s", outcome.unenforced)
        observer.validated(uid, valid_condition(body, outcome))
        report_gaps(observer, uid, generation, outcome)

    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # KUBECONFIG (set from --kubeconfig) when given, else the in-cluster service account
        return kopf.login_with_kubeconfig(**kwargs) or kopf.login_with_service_account(**kwargs)

    kopf.on.login(id="login", registry=registry)(login)

    for kind, plural in POLICY_PLURALS.items():
        kopf.on.event(GROUP, VERSION, plural, id=f"{kind.lower()}_event", registry=registry)(policy_event)

    async def netpol_event(type: str | None, body: kopf.Body, logger: kopf.Logger, **kwargs: Any) -> None:
        # watch events of the core group carry no kind when kopf lists; the kind decides the parser
        named = {**body, "kind": NETPOL_KIND, "apiVersion": f"{NETPOL_GROUP}/{NETPOL_VERSION}"}
        await policy_event(type, named, logger, **kwargs)  # type: ignore[arg-type]

    kopf.on.event(NETPOL_GROUP, NETPOL_VERSION, NETPOL_PLURAL, id="networkpolicy_event",
                  registry=registry)(netpol_event)

    told: dict[str, tuple[Notice, ...]] = {}
    """Pod uid -> the visibility Events last posted for it by this process (posted again only on change)."""

    async def pod_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        uid = body["metadata"]["uid"]
        model.set_pod(uid, None if type == "DELETED" else pod_from_body(body))
        if type == "DELETED":
            told.pop(uid, None)
            return
        notices = visibility_notices(body)
        if notices and told.get(uid) != notices:
            pod = kopf.Body({"apiVersion": "v1", "kind": "Pod", "metadata": body.get("metadata", {})})
            for notice in notices:  # kopf.event: the operator's posting level (WARNING) would drop kopf.info's
                kopf.event(pod, type="Warning" if notice.warning else "Normal", reason=notice.reason,
                           message=notice.message)
        if notices:
            told[uid] = notices
        else:
            told.pop(uid, None)

    async def namespace_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        name = body["metadata"]["name"]
        model.set_namespace(name, None if type == "DELETED" else namespace_from_body(body))

    async def node_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        name = body["metadata"]["name"]
        model.set_node(name, None if type == "DELETED" else node_from_body(body))

    # async: kopf runs a sync handler in a worker thread, where it would change the model while the
    # reconcile loop (on the event loop) iterates it ("dictionary changed size during iteration")
    kopf.on.event("", "v1", "pods", id="pod_event", registry=registry)(pod_event)
    kopf.on.event("", "v1", "namespaces", id="namespace_event", registry=registry)(namespace_event)
    kopf.on.event("", "v1", "nodes", id="node_event", registry=registry)(node_event)

    async def secret_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        # only the Secrets TLS contexts name are read (the model drops the others unread); never logged
        meta = body.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if key in model.wanted_secrets:
            model.set_secret(key, None if type == "DELETED" else secret_from_body(body))

    if watch_secrets:
        kopf.on.event("", "v1", "secrets", id="secret_event", registry=registry)(secret_event)


async def initial_list(api: client.ApiClient, model: ClusterModel, observer: PolicyObserver) -> None:
    """List everything once before the first reconcile, so no intent is published from a partial view."""
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    for ns in (await core.list_namespace()).items:
        model.set_namespace(ns.metadata.name, namespace_from_body(api.sanitize_for_serialization(ns)))
    for node in (await core.list_node()).items:
        model.set_node(node.metadata.name, node_from_body(api.sanitize_for_serialization(node)))
    for pod in (await core.list_pod_for_all_namespaces()).items:
        model.set_pod(pod.metadata.uid, pod_from_body(api.sanitize_for_serialization(pod)))
    networking = client.NetworkingV1Api(api)
    netpols = [{**api.sanitize_for_serialization(item), "kind": NETPOL_KIND,
                "apiVersion": f"{NETPOL_GROUP}/{NETPOL_VERSION}"}
               for item in (await networking.list_network_policy_for_all_namespaces()).items]
    bodies: list[dict[str, Any]] = []
    for kind, plural in POLICY_PLURALS.items():
        listing = await custom.list_cluster_custom_object(GROUP, VERSION, plural)
        for body in listing.get("items", []):
            body.setdefault("kind", kind)
            bodies.append(body)
    for body in [*bodies, *netpols]:
        observer.observe_policy(body)
        outcome = ingest_policy(model, body)
        uid = body.get("metadata", {}).get("uid", "")
        observer.validated(uid, valid_condition(body, outcome))
        report_gaps(observer, uid, int(body.get("metadata", {}).get("generation") or 0), outcome)
