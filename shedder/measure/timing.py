"""The speed-measurement protocol: paired, interleaved rounds until the ratio is known to ±3 %.

Pure statistics and a timer loop over callables, so the protocol is tested with a synthetic timer of
known ratio and noise (``tests/test_timing.py``) and ``shedder.measure.bench`` only supplies what to time.

* **Paired, interleaved rounds.** Every round times each sample of model A and model B back to back,
  in the order A,B then B,A in the next round (A,B,B,A,...), so drift in machine load hits both alike;
  the round's ratio ``time A / time B`` is one paired observation.
* **Auto-ranged samples.** During the warm-up each sample's iterations are fixed so that one sample
  of either model lasts at least ``min_sample_s`` (one forward of a tiny model is a few ms, below the
  timer's and the scheduler's noise), the same number for both models of the pair so that a first,
  colder iteration biases neither; a sample is the mean over its iterations. Warm-up rounds are discarded.
* **Stopping.** Rounds are added until the 95 % interval of every tracked ratio is within
  ``±target`` of its median, or ``budget_s`` has run out; at least ``min_rounds`` always run.
* **The interval.** The distribution-free 95 % interval of the median of the paired ratios: the order
  statistics ``(k, n + 1 - k)`` whose binomial coverage is at least 95 %. Unlike a t interval it
  needs no normality, one round hit by a load spike cannot widen it, and the reported median always
  lies inside it; it is the same on log-ratios as on ratios (order statistics commute with ``log``).
  It needs 6 rounds to exist (``MIN_ROUNDS``).
* **Verdicts.** ``noisy``: the interval is wider than ``±noisy_above`` (10 %) or the machine was loaded
  (1-minute load average above the CPU count at the start or the end). ``resolved``: the interval
  excludes 1.0, i.e. the two models' speeds differ beyond doubt.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

#: Fewest rounds for which a 95 % distribution-free interval of the median exists (1 - 2 / 2**6 > 0.95).
MIN_ROUNDS = 6

#: One timed sample: a callable that runs the work once and returns ``{figure: seconds}`` (a generate
#: gives both its time to first token and its decode time).
Sample = Callable[[], dict[str, float]]


@dataclass(frozen=True)
class Protocol:
    """How long and how precisely to measure (the ``bench`` options ``--budget-s`` and ``--min-rounds``)."""

    budget_s: float = 20.0
    target: float = 0.03
    min_rounds: int = MIN_ROUNDS
    warmup: int = 1
    min_sample_s: float = 0.05
    noisy_above: float = 0.10

    def describe(self) -> str:
        return (f"paired interleaved rounds (A,B,B,A,…) after {self.warmup} warm-up, each sample ≥ "
                f"{self.min_sample_s * 1000:.0f} ms, until the 95 % interval of the median ratio is within "
                f"±{self.target:.0%} or {self.budget_s:g} s have passed (at least {self.min_rounds} rounds)")


@dataclass(frozen=True)
class Ratio:
    """The median of paired ratios with its 95 % interval (``bench --json``'s ``measured_*_speedup``)."""

    median: float
    ci95: tuple[float, float]
    rounds: int
    noisy: bool
    resolved: bool

    def to_dict(self) -> dict:
        return {**asdict(self), "ci95": list(self.ci95)}

    def text(self) -> str:
        """``1.22× [1.18–1.26], 14 rounds`` plus the verdicts that apply."""
        lo, hi = self.ci95
        flags = [w for w, on in (("noisy", self.noisy), ("not resolved", not self.resolved)) if on]
        rounds = f"{self.rounds} round" + ("s" if self.rounds != 1 else "")
        return f"{self.median:.2f}× [{lo:.2f}–{hi:.2f}], {rounds}" + (f" ({', '.join(flags)})" if flags else "")


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """The widest-rank pair of order statistics ``(x_k, x_{n+1-k})`` covering the median with
    probability ≥ ``level`` (binomial(n, 1/2)); None below ``MIN_ROUNDS`` values."""
    v, n = sorted(values), len(values)
    k = 0  # the largest k with P(Bin(n, 1/2) < k) ≤ (1 - level) / 2
    cumulative = 0.0
    for j in range(n // 2 + 1):
        cumulative += math.comb(n, j) / 2 ** n
        if cumulative > (1 - level) / 2:
            break
        k = j + 1
    if k < 1:
        return None
    return v[k - 1], v[n - k]


def ratio_of(ratios: list[float], loaded: bool, noisy_above: float = Protocol.noisy_above) -> Ratio:
    """The verdict on a list of paired ratios."""
    med = statistics.median(ratios)
    ci = median_interval(ratios) or (min(ratios), max(ratios))
    wide = len(ratios) < MIN_ROUNDS or max(med / ci[0] - 1, ci[1] / med - 1) > noisy_above
    return Ratio(med, ci, len(ratios), noisy=loaded or wide, resolved=len(ratios) >= MIN_ROUNDS and not ci[0] <= 1.0 <= ci[1])


def machine_load() -> float | None:
    """1-minute load average per CPU (None where the OS has none)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return None


@dataclass
class PairedRun:
    """Per-round seconds of each figure of both models (``times[name][figure]``), and the load seen."""

    names: tuple[str, str]
    times: dict[str, dict[str, list[float]]]
    iterations: dict[str, list[int]]
    load: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0
    stopped: str = ""

    @property
    def rounds(self) -> int:
        return len(next(iter(self.times[self.names[0]].values()), []))

    @property
    def loaded(self) -> bool:
        return any(v is not None and v > 1.0 for v in self.load.values())

    def ratios(self, figure: str) -> list[float]:
        """time of the first model / time of the second, per round (for the original first: the speedup)."""
        a, b = self.names
        return [x / y for x, y in zip(self.times[a][figure], self.times[b][figure])]

    def speedup(self, figure: str, noisy_above: float = Protocol.noisy_above) -> Ratio:
        return ratio_of(self.ratios(figure), self.loaded, noisy_above)


def _run_sample(sample: Sample, iterations: int, clock: Callable[[], float]) -> tuple[dict[str, float], float]:
    """Mean seconds per iteration of each figure, and the sample's wall time."""
    start = clock()
    total: dict[str, float] = {}
    for _ in range(iterations):
        for figure, s in sample().items():
            total[figure] = total.get(figure, 0.0) + s
    return {f: s / iterations for f, s in total.items()}, clock() - start


def paired_rounds(samples: dict[str, list[Sample]], tracked: list[str], protocol: Protocol = Protocol(),
                  clock: Callable[[], float] = time.perf_counter, load: Callable[[], float | None] = machine_load,
                  on_round: Callable[[int, str], None] | None = None) -> PairedRun:
    """Time two models' samples (``samples[name]``: the same list of samples for both names) in
    paired interleaved rounds until every ``tracked`` figure's interval is within ``±protocol.target``
    or the budget runs out (see the module docstring). ``clock`` and ``load`` are injectable so the
    statistics can be tested with a synthetic timer."""
    names = tuple(samples)
    if len(names) != 2 or len(samples[names[0]]) != len(samples[names[1]]):
        raise ValueError("paired_rounds needs two models with the same samples")
    run = PairedRun(names, {n: {} for n in names}, {n: [1] * len(samples[n]) for n in names})
    run.load["start"] = load()
    started = clock()
    r = 0
    while True:
        order = names if r % 2 == 0 else names[::-1]
        warm = r < protocol.warmup
        needed: dict[str, int] = {}
        for j in range(len(samples[names[0]])):
            for name in order:
                figures, wall = _run_sample(samples[name][j], run.iterations[name][j], clock)
                if warm:  # auto-range: enough iterations for min_sample_s
                    needed[name] = math.ceil(protocol.min_sample_s / max(wall / run.iterations[name][j], 1e-9))
                else:
                    for figure, s in figures.items():
                        run.times[name].setdefault(figure, []).append(s)
            if warm:  # the same number for both: a first, colder iteration weighs alike in both means
                for name in names:
                    run.iterations[name][j] = max(1, run.iterations[name][j], *needed.values())
        r += 1
        done = r - protocol.warmup
        if on_round is not None:
            on_round(r, f"round {r}" + (" (warm-up)" if warm else f", {done} timed"))
        if warm:
            continue
        elapsed = clock() - started
        if done >= protocol.min_rounds and all(_within(run.ratios(f), protocol.target) for f in tracked):
            run.stopped = f"every interval within ±{protocol.target:.0%}"
            break
        if done >= protocol.min_rounds and elapsed >= protocol.budget_s:
            run.stopped = f"time budget of {protocol.budget_s:g} s spent"
            break
    run.seconds = clock() - started
    run.load["end"] = load()
    return run


def _within(ratios: list[float], target: float) -> bool:
    ci = median_interval(ratios)
    if ci is None:
        return False
    med = statistics.median(ratios)
    return ci[1] / med - 1 <= target and med / ci[0] - 1 <= target
