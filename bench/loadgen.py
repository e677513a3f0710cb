"""The C load generator of the datapath bench: compile ``tcpload.c``, serve and run it inside netns.

``build(dir)`` compiles ``bench/tcpload.c`` with ``cc -O2`` (once per bench run,
into a directory the bench owns). ``Server`` runs ``tcpload serve`` in a netns
(bounded lifetime, killed on ``stop``); ``run`` runs one ``crr``/``rr`` client
there and returns transactions per second, measured by the C client itself (no
process start-up or Python in the timed part).
"""

from __future__ import annotations

import contextlib
import select
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("tcpload.c")


class LoadFailed(RuntimeError):
    """A client run did not complete (a timeout means a packet was dropped)."""


def build(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / "tcpload"
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(binary), str(SOURCE)], check=True, timeout=120)
    return binary


def netns_argv(netns: str | None, argv: list[str]) -> list[str]:
    """``argv`` inside ``netns``: a name under /run/netns, or a path (a real pod's ``/proc/<pid>/ns/net``)."""
    if not netns:
        return argv
    return ["nsenter", f"--net={netns}", *argv] if netns.startswith("/") else ["ip", "netns", "exec", netns, *argv]


def tune_client_netns(netns: str) -> None:
    """Many short connections from one address: the widest port range and TIME_WAIT reuse (per netns)."""
    for key, value in (("net.ipv4.ip_local_port_range", "1024 65000"), ("net.ipv4.tcp_tw_reuse", "1")):
        subprocess.run(netns_argv(netns, ["sysctl", "-q", "-w", f"{key}={value}"]), check=True, timeout=10)


class Server:
    def __init__(self, binary: Path, netns: str | None, port: int, lifetime_s: int = 3600) -> None:
        self.proc = subprocess.Popen(netns_argv(netns, [str(binary), "serve", str(port), str(lifetime_s)]),
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        if not ready or self.proc.stdout.readline().strip() != "READY":
            self.stop()
            raise LoadFailed(f"tcpload server in {netns} did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def run(binary: Path, netns: str | None, mode: str, ip: str, port: int, n: int, size: int = 64) -> float:
    """Transactions per second of one ``mode`` (crr|rr) run of ``n`` transactions."""
    out = subprocess.run(netns_argv(netns, [str(binary), mode, ip, str(port), str(n), str(size)]),
                         capture_output=True, text=True, timeout=60 + n * 0.01)
    words = out.stdout.split()
    if out.returncode != 0 or len(words) != 2 or words[0] != "ok":
        raise LoadFailed(f"tcpload {mode} {ip}:{port} in {netns}: {out.stdout.strip()} {out.stderr.strip()}")
    return n / float(words[1])
