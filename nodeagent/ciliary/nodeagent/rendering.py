"""Render the eBPF C programs of ``datapath_c/`` for one node (pure).

Called by the datapath engine (``ciliary.nodeagent.datapath.engine``) before it
compiles. Only what varies per node is templated: feature switches, map sizes
and the bpffs pin directory, all fields of a frozen :class:`RenderContext`.
Policy never reaches a template (it lives in maps), so a policy change renders
the same text, hashes to the same sha256, and compiles nothing.

bcc compiles a single text, so after jinja2 renders a program template the
local ``#include "include/x.h"`` / ``#include "lib/x.h"`` lines are inlined
(each file once, in order). The hash therefore covers every header.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

import jinja2


def _datapath_c_dir() -> Path:
    """``datapath_c/``: CILIARY_DATAPATH_C_DIR, else the repository tree, else the copy installed as package data."""
    override = os.environ.get("CILIARY_DATAPATH_C_DIR")
    if override:
        return Path(override)
    in_repo = Path(__file__).resolve().parents[3] / "datapath_c"
    if (in_repo / "programs").is_dir():
        return in_repo
    return Path(__file__).resolve().parents[1] / "datapath_c"


DATAPATH_C_DIR = _datapath_c_dir()
"""The eBPF C sources (the repository's ``datapath_c/``, or ``ciliary/datapath_c`` when installed)."""

HOOKS: tuple[str, ...] = ("from_pod", "to_pod")
"""Programs, one per attach point: ``programs/tc_<hook>.c.j2`` with entry ``cy_<hook>``."""

_LOCAL_INCLUDE = re.compile(r'^#include "((?:include|lib)/[A-Za-z0-9_]+\.h)"[ \t]*$', re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class RenderContext:
    """The only inputs of a template: per-node switches and sizes."""

    pin_dir: str
    """bpffs directory holding this node's pinned maps, e.g. /sys/fs/bpf/ciliary/<node>."""
    ipcache_size: int = 16384
    """cy_ipcache entries (prefixes)."""
    endpoints_size: int = 1024
    """cy_endpoints entries (pods on the node)."""
    policy_size: int = 65536
    """cy_policy and cy_policy_deny entries each (one per port prefix block)."""
    ct_size: int = 65536
    """cy_ct entries (LRU)."""
    events_pages: int = 256
    """cy_events ring buffer size in 4 KiB pages (a power of two)."""
    trace_all: bool = False
    """Emit a flow event for every packet instead of new flows and drops only."""
    trace_flags: bool = True
    """(Without ``trace_all``) also emit one for a packet of a tracked TCP connection carrying a flag not
    reported yet in its direction (SYN, FIN, RST: the handshake's answer, each side's close): Cilium's ``medium``
    monitor aggregation."""
    trace_interval_s: int = 5
    """(With ``trace_flags``) also one for a tracked connection's packet when its direction reported nothing for
    this many seconds (any protocol; Cilium's monitor interval); 0: never."""
    proxy_ifindex: int = 0
    """ifindex of the node-local device whose ingress receives packets for the HTTP proxy; 0: none
    (packets that HTTP rules would redirect are dropped, ``lib/l7redirect.h``)."""
    proxy_mac: str = "00:00:00:00:00:00"
    """MAC address of that device (a redirected packet's destination MAC)."""

    def proxy_mac_bytes(self) -> str:
        """The MAC as a C initializer list, e.g. ``0x02, 0x00, ...``."""
        return ", ".join(f"0x{part}" for part in self.proxy_mac.split(":"))

    def __post_init__(self) -> None:
        if not self.pin_dir.startswith("/") or '"' in self.pin_dir or "\\" in self.pin_dir:
            raise ValueError(f"pin_dir must be an absolute path without quotes: {self.pin_dir!r}")
        if not 0 <= self.trace_interval_s <= 3600:
            raise ValueError(f"trace_interval_s must be 0..3600 seconds: {self.trace_interval_s}")
        for name in ("ipcache_size", "endpoints_size", "policy_size", "ct_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.proxy_ifindex < 0 or not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", self.proxy_mac):
            raise ValueError(f"bad proxy device: ifindex {self.proxy_ifindex}, MAC {self.proxy_mac!r}")
        pages = self.events_pages
        if pages < 1 or pages & (pages - 1):
            raise ValueError(f"events_pages must be a power of two, not {pages}")


@dataclasses.dataclass(frozen=True)
class RenderedProgram:
    """One program's complete C text, ready for ``BPF(text=...)``."""

    hook: str
    """from_pod or to_pod."""
    name: str
    """Entry function (and bpf program name): cy_from_pod or cy_to_pod."""
    source: str
    sha256: str
    prog_type: str = "SCHED_CLS"
    """bcc's name of the program type (``BPF.<prog_type>``) the compiler loads it as."""
    attach_type: int = -1
    """The expected attach type (``BPFAttachType``) the kernel needs for cgroup programs; -1: none."""


def _environment(root: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _inline_includes(text: str, root: Path, seen: set[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        rel = match.group(1)
        if rel in seen:
            return f"/* {rel}: already inlined */"
        seen.add(rel)
        body = (root / rel).read_text()
        return f"/* ---- {rel} ---- */\n" + _inline_includes(body, root, seen).rstrip("\n")

    return _LOCAL_INCLUDE.sub(replace, text)


def render(ctx: RenderContext, hook: str, *, root: Path = DATAPATH_C_DIR) -> RenderedProgram:
    """Render ``programs/tc_<hook>.c.j2`` for ``ctx``: deterministic text and its sha256."""
    if hook not in HOOKS:
        raise ValueError(f"unknown hook {hook!r}; known: {', '.join(HOOKS)}")
    template = _environment(root).get_template(f"programs/tc_{hook}.c.j2")
    text = template.render(ctx=ctx)
    source = _inline_includes(text, root, set())
    digest = hashlib.sha256(source.encode()).hexdigest()
    return RenderedProgram(hook=hook, name=f"cy_{hook}", source=source, sha256=digest)


def render_template(template: str, ctx: object, *, hook: str, name: str, prog_type: str = "SCHED_CLS",
                    attach_type: int = -1, root: Path = DATAPATH_C_DIR) -> RenderedProgram:
    """Render any program template of ``datapath_c/`` with ``ctx`` (other program families, e.g. sock_*)."""
    text = _environment(root).get_template(template).render(ctx=ctx)
    source = _inline_includes(text, root, set())
    return RenderedProgram(hook=hook, name=name, source=source, sha256=hashlib.sha256(source.encode()).hexdigest(),
                           prog_type=prog_type, attach_type=attach_type)


def render_all(ctx: RenderContext, *, root: Path = DATAPATH_C_DIR) -> dict[str, RenderedProgram]:
    """Every hook's program, keyed by hook, in :data:`HOOKS` order."""
    return {hook: render(ctx, hook, root=root) for hook in HOOKS}
