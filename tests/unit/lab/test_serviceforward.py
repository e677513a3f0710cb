"""ciliary.lab.serviceforward's command line (the process itself is exercised by the real-node chart test)."""

from __future__ import annotations

import pytest

from ciliary.lab.serviceforward import Forward


def test_forward_flags_round_trip_and_refuse_malformed() -> None:
    forward = Forward.parse("4245=kube-system/hubble-relay")
    assert forward == Forward(4245, "kube-system", "hubble-relay")
    assert Forward.parse(forward.flag()) == forward
    for bad in ("4245", "x=kube-system/hubble-relay", "4245=hubble-relay", "4245=/hubble-relay", "4245=ns/"):
        with pytest.raises(ValueError, match="PORT=NAMESPACE/SERVICE"):
            Forward.parse(bad)
