"""``observer_tls``: where the Observer API may be plaintext, and the names the relay checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciliary.nodeagent import observer_tls
from ciliary.nodeagent.observer_tls import Mode, ObserverTLSError

SERVER = observer_tls.ServerTLS(Path("c"), Path("k"), Path("ca"))
CLIENT = observer_tls.ClientTLS(Path("c"), Path("k"), Path("ca"))


@pytest.mark.parametrize(("address", "local"), [
    ("127.0.0.1:4244", True), ("127.9.9.9:4244", True), ("[::1]:4244", True), ("localhost:4244", True),
    ("unix:/run/ciliary/hubble.sock", True), ("unix:///run/x.sock", True),
    ("0.0.0.0:4244", False), ("[::]:4244", False), ("192.0.2.7:4244", False), ("node-1:4244", False),
    ("10.0.0.1:4244", False), ("[2001:db8::1]:4244", False),
])
def test_only_loopback_and_unix_sockets_are_local(address: str, local: bool) -> None:
    assert observer_tls.is_local(address) is local


def test_the_agent_serves_plaintext_only_where_it_is_local_or_explicitly_insecure() -> None:
    assert observer_tls.server_mode("127.0.0.1:4244", None, insecure=False) is Mode.PLAINTEXT
    assert observer_tls.server_mode("192.0.2.7:4244", SERVER, insecure=False) is Mode.TLS
    assert observer_tls.server_mode("127.0.0.1:4244", SERVER, insecure=False) is Mode.TLS
    assert observer_tls.server_mode("192.0.2.7:4244", None, insecure=True) is Mode.PLAINTEXT
    for address in ("192.0.2.7:4244", "0.0.0.0:4244"):
        with pytest.raises(ObserverTLSError) as info:
            observer_tls.server_mode(address, None, insecure=False)
        assert info.value.address == address and "--hubble-insecure" in str(info.value)


def test_the_relay_dials_plaintext_only_loopback_peers_unless_insecure() -> None:
    assert observer_tls.dial_mode("127.0.0.1:4244", None, insecure=False) is Mode.PLAINTEXT
    assert observer_tls.dial_mode("192.0.2.7:4244", CLIENT, insecure=False) is Mode.TLS
    assert observer_tls.dial_mode("192.0.2.7:4244", None, insecure=True) is Mode.PLAINTEXT
    with pytest.raises(ObserverTLSError):
        observer_tls.dial_mode("192.0.2.7:4244", None, insecure=False)


def test_server_names_follow_hubbles_scheme_and_a_wildcard_covers_one_label() -> None:
    assert observer_tls.server_name("node-1") == "node-1.default.hubble-grpc.cilium.io"
    assert observer_tls.server_name("ip-10-0-0-1.ec2.internal", "prod") == \
        "ip-10-0-0-1-ec2-internal.prod.hubble-grpc.cilium.io"
    assert observer_tls.wildcard_name("prod") == "*.prod.hubble-grpc.cilium.io"
    name = observer_tls.server_name("a.b.c", "prod")
    assert name.split(".", 1)[1] == observer_tls.wildcard_name("prod").split(".", 1)[1]


def test_tls_files_are_all_or_nothing(tmp_path: Path) -> None:
    assert observer_tls.files("", " ", "", what="x") is None
    for name in ("c", "k", "a"):
        (tmp_path / name).write_text("x")
    got = observer_tls.files(str(tmp_path / "c"), str(tmp_path / "k"), str(tmp_path / "a"), what="x")
    assert got == (tmp_path / "c", tmp_path / "k", tmp_path / "a")
    with pytest.raises(ValueError, match="key file is missing"):
        observer_tls.files(str(tmp_path / "c"), "", str(tmp_path / "a"), what="x")
    with pytest.raises(ValueError, match="no such file"):
        observer_tls.files(str(tmp_path / "c"), str(tmp_path / "k"), str(tmp_path / "nope"), what="x")


def test_unreadable_credentials_are_an_oserror_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="Hubble TLS key"):
        observer_tls.server_credentials(observer_tls.ServerTLS(tmp_path / "c", tmp_path / "nokey", tmp_path / "a"))
