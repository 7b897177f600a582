"""Export: the physically smaller model of a plan, its model card, saved (and zipped for a download)."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from shedder.arch import count_parameters
from shedder.core.errors import ShedderError
from shedder.core.fileio import RUN_LOCK, RUN_MARKER, check_output_dir, publish_dir, zip_dir
from shedder.core.plan import PruningPlan
from shedder.formats.extract import is_stock, load_line, model_card, save
from shedder.measure.metrics import perplexity


@dataclass(frozen=True)
class Exported:
    """A saved pruned model: where, by which plan, its parameters before and after, and its card."""

    out: Path
    plan: PruningPlan
    params_before: int
    params_after: int
    card: str
    stock: bool
    #: lines on how the parameter count came about (``Adapter.param_notes``: Zamba2's narrowed MLP copies)
    notes: tuple[str, ...] = ()

    @property
    def load_line(self) -> str:
        """The line to paste to load it (plain ``transformers`` when stock-shaped)."""
        return load_line(self.stock, self.out)

    def payload(self) -> dict:
        return {"out": str(self.out), "plan": self.plan.to_dict(), "params_before": self.params_before,
                "params_after": self.params_after, "stock": self.stock, "load": self.load_line,
                "notes": list(self.notes)}


def public_plan(plan: PruningPlan, name: str) -> PruningPlan:
    """``plan`` naming its model ``name`` (what a visitor knows it by), not the server path it was loaded
    from: what the studio writes into every plan file, card and export it hands out."""
    return replace(plan, model=replace(plan.model, name=name)) if plan.model is not None else plan


def measured_card(source: str, architecture: str, plan: PruningPlan, measured: dict, protocol: str,
                  stock: bool) -> str:
    """The engine's card plus what was measured on the extracted model. ``measured`` holds ``ppl``,
    ``params`` and ``flops`` of the extracted model and ``*_original`` of the source, optionally
    ``latency_ms`` / ``original_latency_ms`` and the speedups of ``shedder.prune.frontier.point_speeds``."""
    rows = [("perplexity", f"{measured['ppl_original']:.4f}", f"{measured['ppl']:.4f}"),
            ("parameters", f"{measured['params_original']:,}", f"{measured['params']:,}"),
            ("FLOPs / token (prefill, analytic)", f"{measured['flops_original']:,.0f}", f"{measured['flops']:,.0f}")]
    if "latency_ms" in measured:
        rows.append(("time to first token (ms, measured)", f"{measured['original_latency_ms']:.2f}",
                     f"{measured['latency_ms']:.2f}"))
    table = "\n".join(f"| {name} | {a} | {b} |" for name, a, b in rows)
    speed = (f"\nMeasured prefill speedup: {measured['prefill_speedup_text']} (expected from FLOPs: "
             f"{measured['expected_prefill_speedup']:.2f}×); decode speedup: {measured['decode_speedup_text']} (expected "
             f"{measured['expected_decode_speedup']:.2f}×). Median of paired interleaved rounds of the original and the "
             "extracted model [95 % interval].\n" if "prefill_speedup_text" in measured else "")
    base = model_card(source, architecture, plan, measured["params_original"], measured["params"], stock)
    return f"""{base}
## Measured on the extracted model

| | original | pruned |
| --- | --- | --- |
{table}
{speed}
Protocol: {protocol}.
"""


def export(model, tokenizer, adapter, plan: PruningPlan, out, source: str, overwrite: bool = False,
           protected=(), measured: dict | None = None, windows=None, protocol: str = "") -> Exported:
    """Extract ``plan`` from ``model`` and save it with its card in ``out`` (new, or a previous export
    with ``overwrite``; never inside ``protected``). With ``measured`` (the studio's numbers of the
    original and the plan) the card also shows them, the perplexity measured on ``windows`` of the
    extracted model itself."""
    before = adapter.param_count()
    small = adapter.extract(plan)
    after, stock = count_parameters(small), is_stock(small)
    if measured is None:
        card = model_card(source, type(model).__name__, plan, before, after, stock)
    else:
        measured = {**measured, "ppl": perplexity(small, windows)} if windows is not None else measured
        card = measured_card(source, type(model).__name__, plan, measured, protocol, stock)
    notes = tuple(adapter.param_notes(plan))
    if notes:  # the card says why the count is not simply the original minus the removed parts
        card += "\n## Parameter count\n\n" + "".join(f"- {n}\n" for n in notes)
    path = save(small, tokenizer, out, plan=plan, card=card, overwrite=overwrite, protected=list(protected))
    return Exported(Path(path), plan, before, after, card, stock, notes)


def export_zip(model, tokenizer, adapter, plan: PruningPlan, folder: str, source: str, target=None,
               overwrite: bool = False, protected=(), measured: dict | None = None, windows=None,
               protocol: str = "") -> tuple[Exported, bytes]:
    """``export`` to ``target`` (or a temporary ``folder``) and the saved directory as zip bytes."""
    if target is not None:
        check_output_dir(target, overwrite)  # before the work, so a refusal costs nothing
    with tempfile.TemporaryDirectory() as tmp:
        done = export(model, tokenizer, adapter, plan, target or Path(tmp) / folder, source, overwrite, protected,
                      measured, windows, protocol)
        return done, zip_dir(done.out)


#: What a recovery run directory holds that is not part of the recovered model it exports.
RUN_ONLY = {RUN_MARKER, RUN_LOCK}


def export_recovered(run_dir: str | Path, folder: str, target=None, overwrite: bool = False,
                     protected=()) -> tuple[Path | None, str, bytes]:
    """A finished recovery run's model exported as it was saved: its files (weights, config, tokenizer,
    plan, card, ``recovery.json`` and the log with the recipe and the curve; not the run's lock or
    TensorBoard folder) copied to ``target`` when given (a new directory, or a previous export with
    ``overwrite``), and zipped under ``folder`` for a download. Returns (saved directory or None, card, zip)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ShedderError(f"no recovered model in {run_dir}: the run has not finished")
    files = [p for p in run_dir.iterdir() if p.is_file() and not p.is_symlink() and p.name not in RUN_ONLY]
    card = (run_dir / "README.md").read_text(encoding="utf-8") if (run_dir / "README.md").is_file() else ""

    def copy_into(out: Path) -> None:
        for path in files:
            shutil.copy2(path, out / path.name)

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / folder
        staged.mkdir()
        copy_into(staged)
        data = zip_dir(staged)
    if target is None:
        return None, card, data
    with publish_dir(target, overwrite, protected) as out:
        copy_into(out)
    return Path(target), card, data
