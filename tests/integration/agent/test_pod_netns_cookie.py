"""A pod's network-namespace cookie read as the agent reads it at start-up, through a namespace file
(``setns`` in a thread of its own: root): here this process's own namespace, ``/proc/self/ns/net``."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciliary.nodeagent import endpoints, netns_sockets

pytestmark = pytest.mark.integration


def test_the_cookie_is_the_namespace_s_own(tmp_path: Path) -> None:
    own = netns_sockets.netns_cookie(None)
    path = endpoints.pod_netns_path("/run/netns/net", Path("/proc/self/ns"))
    assert own and netns_sockets.netns_cookie(path) == own
    with pytest.raises(netns_sockets.NetnsSocketError, match=r"^cookie in netns .*cni-missing"):
        netns_sockets.netns_cookie(str(tmp_path / "cni-missing"))  # the warning names what failed
