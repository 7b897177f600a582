"""Measured speed: an extracted model against its original, and the frontier's measured points."""
from __future__ import annotations

from shedder.formats.bench import bench_speed
from shedder.measure.bench import format_report, kernel_path
from shedder.prune.frontier import BENCH_DEFAULTS, measure as measure_point, measured as measured_point

__all__ = ["BENCH_DEFAULTS", "bench_speed", "format_report", "kernel_path", "measure_point", "measured_point"]
