"""The speed-measurement protocol (``shedder.measure.timing``) with a synthetic timer of known ratio
and noise: no wall time is measured or asserted, the clock advances by the synthetic durations."""
import math
import random

import pytest

from shedder.measure.timing import MIN_ROUNDS, Protocol, median_interval, paired_rounds, ratio_of


class SyntheticTimer:
    """Model A takes ``base`` seconds, model B ``base / ratio``, each multiplied by lognormal noise
    of ``sigma``; a shared drift (the machine's load) multiplies both alike within a round."""

    def __init__(self, ratio: float, sigma: float, base: float = 0.01, seed: int = 0, drift: float = 0.0):
        self.now, self.rng, self.ratio, self.sigma, self.base, self.drift = 0.0, random.Random(seed), ratio, sigma, base, drift
        self.calls = {"A": 0, "B": 0}

    def clock(self) -> float:
        return self.now

    def sample(self, name: str):
        def run() -> dict[str, float]:
            self.calls[name] += 1
            slow = 1 + self.drift * math.sin(self.now)  # slow drift in load, the same for both models
            s = self.base / (self.ratio if name == "B" else 1.0) * slow * math.exp(self.rng.gauss(0, self.sigma))
            self.now += s
            return {"t": s}
        return run

    def samples(self) -> dict:
        return {"A": [self.sample("A")], "B": [self.sample("B")]}


def run(timer: SyntheticTimer, load=lambda: 0.1, **protocol):
    return paired_rounds(timer.samples(), ["t"], Protocol(**protocol), clock=timer.clock, load=load)


def test_known_ratio_lies_in_the_interval_and_the_target_stops_the_rounds():
    timer = SyntheticTimer(ratio=1.25, sigma=0.02, drift=0.3)
    result = run(timer, budget_s=60.0)
    r = result.speedup("t")
    assert r.ci95[0] <= 1.25 <= r.ci95[1] and r.ci95[0] <= r.median <= r.ci95[1]
    assert r.resolved and not r.noisy
    assert result.stopped.startswith("every interval") and r.ci95[1] / r.median - 1 <= 0.03
    assert r.rounds >= MIN_ROUNDS


def test_coverage_of_the_interval_is_at_least_95_percent():
    hits = sum(lo <= 1.1 <= hi for lo, hi in
               (run(SyntheticTimer(1.1, 0.05, seed=s), budget_s=0.0, min_rounds=8).speedup("t").ci95 for s in range(200)))
    assert hits >= 180  # ≥ 95 % nominal (exact binomial coverage 96.5 % at 8 rounds), with sampling slack


def test_a_model_against_itself_is_not_resolved():
    results = [run(SyntheticTimer(1.0, 0.03, seed=s), budget_s=0.5).speedup("t") for s in range(100)]
    assert sum(r.resolved for r in results) <= 10  # a 95 % interval excludes the truth in about 5 % of runs
    assert all(r.ci95[0] <= r.median <= r.ci95[1] for r in results)


def test_wide_noise_is_noisy_and_the_budget_ends_the_rounds():
    result = run(SyntheticTimer(1.2, 0.4), budget_s=1.0)
    r = result.speedup("t")
    assert r.noisy and result.stopped.startswith("time budget")
    assert r.rounds >= MIN_ROUNDS


def test_a_loaded_machine_makes_a_precise_result_noisy():
    r = run(SyntheticTimer(1.25, 0.01), load=lambda: 1.6, budget_s=5.0).speedup("t")
    assert r.noisy and r.resolved


def test_samples_are_auto_ranged_and_rounds_interleaved():
    timer = SyntheticTimer(2.0, 0.0, base=0.001)
    result = run(timer, budget_s=0.0, min_rounds=MIN_ROUNDS, min_sample_s=0.05, warmup=1)
    assert result.iterations == {"A": [100], "B": [100]}  # 1 ms and 0.5 ms forwards: both ≥ 50 ms, equal work
    assert result.speedup("t").median == pytest.approx(2.0)
    order = []
    paired_rounds({"A": [lambda: order.append("A") or {"t": 1.0}], "B": [lambda: order.append("B") or {"t": 1.0}]},
                  ["t"], Protocol(budget_s=0.0, min_rounds=3, warmup=1, min_sample_s=0.0),
                  clock=lambda: 0.0, load=lambda: None)
    assert "".join(order) == "ABBAABBA"  # one warm-up round, then three timed, the order alternating


def test_median_interval_is_the_binomial_order_statistics():
    assert median_interval([1.0] * (MIN_ROUNDS - 1)) is None
    assert median_interval(list(range(6))) == (0, 5)       # k = 1: coverage 1 - 2/64
    assert median_interval(list(range(20))) == (5, 14)     # k = 6: coverage 95.9 %
    r = ratio_of([1.0, 1.01, 0.99], loaded=False)
    assert r.noisy and not r.resolved  # too few rounds for an interval
    assert r.text().startswith("1.00× [0.99–1.01], 3 rounds (noisy, not resolved)")
