"""The use-case layer: one calibration resolution for both faces."""
from __future__ import annotations

from shedder.api import OFFICIAL, Calibration


def test_the_official_protocol_fills_in_its_defaults_and_keeps_what_was_given():
    cal = Calibration.resolve("official")
    assert (cal.source, cal.samples, cal.seq_len, cal.batch_size) == (OFFICIAL.source, OFFICIAL.rows, OFFICIAL.seq_len,
                                                                      OFFICIAL.batch_size)
    given = Calibration.resolve("official", "rows.jsonl", 8, 64, 4)
    assert given.key == ("rows.jsonl", 8, 64, "official") and given.batch_size == 4


def test_our_protocol_has_its_own_defaults():
    cal = Calibration.resolve()
    assert cal.key == ("calibration", 16, 256, "shedder") and cal.batch_size == 8


def test_the_studio_announces_the_windows_its_runs_use():
    """Under the official protocol the studio's calibration is the official one, whatever its
    evaluation windows are (the cost caption and the run read the same ``Calibration``)."""
    from app.state import Settings

    settings = Settings(protocol="official", samples=8, seq_len=128)
    assert settings.calibration_spec == Calibration.resolve("official", settings.calibration)
    assert settings.calibration_batch_size == OFFICIAL.batch_size
    ours = Settings(samples=8, seq_len=128)
    assert ours.calibration_key == ("calibration", 8, 128, "shedder") and ours.calibration_batch_size == 8
