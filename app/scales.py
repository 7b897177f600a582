"""How an importance metric's values become colours and bar heights, chosen from the values themselves.

A metric whose values have both signs (Δ perplexity: removing a component can help a small model)
gets a diverging scale centred on zero, white at zero, red where removal hurts and blue where it
helps, and the colour bar spans only the values there are, each end as intense as its distance from
zero. A metric that is never negative (activation, block influence, taylor) gets a sequential scale,
light for the least important. On the log scale, values spanning orders of magnitude stay readable:
symmetric log for signed values, log10 for positive ones; every tick is labelled with a real value.
A log scale is used only when the values span at least ``LOG_SPAN``: for a narrow range (block
influence between 0.02 and 0.2, say) the linear scale is the readable one, and it gets several ticks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from plotly.colors import sample_colorscale

DIVERGING = "RdBu_r"
SEQUENTIAL = "YlOrRd"
#: The least max/min ratio of positive values for which a log scale is chosen.
LOG_SPAN = 100.0
#: Symmetric log: linear within ±(max |value| / LINEAR_SHARE) of zero, logarithmic beyond.
LINEAR_SHARE = 1e5


@dataclass(frozen=True)
class Scale:
    """A transform ``z(value)`` and the colour axis and ticks that go with it."""

    signed: bool
    log: bool
    width: float          # symmetric log: the linear part's half-width; log10: the floor for zeros
    lo: float             # transformed range of the data
    hi: float
    label: str

    @classmethod
    def of(cls, values, log: bool, label: str) -> "Scale":
        values = [float(v) for v in values if v is not None and math.isfinite(v)] or [0.0]
        signed = min(values) < 0
        top = max(abs(v) for v in values) or 1.0
        positive = [v for v in values if v > 0]
        if signed:
            width = top / LINEAR_SHARE
        else:
            width = min(positive) / 10 if positive else 1.0
            log = log and bool(positive) and max(positive) / min(positive) >= LOG_SPAN
        scale = cls(signed, log, width, 0.0, 0.0, label)
        zs = [scale.z(v) for v in values]
        return cls(signed, log, width, min(zs), max(zs), label)

    def z(self, value: float) -> float:
        if not self.log:
            return value
        if self.signed:
            return math.copysign(math.log10(1 + abs(value) / self.width), value)
        return math.log10(max(value, self.width))

    def ticks(self) -> tuple[list[float], list[str]] | None:
        """Tick positions (in z) labelled with real values on a log scale; None: plotly's own (linear)."""
        if not self.log:
            return None
        if self.signed:
            first = math.floor(math.log10(self.width)) + 1
            real = [0.0] + [s * 10.0 ** k for k in range(first, 8) for s in (1, -1)]
        else:
            real = [10.0 ** k for k in range(math.floor(math.log10(self.width)), 12)]
        inside = sorted((self.z(v), v) for v in real if self.lo - 1e-9 <= self.z(v) <= self.hi + 1e-9)
        return [z for z, _ in inside], [f"{v:g}" for _, v in inside]

    def colorscale(self) -> list:
        """Sequential light-to-dark; diverging with white at zero and each end as dark as its distance
        from zero (a small negative side is pale, not as dark as the largest positive value)."""
        if not self.signed:
            return SEQUENTIAL
        reach = max(-self.lo, self.hi) or 1.0
        steps = [i / 10 for i in range(11)]
        points = [self.lo + t * (self.hi - self.lo) for t in steps]
        colours = sample_colorscale(DIVERGING, [0.5 + 0.5 * p / reach for p in points])
        return [[t, c] for t, c in zip(steps, colours)]

    def axis(self) -> dict:
        """A plotly ``coloraxis`` for the data's range with this scale's colours and ticks."""
        bar = dict(title=self.label)
        ticks = self.ticks()
        if ticks is not None:
            bar.update(tickvals=ticks[0], ticktext=ticks[1])
        else:
            bar.update(nticks=6)
        hi = self.hi if self.hi > self.lo else self.lo + 1e-12
        return dict(colorscale=self.colorscale(), cmin=self.lo, cmax=hi, colorbar=bar)

    def describe(self) -> str:
        kind = "diverging around zero" if self.signed else "sequential"
        how = ("symmetric log" if self.signed else "log") if self.log else "linear"
        return f"{self.label}: {kind}, {how} colour scale"
