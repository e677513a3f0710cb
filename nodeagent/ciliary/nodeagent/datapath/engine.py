"""The datapath engine the node agent drives.

``Datapath(node, netns=...)`` owns one node's eBPF state: its bpffs pin
directory ``<bpffs>/ciliary/<node>/``, the two tc programs and their maps.
``start()`` renders, adopts what a previous agent pinned (maps keep their
contents, programs whose hash still matches keep running), compiles the rest
(in a child process: ``compiling``), and observes the kernel. Programs and maps
are used through the fds of their pins (``libbpf``): this process never
compiles, nor imports bcc. ``apply(intent, endpoints)`` plans against a
shadow of what was written (``planning.plan``) and applies: maps (capacity
checked first, written in ``planning.write_order``, undone on failure), then
tc attachments.

Failures are typed (``errors``): a compile or verifier failure happens before
anything is touched, a map failure is rolled back, so the last good state
keeps enforcing; attach failures are isolated per veth and reported together.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from ciliary.nodeagent import planning, rendering
from ciliary.nodeagent.datapath import compiling, conntrack_purge, errors, flows, loading, maps
from ciliary.operator import intents

log = logging.getLogger(__name__)

MAP_NAMES = ("cy_ipcache", "cy_endpoints", "cy_ep_ifindex", "cy_policy", "cy_policy_deny", "cy_ct",
             "cy_counters", "cy_lost", "cy_events", *maps.TRAIL_MAPS)


@dataclasses.dataclass(frozen=True)
class ApplyResult:
    """What one ``apply`` changed."""

    revision: int
    compiled: tuple[str, ...]
    map_writes: int
    attached: tuple[planning.Attachment, ...]
    detached: tuple[planning.Attachment, ...]
    endpoint_ids: Mapping[IPv4Address, int]
    unplaced: tuple[IPv4Address, ...]
    seconds: float
    program_hashes: Mapping[str, str]


def _sizes_of(ctx: rendering.RenderContext) -> dict[str, tuple[int, int, int]]:
    """Expected (key_size, value_size, max_entries) of maps whose shape the context decides."""
    return {
        "cy_ipcache": (8, 8, ctx.ipcache_size),
        "cy_endpoints": (4, ct.sizeof(maps.EndpointInfoC), ctx.endpoints_size),
        "cy_ep_ifindex": (4, 4, ctx.endpoints_size),
        "cy_policy": (16, 8, ctx.policy_size),
        "cy_policy_deny": (16, 8, ctx.policy_size),
        "cy_ct": (16, ct.sizeof(maps.CtEntryC), ctx.ct_size),
        "cy_counters": (4, 16, 3 * maps.REASON_MAX),
        "cy_lost": (4, 8, 1),
        "cy_events": (0, 0, ctx.events_pages * 4096),
    }


class Datapath:
    """One node's datapath. Not thread-safe: drive it from one task or thread."""

    def __init__(self, node: str, *, netns: str | None = None, bpffs: Path = Path("/sys/fs/bpf"),
                 context: rendering.RenderContext | None = None,
                 template_root: Path = rendering.DATAPATH_C_DIR) -> None:
        self.node = node
        self.netns = netns
        self.bpffs = bpffs
        self.pin_dir = bpffs / "ciliary" / node
        self.context = context or rendering.RenderContext(pin_dir=str(self.pin_dir))
        if self.context.pin_dir != str(self.pin_dir):
            raise ValueError(f"context.pin_dir must be {self.pin_dir}")
        self._root = template_root
        self._programs: dict[str, str] = {}
        """hook -> rendered hash of the program this engine attaches."""
        self._prog_fds: dict[str, int] = {}
        self._map_fds: dict[str, int] = {}
        self._state = planning.DatapathState()
        self._rules: dict[int, tuple[intents.RuleRef, ...]] = {}
        self._pod_netns: dict[int, IPv4Address] | None = None
        """What ``cy_lb4_podns`` holds as this engine last wrote it (None: unknown, read it again)."""
        self._reader: flows.FlowReader | None = None
        self._started = False
        self._rendered: tuple[rendering.RenderContext, dict[str, rendering.RenderedProgram]] | None = None
        self.proxy_ports: dict[str, int] = {}
        """L7 parser -> port of the node-local proxy serving it (set by the agent; read at each apply)."""

    # ------------------------------------------------------------ lifecycle

    def start(self) -> planning.DatapathState:
        """Render, compile, adopt pins, observe. Idempotent."""
        loading.ensure_bpffs(self.bpffs)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        self._drop_misshapen_maps()
        self._load(self._render())
        self._started = True
        self._state = self.observe()
        return self._state

    def _render(self) -> dict[str, rendering.RenderedProgram]:
        """Rendered programs of the current context (cached: policy changes never re-render)."""
        if self._rendered is None or self._rendered[0] != self.context:
            self._rendered = (self.context, rendering.render_all(self.context, root=self._root))
        return self._rendered[1]

    def _drop_misshapen_maps(self) -> None:
        # A pinned map whose size or layout differs from this render would be silently
        # reused by bcc: unpin it so the compile creates a fresh one (the planner refills).
        for name, (key_size, value_size, max_entries) in _sizes_of(self.context).items():
            info = loading.pinned_map_info(self.pin_dir / name)
            if info is None:
                continue
            if (info.key_size, info.value_size, info.max_entries) != (key_size, value_size, max_entries):
                log.info("Recreating map %s: shape changed", name, extra={"node": self.node})
                (self.pin_dir / name).unlink()

    def _load(self, programs: Mapping[str, rendering.RenderedProgram]) -> None:
        """Adopt the pinned program of each hash, compile (and pin) the others, open the pins.

        Nothing changes for this engine unless every program is pinned: a compile
        or verifier failure leaves the previous programs and fds in place.
        """
        adopted: dict[str, int] = {}
        map_fds: dict[str, int] = {}
        jobs: list[tuple[rendering.RenderedProgram, Path]] = []
        try:
            for hook, program in programs.items():
                pin_path = loading.program_pin_path(self.pin_dir, hook, program.sha256)
                fd = self._adopt(pin_path)
                if fd is None:
                    jobs.append((program, pin_path))
                else:
                    adopted[hook] = fd
            if jobs:
                loading.ensure_pinned_maps(self.pin_dir, maps.TRAIL_MAPS)
            compiling.compile_and_pin(jobs)
            for program, pin_path in jobs:
                adopted[program.hook] = loading.open_pinned(pin_path)
            for name in MAP_NAMES:
                map_fds[name] = loading.open_pinned(self.pin_dir / name)
        except BaseException:
            for fd in (*adopted.values(), *map_fds.values()):
                os.close(fd)
            raise
        for fd in (*self._prog_fds.values(), *self._map_fds.values()):
            os.close(fd)
        self._prog_fds = adopted
        self._map_fds = map_fds
        self._pod_netns = None  # the pins opened may be new maps
        self._programs = {hook: program.sha256 for hook, program in programs.items()}

    def _adopt(self, pin_path: Path) -> int | None:
        """An fd for the program pinned at ``pin_path`` if it uses only the node's pinned maps."""
        if not pin_path.exists():
            return None
        fd = loading.open_pinned(pin_path)
        try:
            usable = loading.uses_only(fd, [self.pin_dir / name for name in MAP_NAMES])
        except BaseException:
            os.close(fd)
            raise
        if usable:
            return fd
        os.close(fd)
        log.info("Recompiling %s: one of its maps is no longer pinned", pin_path.name, extra={"node": self.node})
        return None

    def close(self) -> None:
        """Release this process's handles; attached programs and pins keep enforcing."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        for fd in (*self._prog_fds.values(), *self._map_fds.values()):
            os.close(fd)
        self._prog_fds.clear()
        self._map_fds.clear()
        self._started = False

    def teardown(self) -> None:
        """Detach every program of this node and remove its pins (the node leaves)."""
        for f in loading.list_filters(self.netns):
            if f.name.startswith("cy_"):
                with contextlib.suppress(errors.AttachFailed):
                    loading.detach(self.netns, f.ifindex, f.hook)
        self.close()
        self._programs.clear()
        if self.pin_dir.exists():
            for pinned in self.pin_dir.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    pinned.unlink()
            with contextlib.suppress(OSError):
                self.pin_dir.rmdir()
        self._state = planning.DatapathState()

    # ------------------------------------------------------------ observation

    @property
    def program_hashes(self) -> dict[str, str]:
        return dict(self._programs)

    def _fd(self, name: str) -> int:
        """The fd of the node's pinned map ``name`` (opened by ``start``)."""
        return self._map_fds[name]

    def observe(self) -> planning.DatapathState:
        """Read what the kernel holds: pinned programs, tc filters, map contents."""
        self._require_started()
        id_to_hash: dict[int, str] = {}
        for pinned in self.pin_dir.glob("prog_*"):
            fd = loading.open_pinned(pinned)
            try:
                id_to_hash[loading.prog_id(fd)] = self._hash_of_pin(pinned)
            finally:
                os.close(fd)
        programs = {hook: sha for hook, sha in self._programs.items()
                    if loading.program_pin_path(self.pin_dir, hook, sha).exists()}
        attachments = frozenset(
            planning.Attachment(f.ifname, f.ifindex, f.hook, id_to_hash.get(f.prog_id, ""))
            for f in loading.list_filters(self.netns) if f.name.startswith("cy_")
        )
        return planning.DatapathState(
            programs=programs,
            attachments=attachments,
            ipcache=maps.read_map(self._fd("cy_ipcache"), maps.IPCACHE),
            endpoints=maps.read_map(self._fd("cy_endpoints"), maps.ENDPOINTS),
            policy=maps.read_map(self._fd("cy_policy"), maps.POLICY),
            policy_deny=maps.read_map(self._fd("cy_policy_deny"), maps.POLICY_DENY),
            ep_ifindex=maps.read_map(self._fd("cy_ep_ifindex"), maps.EP_IFINDEX),
        )

    def _hash_of_pin(self, pinned: Path) -> str:
        prefix = pinned.name.rsplit("_", 1)[-1]
        for sha in self._programs.values():
            if sha.startswith(prefix):
                return sha
        return prefix  # a stale program: its full hash is unknown, the prefix never matches

    @property
    def state(self) -> planning.DatapathState:
        """The shadow of what this engine believes is loaded (refreshed by ``observe``)."""
        return self._state

    def _require_started(self) -> None:
        if not self._programs or not self._map_fds:
            raise RuntimeError("Datapath.start() was not called (or close() was)")

    # ------------------------------------------------------------ apply

    def apply(self, intent: intents.NodeIntent,
              endpoints: Mapping[IPv4Address | str, planning.HostVeth]) -> ApplyResult:
        """Make the datapath enforce ``intent`` on the veths of ``endpoints`` (pod IPv4 -> veth)."""
        self._require_started()
        began = time.monotonic()
        veths = {IPv4Address(str(ip)): veth for ip, veth in endpoints.items()}
        rendered = self._render()
        hashes = {hook: p.sha256 for hook, p in rendered.items()}
        observed = self._state
        the_plan = planning.plan(intent, observed, programs=hashes, veths=veths, proxy_ports=dict(self.proxy_ports))

        # 1. Programs: compile and verify before touching anything.
        if the_plan.compile:
            self._load(rendered)

        # 2. Maps: all capacities first, then writes with an undo log (planning.write_order).
        state = dataclasses.replace(self._write_maps(the_plan, observed), programs=dict(hashes))
        before = {ip: v.ep_id for ip, v in observed.endpoints.items()}
        if conntrack_purge.endpoints_replaced(before, {ip: v.ep_id for ip, v in state.endpoints.items()}):
            purged = conntrack_purge.purge(self._fd("cy_ct"), {maps.addr_to_u32(ip): v.ep_id
                                                               for ip, v in state.endpoints.items()})
            log.info("Conntrack entries of gone endpoints removed", extra={"node": self.node, "entries": purged})
        self._rules = {planning.rule_cookie(e.rules): e.rules
                       for ep in intent.endpoints for d in (ep.ingress, ep.egress) for e in d.entries}
        self._sync_pod_netns(veths)

        # 3. Attachments, isolated per veth.
        attachments = set(state.attachments)
        failures: list[errors.AttachFailed] = []
        for att in the_plan.attach:
            try:
                loading.attach(self.netns, att.ifindex, att.hook, self._prog_fds[att.hook], f"cy_{att.hook}")
            except errors.AttachFailed as exc:
                failures.append(errors.AttachFailed(att.ifname, att.hook, exc.message))
                continue
            attachments = {a for a in attachments if (a.ifname, a.hook) != (att.ifname, att.hook)}
            attachments.add(att)
        for att in the_plan.detach:
            try:
                loading.detach(self.netns, att.ifindex, att.hook)
            except errors.AttachFailed as exc:
                failures.append(errors.AttachFailed(att.ifname, att.hook, exc.message))
                continue
            attachments.discard(att)
        self._state = dataclasses.replace(state, attachments=frozenset(attachments))
        if not failures:
            self._unpin_stale_programs()

        result = ApplyResult(
            revision=intent.revision,
            compiled=the_plan.compile,
            map_writes=the_plan.map_writes,
            attached=the_plan.attach,
            detached=the_plan.detach,
            endpoint_ids=the_plan.endpoint_ids,
            unplaced=the_plan.unplaced,
            seconds=time.monotonic() - began,
            program_hashes=hashes,
        )
        log.info("Applied node intent", extra={"node": self.node, "revision": intent.revision,
                                               "map_writes": result.map_writes})
        if the_plan.attach or the_plan.detach:
            _release_freed_heap()  # netlink work for many veths leaves freed heap behind
        if failures:
            first = failures[0]
            raise errors.AttachFailed(first.ifname, first.hook, first.message, tuple(failures[1:]))
        return result

    def _sync_pod_netns(self, veths: Mapping[IPv4Address, planning.HostVeth]) -> None:
        """``cy_lb4_podns``: each pod's network namespace cookie -> its IPv4, so the socket load balancer's
        translations leave the trail that names the Service in the pod's flows (include/lb_trail_maps.h) and a
        pod is held to a load balancer IP's source ranges (lib/lb.h). A failed write is logged and the apply goes
        on: the pods missing from the map get no Service names in their flows and are refused by load balancer IPs
        with source ranges (fail closed)."""
        wanted = {veth.netns_cookie: ip for ip, veth in veths.items() if veth.netns_cookie}
        if wanted == self._pod_netns:
            return  # most applies change policy, not pods: no map read
        self._pod_netns = None
        try:
            maps.sync_map(self._fd("cy_lb4_podns"), maps.POD_NETNS, wanted)
            self._pod_netns = wanted
        except (OSError, errors.DatapathError) as exc:
            log.warning("Pod network namespaces not written: their flows name no Service and load balancer IPs "
                        "with source ranges refuse them", extra={
                "node": self.node, "error": str(exc)})

    def _write_maps(self, the_plan: planning.Plan, observed: planning.DatapathState) -> planning.DatapathState:
        """Write the plan's maps in ``planning.write_order``; returns ``observed`` as patched."""
        ctx = self.context
        codecs: dict[str, tuple[maps.Codec[Any, Any], int]] = {
            "ipcache": (maps.IPCACHE, ctx.ipcache_size),
            "endpoints": (maps.ENDPOINTS, ctx.endpoints_size),
            "policy": (maps.POLICY, ctx.policy_size),
            "policy_deny": (maps.POLICY_DENY, ctx.policy_size),
            "ep_ifindex": (maps.EP_IFINDEX, ctx.endpoints_size),
        }
        current: dict[str, dict[Any, Any]] = {name: dict(getattr(observed, name)) for name in codecs}
        for name, (codec, capacity) in codecs.items():
            # The deny-flag writes only rewrite existing endpoints: the main diff decides the size.
            maps.check_capacity(codec, current[name], getattr(the_plan, name), capacity)
        undo = maps.UndoLog()
        try:
            for name, kind, diff in planning.write_order(the_plan):
                codec, fd, contents = codecs[name][0], self._fd(codecs[name][0].name), current[name]
                if kind == "upserts":
                    maps.apply_upserts(fd, codec, contents, diff, undo)
                    contents.update(diff.upserts)
                else:
                    maps.apply_deletes(fd, codec, contents, diff, undo)
                    for key in diff.deletes:
                        del contents[key]
        except errors.MapWriteFailed:
            undo.rollback()
            raise
        return dataclasses.replace(observed, ipcache=current["ipcache"], endpoints=current["endpoints"],
                                   policy=current["policy"], policy_deny=current["policy_deny"],
                                   ep_ifindex=current["ep_ifindex"])

    def _unpin_stale_programs(self) -> None:
        current = {loading.program_pin_path(self.pin_dir, h, sha) for h, sha in self._programs.items()}
        for pinned in self.pin_dir.glob("prog_*"):
            if pinned not in current:
                log.info("Removed stale program pin %s", pinned.name, extra={"node": self.node})
                with contextlib.suppress(FileNotFoundError):
                    pinned.unlink()

    # ------------------------------------------------------------ observability

    def flows(self) -> flows.FlowReader:
        """The (single) reader of this node's flow events."""
        self._require_started()
        if self._reader is None:
            self._reader = flows.FlowReader(self._fd("cy_events"), self._fd("cy_lost"))
        return self._reader

    def rules_for(self, cookie: int) -> tuple[intents.RuleRef, ...]:
        """The rules behind a flow event's cookie (from the last applied intent)."""
        return self._rules.get(cookie, ())

    def counters(self) -> dict[tuple[str, maps.Reason], tuple[int, int]]:
        """(direction, reason) -> (packets, bytes), summed over CPUs."""
        fd = self._fd("cy_counters")
        out: dict[tuple[str, maps.Reason], tuple[int, int]] = {}
        for direction, dname in flows.DIRECTIONS.items():
            for reason in maps.Reason:
                per_cpu = maps.read_percpu(fd, direction * maps.REASON_MAX + int(reason), maps.CounterC)
                out[(dname, reason)] = (sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu))
        return out

    def check(self) -> list[str]:
        """What is broken in the kernel: a program or map pin gone, a program no longer attached to a veth
        this engine attached it to (a veth that no longer exists is not a problem). Empty: healthy."""
        if not self._started:
            return ["the datapath is not loaded"]
        problems = [f"program pin {loading.program_pin_path(self.pin_dir, hook, sha).name} is gone"
                    for hook, sha in sorted(self._programs.items())
                    if not loading.program_pin_path(self.pin_dir, hook, sha).exists()]
        problems += [f"map pin {name} is gone" for name in MAP_NAMES if not (self.pin_dir / name).exists()]
        wanted = {(a.ifindex, a.hook): a.ifname for a in self._state.attachments}
        found, gone = loading.attached_hooks(self.netns, {index for index, _ in wanted})
        ours = {hook: loading.prog_id(fd) for hook, fd in self._prog_fds.items()}
        for (index, hook), ifname in sorted(wanted.items()):
            if index in gone:
                continue
            if (index, hook) not in found:
                problems.append(f"cy_{hook} is not attached to {ifname}")
            elif found[(index, hook)] != ours.get(hook):
                problems.append(f"{ifname} runs program id {found[(index, hook)]} at cy_{hook}'s place, "
                                f"not the loaded cy_{hook} (id {ours.get(hook)})")
        return problems

    def endpoint_revisions(self) -> dict[str, int]:
        """Read back from the kernel: pod IPv4 -> the revision stamped on its ``cy_endpoints`` entry."""
        self._require_started()
        return {str(ip): value.revision for ip, value in maps.read_map(self._fd("cy_endpoints"), maps.ENDPOINTS).items()}

    def conntrack_size(self) -> int:
        return maps.count_entries(self._fd("cy_ct"), maps.CtKeyC)


def _release_freed_heap() -> None:
    """Return freed heap to the kernel (glibc ``malloc_trim``); cheap, safe any time."""
    try:
        ct.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
