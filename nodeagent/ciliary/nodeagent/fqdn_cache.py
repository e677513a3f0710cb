"""What each endpoint of this node has resolved: (name, address) pairs with their expiry.

Pure (time is passed in). Owns :class:`FQDNCache`. An answer that passed the DNS
proxy is recorded for the endpoint that asked: each A record's address, under the
question's name and the record's owner name (a CNAME chain's names all lead to
the final addresses), until ``now + max(ttl, min_ttl)``. A newer answer for the
same (endpoint, name, address) extends the expiry, never shortens it. Per
endpoint at most ``max_ips`` distinct addresses are kept: when a new address
would exceed the cap, the addresses expiring first are dropped (so the cap
never stops a pod from reaching what it resolved last). :meth:`expire` removes
what is due. Addresses in the cluster (a pod or node address the ipcache knows)
are the caller's to filter (``fqdn_expansion``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ciliary.nodeagent.dns_policy import canonical

DEFAULT_MIN_TTL_S = 3600
DEFAULT_MAX_IPS_PER_ENDPOINT = 1000


@dataclass
class _Endpoint:
    expiry: dict[tuple[str, str], float] = field(default_factory=dict)
    """(name, address) -> when it expires (monotonic seconds)."""

    def addresses(self) -> dict[str, float]:
        """address -> its latest expiry over every name."""
        out: dict[str, float] = {}
        for (_name, address), when in self.expiry.items():
            out[address] = max(when, out.get(address, 0.0))
        return out


class FQDNCache:
    """Per endpoint (pod IPv4): which names resolved to which addresses, until when."""

    def __init__(self, *, min_ttl: float = DEFAULT_MIN_TTL_S, max_ips: int = DEFAULT_MAX_IPS_PER_ENDPOINT) -> None:
        if max_ips < 1:
            raise ValueError("max_ips must be at least 1")
        self.min_ttl = max(0.0, min_ttl)
        self.max_ips = max_ips
        self._endpoints: dict[str, _Endpoint] = {}
        self.evicted = 0
        """Addresses dropped because an endpoint reached the cap."""

    def record(self, endpoint: str, names: Iterable[str], answers: Iterable[tuple[str, int]], now: float) -> bool:
        """Record an answer's (address, ttl) pairs under each of ``names``; True when something changed."""
        names = sorted({canonical(n) for n in names})
        state = self._endpoints.setdefault(endpoint, _Endpoint())
        changed = False
        for address, ttl in answers:
            until = now + max(float(ttl), self.min_ttl)
            for name in names:
                key = (name, address)
                if state.expiry.get(key, -1.0) < until:
                    changed |= key not in state.expiry
                    state.expiry[key] = until
        changed |= self._enforce_cap(state)
        return changed

    def _enforce_cap(self, state: _Endpoint) -> bool:
        addresses = state.addresses()
        if len(addresses) <= self.max_ips:
            return False
        doomed = sorted(addresses, key=lambda a: (addresses[a], a))[: len(addresses) - self.max_ips]
        gone = set(doomed)
        for key in [k for k in state.expiry if k[1] in gone]:
            del state.expiry[key]
        self.evicted += len(gone)
        return True

    def drop(self, endpoint: str) -> bool:
        """Forget everything ``endpoint`` resolved (its pod is gone or replaced); True when it had anything."""
        return self._endpoints.pop(endpoint, None) is not None

    def expire(self, now: float) -> bool:
        """Drop every (name, address) due at ``now``; True when something was dropped."""
        changed = False
        for endpoint in list(self._endpoints):
            state = self._endpoints[endpoint]
            for key in [k for k, when in state.expiry.items() if when <= now]:
                del state.expiry[key]
                changed = True
            if not state.expiry:
                del self._endpoints[endpoint]
        return changed

    def forget(self, keep: Iterable[str]) -> bool:
        """Drop endpoints not in ``keep`` (pods that left the node)."""
        wanted = set(keep)
        gone = [e for e in self._endpoints if e not in wanted]
        for endpoint in gone:
            del self._endpoints[endpoint]
        return bool(gone)

    def next_expiry(self) -> float | None:
        whens = [w for state in self._endpoints.values() for w in state.expiry.values()]
        return min(whens) if whens else None

    def names_by_address(self) -> Mapping[str, Mapping[str, frozenset[str]]]:
        """endpoint -> address -> the names it was learnt under."""
        out: dict[str, dict[str, set[str]]] = {}
        for endpoint, state in self._endpoints.items():
            per = out.setdefault(endpoint, {})
            for name, address in state.expiry:
                per.setdefault(address, set()).add(name)
        return {e: {a: frozenset(n) for a, n in per.items()} for e, per in out.items()}

    def snapshot(self) -> list[dict[str, object]]:
        """For ``GET /v1/fqdn``: every (endpoint, name, address, expiry)."""
        return [{"endpoint": e, "name": n, "address": a, "expires": round(w, 3)}
                for e, state in sorted(self._endpoints.items()) for (n, a), w in sorted(state.expiry.items())]
