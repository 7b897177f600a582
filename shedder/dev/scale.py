"""How cost grows with model size, and the whole journey on a GPU: ``bench scale``, ``bench gpu-check``.

    python -m shedder bench scale [--sizes S,M,130m] [--samples 4 --seq-len 256] [--device cuda --dtype bfloat16]
    python -m shedder bench gpu-check [--family mamba2] [--dtype bfloat16]

``bench scale`` builds random Mamba-2 models of growing width, depth and vocabulary (no download; the
largest is the real Mamba-2 130M shape) and measures, on the same calibration windows, the time of one
perplexity evaluation (``eval``), of one candidate in ``score`` (all SSMs scored, time per candidate)
and of one greedy ``search`` step over the SSMs, each with the peak memory it added. Time per
candidate grows with layers × tokens (plus vocabulary × tokens for the loss head); the table prints
that product so the growth can be read off.

``bench gpu-check`` runs the CLI journey (info, eval under a plan, score, search, extract, eval of the
extracted model, bench) on a real-shape model on CUDA and checks masked == extracted; on a machine
without CUDA it says so in one line and exits 0, so a CI job can call it unconditionally. With
``--paper`` it measures the paper's two models instead (``shedder.dev.paper_speed``).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from shedder.arch import adapter_for
from shedder.core.errors import ShedderError
from shedder.core.plan import Component, PruningPlan
from shedder.dev.realshape import build, fill, save_checkpoint
from shedder.formats.loading import parse_dtype
from shedder.measure.bench import kernel_path
from shedder.measure.budget import human_bytes
from shedder.measure.evaluator import PlanEvaluator
from shedder.measure.metrics import perplexity
from shedder.prune.importance import score
from shedder.prune.search import StopWhen, greedy_search

#: name -> (hidden, layers, vocab, heads of 64 channels, state, chunk)
SIZES = {
    "S": (256, 4, 8192, 8, 64, 256),
    "M": (512, 8, 32768, 16, 128, 256),
    "130m": (768, 24, 50288, 24, 128, 256),
}


def _mamba2(size: str, dtype: torch.dtype, device: str):
    import transformers

    hidden, layers, vocab, heads, state, chunk = SIZES[size]
    config = transformers.Mamba2Config(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab,
                                       num_heads=heads, head_dim=64, expand=2, n_groups=1, state_size=state,
                                       chunk_size=chunk, tie_word_embeddings=True, eos_token_id=0, pad_token_id=0)
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = transformers.Mamba2ForCausalLM._from_config(config, dtype=dtype)
    fill(model)
    return model.to(device).eval()


class _Peak:
    """Peak memory added while the block runs: CUDA's allocator peak, or the process's peak RSS
    (``VmHWM`` after resetting it through ``/proc/self/clear_refs``; None where that is unavailable)."""

    def __init__(self, device: str):
        self.device, self.added = device, None

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.start = _status_kb("VmRSS") * 1024
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.added = torch.cuda.max_memory_allocated() - self.start
        elif self.start is not None:
            self.added = _status_kb("VmHWM") * 1024 - self.start


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(size: str, samples: int, seq_len: int, batch_size: int, dtype: torch.dtype, device: str) -> dict:
    """One row of the scale table (times in seconds, memory in bytes)."""
    model = _mamba2(size, dtype, device)
    adapter = adapter_for(model)
    windows = torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    row = {"size": size, "hidden": model.config.hidden_size, "layers": adapter.num_layers,
           "vocab": model.config.vocab_size, "params": adapter.param_count(), "tokens": samples * seq_len}
    row["layers_x_tokens"] = row["layers"] * row["tokens"]
    perplexity(model, windows[:1], 1)  # warm-up
    for name, run in (
        ("eval", lambda: perplexity(model, windows, batch_size)),
        ("score", lambda: score(model, windows, ["ssm"], batch_size=batch_size,
                                cache_dir=tempfile.mkdtemp(prefix="shedder-scale-"),
                                evaluator=PlanEvaluator(model, windows, adapter, batch_size))),
        ("search", lambda: greedy_search(model, windows, ["ssm"], StopWhen(steps=1), batch_size=batch_size)),
    ):
        with _Peak(device) as peak:
            started = time.perf_counter()
            run()
            _sync(device)
            took = time.perf_counter() - started
        per = adapter.num_layers if name == "score" else 1  # score: one ssm candidate per layer (+ base)
        row[f"{name}_s"] = took / (per + (1 if name == "score" else 0))
        row[f"{name}_peak_bytes"] = peak.added
    return row


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def format_table(rows: list[dict], header: str) -> str:
    def mem(v):
        return human_bytes(v) if v is not None else "n/a"

    lines = [header, "",
             "| size | hidden × layers, vocab | params | layers × tokens | eval (s) | score: s per candidate | "
             "search step (s) | peak added: eval / score / search |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['hidden']} × {r['layers']}, {r['vocab']:,} | {r['params'] / 1e6:.1f} M | "
                     f"{r['layers_x_tokens']:,} | {r['eval_s']:.2f} | {r['score_s']:.2f} | {r['search_s']:.1f} | "
                     f"{mem(r['eval_peak_bytes'])} / {mem(r['score_peak_bytes'])} / {mem(r['search_peak_bytes'])} |")
    return "\n".join(lines)


def run_scale(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise ShedderError(f"unknown size {unknown[0]!r}; choose from {', '.join(SIZES)}")
    rows = []
    for size in sizes:
        rows.append(measure(size, args.samples, args.seq_len, args.batch_size, dtype, args.device))
        print(f"bench scale: {size} done", file=sys.stderr, flush=True)
    header = (f"{args.device}, {args.dtype}, {torch.get_num_threads()} threads, {kernel_path(args.device)}; "
              f"{args.samples} windows × {args.seq_len} tokens, batch {args.batch_size}; score and search over "
              "the SSMs (one candidate per layer)")
    print(json.dumps({"header": header, "rows": rows}, indent=2) if args.json else format_table(rows, header))
    return 0


#: What ``bench gpu-check`` (the journey, or ``--paper``) prints on a machine without CUDA, exiting 0.
SKIPPED = ("gpu-check: skipped: PyTorch sees no CUDA device on this machine (torch.cuda.is_available() is "
           "False); run `python -m shedder bench gpu-check` on a GPU machine")


def run_gpu_check(args, main) -> int:
    """The CLI journey on CUDA, each step a call of the CLI's ``main``; one line and exit 0 without a
    CUDA device."""
    if not torch.cuda.is_available():
        print(SKIPPED)
        return 0

    print(f"gpu-check: {torch.cuda.get_device_name()}, {kernel_path('cuda')}", flush=True)
    failures = []
    with tempfile.TemporaryDirectory(prefix="shedder-gpu-check-") as tmp:
        tmp = Path(tmp)
        model = build(args.family, args.layers, small=False, dtype=getattr(torch, args.dtype))
        model_dir = save_checkpoint(model, tmp / "model")
        adapter = adapter_for(model)
        plan = PruningPlan(frozenset([Component("ssm", 0), Component("block", adapter.num_layers - 1)]))
        del model, adapter
        plan.save(tmp / "plan.json")
        opts = ["--model", str(model_dir), "--dtype", args.dtype, "--device", "cuda", "--no-progress"]
        data = ["--samples", "2", "--seq-len", "2048", "--batch-size", "2"]
        steps = [
            ("info", ["info", *opts]),
            ("eval (masked plan)", ["eval", *opts, "--plan", str(tmp / "plan.json"), *data, "--accuracy-n", "32"]),
            ("score", ["score", *opts, "--kinds", "block,ssm", "--out", str(tmp / "s.csv"),
                       "--cache-dir", str(tmp / "cache"), *data]),
            ("search", ["search", *opts, "--kinds", "ssm", "--steps", "2", "--out", str(tmp / "run"), *data]),
            ("extract", ["extract", *opts, "--plan", str(tmp / "plan.json"), "--out", str(tmp / "pruned")]),
            ("eval (extracted)", ["eval", *opts[:1], str(tmp / "pruned"), *opts[2:], *data, "--accuracy-n", "32"]),
            ("bench", ["bench", "--model", str(model_dir), "--pruned", str(tmp / "pruned"), "--dtype", args.dtype,
                       "--device", "cuda", "--repeats", "3"]),
        ]
        results = {}
        for name, argv in steps:
            started = time.perf_counter()
            import contextlib
            import io

            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = main([*argv, "--json"] if name != "bench" else [*argv, "--json"])
            results[name] = json.loads(out.getvalue()) if code == 0 else None
            print(f"  {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {time.perf_counter() - started:.1f} s",
                  flush=True)
            if code != 0:
                failures.append(name)
        masked, pruned = results.get("eval (masked plan)"), results.get("eval (extracted)")
        if masked and pruned:
            rel = abs(pruned["perplexity"] - masked["perplexity"]) / masked["perplexity"]
            ok = rel <= (1e-4 if args.dtype == "float32" else 2e-2)
            print(f"  masked == extracted: perplexity {masked['perplexity']:.4f} vs {pruned['perplexity']:.4f} "
                  f"(relative difference {rel:.2e}) {'ok' if ok else 'FAILED'}")
            if not ok:
                failures.append("masked == extracted")
    print("gpu-check: " + ("all passed" if not failures else "FAILED: " + ", ".join(failures)))
    return 0 if not failures else 1
