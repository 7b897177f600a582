"""Physical pruning: build the smaller model, save it with its plan, and read the plan back."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from shedder.arch import ResolvedPlan, adapter_for_plan
from shedder.arch.spec import is_stock, load_line
from shedder.core.fileio import publish_dir
from shedder.core.plan import PruningPlan

PLAN_FILE = "pruning_plan.json"
WEIGHTS_FILE = "model.safetensors"


def extract(model, plan: ResolvedPlan | PruningPlan, adapter=None):
    """A new model with the plan's parameters physically gone; ``model`` is left untouched (a plan
    not yet resolved for ``model`` is resolved once here)."""
    adapter = adapter or adapter_for_plan(model, plan)
    return adapter.extract(plan)


def save(model, tokenizer, out_dir: str | Path, plan: PruningPlan | None = None, card: str | None = None,
         overwrite: bool = False, protected: Iterable[str | Path] = ()) -> Path:
    """Write safetensors + config (+ tokenizer, the plan, a model card) to ``out_dir``.

    Everything is written into a temporary directory beside ``out_dir`` and renamed into place when
    complete, so a failure (disk full, a kill) leaves ``out_dir`` as it was. An existing non-empty
    ``out_dir`` is refused unless ``overwrite`` and it is a previous export; ``protected`` (the
    source model's directory) and the working directory are never written (``fileio.publish_dir``).
    """
    with publish_dir(out_dir, overwrite=overwrite, protected=protected) as out:
        if not is_stock(model):
            _save_uneven(model, out)
        else:
            model.save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        if plan is not None:
            plan.save(out / PLAN_FILE)
        if card:
            (out / "README.md").write_text(card, encoding="utf-8")
    return Path(out_dir).expanduser().resolve()


def _save_uneven(model, out: Path) -> None:
    """A model with per-layer shapes only our loader can rebuild: its weights are written under
    their module names (``save_pretrained`` would rename keys into a family's checkpoint layout,
    which only ``from_pretrained`` undoes), shared tensors once."""
    from safetensors.torch import save_model

    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    save_model(model, str(out / WEIGHTS_FILE), metadata={"format": "pt"})


def model_card(source: str, architecture: str, plan, before: int, after: int, stock: bool) -> str:
    """README.md for an extracted model: where it came from, what was removed, how to load it."""
    rows = "\n".join(f"| {c.kind} | {c.layer} | {c.index} |" for c in plan.sorted()) or "| - | - | - |"
    return f"""# Pruned {architecture}

Physically pruned from `{source}` with Shedder Studio (training-free structured pruning after
Mamba-Shedder). No retraining was applied.

Loading: {load_line(stock)}

- Source model: `{source}`
- Removed: {plan.describe()}
- Parameters: {after:,} (from {before:,}; {100.0 * (before - after) / before:.1f}% removed)
- Plan: `pruning_plan.json` in this directory

| kind | layer | index |
| --- | --- | --- |
{rows}
"""


def saved_plan(model_dir: str | Path) -> PruningPlan | None:
    """The plan a pruned model directory was made with, if it records one."""
    p = Path(model_dir) / PLAN_FILE
    return PruningPlan.load(p) if p.is_file() else None
