"""Real speed: an extracted model measured next to its original, in one run.

    python -m shedder bench --model mamba2-tiny --plan plan.json [--batch 1 --seq-len 256 --new-tokens 32]
    python -m shedder bench --model mamba2-tiny --pruned out/pruned-dir --device cuda --json

What is measured (both models, same inputs, same process, repeats interleaved and their order
alternated so that drift in machine load hits both alike; warm-up rounds are discarded):

* prefill throughput: ``batch · seq_len`` tokens / wall time of one full forward (logits for every
  position, no cache), random token ids;
* time to first token and decode throughput, from one greedy ``generate`` of ``new_tokens`` tokens
  with the recurrent cache (whatever the saved config's ``use_cache`` says; only a model that
  cannot use a cache at all decodes without one, and the report says so): a logits processor stamps the time each token's logits arrive, so
  TTFT is the time to the first stamp and decode throughput is ``batch · (new_tokens - 1)`` over the
  time between the first and the last stamp;
* peak memory. CUDA: ``torch.cuda.max_memory_allocated`` during prefill + generate, minus what was
  allocated before, plus the model's own weight bytes. CPU: each model is loaded from its saved
  directory in a fresh Python subprocess; after loading, the kernel's peak-RSS mark is reset
  (``/proc/self/clear_refs``) and the peak resident set during one prefill + generate is read back
  (``VmHWM``) — so the figure is the process's real peak (interpreter, libraries, weights,
  activations, cache), and ``delta`` is the part above the loaded model;
* parameters (tied weights once) and on-disk size (both models saved as safetensors to a temporary
  directory when the CPU memory probe needs them there; otherwise the bytes of the tensors a save
  writes, i.e. the file less its header).

Every timing is reported as median with quartiles and min–max; each ratio is pruned / original
(for throughputs that is the speedup); for timings it is the median of per-round ratios (both
models are timed back to back in every round), which cancels slow drifts in machine load. The cost model's expected prefill speedup
(``shedder.measure.cost.expected_speedup``) is printed next to the measured one. Latency always comes from
the extracted model, never from a masked one.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
import torch

from shedder.arch import adapter_for, count_parameters
from shedder.measure.cost import estimate
from shedder.core.errors import ShedderError
from shedder.formats.extract import extract, save, saved_plan
from shedder.formats.loading import REPO_ROOT, load_model, parse_dtype
from shedder.core.plan import PruningPlan
from shedder.core.progress import Progress


@dataclass
class Spread:
    """Median and spread of repeated measurements."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        v = sorted(values)
        if len(v) == 1:
            return cls(v[0], v[0], v[0], v[0], v[0], 1)
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
        return cls(statistics.median(v), q1, q3, v[0], v[-1], len(v))


def kernel_path(device: str) -> str:
    """Which implementation of the scan and conv runs: ``transformers`` picks the mamba-ssm /
    causal-conv1d kernels by itself on CUDA when they are installed, else the PyTorch reference."""
    if not device.startswith("cuda"):
        return "CPU: PyTorch reference scan and conv"
    found = [name for name in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(name)]
    if found:
        return "CUDA: kernels from " + ", ".join(n.replace("_", "-") for n in found)
    return "CUDA: PyTorch reference scan and conv (mamba-ssm / causal-conv1d not installed)"


def bench_speed(model_name: str, plan: PruningPlan | str | Path | None = None, pruned_dir: str | Path | None = None,
                *, batch_size: int = 1, seq_len: int = 256, new_tokens: int = 32, repeats: int = 5,
                warmup: int = 1, device: str = "cpu", dtype: str = "float32", memory: bool = True,
                seed: int = 0, progress: Progress | None = None) -> dict:
    """Measure the original model and its extracted version side by side; returns a JSON-able dict.

    Give either ``plan`` (a ``PruningPlan`` or a plan file; the model is extracted here) or
    ``pruned_dir`` (a saved pruned model; its recorded plan, if any, is checked against the model).
    """
    if (plan is None) == (pruned_dir is None):
        raise ShedderError("bench needs exactly one of a plan (--plan) or a pruned model directory (--pruned)")
    if min(batch_size, seq_len, repeats) < 1 or warmup < 0:
        raise ShedderError("batch size, sequence length and repeats must be at least 1 (warm-up at least 0)")
    if new_tokens < 2:
        raise ShedderError("--new-tokens must be at least 2 (decode throughput is measured after the first token)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ShedderError("--device cuda was asked for, but PyTorch sees no CUDA device")
    torch_dtype = parse_dtype(dtype)

    original, pruned, tokenizer, plan = _load_pair(model_name, plan, pruned_dir, dtype, device)
    costs = {"original": estimate(original, None, seq_len, batch_size),
             "pruned": estimate(pruned, None, seq_len, batch_size)}
    models = {"original": original, "pruned": pruned}
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, original.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    pad_id = pad_token_id(original, tokenizer)
    cache = {name: supports_cache(model, pad_id) for name, model in models.items()}
    total_steps = warmup + repeats + (2 if memory else 0)
    samples = _timing_rounds(models, cache, ids, new_tokens, pad_id, device, warmup, repeats, total_steps, progress)

    results: dict[str, dict] = {}
    # Saved only for the CPU memory probe, which loads each model in a fresh process: a 7B model
    # is not written to a temporary directory just to read its size.
    probe = memory and not device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="shedder-bench-") as tmp:
        for i, (name, model) in enumerate(models.items()):
            out = save(model, tokenizer, Path(tmp) / name, plan if name == "pruned" else None) if probe else None
            entry = {
                "params": count_parameters(model),
                "decode_with_cache": cache[name],
                "disk_bytes": (sum(f.stat().st_size for f in out.glob("*.safetensors")) if out
                               else _state_bytes(model)),
                **{key: asdict(Spread.of(values)) for key, values in samples[name].items()},
                "flops_per_token_prefill": costs[name].flops_per_token_prefill,
                "state_bytes_per_sequence": costs[name].state_bytes_per_sequence,
            }
            if memory:
                if device.startswith("cuda"):
                    entry["memory"] = _cuda_peak(model, ids, new_tokens, pad_id, cache[name])
                else:
                    entry["memory"] = _cpu_peak_subprocess(out, batch_size, seq_len, new_tokens, cache[name], dtype, seed)
                _report(progress, warmup + repeats + i + 1, total_steps, f"bench: peak memory of the {name} model")
            results[name] = entry

    expected = costs["original"].flops_per_token_prefill / costs["pruned"].flops_per_token_prefill
    paired = Spread.of([p / o for p, o in zip(samples["pruned"]["prefill_tokens_per_s"],
                                              samples["original"]["prefill_tokens_per_s"])])
    return {
        "model": model_name,
        "plan": plan.describe() if plan is not None else "(plan not recorded in the pruned directory)",
        "device": device,
        "dtype": str(torch_dtype).replace("torch.", ""),
        "kernels": kernel_path(device),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size, "seq_len": seq_len, "new_tokens": new_tokens,
        "repeats": repeats, "warmup": warmup,
        "original": results["original"],
        "pruned": results["pruned"],
        "ratios": _ratios(results["original"], results["pruned"], samples),
        "expected_prefill_speedup": expected,
        "measured_prefill_speedup": paired.median,
        "measured_prefill_speedup_spread": asdict(paired),
        "measured_over_expected": paired.median / expected,
    }


def pad_token_id(model, tokenizer) -> int:
    """The tokenizer's pad id, else the config's (a directory without a tokenizer), else 0."""
    for pad in (getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None)):
        if isinstance(pad, int):
            return pad
    return 0


def _load_pair(model_name: str, plan, pruned_dir, dtype: str, device: str):
    """(original, extracted model, tokenizer, validated plan or None when a pruned directory has none)."""
    original, tokenizer = load_model(model_name, dtype=dtype, device=device)
    adapter = adapter_for(original)
    if pruned_dir is not None:
        pruned, _ = load_model(str(pruned_dir), dtype=dtype, device=device)
        if pruned.config.vocab_size != original.config.vocab_size or type(pruned) is not type(original):
            raise ShedderError(f"{pruned_dir} ({type(pruned).__name__}, vocabulary {pruned.config.vocab_size}) is not "
                               f"a pruned version of {model_name} ({type(original).__name__}, "
                               f"vocabulary {original.config.vocab_size})")
        plan = saved_plan(pruned_dir)
        return original, pruned, tokenizer, adapter.validate(plan) if plan is not None else None
    if not isinstance(plan, PruningPlan):
        plan = PruningPlan.load(plan, adapter.identity(model_name))
    plan = adapter.validate(plan)
    return original, extract(original, plan, adapter), tokenizer, plan


def _timing_rounds(models: dict, cache: dict, ids: torch.Tensor, new_tokens: int, pad_id: int, device: str, warmup: int,
                   repeats: int, total_steps: int, progress: Progress | None) -> dict[str, dict[str, list[float]]]:
    """Timed figures per model, one value per round after the warm-up. Within a round, each
    measurement runs for both models back to back; the order alternates between rounds."""
    batch_size, seq_len = ids.shape
    samples = {name: {"prefill_tokens_per_s": [], "decode_tokens_per_s": [], "ttft_ms": []} for name in models}
    for r in range(warmup + repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        prefill_s = {name: _time_prefill(models[name], ids, device) for name in order}
        generate_s = {name: _time_generate(models[name], ids, new_tokens, pad_id, cache[name], device)
                      for name in order}
        if r >= warmup:
            for name in models:
                ttft_s, decode_s = generate_s[name]
                samples[name]["prefill_tokens_per_s"].append(batch_size * seq_len / prefill_s[name])
                samples[name]["decode_tokens_per_s"].append(batch_size * (new_tokens - 1) / decode_s)
                samples[name]["ttft_ms"].append(ttft_s * 1000)
        _report(progress, r + 1, total_steps,
                f"bench: round {r + 1}/{warmup + repeats}" + (" (warm-up)" if r < warmup else ""))
    return samples


def _report(progress: Progress | None, done: int, total: int, message: str) -> None:
    if progress is not None:
        progress(done, total, message)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def _time_prefill(model, ids: torch.Tensor, device: str) -> float:
    """Seconds for one full forward over ``ids`` [batch, seq_len] without a cache."""
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(device)
    return time.perf_counter() - start


class _Stamps:
    """A logits processor that records when each generated token's logits are ready."""

    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def supports_cache(model, pad_id: int) -> bool:
    """Whether ``generate`` can run with the recurrent cache. Always tried, whatever the saved config's
    ``use_cache`` says (training configs often switch it off); a hybrid left without attention layers
    cannot, because ``transformers`` reads the cached length from an attention layer."""
    ids = torch.ones(1, 4, dtype=torch.long, device=next(model.parameters()).device)
    try:
        _generate(model, ids, 2, pad_id, use_cache=True)
    except ValueError:
        return False
    return True


@torch.inference_mode()
def _generate(model, ids: torch.Tensor, new_tokens: int, pad_id: int, use_cache: bool = True,
              stamps: _Stamps | None = None):
    from transformers import LogitsProcessorList

    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache, pad_token_id=pad_id,
                          logits_processor=LogitsProcessorList([stamps] if stamps else []))


def _time_generate(model, ids: torch.Tensor, new_tokens: int, pad_id: int, use_cache: bool,
                   device: str) -> tuple[float, float]:
    """(time to first token, time for the remaining ``new_tokens - 1`` tokens), in seconds."""
    stamps = _Stamps(device)
    _sync(device)
    start = time.perf_counter()
    _generate(model, ids, new_tokens, pad_id, use_cache, stamps)
    if len(stamps.times) != new_tokens:
        raise RuntimeError(f"generate produced {len(stamps.times)} tokens, expected {new_tokens}")
    return stamps.times[0] - start, stamps.times[-1] - stamps.times[0]


def _state_bytes(model) -> int:
    """Bytes of the tensors ``save`` writes (tied ones once): the safetensors size, less its header."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _cuda_peak(model, ids: torch.Tensor, new_tokens: int, pad_id: int, use_cache: bool) -> dict:
    """Peak CUDA memory of one prefill + generate: the weights plus the peak above what was allocated."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _time_prefill(model, ids, "cuda")
    _generate(model, ids, new_tokens, pad_id, use_cache)
    torch.cuda.synchronize()
    above = torch.cuda.max_memory_allocated() - before
    weights = _weight_bytes(model)
    return {"peak_bytes": weights + above, "delta_bytes": above, "weights_bytes": weights,
            "how": "torch.cuda.max_memory_allocated during prefill + generate, above the allocation before, plus weights"}


def _cpu_peak_subprocess(model_dir: Path, batch_size: int, seq_len: int, new_tokens: int, use_cache: bool, dtype: str,
                         seed: int) -> dict:
    """Run ``_memory_probe`` in a fresh interpreter so no other model or allocator cache is counted."""
    spec = {"model_dir": str(model_dir), "batch_size": batch_size, "seq_len": seq_len,
            "new_tokens": new_tokens, "use_cache": use_cache, "dtype": dtype, "seed": seed}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    code = "import sys, json; from shedder.measure.bench import _memory_probe; print(json.dumps(_memory_probe(json.loads(sys.argv[1]))))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed for {model_dir}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _memory_probe(spec: dict) -> dict:
    """In a fresh process: load the model, reset the peak-RSS mark, run prefill + generate, read the peak."""
    model, tokenizer = load_model(spec["model_dir"], dtype=spec["dtype"], device="cpu")
    generator = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(0, model.config.vocab_size, (spec["batch_size"], spec["seq_len"]), generator=generator)
    pad_id = pad_token_id(model, tokenizer)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return {"peak_bytes": None, "delta_bytes": None, "weights_bytes": _weight_bytes(model),
                "how": "unavailable: needs Linux /proc/self/clear_refs"}
    loaded = _proc_status_kb("VmRSS") * 1024
    _time_prefill(model, ids, "cpu")
    _generate(model, ids, spec["new_tokens"], pad_id, spec["use_cache"])
    peak = _proc_status_kb("VmHWM") * 1024
    return {"peak_bytes": peak, "delta_bytes": peak - loaded, "weights_bytes": _weight_bytes(model),
            "how": "peak RSS (VmHWM) of a fresh process during prefill + generate; delta = above the loaded model"}


def _ratios(original: dict, pruned: dict, samples: dict) -> dict:
    """pruned / original for every figure. Timings: the median of per-round ratios (both models are
    timed back to back in every round, so the ratio cancels slow drifts in machine load that a
    ratio of two separate medians would not)."""
    out = {}
    for key in ("params", "disk_bytes", "flops_per_token_prefill", "state_bytes_per_sequence"):
        out[key] = pruned[key] / original[key] if original[key] else None
    for key in samples["original"]:
        out[key] = statistics.median(p / o for p, o in zip(samples["pruned"][key], samples["original"][key]))
    if "memory" in original:
        for key in ("peak_bytes", "delta_bytes"):
            a, b = original["memory"][key], pruned["memory"][key]
            out[f"memory_{key}"] = b / a if a and b is not None else None
    return out


# ---------------------------------------------------------------------------------------- report
def format_report(result: dict) -> str:
    """A plain-text table of ``bench_speed``'s result."""
    o, p, r = result["original"], result["pruned"], result["ratios"]

    def timing(entry: dict, key: str, fmt: str) -> str:
        s = entry[key]
        return f"{s['median']:{fmt}} [{s['q1']:{fmt}}–{s['q3']:{fmt}}]"

    def size(n) -> str:
        if n is None:
            return "n/a"
        return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"

    rows = [
        ("parameters", f"{o['params']:,}", f"{p['params']:,}", r["params"]),
        ("on disk (safetensors)", size(o["disk_bytes"]), size(p["disk_bytes"]), r["disk_bytes"]),
        ("prefill FLOPs/token (model)", f"{o['flops_per_token_prefill']:,}", f"{p['flops_per_token_prefill']:,}",
         r["flops_per_token_prefill"]),
        ("state per sequence (model)", size(o["state_bytes_per_sequence"]), size(p["state_bytes_per_sequence"]),
         r["state_bytes_per_sequence"]),
        ("prefill tokens/s", timing(o, "prefill_tokens_per_s", ".0f"), timing(p, "prefill_tokens_per_s", ".0f"),
         r["prefill_tokens_per_s"]),
        ("decode tokens/s", timing(o, "decode_tokens_per_s", ".1f"), timing(p, "decode_tokens_per_s", ".1f"),
         r["decode_tokens_per_s"]),
        ("time to first token (ms)", timing(o, "ttft_ms", ".1f"), timing(p, "ttft_ms", ".1f"), r["ttft_ms"]),
    ]
    if "memory" in o:
        rows.append(("peak memory", size(o["memory"]["peak_bytes"]), size(p["memory"]["peak_bytes"]),
                     r["memory_peak_bytes"]))
        rows.append(("  of which above loaded", size(o["memory"]["delta_bytes"]), size(p["memory"]["delta_bytes"]),
                     r["memory_delta_bytes"]))
    widths = [max(len(str(row[i])) for row in rows + [("figure", "original", "pruned", "")]) for i in range(3)]
    lines = [f"model {result['model']}; removed: {result['plan']}",
             f"{result['device']} {result['dtype']}, {result['threads']} threads; {result['kernels']}",
             f"batch {result['batch_size']}, seq_len {result['seq_len']}, {result['new_tokens']} new tokens; "
             f"{result['repeats']} repeats after {result['warmup']} warm-up: median [IQR]; "
             "a timing's ratio is the median of per-round ratios",
             "",
             f"{'figure':<{widths[0]}}  {'original':>{widths[1]}}  {'pruned':>{widths[2]}}  pruned/original"]
    for name, a, b, ratio in rows:
        lines.append(f"{name:<{widths[0]}}  {a:>{widths[1]}}  {b:>{widths[2]}}  "
                     + ("n/a" if ratio is None else f"{ratio:.3f}"))
    if "memory" in o:
        lines.append(f"memory: {o['memory']['how']}")
    for name, entry in (("original", o), ("pruned", p)):
        if not entry["decode_with_cache"]:
            lines.append(f"note: the {name} model cannot generate with a cache here, so it decodes without one")
    lines += ["",
              f"prefill speedup: measured {result['measured_prefill_speedup']:.3f}x "
              f"[{result['measured_prefill_speedup_spread']['q1']:.3f}–{result['measured_prefill_speedup_spread']['q3']:.3f}] "
              "(median of per-round paired ratios), "
              f"expected from FLOPs {result['expected_prefill_speedup']:.3f}x "
              f"(measured/expected {result['measured_over_expected']:.2f})"]
    return "\n".join(lines)
