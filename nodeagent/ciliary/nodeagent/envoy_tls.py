"""TLS in the node's Envoy (egress interception, ingress termination): filter chains, upstream clusters and
secret files (pure).

Owns :func:`chain_tls` (which TLS context one egress filter chain's rules ask for),
:func:`filter_chain` (the chain that terminates the pod's TLS and applies the HTTP rules
inside it), :func:`clusters` (one upstream cluster per originating context, for the CDS
file) and :func:`secret_files` (the PEM files those reference).

How an intercepted connection is handled (``terminatingTLS`` + ``originatingTLS`` on an egress
port rule with ``rules.http``; ``policy.tls_secrets`` on the operator side):

- the chain of (pod, port, destination identity) carries a ``DownstreamTlsContext`` with the
  terminating context's certificate and key: the pod must trust the CA that signed them. When
  the terminating Secret also has ``ca.crt``, a client certificate signed by it is required
  (Cilium's meaning of a trusted CA in a terminating context). With ``serverNames`` the chain
  matches only those SNI values (``tls_inspector``): a pod asking for another name matches no
  chain and its connection is closed;
- inside, the HTTP rules apply as for plain HTTP (``envoy_routes``: 403 ``Access denied``
  inside TLS for a request no rule allows);
- an allowed request goes to the original destination (from the pod's own address, like
  every egress request) over a new TLS connection that verifies the server against the
  originating context's CA (``UpstreamTlsContext``) and asks for, and checks the certificate
  against, the name the pod asked for (its SNI, else the request's host: ``auto_sni``,
  ``auto_san_validation``). A certificate in the originating Secret is presented as the
  proxy's client certificate;
- fail closed: a chain whose covering rules mix TLS contexts (or TLS and plain HTTP, e.g. an
  any-peer port rule with TLS and a peer's without) denies every request (its rules become
  none) and the node reports its HTTP policies not enforcing, naming the chain; the operator
  never publishes an entry whose Secret could not be read (its HTTP rules are dropped: the
  kernel drops the connections).

Ingress termination (``envoy_config`` builds the chains) uses the same pieces: the terminating
context's ``DownstreamTlsContext`` on the pod's chain, and with ``originatingTLS`` an ingress
cluster (:data:`INGRESS_TLS_CLUSTER_PREFIX`, upstream from the node with the ingress mark, the
pod verified against the CA and the client's name); without it, plain HTTP to the pod.

**Secrets reach Envoy as files**, not SDS: each PEM item is written by the agent
(``envoy_proxy``) into ``<run dir>/tls/`` (directory 0700, files 0600, created with those
modes, owned by the agent's user, which Envoy runs as) under a name derived from its content
(sha256), so a rotated Secret gives new paths, hence a new listener and cluster version, and
Envoy never reads a half-written file; files no configuration names any more are removed. The
LDS and CDS documents hold only these paths, never key material.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ciliary.nodeagent import envoy_bootstrap
from ciliary.operator import intents

TLS_CLUSTER_PREFIX = "cy_egress_tls_"
INGRESS_TLS_CLUSTER_PREFIX = "cy_ingress_tls_"
TLS_SOCKET = "envoy.transport_sockets.tls"
_TLS_API = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
SECRETS_DIR = "tls"
"""Directory under the agent's Envoy run dir holding the PEM files (0700; files 0600)."""


class Conflict:
    """Marker: a chain's rules ask for different TLS handling (it then denies everything)."""


CONFLICT = Conflict()
ChainTls = intents.TlsInterception | None | Conflict


def chain_tls(rules: Iterable[intents.HttpRule] | None, covering: Iterable[intents.PolicyEntry]) -> ChainTls:
    """The TLS interception of a chain with ``rules`` (None: an L4 allow wins) from ``covering`` entries.

    An L4 allow on a port where some covering entry intercepts TLS passes the connection through
    untouched (returned as the interception: :func:`filter_chain` gives a TCP pass-through)."""
    if rules is None:
        found = {r.tls for e in covering for r in e.http or () if r.tls is not None}
        return next(iter(found)) if len(found) == 1 else (CONFLICT if found else None)
    kinds = {r.tls for r in rules}
    if len(kinds) > 1 and any(k is not None for k in kinds):
        return CONFLICT
    return next(iter(kinds)) if kinds else None


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_name(content: str) -> str:
    """The file a PEM item is written to (relative to the secrets directory): named by its content."""
    return f"{_digest(content)}.pem"


def _path(secrets_dir: str, content: str) -> dict[str, str]:
    return {"filename": f"{secrets_dir}/{file_name(content)}"}


def material(intent: intents.NodeIntent, ref: intents.TlsContextRef) -> intents.TlsMaterial | None:
    return intent.tls_secrets.get(ref.key())


def cluster_name(originating: intents.TlsMaterial, *, ingress: bool = False) -> str:
    """The upstream cluster of one originating context (by its content: rotation gives a new cluster)."""
    prefix = INGRESS_TLS_CLUSTER_PREFIX if ingress else TLS_CLUSTER_PREFIX
    return prefix + _digest(originating.trusted_ca, originating.certificate, originating.private_key)


def _certificate(secrets_dir: str, m: intents.TlsMaterial) -> list[dict[str, Any]]:
    if not m.certificate:
        return []
    return [{"certificate_chain": _path(secrets_dir, m.certificate),
             "private_key": _path(secrets_dir, m.private_key)}]


def downstream_context(secrets_dir: str, terminating: intents.TlsMaterial) -> dict[str, Any]:
    """The ``transport_socket`` terminating the pod's TLS."""
    common: dict[str, Any] = {"tls_certificates": _certificate(secrets_dir, terminating)}
    context: dict[str, Any] = {"@type": _TLS_API + "DownstreamTlsContext", "common_tls_context": common}
    if terminating.trusted_ca:
        common["validation_context"] = {"trusted_ca": _path(secrets_dir, terminating.trusted_ca)}
        context["require_client_certificate"] = True
    return {"name": TLS_SOCKET, "typed_config": context}


def cluster(secrets_dir: str, originating: intents.TlsMaterial, *, ingress: bool = False) -> dict[str, Any]:
    """The original-destination cluster re-originating TLS, verifying the server with the CA. Ingress: to the
    local pod, from the node with the ingress upstream mark (as the plain ingress cluster)."""
    common: dict[str, Any] = {"validation_context": {"trusted_ca": _path(secrets_dir, originating.trusted_ca)}}
    if originating.certificate:
        common["tls_certificates"] = _certificate(secrets_dir, originating)
    bind = {"upstream_bind_config": {
        "source_address": {"address": "0.0.0.0", "port_value": 0},
        "socket_options": [{"level": envoy_bootstrap.SOL_SOCKET, "name": envoy_bootstrap.SO_MARK,
                            "int_value": envoy_bootstrap.FROM_PROXY_MARK, "state": "STATE_PREBIND"}]}} \
        if ingress else {}
    return {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": cluster_name(originating, ingress=ingress),
        **bind,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "original_dst_lb_config": {"use_http_header": True},
        "connect_timeout": "5s",
        "cleanup_interval": "60s",
        "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                                             "max_requests": 100000}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            # SNI and certificate name from the request's host unless the pod's SNI set them (below)
            "upstream_http_protocol_options": {"auto_sni": True, "auto_san_validation": True},
            "explicit_http_config": {"http_protocol_options": {}}}},
        "transport_socket": {"name": TLS_SOCKET, "typed_config": {
            "@type": _TLS_API + "UpstreamTlsContext", "common_tls_context": common}},
    }


def sni_filter() -> dict[str, Any]:
    """Network filter: the pod's SNI becomes the upstream SNI and the name its certificate must carry."""
    def value(key: str) -> dict[str, Any]:
        return {"object_key": key, "format_string": {"text_format_source": {
            "inline_string": "%REQUESTED_SERVER_NAME%"}}, "shared_with_upstream": "ONCE", "skip_if_empty": True}

    return {"name": "envoy.filters.network.set_filter_state", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config",
        "on_new_connection": [value("envoy.network.upstream_server_name"),
                              value("envoy.network.upstream_subject_alt_names")]}}


def passthrough_filter(stat_prefix: str, cluster: str) -> dict[str, Any]:
    """TCP pass-through to the original destination (an L4 allow wins over the TLS rules)."""
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": stat_prefix, "cluster": cluster}}


@dataclass(frozen=True, slots=True)
class TlsChain:
    """What :func:`filter_chain` adds to an egress chain: the match, the socket and the filters before HTTP."""

    match: dict[str, Any]
    transport_socket: dict[str, Any] | None
    cluster: str | None
    """The upstream cluster of allowed requests (None: no TLS upstream)."""
    sni: bool


def tls_chain(intent: intents.NodeIntent, tls: intents.TlsInterception, secrets_dir: str, *,
              ingress: bool = False) -> TlsChain | None:
    """The TLS parts of a terminating chain; None when the intent lacks the material (deny instead). Without an
    originating context (ingress only) the cluster is None: plain HTTP to the pod."""
    terminating = material(intent, tls.terminating)
    if terminating is None or not terminating.certificate:
        return None
    upstream: str | None = None
    if tls.originating is not None:
        originating = material(intent, tls.originating)
        if originating is None or not originating.trusted_ca:
            return None
        upstream = cluster_name(originating, ingress=ingress)
    elif not ingress:
        return None
    # No transport_protocol: Envoy matches it before the source address, so a peer's plain text would fall
    # to another peer's (CIDR, world) chain. Without it the peer meets its own chain whatever it sends, and
    # plain text fails the TLS handshake there (closed).
    match: dict[str, Any] = {}
    if tls.server_names:
        match["server_names"] = list(tls.server_names)
    return TlsChain(match, downstream_context(secrets_dir, terminating), upstream, upstream is not None)


def originating_materials(intent: intents.NodeIntent, direction: intents.Direction = intents.Direction.EGRESS
                          ) -> list[intents.TlsMaterial]:
    """The originating contexts the intent's entries of ``direction`` use (one cluster each)."""
    out: dict[str, intents.TlsMaterial] = {}
    for endpoint in intent.endpoints:
        for entry in endpoint.direction(direction).entries:
            for rule in entry.http or ():
                if rule.tls is None or rule.tls.originating is None:
                    continue
                found = material(intent, rule.tls.originating)
                if found is not None and found.trusted_ca:
                    out[cluster_name(found)] = found
    return [out[name] for name in sorted(out)]


def clusters(intent: intents.NodeIntent, secrets_dir: str, *, egress: bool = True) -> list[dict[str, Any]]:
    """The CDS resources: one TLS cluster per originating context of each direction (``egress`` False: the
    node has no egress listener)."""
    out = [cluster(secrets_dir, m, ingress=True)
           for m in originating_materials(intent, intents.Direction.INGRESS)]
    if egress:
        out += [cluster(secrets_dir, m) for m in originating_materials(intent)]
    return out


def secret_files(intent: intents.NodeIntent) -> Mapping[str, str]:
    """File name (in the secrets directory) -> PEM content, for every item the intent's material holds."""
    out: dict[str, str] = {}
    for m in intent.tls_secrets.values():
        for content in (m.trusted_ca, m.certificate, m.private_key):
            if content:
                out[file_name(content)] = content
    return out
