"""ciliary.lab.serviceforward's command line (the process itself is exercised by the real-node chart test
and, with fixed addresses, by e2e/test_hubble.py's Prometheus on real nodes)."""

from __future__ import annotations

import pytest

from ciliary.lab.serviceforward import Forward, main


def test_forward_flags_round_trip_and_refuse_malformed() -> None:
    forward = Forward.parse("4245=kube-system/hubble-relay")
    assert forward == Forward(4245, "kube-system", "hubble-relay")
    assert Forward.parse(forward.flag()) == forward
    for bad in ("4245", "x=kube-system/hubble-relay", "4245=hubble-relay", "4245=/hubble-relay", "4245=ns/",
                "4245=127.0.0.1:", "4245=:9876", "4245=127.0.0.1:x"):
        with pytest.raises(ValueError, match="PORT=NAMESPACE/SERVICE or PORT=HOST:PORT"):
            Forward.parse(bad)


def test_a_fixed_address_forward_dials_it_as_is() -> None:
    forward = Forward.parse("40001=127.0.0.1:9876")
    assert forward == Forward(40001, address=("127.0.0.1", 9876)) and not forward.service
    assert Forward.parse(forward.flag()) == forward


def test_a_service_forward_needs_kubectl_and_kubeconfig(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--netns", "x", "--forward", "4245=kube-system/hubble-relay"])
    assert exit_.value.code == 2 and "needs --kubectl and --kubeconfig" in capsys.readouterr().err
