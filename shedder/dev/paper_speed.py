"""The paper's speed numbers on a GPU: ``bench gpu-check --paper``.

    python -m shedder bench gpu-check --paper --out DIR [--budget-s 45 --total-s 420] [--dry-run]

Measures, with the paired protocol of ``shedder.measure.timing`` (``bench_models``, the same code as
``python -m shedder bench``), random-weight models in the shapes the paper times, in fp16 on CUDA:

* **Mamba-2.8B** (``state-spaces/mamba-2.8b-hf``: Mamba-1, 64 layers, width 2560, vocabulary 50280)
  minus 14 blocks;
* **Mamba2-2.7B** (``state-spaces/mamba2-2.7b``: 64 layers, width 2560, head dim 64, state 128, one
  group, vocabulary 50288) minus 22 SSMs;

each as a prefill of 2048 tokens and a greedy decode, once on the PyTorch reference path (forced, see
``torch_path``) and once more on the mamba-ssm / causal-conv1d kernels when they are importable.

**Which components go.** No released Mamba-Shedder config of these two models is in
``tests/fixtures/official``, so the choice is fixed and documented instead: ``evenly_spaced`` takes
the centre layer of ``k`` equal stretches of the ``n`` layers. The weights are random; only speed is
measured, and speed depends on how many layers lose a component, not on which.

**The budget.** The whole run is bounded by ``--total-s`` (building the models included): each
measurement gets ``--budget-s`` of paired rounds (fewer when less is left), and a measurement that no
longer fits is cut and listed under ``cut`` in the report instead of overrunning.

**Dry run.** ``--dry-run`` builds the same plans and writes the same JSON and Markdown on the CPU, with
tiny shapes of the same layout (8 layers, width 64; the removed counts scaled to 8 layers), so the
tests cover everything but the device.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from shedder.arch import adapter_for
from shedder.core.errors import ShedderError
from shedder.core.fileio import check_output_file, write_output_file
from shedder.core.plan import Component, PruningPlan
from shedder.dev.realshape import fill
from shedder.formats.extract import extract
from shedder.measure.bench import bench_models, speedup_text
from shedder.measure.timing import Protocol

SCHEMA = "shedder.gpu-check.paper/1"
JSON_NAME, MARKDOWN_NAME = "gpu-check-paper.json", "gpu-check-paper.md"
#: Layers of the published layouts: the removed counts are of these.
PAPER_LAYERS = 64
KERNEL_PACKAGES = ("mamba_ssm", "causal_conv1d")
#: The functions ``transformers`` resolves to a kernel when its package imports (5.x: module-level
#: wrappers whose ``__wrapped__`` is the PyTorch reference).
KERNEL_FUNCTIONS = ("causal_conv1d_fn", "causal_conv1d_update", "mamba_inner_fn", "mamba_selective_scan",
                    "mamba_selective_state_update", "selective_scan_fn", "selective_state_update",
                    "mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined")


@dataclass(frozen=True)
class PaperModel:
    """One model the paper times: its config at the published shape, the tiny dry-run shape, and what
    is removed (``count`` of ``kind`` out of ``PAPER_LAYERS`` layers)."""

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


_TINY = dict(hidden_size=64, num_hidden_layers=8, vocab_size=512)

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
        tiny=dict(_TINY, state_size=16, head_dim=16, num_heads=8, chunk_size=32), kind="ssm", count=22),
)


def evenly_spaced(n: int, k: int) -> list[int]:
    """The centre index of each of ``k`` equal stretches of ``range(n)`` (distinct while ``k ≤ n``)."""
    if not 0 < k <= n:
        raise ValueError(f"cannot pick {k} of {n} layers")
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def kernel_versions() -> dict[str, str | None]:
    """Each kernel package's installed version, None when it does not import."""
    found = {}
    for name in KERNEL_PACKAGES:
        try:
            importlib.import_module(name)
            found[name] = importlib.metadata.version(name.replace("_", "-"))
        except Exception:  # not installed, or built for another torch/CUDA: transformers falls back too
            found[name] = None
    return found


@contextlib.contextmanager
def torch_path():
    """Force the PyTorch reference scan and conv in ``transformers``' Mamba and Mamba-2 modules while
    the block runs, whatever is installed: each kernel wrapper is replaced by the reference function
    it wraps (``inspect.unwrap``), and the older ``is_fast_path_available`` switch, where a module has
    one, is set False. Everything is put back on exit. Yields the names replaced, per module."""
    saved: list[tuple[object, str, object]] = []
    replaced: dict[str, list[str]] = {}
    try:
        for module_name in ("transformers.models.mamba.modeling_mamba", "transformers.models.mamba2.modeling_mamba2"):
            module = importlib.import_module(module_name)
            for name in KERNEL_FUNCTIONS:
                fn = getattr(module, name, None)
                if callable(fn) and hasattr(fn, "__wrapped__"):
                    saved.append((module, name, fn))
                    setattr(module, name, inspect.unwrap(fn))
                    replaced.setdefault(module_name.rsplit(".", 1)[-1], []).append(name)
            if hasattr(module, "is_fast_path_available"):
                saved.append((module, "is_fast_path_available", module.is_fast_path_available))
                module.is_fast_path_available = False
                replaced.setdefault(module_name.rsplit(".", 1)[-1], []).append("is_fast_path_available")
        yield replaced
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def build(spec: PaperModel, dry: bool, dtype: torch.dtype, device: str):
    """A random-weight model of ``spec``'s shape (``realshape.fill``'s cheap draw), in eval mode."""
    from transformers.initialization import no_init_weights

    config = spec.config(dry)
    cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    with no_init_weights():
        model = cls._from_config(config, dtype=dtype)
    fill(model)
    return model.to(device).eval()


def check_outputs(out: str | Path, overwrite: bool) -> tuple[Path, Path]:
    """Both report files, refused before any work when the output policy forbids writing them."""
    return tuple(check_output_file(Path(out) / name, overwrite) for name in (JSON_NAME, MARKDOWN_NAME))


def run_paper(out: str | Path, dry: bool, budget_s: float, total_s: float, overwrite: bool = False,
              log=print) -> dict:
    """Measure every ``PAPER_MODELS`` entry on every available path within ``total_s``; write the
    JSON and Markdown report into ``out``; return the report."""
    if not dry and not torch.cuda.is_available():
        raise ShedderError("--paper needs a CUDA device (or --dry-run)")
    check_outputs(out, overwrite)
    started = time.perf_counter()
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.float16)
    kernels = kernel_versions()
    paths = ["torch"] + (["kernels"] if not dry and any(kernels.values()) else [])
    seq_len, new_tokens = (64, 4) if dry else (2048, 32)
    report = {"schema": SCHEMA, "dry_run": dry, "device": device,
              "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
              "transformers": transformers.__version__, "kernel_packages": kernels, "paths": paths,
              "batch_size": 1, "seq_len": seq_len, "new_tokens": new_tokens,
              "budget": {"total_s": total_s, "per_measurement_s": budget_s}, "cut": [], "models": []}
    for spec in PAPER_MODELS:
        if time.perf_counter() - started >= total_s:
            report["cut"].append(f"{spec.name}: not built (total budget of {total_s:g} s spent)")
            continue
        log(f"gpu-check --paper: building {spec.name}{' (tiny dry-run shape)' if dry else ''}")
        original = build(spec, dry, dtype, device)
        adapter = adapter_for(original)
        plan = adapter.resolve(spec.plan(adapter.num_layers))
        pruned = extract(original, plan, adapter)
        entry = {"name": spec.name, "checkpoint": spec.checkpoint, "layers": adapter.num_layers,
                 "hidden": original.config.hidden_size, "vocab": original.config.vocab_size,
                 "params": adapter.param_count(),
                 "removed": {"kind": spec.kind, "count": len(plan.components),
                             "layers": sorted(c.index for c in plan.components), "plan": plan.describe()},
                 "runs": []}
        for path in paths:
            left = total_s - (time.perf_counter() - started)
            if left < min(budget_s, 10.0) + 5.0:  # rounds plus the fixed passes (warm-up, outside share, memory)
                report["cut"].append(f"{spec.name} on the {path} path: {left:.0f} s left of {total_s:g} s")
                continue
            protocol = Protocol(budget_s=min(budget_s, left / 2), **({"min_sample_s": 0.005} if dry else {}))
            log(f"gpu-check --paper: {spec.name}, {path} path ({protocol.budget_s:.0f} s of rounds at most)")
            with torch_path() if path == "torch" else contextlib.nullcontext({}) as replaced:
                result = bench_models(original, pruned, None, plan, model_name=f"{spec.name} (random weights)",
                                      seq_len=seq_len, new_tokens=new_tokens, protocol=protocol, device=device,
                                      dtype=report["dtype"], memory=not dry)
            entry["runs"].append({"path": path, "path_detail": _path_detail(path, kernels, replaced),
                                  "bench": result})
        report["models"].append(entry)
        del original, pruned
        if device == "cuda":
            torch.cuda.empty_cache()
    report["budget"]["spent_s"] = time.perf_counter() - started
    json_path, md_path = check_outputs(out, overwrite)
    write_output_file(json_path, json.dumps(report, indent=2) + "\n", overwrite)
    write_output_file(md_path, markdown(report), overwrite)
    return report


def _path_detail(path: str, kernels: dict, replaced: dict) -> str:
    if path == "kernels":
        found = ", ".join(f"{n.replace('_', '-')} {v}" for n, v in kernels.items() if v)
        return f"kernels: transformers resolves its scan/conv functions to {found}"
    names = sorted({n for names in replaced.values() for n in names})
    return "PyTorch reference, forced (replaced: " + (", ".join(names) or "nothing to replace") + ")"


def markdown(report: dict) -> str:
    """The report as a Markdown page: one row per model and path, the speedups as ``bench`` prints them."""
    lines = [f"# Paper-shape speed check{' (dry run: tiny CPU shapes, not the paper numbers)' if report['dry_run'] else ''}",
             "",
             f"{report['device_name']}, {report['dtype']}, torch {report['torch']}, transformers "
             f"{report['transformers']}; kernel packages: "
             + ", ".join(f"{n} {v or 'not importable'}" for n, v in report["kernel_packages"].items()),
             f"batch {report['batch_size']}, prefill of {report['seq_len']} tokens, decode of "
             f"{report['new_tokens']} tokens; random weights (speed only)",
             f"budget: {report['budget']['per_measurement_s']:g} s of rounds per measurement, "
             f"{report['budget']['total_s']:g} s in all; spent {report['budget']['spent_s']:.0f} s",
             "",
             "| model | removed | path | prefill speedup | decode speedup | expected (FLOPs) prefill / decode |",
             "| --- | --- | --- | --- | --- | --- |"]
    for m in report["models"]:
        for run in m["runs"]:
            b = run["bench"]
            lines.append(f"| {m['name']} ({m['layers']} layers, width {m['hidden']}) | {m['removed']['plan']} | "
                         f"{run['path_detail']} | {speedup_text(b['measured_prefill_speedup'])} | "
                         f"{speedup_text(b['measured_decode_speedup'])} | {b['expected_prefill_speedup']:.2f}× / "
                         f"{b['expected_decode_speedup']:.2f}× |")
    lines += ["", "Speedup: median of paired ratios original / pruned time, [95 % interval], rounds "
                  "(`docs/speed.md`)."]
    if report["cut"]:
        lines += ["", "Cut for the time budget:", *[f"- {c}" for c in report["cut"]]]
    return "\n".join(lines) + "\n"
