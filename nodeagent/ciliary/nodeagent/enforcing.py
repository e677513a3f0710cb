"""The async shell that makes the datapath enforce the latest intent on the registered veths.

:class:`Enforcer` owns one ``Datapath`` (injected; a fake in unit tests) and one
worker thread: every blocking datapath call (start, apply, counters) runs in
that single thread, one at a time, so applies are serialised and the event
loop never blocks on clang, the verifier or netlink. Triggers — a new intent
from the watcher, an endpoint ADDED/REMOVED event from the registry — only
bump a request counter and wake the worker, which coalesces them: it always
applies the newest intent against the registry's current veths.

Behaviour decisions
- Nothing is applied before the first valid intent arrives. A restarted agent
  therefore keeps what the previous one pinned (maps, programs, tc filters)
  enforcing untouched until etcd answers; the first apply then plans against
  what ``Datapath.start()`` observed and writes only the difference (stale
  entries and veths of removed pods are the only things removed).
- A new pod is default-allow until its policy arrives (like Cilium without
  ``policy-enforcement=always``): the CNI plugin reports the endpoint before
  the operator knows the pod's IP, and the datapath passes every packet of an
  address missing from ``cy_endpoints``. Once the intent lists the pod, the
  next apply programs its entries and it is enforced from the next packet.
  An intent endpoint with no local veth yet is "unplaced" (logged, nothing to
  attach to) and is programmed by the apply that the endpoint's ADDED event
  triggers.
- Conntrack is the datapath's: policy changes never flush it; forward packets
  are re-evaluated on every packet, replies of allowed connections pass.
- After every apply, and every ``VERIFY_S`` while idle, the enforcer reads the
  kernel's endpoint map back (``Datapath.endpoint_revisions``: pod IPv4 -> the
  revision stamped on its ``cy_endpoints`` entry) together with the registry's
  endpoints; the reporter says a policy is enforcing only when every local pod it
  selects shows the applied revision there.
- A failed apply (``CompileFailed``/``VerifierRejected``/``MapFull``/
  ``MapWriteFailed``/``AttachFailed``) leaves the last good state enforcing;
  the failure is recorded in :attr:`outcome` for the reporter and retried on
  the next trigger (or after a bounded back-off for transient failures).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address
from typing import Any, Protocol

from ciliary.nodeagent import endpoints, planning
from ciliary.nodeagent.datapath import errors
from ciliary.operator import intents

log = logging.getLogger(__name__)

START_RETRY_S = (1.0, 30.0)
APPLY_RETRY_S = (1.0, 30.0)
VERIFY_S = 2.0
"""How often the kernel's endpoint map is read back while nothing else happens."""


class DatapathLike(Protocol):
    """What the enforcer needs of ``engine.Datapath``."""

    def start(self) -> Any: ...

    def apply(self, intent: intents.NodeIntent, endpoints: Mapping[IPv4Address | str, planning.HostVeth]) -> Any: ...

    @property
    def program_hashes(self) -> dict[str, str]: ...

    def close(self) -> None: ...

    def flows(self) -> Any: ...

    def rules_for(self, cookie: int) -> tuple[intents.RuleRef, ...]: ...

    def endpoint_revisions(self) -> Mapping[str, int]: ...

    def check(self) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class Outcome:
    """Where enforcement stands; the reporter turns it into reports."""

    started: bool = False
    """The datapath is loaded (pins adopted or created)."""
    wanted: intents.NodeIntent | None = None
    """The newest valid intent received."""
    applied: intents.NodeIntent | None = None
    """The intent in force in the datapath (the last successful apply)."""
    error: str = ""
    """Why ``wanted`` (or the newest etcd value) is not in force; empty when it is."""
    error_kind: str = ""
    """CompileFailed, VerifierRejected, MapFull, MapWriteFailed, AttachFailed, InvalidIntent, StartFailed."""
    program_hashes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    endpoints: int = 0
    unplaced: tuple[str, ...] = ()
    applies: int = 0
    last_compiled: tuple[str, ...] = ()
    last_map_writes: int = 0
    last_attached: int = 0
    """tc attachments (new or replaced) of the last successful apply."""
    kernel_endpoints: Mapping[str, int] | None = None
    """Read back from the kernel's endpoint map: pod IPv4 -> revision stamp; None: not read (or unreadable)."""
    local_endpoints: frozenset[str] = frozenset()
    """Pod IPv4s with a veth on this node (the registry) when the kernel was last read."""
    last_verified: float = 0.0
    """time.monotonic() of the last read-back."""
    datapath_problems: tuple[str, ...] = ()
    """What the last check found broken in the kernel (a pin gone, a program detached); empty: healthy."""
    proxy_problems: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """L7 parser -> why its node-local proxy cannot enforce (empty string: it can). A policy whose
    entries redirect to a parser listed with a problem is not reported enforcing."""


class Enforcer:
    """Serialises applies of the newest intent onto the registry's veths."""

    def __init__(self, *, node: str, datapath: DatapathLike, registry: endpoints.EndpointRegistry,
                 on_outcome: Callable[[Outcome], None] = lambda _o: None,
                 retry: tuple[float, float] = APPLY_RETRY_S, verify_every: float = VERIFY_S) -> None:
        self.node = node
        self.datapath = datapath
        self.registry = registry
        self._on_outcome = on_outcome
        self._retry = retry
        self._verify_every = verify_every
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="datapath")
        self._wake = asyncio.Event()
        self._requested = 0
        self._done = 0
        self._done_cond = asyncio.Condition()
        self._invalid: str = ""
        self.started = asyncio.Event()
        """Set once the datapath is loaded (flows can be read)."""
        self.outcome = Outcome()

    # ------------------------------------------------------------ triggers

    def set_intent(self, intent: intents.NodeIntent) -> int:
        """A new valid intent: apply it soon. Returns the request number."""
        self._invalid = ""
        self._update(wanted=intent)
        return self._request()

    def refresh_intent(self, intent: intents.NodeIntent) -> int:
        """The same operator intent, re-expanded by the agent (toFQDNs learnt addresses): apply it soon.

        Unlike :meth:`set_intent` it does not clear an invalid-intent error: the newest etcd value
        is still the one that could not be parsed."""
        self._update(wanted=intent)
        return self._request()

    def set_proxy_problems(self, problems: Mapping[str, str]) -> None:
        """The node-local proxies' state (reported with every policy that needs them)."""
        if dict(problems) != dict(self.outcome.proxy_problems):
            self._update(proxy_problems=dict(problems))

    def set_invalid(self, message: str) -> None:
        """The newest etcd value could not be parsed: keep enforcing, report the error."""
        self._invalid = message
        self._update(error=message, error_kind="InvalidIntent")

    async def on_endpoint_event(self, event: endpoints.EndpointEvent) -> None:
        """Registry listener: re-apply with the new set of veths (waits briefly for it)."""
        self._update(endpoints=len(self.registry))
        request = self._request()
        if self.outcome.wanted is not None and self.outcome.started:
            await self.wait_applied(request, timeout=5.0)

    def _request(self) -> int:
        self._requested += 1
        self._wake.set()
        return self._requested

    async def wait_applied(self, request: int, timeout: float) -> bool:
        """Wait until an apply that began after ``request`` has finished (successfully or not)."""
        async def done() -> None:
            async with self._done_cond:
                await self._done_cond.wait_for(lambda: self._done >= request)

        try:
            await asyncio.wait_for(done(), timeout)
            return True
        except TimeoutError:
            return False

    # ------------------------------------------------------------ the worker

    def veths(self) -> dict[IPv4Address, planning.HostVeth]:
        return {e.ipv4: planning.HostVeth(e.host_ifname, e.host_ifindex, e.netns_cookie) for e in self.registry.list()}

    async def run(self, stop: asyncio.Event) -> None:
        """Start the datapath (bounded retries), then apply on every trigger until ``stop``."""
        await self._start(stop)
        delay = self._retry[0]
        while not stop.is_set():
            retrying = bool(self.outcome.error) and not self._invalid
            await _wait_either(self._wake, stop, timeout=delay if retrying else self._verify_every)
            if stop.is_set():
                break
            if not self._wake.is_set() and not retrying:
                await self._verify()
                continue
            self._wake.clear()
            request = self._requested
            ok = await self._apply_once()
            async with self._done_cond:
                self._done = max(self._done, request)
                self._done_cond.notify_all()
            delay = self._retry[0] if ok else min(delay * 2, self._retry[1])

    async def _start(self, stop: asyncio.Event) -> None:
        delay = START_RETRY_S[0]
        while not stop.is_set():
            try:
                began = time.monotonic()
                await self._in_thread(self.datapath.start)
                self._update(started=True, program_hashes=dict(self.datapath.program_hashes), error="",
                             error_kind="", endpoints=len(self.registry))
                self.started.set()
                log.info("Datapath started", extra={"node": self.node,
                                                    "seconds": round(time.monotonic() - began, 3)})
                return
            except (errors.DatapathError, OSError, RuntimeError) as exc:
                log.error("Datapath did not start; retrying", extra={"node": self.node, "error": str(exc)})
                self._update(error=f"datapath did not start: {exc}", error_kind=type(exc).__name__)
                await _wait_either(stop, stop, timeout=delay)
                delay = min(delay * 2, START_RETRY_S[1])

    async def _apply_once(self) -> bool:
        intent = self.outcome.wanted
        if intent is None:
            return True
        veths = self.veths()
        try:
            result = await self._in_thread(self.datapath.apply, intent, veths)
        except errors.DatapathError as exc:
            log.error("Apply failed; the last good state keeps enforcing", extra={
                "node": self.node, "revision": intent.revision, "error": str(exc), "kind": type(exc).__name__})
            self._update(error=str(exc), error_kind=type(exc).__name__, endpoints=len(veths),
                         applies=self.outcome.applies + 1)
            return False
        kernel, local = await self._read_kernel()
        problems = await self._check()
        unplaced = tuple(str(ip) for ip in getattr(result, "unplaced", ()))
        if unplaced:
            log.info("Intent endpoints without a local veth yet", extra={"node": self.node, "unplaced": unplaced})
        self._update(applied=intent, error=self._invalid, error_kind="InvalidIntent" if self._invalid else "",
                     program_hashes=dict(getattr(result, "program_hashes", self.datapath.program_hashes)),
                     endpoints=len(veths), unplaced=unplaced, applies=self.outcome.applies + 1,
                     last_compiled=tuple(getattr(result, "compiled", ())),
                     last_map_writes=int(getattr(result, "map_writes", 0)),
                     last_attached=len(getattr(result, "attached", ())),
                     kernel_endpoints=kernel, local_endpoints=local, last_verified=time.monotonic(),
                     datapath_problems=problems)
        return True

    async def _check(self) -> tuple[str, ...]:
        """The datapath's own check of what it loaded (pins, tc attachments); a failing check is a problem."""
        try:
            return tuple(await self._in_thread(self.datapath.check))
        except (errors.DatapathError, OSError, RuntimeError) as exc:
            return (f"datapath check failed: {exc}",)

    async def _read_kernel(self) -> tuple[Mapping[str, int] | None, frozenset[str]]:
        """(the kernel's endpoint map read back, the registry's pod IPv4s); None when the map cannot be read."""
        local = frozenset(str(e.ipv4) for e in self.registry.list())
        try:
            kernel: Mapping[str, int] | None = dict(await self._in_thread(self.datapath.endpoint_revisions))
        except (errors.DatapathError, OSError, RuntimeError) as exc:
            log.error("Cannot read the kernel's endpoint map", extra={"node": self.node, "error": str(exc)})
            kernel = None
        return kernel, local

    async def _verify(self) -> None:
        """Read the kernel's endpoint map back; a change (an entry gone, a stamp changed) updates the outcome."""
        if not self.outcome.started:
            return
        problems = await self._check()
        if problems != self.outcome.datapath_problems:
            if problems:
                log.error("Datapath broken", extra={"node": self.node, "problems": list(problems)})
            self._update(datapath_problems=problems)
        if self.outcome.applied is None:
            return
        kernel, local = await self._read_kernel()
        if (kernel, local) != (self.outcome.kernel_endpoints, self.outcome.local_endpoints):
            if kernel != self.outcome.kernel_endpoints:
                log.warning("The kernel's endpoint map differs from the last read-back",
                            extra={"node": self.node, "endpoints": len(kernel or {})})
            self._update(kernel_endpoints=kernel, local_endpoints=local, last_verified=time.monotonic())
        else:
            self.outcome = dataclasses.replace(self.outcome, last_verified=time.monotonic())

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run another datapath call (counters, observe) in the datapath thread."""
        return await self._in_thread(fn, *args)

    def _update(self, **changes: Any) -> None:
        self.outcome = dataclasses.replace(self.outcome, **changes)
        self._on_outcome(self.outcome)

    async def close(self) -> None:
        """Release handles; attached programs and pins keep enforcing (a restart adopts them)."""
        if self.outcome.started:
            await self._in_thread(self.datapath.close)
        self._executor.shutdown(wait=True)


async def _wait_either(first: asyncio.Event, second: asyncio.Event, *, timeout: float | None) -> None:
    waiters = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
