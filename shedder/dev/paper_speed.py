"""The paper's speed numbers on a GPU: ``bench gpu-check --paper``.

    python -m shedder bench gpu-check --paper --out DIR [--budget-s 30 --total-s 420] [--dry-run] [--overwrite]

Measures, with the paired protocol of ``shedder.measure.timing`` (``bench_models``, the same code as
``python -m shedder bench``), random-weight models in the shapes the paper times, in float16 on CUDA:

* **Mamba-2.8B** (``state-spaces/mamba-2.8b-hf``: Mamba-1, 64 layers, width 2560, vocabulary 50280)
  minus 14 blocks;
* **Mamba2-2.7B** (``state-spaces/mamba2-2.7b``: 64 layers, width 2560, head dim 64, state 128, one
  group, vocabulary 50288) minus 22 SSMs;

each as a prefill of 2048 tokens and a greedy decode of 32, on two paths: ``kernels`` (what
``transformers`` resolved at import: the mamba-ssm / causal-conv1d kernels, measured only when one of
them imports) and ``torch`` (forced by ``shedder.arch.kernels.torch_path``: what a machine without them
runs). Every run records what each scan / conv function resolved to.

**Which components go.** No released Mamba-Shedder config of these two models is in
``tests/fixtures/official``, so the choice is fixed instead: ``evenly_spaced`` takes the centre layer
of each of ``k`` equal stretches of the ``n`` layers. The weights are random; only speed is measured,
and it depends on how many layers lose a component, not on which.

**The budget.** ``--total-s`` bounds the whole run, building the models included. Before each
measurement one prefill + generate of the original is timed (after an untimed one): ``probe_s``. The
measurement needs at most ``(warm-up + min rounds) · 2 · probe`` for its rounds and ``3 · probe`` for
the passes outside them (time outside the layers, peak memory), with a ``MARGIN``; one that does not
fit in what is left is cut and listed under ``cut``, and the others still run. The rounds of each get
``--budget-s`` at most (less when less is left). The kernel paths of both models run first (the
paper's setting), then the torch paths. The report is rewritten after every measurement, so a run
killed from outside keeps what it measured (``complete`` is false until the end).

**Dry run.** ``--dry-run`` builds the same plans and writes the same JSON and Markdown on the CPU in
float32, with tiny shapes of the same layout (``DRY_LAYERS`` layers, width 64; the removed counts
scaled to them), and runs both paths (on a CPU both resolve to the PyTorch reference), so the tests
cover everything but the device.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import transformers
from packaging.version import Version

from shedder.arch import adapter_for, kernels
from shedder.core.defaults import PAPER_BUDGET_S, PAPER_TOTAL_S
from shedder.core.errors import ShedderError
from shedder.core.fileio import check_output_file, write_output_file
from shedder.core.plan import Component, PruningPlan
from shedder.dev.realshape import from_config
from shedder.formats.extract import extract
from shedder.measure.bench import bench_models, pad_token_id, speedup_text, supports_cache, timed_samples
from shedder.measure.timing import Protocol

SCHEMA = "shedder.gpu-check.paper/1"
JSON_NAME, MARKDOWN_NAME = "gpu-check-paper.json", "gpu-check-paper.md"
#: Layers of the published layouts: the removed counts are of these.
PAPER_LAYERS = 64
DRY_LAYERS = 8
#: Prompt tokens and generated tokens: the paper's setting, and the dry run's.
PAPER_TOKENS, DRY_TOKENS = (2048, 32), (32, 4)
#: The oldest transformers whose scan / conv functions are the kernel wrappers ``arch.kernels`` swaps.
MIN_TRANSFORMERS = "5.24"
#: Headroom on the probe's estimate of a measurement's cost.
MARGIN = 1.25
PATHS = ("kernels", "torch")


@dataclass(frozen=True)
class PaperModel:
    """One model the paper times: its config at the published shape, the keys the dry run narrows,
    and what is removed (``count`` of ``kind`` out of ``PAPER_LAYERS`` layers)."""

    name: str
    checkpoint: str
    config_class: str
    values: dict
    tiny: dict
    kind: str
    count: int

    def config(self, dry: bool):
        values = {**self.values, **(self.tiny if dry else {})}
        return getattr(transformers, self.config_class)(**values)

    def removed(self, layers: int) -> list[int]:
        """The layers whose ``kind`` goes: ``count`` at the published depth, scaled to ``layers``."""
        k = self.count if layers == PAPER_LAYERS else max(1, round(self.count * layers / PAPER_LAYERS))
        return evenly_spaced(layers, k)

    def plan(self, layers: int) -> PruningPlan:
        return PruningPlan(frozenset(Component(self.kind, i) for i in self.removed(layers)))


_TINY = dict(hidden_size=64, num_hidden_layers=DRY_LAYERS, vocab_size=512)

PAPER_MODELS = (
    PaperModel("Mamba-2.8B", "state-spaces/mamba-2.8b-hf", "MambaConfig", dict(
        vocab_size=50280, hidden_size=2560, num_hidden_layers=PAPER_LAYERS, state_size=16, expand=2,
        conv_kernel=4, time_step_rank=160, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0, use_mambapy=False),
        tiny=dict(_TINY, time_step_rank=4), kind="block", count=14),
    PaperModel("Mamba2-2.7B", "state-spaces/mamba2-2.7b", "Mamba2Config", dict(
        vocab_size=50288, hidden_size=2560, num_hidden_layers=PAPER_LAYERS, state_size=128, head_dim=64,
        num_heads=80, expand=2, n_groups=1, chunk_size=256, conv_kernel=4, use_bias=False, use_conv_bias=True,
        layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0),
        tiny=dict(_TINY, state_size=16, head_dim=16, num_heads=8, chunk_size=16), kind="ssm", count=22),
)


def evenly_spaced(n: int, k: int) -> list[int]:
    """The centre index of each of ``k`` equal stretches of ``range(n)``: ``(2i + 1) · n // 2k``
    (distinct while ``k ≤ n``, since neighbours are ``n / k ≥ 1`` apart before flooring)."""
    if not 0 < k <= n:
        raise ValueError(f"cannot pick {k} of {n} layers")
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


@dataclass(frozen=True)
class PaperRun:
    """What ``run_paper`` does: where it writes, dry or on CUDA, and its time limits."""

    out: Path
    dry_run: bool = False
    budget_s: float = PAPER_BUDGET_S
    total_s: float = PAPER_TOTAL_S
    overwrite: bool = False

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.dry_run else torch.float16

    def outputs(self) -> tuple[Path, Path]:
        """Both report files, refused (``ShedderError``) when the output policy forbids writing them."""
        return tuple(check_output_file(Path(self.out) / name, self.overwrite) for name in (JSON_NAME, MARKDOWN_NAME))


class _Report:
    """The report and its two files, rewritten after every step: the first write follows the
    output policy with the user's ``--overwrite``; later ones replace only what this run wrote."""

    def __init__(self, run: PaperRun, data: dict):
        self.run, self.data, self.written = run, data, False

    def write(self) -> None:
        json_path, md_path = (Path(self.run.out) / n for n in (JSON_NAME, MARKDOWN_NAME))
        again = self.written or self.run.overwrite
        write_output_file(json_path, json.dumps(self.data, indent=2) + "\n", again)
        write_output_file(md_path, markdown(self.data), again)
        self.written = True


def run_paper(run: PaperRun, log: Callable[[str], None] = print) -> dict:
    """Measure every ``PAPER_MODELS`` entry on every path within ``run.total_s`` (module docstring);
    write the JSON and Markdown report into ``run.out``; return the report."""
    if not run.dry_run and not torch.cuda.is_available():
        raise ShedderError("--paper needs a CUDA device (or --dry-run)")
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ShedderError(f"--paper needs transformers >= {MIN_TRANSFORMERS} (its kernel wrappers are what the torch "
                           f"path swaps; this is {transformers.__version__}); see docs/gpu.md")
    run.outputs()
    started = time.perf_counter()
    left = lambda: run.total_s - (time.perf_counter() - started)  # noqa: E731
    seq_len, new_tokens = DRY_TOKENS if run.dry_run else PAPER_TOKENS
    found = kernels.kernel_versions()
    paths = list(PATHS) if run.dry_run or any(found.values()) else ["torch"]
    report = _Report(run, {
        "schema": SCHEMA, "dry_run": run.dry_run, "complete": False, "device": run.device,
        "device_name": torch.cuda.get_device_name() if run.device == "cuda" else "cpu",
        "dtype": str(run.dtype).removeprefix("torch."), "torch": torch.__version__,
        "transformers": transformers.__version__, "kernel_packages": found, "paths": paths,
        "batch_size": 1, "seq_len": seq_len, "new_tokens": new_tokens,
        "removal": "evenly spaced: layer (2i+1)·n // 2k for i < k (no released config of these models)",
        "budget": {"total_s": run.total_s, "per_measurement_s": run.budget_s, "margin": MARGIN, "spent_s": 0.0},
        "cut": [], "models": []})
    cut = report.data["cut"]
    if "kernels" not in paths:
        cut.append("kernels path: neither mamba-ssm nor causal-conv1d imports here, so only the torch path ran")
    built = []
    for spec in PAPER_MODELS:
        if left() <= 0:
            cut.append(f"{spec.name}: not built ({run.total_s:g} s spent)")
            continue
        log(f"gpu-check --paper: building {spec.name}" + (" (tiny dry-run shape)" if run.dry_run else ""))
        built.append(_build(spec, run, seq_len))
        report.data["models"].append(built[-1][0])
    for path in paths:
        for entry, original, pruned, plan, ids in built:
            outcome = _measure(entry["name"], path, original, pruned, plan, ids, new_tokens, run, left, log)
            if "skipped" in outcome:
                cut.append(outcome["skipped"])
            entry["runs"].append(outcome)
            report.data["budget"]["spent_s"] = run.total_s - left()
            report.write()
    report.data["complete"] = True
    report.data["budget"]["spent_s"] = run.total_s - left()
    report.write()
    return report.data


def _build(spec: PaperModel, run: PaperRun, seq_len: int) -> tuple:
    """The report entry, the random-weight original on the device, its extracted version, the plan
    and the prompt's token ids."""
    original = from_config(spec.config(run.dry_run), run.dtype).to(run.device)
    adapter = adapter_for(original)
    plan = adapter.resolve(spec.plan(adapter.num_layers))
    pruned = extract(original, plan, adapter)
    entry = {"name": spec.name, "checkpoint": spec.checkpoint, "layers": adapter.num_layers,
             "hidden": original.config.hidden_size, "vocab": original.config.vocab_size,
             "params": adapter.param_count(),
             "removed": {"kind": spec.kind, "count": len(plan.components),
                         "layers": sorted(c.layer for c in plan.components), "plan": plan.describe()},
             "runs": []}
    ids = torch.randint(0, original.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    return entry, original, pruned, plan, ids.to(run.device)


def _measure(name: str, path: str, original, pruned, plan, ids, new_tokens: int, run: PaperRun,
             left: Callable[[], float], log) -> dict:
    """One model on one path: the probe, then ``bench_models`` if it fits, else why not (``skipped``)."""
    outcome: dict = {"path": path}
    forced = kernels.torch_path() if path == "torch" else contextlib.nullcontext([])
    try:
        with forced as replaced:
            outcome["resolved"] = kernels.resolved()
            outcome["replaced"] = replaced
            outcome["path_detail"] = _path_detail(path, outcome["resolved"], replaced)
            probe_s = _probe(original, ids, new_tokens, run.device)
            protocol = Protocol(budget_s=run.budget_s, **({"min_sample_s": 0.005} if run.dry_run else {}))
            rounds_s = (protocol.warmup + protocol.min_rounds) * 2 * probe_s * MARGIN
            fixed_s = 3 * probe_s * MARGIN
            outcome["probe_s"], outcome["needs_s"] = probe_s, rounds_s + fixed_s
            if rounds_s + fixed_s > left():
                outcome["skipped"] = (f"{name} on the {path} path: needs about {rounds_s + fixed_s:.0f} s (probe "
                                      f"{probe_s:.2f} s per prefill + generate), {max(left(), 0):.0f} s left")
                return outcome
            # the rounds stop once past the budget, at most one round (2 probes) late
            protocol = replace(protocol, budget_s=max(0.0, min(run.budget_s, left() - fixed_s - 2 * probe_s * MARGIN)))
            log(f"gpu-check --paper: {name}, {path} path (probe {probe_s:.2f} s; {protocol.budget_s:.3g} s of rounds at most)")
            outcome["bench"] = bench_models(original, pruned, None, plan, model_name=f"{name} (random weights)",
                                            seq_len=ids.shape[1], new_tokens=new_tokens, protocol=protocol,
                                            device=run.device, dtype=str(run.dtype).removeprefix("torch."),
                                            memory=not run.dry_run)
    except Exception as e:  # noqa: BLE001 - one failed path (a kernel built for another CUDA, OOM) must not lose the rest
        outcome["error"] = f"{type(e).__name__}: {e}"
        log(f"gpu-check --paper: {name}, {path} path FAILED: {outcome['error']}")
        if run.device == "cuda":
            torch.cuda.empty_cache()
    return outcome


def _probe(model, ids, new_tokens: int, device: str) -> float:
    """Seconds of one prefill + one generate of ``model`` (the second of two: the first warms up)."""
    pad_id = pad_token_id(model, None)
    samples = timed_samples(model, ids, new_tokens, pad_id, supports_cache(model, pad_id), device)
    for sample in samples:
        sample()
    return sum(s for sample in samples for s in sample().values())


def _path_detail(path: str, resolved: dict, replaced: list[str]) -> str:
    """One line on what ran: the kernel packages the functions resolved to, or what was forced."""
    if path == "kernels":
        found = sorted({impl.split(".")[0] for impl in resolved.values()
                        if impl not in ("reference", "unknown") and not impl.startswith("engine")})
        return "as installed: " + (f"kernels from {', '.join(found)}" if found
                                   else "every function resolves to the PyTorch reference here")
    return f"PyTorch, forced ({len(replaced)} kernel wrappers replaced by their reference; engine SSD scan for Mamba-2)"


def markdown(report: dict) -> str:
    """The report as a Markdown page: one row per model and path, the speedups as ``bench`` prints them."""
    b = report["budget"]
    lines = [f"# Paper-shape speed check{' (dry run: tiny CPU shapes, not the paper numbers)' if report['dry_run'] else ''}",
             "",
             f"{report['device_name']}, {report['dtype']}, torch {report['torch']}, transformers "
             f"{report['transformers']}; kernel packages: "
             + ", ".join(f"{n} {v or 'not importable'}" for n, v in report["kernel_packages"].items()),
             f"batch {report['batch_size']}, prefill of {report['seq_len']} tokens, decode of "
             f"{report['new_tokens']} tokens; random weights (speed only); removed components: {report['removal']}",
             f"budget: {b['per_measurement_s']:g} s of rounds per measurement, {b['total_s']:g} s in all; "
             f"spent {b['spent_s']:.0f} s" + ("" if report["complete"] else " so far (incomplete)"),
             "",
             "| model | removed | path | prefill speedup | decode speedup | expected (FLOPs) prefill / decode |",
             "| --- | --- | --- | --- | --- | --- |"]
    for m in report["models"]:
        for r in m["runs"]:
            head = f"| {m['name']} ({m['layers']} layers, width {m['hidden']}) | {m['removed']['plan']} | {r['path']}: "
            if "bench" in r:
                x = r["bench"]
                lines.append(f"{head}{r['path_detail']} | {speedup_text(x['measured_prefill_speedup'])} | "
                             f"{speedup_text(x['measured_decode_speedup'])} | {x['expected_prefill_speedup']:.2f}× / "
                             f"{x['expected_decode_speedup']:.2f}× |")
            else:
                why = f"failed: {r['error']}" if "error" in r else "cut (time budget)"
                lines.append(f"{head}{r.get('path_detail', '')} | {why} | | |")
    lines += ["", "Speedup: median of paired ratios original / pruned time, [95 % interval], rounds "
                  "(`docs/speed.md`)."]
    if report["cut"]:
        lines += ["", "Cut:", *[f"- {c}" for c in report["cut"]]]
    return "\n".join(lines) + "\n"
