"""The operator's flags from the environment: a value it does not know stops it, naming the variable."""

from __future__ import annotations

import pytest

from ciliary.operator import main


@pytest.mark.parametrize(("word", "expected"), [("true", True), ("Yes", True), ("1", True), ("on", True),
                                                ("false", False), ("NO", False), ("0", False), ("off", False)])
def test_boolean_words(monkeypatch: pytest.MonkeyPatch, word: str, expected: bool) -> None:
    monkeypatch.setenv("CILIARY_OPERATOR_ENABLE_K8S_EVENT_HANDOVER", word)
    assert main.build_parser().parse_args([]).enable_k8s_event_handover is expected


def test_an_unknown_boolean_word_is_refused_not_taken_for_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CILIARY_OPERATOR_ENABLE_K8S_EVENT_HANDOVER", "ture")
    with pytest.raises(SystemExit, match="CILIARY_OPERATOR_ENABLE_K8S_EVENT_HANDOVER='ture' is neither true nor"):
        main.build_parser()
    monkeypatch.delenv("CILIARY_OPERATOR_ENABLE_K8S_EVENT_HANDOVER")
    assert main.build_parser().parse_args([]).enable_k8s_event_handover is True


def test_a_choice_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CILIARY_OPERATOR_ENDPOINTS_API", "endpointslice")
    with pytest.raises(SystemExit) as caught:
        main.main([])
    assert caught.value.code == 2
    assert "--endpoints-api: 'endpointslice' (from the environment) is not one of" in capsys.readouterr().err
