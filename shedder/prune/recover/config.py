"""The recovery recipe (``RecoverConfig``), checked when made, and what a run reports (``RecoverResult``)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shedder.core.defaults import RECOVER_DEFAULT_LR as DEFAULT_LR, RECOVER_METHODS as METHODS, RECOVER_SCHEDULES as SCHEDULES
from shedder.core.errors import ShedderError

TEMPLATES = (None, "alpaca")


@dataclass(frozen=True)
class RecoverConfig:
    """The recipe. ``steps`` or ``tokens`` sets the budget (tokens are rounded up to whole steps)."""

    method: str = "lora"
    data: str = "train"
    template: str | None = None
    steps: int | None = None
    tokens: int | None = None
    batch_size: int = 8
    seq_len: int = 256
    lr: float | None = None             # default: DEFAULT_LR[method]
    schedule: str = "cosine"            # warm-up, then cosine to 10 % / linear to 0 / constant
    warmup: float = 0.05                # fraction of the steps
    seed: int = 0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] | None = None   # default: the family adapter's lora_targets
    temperature: float = 2.0
    lm_weight: float = 0.0              # distill: weight of the plain next-token loss
    eval_data: str = "test"
    eval_samples: int | None = 64       # held-out windows before and after (None: the whole split)
    checkpoint_every: int = 50
    tasks: tuple[str, ...] = ()          # lm-eval tasks before and after (needs shedder.measure.downstream)

    def __post_init__(self):
        """Refuse a recipe a user can get wrong (a CLI flag, an app field) with one message naming the
        option and what it allows, before anything is loaded or written."""
        if self.method not in METHODS:
            raise ShedderError(f"unknown recovery method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.schedule not in SCHEDULES:
            raise ShedderError(f"unknown lr schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.template not in TEMPLATES:
            raise ShedderError(f"unknown template {self.template!r}; the only template is 'alpaca'")
        for name in ("steps", "tokens", "batch_size", "lora_rank", "checkpoint_every", "eval_samples"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ShedderError(f"{_flag(name)} must be a whole number of at least 1, got {value!r}")
        if not is_int(self.seq_len) or self.seq_len < 2:
            raise ShedderError(f"--seq-len must be a whole number of at least 2, got {self.seq_len!r}")
        if not is_int(self.seed) or not 0 <= self.seed < 2 ** 63:
            raise ShedderError(f"--seed must be a whole number in [0, 2**63), got {self.seed!r}")
        # beyond 1 an AdamW step outgrows any weight (and past float32's range the optimizer fails)
        _check_number("lr", self.lr, "a positive number at most 1", lambda v: 0 < v <= 1, optional=True)
        _check_number("warmup", self.warmup, "a fraction of the steps in [0, 1)", lambda v: 0 <= v < 1)
        _check_number("lora_alpha", self.lora_alpha, "a positive number", lambda v: v > 0)
        _check_number("temperature", self.temperature, "a positive number", lambda v: v > 0)
        _check_number("lm_weight", self.lm_weight, "a number of at least 0", lambda v: v >= 0)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return math.ceil(self.tokens / (self.batch_size * self.seq_len))
        return 100

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warm-up, then the schedule."""
        total, peak = self.total_steps, self.learning_rate
        warmup = max(1, round(self.warmup * total)) if self.warmup > 0 else 0
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if self.schedule == "cosine":
            return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        if self.schedule == "linear":
            return peak * (1 - progress)
        return peak

    def describe(self) -> str:
        return (f"{self.method}, {self.total_steps} steps × {self.batch_size} windows × {self.seq_len} tokens of "
                f"{self.data!r}{' (alpaca template)' if self.template else ''}, lr {self.learning_rate:g} "
                f"({self.schedule})")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def is_int(value) -> bool:
    """A whole number, and not a bool (JSON and Python both let ``True`` pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(name: str, value, allowed: str, ok, optional: bool = False) -> None:
    """``value`` must be a finite real number for which ``ok`` holds (NaN and infinity never pass)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ShedderError(f"{_flag(name)} must be {allowed}, got {value!r}")


@dataclass
class RecoverResult:
    run_dir: Path
    config: RecoverConfig
    steps: int
    tokens: int
    seconds: float
    ppl: dict = field(default_factory=dict)     # {"unpruned", "pruned", "recovered"} held-out perplexity
    protocol: str = ""
    trained_params: int = 0
    resumed_from: int = 0
    tasks: dict = field(default_factory=dict)

    @property
    def recovered_fraction(self) -> float | None:
        """Share of the perplexity lost to pruning that recovery won back (log scale: of the NLL)."""
        p = self.ppl
        if not all(k in p for k in ("unpruned", "pruned", "recovered")):
            return None
        lost = math.log(p["pruned"]) - math.log(p["unpruned"])
        return (math.log(p["pruned"]) - math.log(p["recovered"])) / lost if lost > 0 else None

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "recipe": asdict(self.config), "steps": self.steps,
                "tokens": self.tokens, "seconds": round(self.seconds, 2), "ppl": self.ppl, "protocol": self.protocol,
                "recovered_fraction": self.recovered_fraction, "trained_params": self.trained_params,
                "resumed_from": self.resumed_from, "tasks": self.tasks}
