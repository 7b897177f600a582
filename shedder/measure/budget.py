"""What a long run will cost, said before it starts, and memory budgets from what is available.

Scoring and searching a real checkpoint take minutes to hours; the user should know how much
before committing to it. ``run_cost`` counts the forward passes and tokens a ``score`` or ``search``
needs (an upper bound: the prefix cache re-runs only the layers a candidate changes, and abandoned
candidates stop early) and the evaluator's activation memory; ``RunCost.describe`` adds an ETA once
the first pass has been timed (``PassTiming``: its layers and its loss head apart, since a later pass
re-runs only the layers from its change on but pays the whole head). The evaluator's activation cache gets a share of the memory actually
available (``process_cache_budget``), split between the evaluators alive in the process (the app's
sessions), instead of a fixed amount per evaluator.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

#: Share of the available memory the activation caches of one process may use together.
CACHE_SHARE = 0.25
#: Never more than this, whatever is free (a cache past it saves little more time).
CACHE_CAP = 32 << 30


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes free for new allocations now: CUDA's free memory, else the smaller of the kernel's
    MemAvailable and the room left under a cgroup limit (containers)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    free = _meminfo_kb("MemAvailable") * 1024 if Path("/proc/meminfo").is_file() else 8 << 30
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                free = min(free, int(limit) - int(Path(usage_file).read_text()))
            break
        except (OSError, ValueError):
            continue
    return max(free, 0)


def _meminfo_kb(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 8 << 20


_PROCESS_BUDGET: dict[str, int] = {}


def process_cache_budget(device: str | torch.device = "cpu") -> int:
    """The activation-cache bytes all evaluators of this process on ``device`` share: a quarter of the
    memory available when first asked (``$SHEDDER_CACHE_BYTES`` overrides), at most 32 GiB."""
    key = torch.device(device).type
    if key not in _PROCESS_BUDGET:
        override = os.environ.get("SHEDDER_CACHE_BYTES")
        _PROCESS_BUDGET[key] = int(override) if override else min(int(available_memory(device) * CACHE_SHARE), CACHE_CAP)
    return _PROCESS_BUDGET[key]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


@dataclass(frozen=True)
class PassTiming:
    """A timed full pass split into its layers and its loss head: a later pass pays the head in full
    but its layers only from the first one its plan changes (the prefix cache)."""

    layers: float
    head: float

    @property
    def seconds(self) -> float:
        return self.layers + self.head


@dataclass(frozen=True)
class RunCost:
    """The work of one run: ``passes`` forward passes over ``tokens_per_pass`` tokens each (upper
    bound), and the memory the evaluator adds on top of the weights. ``layer_passes``: the layers the
    passes after the first re-run, in whole passes' worth (None: all of every pass). ``total_tokens``
    replaces ``passes × tokens_per_pass`` when the passes differ in size (``score --compare``'s halves)."""

    what: str
    passes: int
    tokens_per_pass: int
    cache_bytes: int          # activation cache the evaluator may fill (within its budget)
    logits_bytes: int         # one batch's logits, the largest single activation
    budget_bytes: int
    layer_passes: float | None = None
    backwards: int = 0
    total_tokens: int | None = None

    @property
    def peak_bytes(self) -> int:
        """Activation memory at its peak: the cache, and one batch's logits twice over (the loss's
        log-softmax is as large), as when the first batch's whole-batch loss is taken."""
        return self.cache_bytes + 2 * self.logits_bytes

    @property
    def tokens(self) -> int:
        return self.total_tokens if self.total_tokens is not None else self.passes * self.tokens_per_pass

    def eta_seconds(self, timing: PassTiming) -> float:
        """Time left once the first (base) pass has been timed: that pass is done, so it is not
        counted again; each later pass pays the head and its share of the layers."""
        rest = max(self.passes - 1, 0)
        layers = rest if self.layer_passes is None else self.layer_passes
        return rest * timing.head + layers * timing.layers

    def describe(self, timing: PassTiming | None = None) -> str:
        """One line for the user: passes, tokens, memory, and the ETA when a pass has been timed."""
        passes = "one forward pass" if self.passes == 1 else f"at most {self.passes:,} forward passes"
        if self.backwards:
            passes += f" and {self.backwards} backward pass{'es' if self.backwards > 1 else ''}"
        size = (f" × {self.tokens_per_pass:,} tokens ({self.tokens:,} tokens)" if self.total_tokens is None
                else f" ({self.tokens:,} tokens)")
        text = (f"{self.what}: {passes}{size}; evaluator memory: activation cache ≤ "
                f"{human_bytes(self.cache_bytes)} (budget {human_bytes(self.budget_bytes)}), "
                f"logits {human_bytes(self.logits_bytes)} per batch, ≤ {human_bytes(self.peak_bytes)} at the peak "
                "(cache, logits and their log-softmax)")
        if timing is not None:
            text += "; " + self.eta_text(timing)
        return text

    def eta_text(self, timing: PassTiming) -> str:
        return (f"the first pass took {timing.seconds:.2f} s ({timing.head:.2f} s of it the loss head), so about "
                f"{human_seconds(self.eta_seconds(timing))} more (less when candidates are abandoned early)")


def run_cost(what: str, model, windows: torch.Tensor, candidates: int, steps: int | None = 1, batch_size: int = 8,
             budget_bytes: int | None = None, candidate_layers: list[int] | None = None) -> RunCost:
    """Cost of scoring ``candidates`` components (``steps=1``) or of a greedy search of ``steps``
    steps starting from ``candidates`` (one fewer each step; ``None``: until none is left), plus the
    base evaluation.

    The activation cache counts what the evaluator keeps in one step: the base plan's inputs of
    layers ``1..n-1``, and for a candidate at layer ``L`` the inputs of the layers after ``L`` (those
    before are shared with the base plan). A candidate at ``L`` re-runs layers ``L..n-1``; later steps
    are taken to re-run the same share. ``candidate_layers`` gives each candidate's layer; without
    it every candidate is assumed to sit at the middle layer."""
    config = model.config.get_text_config()
    n, seq = windows.shape
    steps = candidates if steps is None else min(steps, candidates)
    per_step = [max(candidates - s, 0) for s in range(max(steps, 1))]
    passes = 1 + sum(per_step)
    budget = budget_bytes if budget_bytes is not None else process_cache_budget(next(model.parameters()).device)
    layers = getattr(config, "num_hidden_layers", 1)
    per_layer = n * seq * config.hidden_size * 4
    if candidate_layers is None:
        candidate_layers = [layers // 2] * candidates
    kept = max(layers - 1, 0) + sum(max(layers - 1 - layer, 0) for layer in candidate_layers)
    rerun = sum((layers - layer) / layers for layer in candidate_layers)  # one step's layers, in passes
    layer_passes = sum(rerun * count / max(candidates, 1) for count in per_step)
    return RunCost(what, passes, n * seq, min(per_layer * kept, budget), min(batch_size, n) * seq * config.vocab_size * 4,
                   budget, layer_passes)
