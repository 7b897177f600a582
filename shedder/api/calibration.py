"""The text a score or search is measured on: one resolution of ``--protocol`` and its defaults.

Both faces resolve their calibration here: the CLI from its flags, the studio from its settings, so
the official protocol's defaults (alpaca, 256 rows, 2048-token windows, batch 2) live in one place and
the cost announced before a run is the cost of the windows the run uses.
"""
from __future__ import annotations

from dataclasses import dataclass

from shedder.core.defaults import DEFAULT_BATCH, DEFAULT_CALIBRATION, DEFAULT_EVAL, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from shedder.measure.data import OFFICIAL, PROTOCOLS, calibration_windows
from shedder.measure.metrics import calibration_protocol



@dataclass(frozen=True)
class Calibration:
    """A resolved calibration: every field filled in, by the protocol's defaults where not given."""

    source: str
    samples: int
    seq_len: int
    batch_size: int
    protocol: str = "shedder"

    @classmethod
    def resolve(cls, protocol: str = "shedder", source: str | None = None, samples: int | None = None,
                seq_len: int | None = None, batch_size: int | None = None) -> "Calibration":
        """Fill in what was not given: the official protocol's defaults under ``official``, ours else."""
        official = protocol == "official"
        return cls(source=source or (OFFICIAL.source if official else DEFAULT_CALIBRATION),
                   samples=samples or (OFFICIAL.rows if official else DEFAULT_SAMPLES),
                   seq_len=seq_len or (OFFICIAL.seq_len if official else DEFAULT_SEQ_LEN),
                   batch_size=batch_size or (OFFICIAL.batch_size if official else DEFAULT_BATCH),
                   protocol=protocol)

    @property
    def key(self) -> tuple:
        """(source, samples, seq_len, protocol): what decides the windows (not the batch size)."""
        return (self.source, self.samples, self.seq_len, self.protocol)

    def windows(self, tokenizer):
        """Token windows ``LongTensor[n, seq_len]`` drawn by the protocol."""
        return calibration_windows(tokenizer, self.source, samples=self.samples, seq_len=self.seq_len,
                                   protocol=self.protocol)

    def describe(self, windows, label: str | None = None) -> str:
        """The protocol line results carry (``label``: the source as the user knows it)."""
        return calibration_protocol(windows, label or self.source, self.protocol, rows=self.samples)


__all__ = ["Calibration", "DEFAULT_BATCH", "DEFAULT_CALIBRATION", "DEFAULT_EVAL", "DEFAULT_SAMPLES",
           "DEFAULT_SEQ_LEN", "OFFICIAL", "PROTOCOLS"]
