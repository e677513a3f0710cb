"""Header values from Secrets (``headerMatches[].secret``): which Secrets a node's intent needs, and their
values put into it (pure).

Owns :func:`references` (the Secrets the header matches of a set of intents name, after
:func:`fill_namespaces`), :func:`value` (the expected value out of one Secret's data) and
:func:`attach` (an intent with its ``header_secrets`` filled in, and the problems found). The
reconciler fetches and watches these Secrets together with the TLS ones (``tls_secrets``): a
Secret's value goes only into the intents of nodes hosting an endpoint whose ingress or egress
entries name it, and a changed Secret changes those intents (rotation: published again).

Cilium's rules: the Secret must hold exactly one item, whose value is the expected header
value (an empty one: presence only); its namespace defaults to the selected endpoint's. Ciliary
adds: the value must be a header value Envoy can match and set (no control characters, e.g. the
final newline of a file given to ``kubectl create secret --from-file``, no leading or trailing
blanks, which Envoy strips from requests: such a value could never match).

When the Secret cannot be used (missing, not exactly one item, a bad value):

- with an inline ``value`` too, that value is matched instead (Cilium's documented fallback);
- otherwise the entry loses its HTTP rules (fail closed: its connections are dropped,
  ``PROXY_UNAVAILABLE``, with or without ``mismatch``);

either way the problem names the Secret (never its content) for the policy's status
(``Enforced=False``) and a Warning Event ``HeaderSecretProblem``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from ciliary.operator.intents import (
    DirectionPolicy,
    EndpointIntent,
    HeaderMatch,
    HeaderSecret,
    NodeIntent,
    PolicyEntry,
    SecretRef,
)
from ciliary.operator.policy.tls_secrets import SecretData, SecretKey, TlsProblem

PREFIX = "headerMatches Secret"
"""Every problem message of this module starts so (the Event reporter tells them from TLS ones by it)."""


class HeaderSecretError(ValueError):
    """A Secret that gives no header value (the message names the Secret, never its data)."""

    def __init__(self, ref: SecretRef, message: str) -> None:
        super().__init__(f"{PREFIX} {ref.key()}: {message}")
        self.ref = ref


def _directions(endpoint: EndpointIntent) -> tuple[tuple[str, DirectionPolicy], ...]:
    return ("ingress", endpoint.ingress), ("egress", endpoint.egress)


def _entry_matches(entry: PolicyEntry) -> Iterator[HeaderMatch]:
    for rule in entry.http or ():
        yield from (m for m in rule.header_matches if m.secret is not None)


def _matches(intent: NodeIntent) -> Iterator[HeaderMatch]:
    for endpoint in intent.endpoints:
        for _, policy in _directions(endpoint):
            for entry in policy.entries:
                yield from _entry_matches(entry)


def names_secrets(intent: NodeIntent) -> bool:
    """Does any header match of the intent take its value from a Secret?"""
    return any(True for _ in _matches(intent))


MatchChange = Callable[[HeaderMatch], HeaderMatch]
EntryChange = Callable[[PolicyEntry, str], PolicyEntry]
"""(entry, its endpoint's namespace) -> the entry to publish."""


def _change_matches(entry: PolicyEntry, change: MatchChange) -> PolicyEntry:
    """``entry`` with ``change`` applied to each header match that names a Secret."""
    if entry.http is None:
        return entry
    rules = []
    for rule in entry.http:
        matches = tuple(change(m) if m.secret is not None else m for m in rule.header_matches)
        rules.append(rule if matches == rule.header_matches else rule.model_copy(update={"header_matches": matches}))
    return entry if tuple(rules) == entry.http else entry.model_copy(update={"http": tuple(rules)})


def _map_entries(intent: NodeIntent, change: EntryChange) -> NodeIntent:
    endpoints = []
    for endpoint in intent.endpoints:
        update = {}
        for name, policy in _directions(endpoint):
            entries = tuple(change(entry, endpoint.namespace) for entry in policy.entries)
            if entries != policy.entries:
                update[name] = DirectionPolicy(enforced=policy.enforced, entries=entries)
        endpoints.append(endpoint.model_copy(update=update) if update else endpoint)
    out = tuple(endpoints)
    return intent if out == intent.endpoints else intent.model_copy(update={"endpoints": out})


def fill_namespaces(intent: NodeIntent) -> NodeIntent:
    """``intent`` with each header Secret's empty namespace set to its endpoint's namespace."""
    def entry_change(entry: PolicyEntry, namespace: str) -> PolicyEntry:
        def filled(match: HeaderMatch) -> HeaderMatch:
            if match.secret is None or match.secret.namespace:
                return match
            return match.model_copy(update={"secret": match.secret.model_copy(update={"namespace": namespace})})
        return _change_matches(entry, filled)

    return _map_entries(intent, entry_change)


def references(intents: Iterable[NodeIntent]) -> set[SecretKey]:
    """The Secrets the given intents (after :func:`fill_namespaces`) name in header matches."""
    return {(m.secret.namespace, m.secret.name) for intent in intents for m in _matches(intent)
            if m.secret is not None}


def _valid_header_value(text: str) -> bool:
    if text != text.strip(" \t"):
        return False
    return not any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in text)


def value(ref: SecretRef, data: SecretData | None) -> str:
    """The header value the Secret holds; raises :class:`HeaderSecretError` (see the module docstring)."""
    if data is None:
        raise HeaderSecretError(ref, "not found")
    if len(data) != 1:
        raise HeaderSecretError(ref, f"must have exactly one item (it has {len(data)})")
    (item, raw), = data.items()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderSecretError(ref, f"item {item!r} is not UTF-8 text") from None
    if not text:
        # an empty value would only require the header to be present: a placeholder Secret must not turn a
        # secret match into that
        raise HeaderSecretError(ref, f"item {item!r} is empty")
    if not _valid_header_value(text):
        raise HeaderSecretError(ref, f"item {item!r} is not an HTTP header value (control characters, e.g. a "
                                     "final newline, or leading/trailing blanks)")
    return text


def attach(intent: NodeIntent, secrets: Mapping[SecretKey, SecretData | None]
           ) -> tuple[NodeIntent, list[TlsProblem]]:
    """``intent`` (namespaces filled in) with the value of every header Secret it names in
    ``header_secrets``; an unusable Secret falls back to the inline value, else its entry loses its
    HTTP rules (fail closed). ``secrets``: the Secrets fetched (None or absent: not found)."""
    intent = fill_namespaces(intent)
    if not names_secrets(intent):
        return intent, []
    found: dict[str, HeaderSecret] = {}
    failed: dict[str, str] = {}
    for match in _matches(intent):
        assert match.secret is not None
        key = match.secret.key()
        if key in found or key in failed:
            continue
        try:
            found[key] = HeaderSecret(value=value(match.secret, secrets.get((match.secret.namespace,
                                                                              match.secret.name))))
        except HeaderSecretError as exc:
            failed[key] = str(exc)
    problems: dict[tuple[str, str], None] = {}

    def fallback(match: HeaderMatch) -> HeaderMatch:
        if match.secret is not None and match.secret.key() in failed:
            return match.model_copy(update={"secret": None})  # Cilium: the inline value when the Secret fails
        return match

    def entry_change(entry: PolicyEntry, _namespace: str) -> PolicyEntry:
        bad = [m for m in _entry_matches(entry) if m.secret is not None and m.secret.key() in failed]
        if not bad:
            return entry
        closed = any(not m.value for m in bad)
        for match in bad:
            assert match.secret is not None
            outcome = "the port's connections are dropped" if closed else "its inline value is matched instead"
            for rule in entry.rules:
                problems[(rule.uid, f"{failed[match.secret.key()]}: {outcome}")] = None
        return entry.model_copy(update={"http": None}) if closed else _change_matches(entry, fallback)

    out = _map_entries(intent, entry_change)
    used = {m.secret.key() for m in _matches(out) if m.secret is not None}
    out = out.model_copy(update={"header_secrets": {k: v for k, v in sorted(found.items()) if k in used}})
    return out, [TlsProblem(uid, message) for uid, message in problems]
