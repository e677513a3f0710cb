"""The agent's DNS enforcement: the proxy, the per-endpoint FQDN cache and the intent it makes applied.

Owns :class:`DNSService`, which sits between the intent watcher and the
enforcer: the operator's intent (``on_intent``) is expanded with what the pods
resolved (``fqdn_expansion.expand``) before the enforcer applies it, and again
whenever an answer grants a new address (the DNS proxy waits for that apply
before it releases the answer, so the pod's first connection already passes)
or a learnt address expires (checked every ``EXPIRY_TICK_S``).

Fail closed: the datapath's DNS entries redirect to ``--dns-proxy-port`` from
the first apply on, whether or not the proxy listens yet; without a proxy
socket a query is dropped (``PROXY_UNAVAILABLE``), never passed unfiltered.
Until both the proxy and the node's proxy routing (``proxy_routing``) are up,
every policy needing the DNS proxy is reported not enforcing with the reason
(``Enforcer.set_proxy_problems``).

What a pod resolved belongs to that pod, i.e. to its (address, host veth): the veth
behind the address is noted when an answer is learnt, and when the registry shows
another veth behind it (a new pod got the address, possibly before the old pod's
removal was applied) or none, the learnt addresses are forgotten (``on_endpoint_event``,
which the agent subscribes before the enforcer, so the apply of the new veth already
carries no inherited grant).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ciliary.nodeagent import dns_policy, endpoints, enforcing, fqdn_cache, fqdn_expansion, proxy_routing
from ciliary.nodeagent.dns_proxy import DNSProxy
from ciliary.nodeagent.netns_sockets import NetnsSockets
from ciliary.nodeagent.settings import AgentSettings
from ciliary.operator import intents

log = logging.getLogger(__name__)

EXPIRY_TICK_S = 1.0
CHECK_EVERY_S = 10.0
RETRY_S = (1.0, 30.0)
APPLY_WAIT_S = 2.0
PARSER = "dns"


class DNSService:
    def __init__(self, config: AgentSettings, enforcer: enforcing.Enforcer, publish: Any) -> None:
        self.config = config
        self.enforcer = enforcer
        self.port = config.dns_proxy_port
        self.cache = fqdn_cache.FQDNCache(min_ttl=config.fqdn_min_ttl, max_ips=config.fqdn_max_ips_per_endpoint)
        self.ids = fqdn_expansion.LearntIdentities()
        self.base: intents.NodeIntent | None = None
        self._grants: dict[str, dict[str, frozenset[int]]] = {}
        self._learnt_on: dict[str, int] = {}
        """Pod address -> the host veth ifindex behind it when its cached answers were learnt."""
        self.sockets = NetnsSockets(config.netns or None)
        self.proxy = DNSProxy(sockets=self.sockets, port=self.port, verdict=self._verdict, learn=self._learn,
                              publish=publish)
        self.routing_problems: list[str] = ["proxy routing not checked yet"]
        self._report()

    @property
    def proxy_ports(self) -> dict[str, int]:
        """What the datapath redirects DNS entries to (empty: no DNS proxy configured)."""
        return {PARSER: self.port} if self.port else {}

    # ------------------------------------------------------------------ intents in

    def on_intent(self, intent: intents.NodeIntent) -> int:
        """A new operator intent: apply it expanded with what the pods resolved."""
        self.base = intent
        self.cache.forget(e.ipv4 for e in intent.endpoints)
        return self._apply(force=True) or 0

    def _apply(self, *, force: bool = False) -> int | None:
        """Hand the expanded intent to the enforcer when the grants changed (or ``force``); its request number."""
        if self.base is None:
            return None
        learnt = self.cache.names_by_address()
        grants = fqdn_expansion.grants(self.base, learnt)
        if not force and grants == self._grants:
            return None
        self._grants = grants
        expanded = fqdn_expansion.expand(self.base, learnt, self.ids)
        return self.enforcer.set_intent(expanded) if force else self.enforcer.refresh_intent(expanded)

    # ------------------------------------------------------------------ the proxy's callbacks

    def _verdict(self, client: str, server: str, port: int, protocol: int) -> dns_policy.QueryVerdict:
        return dns_policy.query_verdict(self.enforcer.outcome.applied, client, server, port, protocol)

    async def _learn(self, client: str, names: list[str], answers: list[tuple[str, int]]) -> None:
        veth = self._veth_of(client)
        dropped = False
        if self._learnt_on.get(client, veth) != veth:
            dropped = self.cache.drop(client)  # another pod's answers (its removal not seen yet): not this one's
        self._learnt_on[client] = veth
        if not self.cache.record(client, names, answers, time.monotonic()) and not dropped:
            return  # the pairs it had (later expiries only): the grants of the last _apply still hold
        request = self._apply()
        if request is not None:
            await self.enforcer.wait_applied(request, APPLY_WAIT_S)

    # ------------------------------------------------------------------ endpoints

    def _veth_of(self, address: str, *, ignore: int = 0) -> int:
        """The host veth ifindex of the registry's endpoint with ``address`` (0: none; the newest if several)."""
        return max((e.host_ifindex for e in self.enforcer.registry.list()
                    if str(e.ipv4) == address and e.host_ifindex != ignore), default=0)

    async def on_endpoint_event(self, event: endpoints.EndpointEvent) -> None:
        """Registry listener: an address whose veth changed (or went) loses what its old pod resolved."""
        address = str(event.endpoint.ipv4)
        learnt = self._learnt_on.get(address)
        if learnt is None:
            return
        if event.kind is endpoints.EventKind.ADDED:
            current = event.endpoint.host_ifindex
        else:
            current = self._veth_of(address, ignore=event.endpoint.host_ifindex)
        if current == learnt:
            return
        del self._learnt_on[address]
        if self.cache.drop(address):
            log.info("Learnt addresses of a replaced endpoint forgotten", extra={"ip": address})
            self._apply()

    # ------------------------------------------------------------------ state

    def problem(self) -> str:
        if not self.port:
            return "no DNS proxy on this node (--dns-proxy-port 0): rules.dns and toFQDNs are not enforced"
        if not self.proxy.running:
            return f"DNS proxy not running: {self.proxy.error or 'starting'}"
        if self.routing_problems:
            return f"proxy redirection not in place: {'; '.join(self.routing_problems)}"
        return ""

    def _report(self) -> None:
        self.enforcer.set_proxy_problems({PARSER: self.problem()})

    def view(self) -> dict[str, object]:
        """``GET /v1/dns``: the proxy and the learnt addresses."""
        return {"port": self.port, "running": self.proxy.running, "problem": self.problem(),
                "stats": vars(self.proxy.stats), "evicted": self.cache.evicted, "learnt": self.cache.snapshot()}

    # ------------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event) -> None:
        if not self.port:
            self._report()
            await stop.wait()
            return
        await self.enforcer.started.wait()
        delay = RETRY_S[0]
        next_check = 0.0
        try:
            while not stop.is_set():
                now = time.monotonic()
                if not self.proxy.running:
                    try:
                        await self.proxy.start()
                        delay = RETRY_S[0]
                    except OSError as exc:
                        log.error("DNS proxy did not start; retrying", extra={"error": str(exc)})
                        delay = min(delay * 2, RETRY_S[1])
                if now >= next_check or self.routing_problems:
                    await self._check_routing()
                    next_check = now + CHECK_EVERY_S
                self._report()
                if self.cache.expire(time.monotonic()):
                    self._apply()
                await _sleep(stop, EXPIRY_TICK_S if self.proxy.running else delay)
        finally:
            await self.proxy.close()
            self.sockets.close()

    async def _check_routing(self) -> None:
        netns = self.config.netns or None

        def fix() -> list[str]:
            try:
                proxy_routing.ensure(netns)
            except (proxy_routing.ProxyRoutingError, OSError) as exc:
                return [str(exc)]
            return proxy_routing.check(netns)

        problems = await asyncio.get_running_loop().run_in_executor(None, fix)
        if problems != self.routing_problems:
            (log.error if problems else log.info)("Proxy routing", extra={"problems": problems})
        self.routing_problems = problems


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
