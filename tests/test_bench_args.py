"""The bench's command line refuses a soak too short to be judged, before starting anything."""

from __future__ import annotations

import pytest

from bench.__main__ import _parser


def test_a_soak_shorter_than_its_warm_up_and_a_minute_of_samples_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as refused:
        _parser().parse_args(["--soak", "1"])
    assert refused.value.code == 2
    assert "a soak needs at least 3 minutes" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "minutes"), [(["--soak"], 30.0), (["--soak", "3"], 3.0)])
def test_a_soak_long_enough_is_taken(argv: list[str], minutes: float) -> None:
    assert _parser().parse_args(argv).soak == minutes
