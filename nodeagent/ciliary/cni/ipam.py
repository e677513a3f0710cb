"""Host-local style IPv4 allocation over a directory (one file per allocated address).

Layout of ``dataDir`` (compatible in spirit with the reference host-local plugin):

- ``<ip>`` — one file per allocated address; its content is ``<containerID>\\n<ifname>\\n``;
- ``last_reserved_ip.0`` — the address handed out last; the next search starts after it,
  so a just-released address is not reused at once;
- ``lock`` — every read-modify-write holds an exclusive ``fcntl.flock`` on it, so
  concurrent ADD/DEL invocations on one node are safe.

The network address, the broadcast address and the first host (``.1``, reserved for
the node) are never handed out. Only this module touches the directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from ciliary.cni import errors

LOCK_FILE = "lock"
LAST_RESERVED_FILE = "last_reserved_ip.0"
LOCK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Reservation:
    """Who holds an address."""

    container_id: str
    ifname: str


def usable_addresses(subnet: IPv4Network) -> range:
    """The allocatable addresses of ``subnet`` as integers (network, broadcast and .1 excluded)."""
    first = int(subnet.network_address) + 2
    last = int(subnet.broadcast_address) - 1
    return range(first, max(first, last + 1))


class IpamStore:
    """Allocations of one subnet, persisted in one directory."""

    def __init__(self, data_dir: Path, subnet: IPv4Network, *, lock_timeout: float = LOCK_TIMEOUT_S) -> None:
        self.data_dir = data_dir
        self.subnet = subnet
        self.lock_timeout = lock_timeout

    # -- public operations (each one takes the lock) ---------------------------------

    def allocate(self, container_id: str, ifname: str) -> IPv4Address:
        """Reserve an address for (container, ifname); an existing reservation is returned as is."""
        with self._locked():
            existing = self._find(container_id, ifname)
            if existing:
                return existing[0]
            candidates = usable_addresses(self.subnet)
            for value in self._search_order(candidates):
                address = IPv4Address(value)
                if self._try_reserve(address, Reservation(container_id, ifname)):
                    self._write_last_reserved(address)
                    return address
        raise errors.CniError(
            errors.ErrorCode.POD_CIDR_EXHAUSTED,
            f"Pod CIDR {self.subnet} is exhausted",
            f"all {len(candidates)} usable addresses of {self.subnet} are allocated (see {self.data_dir})",
        )

    def release(self, container_id: str, ifname: str) -> list[IPv4Address]:
        """Free the addresses held by (container, ifname); releasing nothing is fine."""
        with self._locked():
            released = self._find(container_id, ifname)
            for address in released:
                with contextlib.suppress(FileNotFoundError):
                    (self.data_dir / str(address)).unlink()
            return released

    def lookup(self, container_id: str, ifname: str) -> IPv4Address | None:
        """The address held by (container, ifname), if any."""
        with self._locked():
            found = self._find(container_id, ifname)
        return found[0] if found else None

    def allocations(self) -> dict[IPv4Address, Reservation]:
        """Every reservation in this subnet (a snapshot)."""
        with self._locked():
            return dict(self._scan())

    # -- internals (lock held) ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError as exc:
                    if time.monotonic() >= deadline:
                        raise errors.CniError(
                            errors.ErrorCode.TRY_AGAIN_LATER,
                            "Timed out waiting for the IPAM lock",
                            f"{self.data_dir / LOCK_FILE} held for more than {self.lock_timeout}s",
                        ) from exc
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _scan(self) -> Iterator[tuple[IPv4Address, Reservation]]:
        for entry in self.data_dir.iterdir():
            try:
                address = IPv4Address(entry.name)
            except ValueError:
                continue  # lock, last_reserved_ip.0, stray files
            if address not in self.subnet:
                continue
            try:
                lines = entry.read_text().splitlines()
            except FileNotFoundError:
                continue
            container_id = lines[0].strip() if lines else ""
            ifname = lines[1].strip() if len(lines) > 1 else ""
            yield address, Reservation(container_id, ifname)

    def _find(self, container_id: str, ifname: str) -> list[IPv4Address]:
        return sorted(
            address
            for address, holder in self._scan()
            if holder.container_id == container_id and holder.ifname in (ifname, "")
        )

    def _search_order(self, candidates: range) -> Iterator[int]:
        last = self._read_last_reserved()
        if last is None or int(last) not in candidates:
            yield from candidates
            return
        start = int(last) - candidates.start + 1
        for offset in range(len(candidates)):
            yield candidates[(start + offset) % len(candidates)]

    def _try_reserve(self, address: IPv4Address, holder: Reservation) -> bool:
        path = self.data_dir / str(address)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, f"{holder.container_id}\n{holder.ifname}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _read_last_reserved(self) -> IPv4Address | None:
        try:
            return IPv4Address((self.data_dir / LAST_RESERVED_FILE).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _write_last_reserved(self, address: IPv4Address) -> None:
        path = self.data_dir / LAST_RESERVED_FILE
        tmp = path.with_name(f".{LAST_RESERVED_FILE}.{os.getpid()}")
        tmp.write_text(str(address))
        try:
            os.replace(tmp, path)
        except OSError as exc:  # pragma: no cover - same-directory rename only fails on a broken fs
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise errors.CniError(
                errors.ErrorCode.IO_FAILURE, "Failed to record the last reserved address", os.strerror(exc.errno or errno.EIO)
            ) from exc
