"""Real speed: an extracted model measured next to its original, in one run.

This module measures the models it is given (``bench_models``); ``shedder.formats.bench`` loads them
from names and files, extracts the plan, and saves each model for the CPU memory probe.

    python -m shedder bench --model mamba2-tiny --plan plan.json [--batch 1 --seq-len 256 --new-tokens 32]
    python -m shedder bench --model mamba2-tiny --pruned out/pruned-dir --device cuda --json

What is measured (both models, same inputs, same process, under the protocol of
``shedder.measure.timing``: paired interleaved rounds, auto-ranged samples, warm-up discarded, rounds
added until the 95 % interval of the paired ratio is within ±3 % or the time budget is spent):

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

The speedups are the median of per-round paired ratios (original time / pruned time) with their
95 % interval, round count and the ``noisy`` / ``resolved`` verdicts (``measured_prefill_speedup``,
``measured_decode_speedup``); per-model figures (median with quartiles and min–max) are supporting
information, labelled as such, never a second speedup. The cost model's expected speedups and, when
they differ from the measured ones, the measured reasons (``shedder.measure.expected``) come with
them. Latency always comes from the extracted model, never from a masked one.
"""
from __future__ import annotations

import importlib.util
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from shedder.arch import adapter_for, count_parameters, kernels
from shedder.core.errors import ShedderError
from shedder.core.plan import PruningPlan
from shedder.core.progress import Progress
from shedder.measure.cost import estimate
from shedder.measure.expected import expectations, gap_reasons, outside_share
from shedder.measure.timing import PairedRun, Protocol, Ratio, paired_rounds

#: ``fresh_process(name, model, spec) -> (disk bytes, memory entry)``: the model saved as safetensors
#: and its peak memory during one prefill + generate measured in a fresh process that loads it from
#: there (``shedder.formats.bench.FreshProcess``: saving and loading a model are ``formats``' concern).
FreshProcess = Callable[[str, object, dict], tuple[int, dict]]


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
    if kernels.torch_forced():
        return "CUDA: PyTorch scan and conv, forced (kernels.torch_path), whatever is installed"
    found = [name for name in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(name)]
    if found:
        return "CUDA: kernels from " + ", ".join(n.replace("_", "-") for n in found)
    return "CUDA: PyTorch reference scan and conv (mamba-ssm / causal-conv1d not installed)"


def check_options(batch_size: int, seq_len: int, new_tokens: int, protocol: Protocol, device: str) -> None:
    """Refuse options that cannot be measured, before anything is loaded."""
    if min(batch_size, seq_len, protocol.min_rounds) < 1 or protocol.warmup < 0:
        raise ShedderError("batch size, sequence length and --min-rounds must be at least 1 (warm-up at least 0)")
    if not protocol.budget_s >= 0:
        raise ShedderError("--budget-s must be at least 0 seconds")
    if new_tokens < 2:
        raise ShedderError("--new-tokens must be at least 2 (decode throughput is measured after the first token)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ShedderError("--device cuda was asked for, but PyTorch sees no CUDA device")


def bench_models(original, pruned, tokenizer, plan: PruningPlan | None = None, *, model_name: str = "",
                 batch_size: int = 1, seq_len: int = 256, new_tokens: int = 32, protocol: Protocol = Protocol(),
                 device: str = "cpu", dtype: str = "float32", memory: bool = True, seed: int = 0,
                 progress: Progress | None = None, fresh_process: FreshProcess | None = None) -> dict:
    """Measure ``original`` and its extracted version ``pruned`` side by side (both on ``device``,
    in ``dtype``) under ``protocol``; returns a JSON-able dict. ``plan`` is the validated plan ``pruned``
    was extracted with (None when unknown). The CPU peak memory (``memory`` on a CPU device) needs ``fresh_process``."""
    check_options(batch_size, seq_len, new_tokens, protocol, device)
    probe = memory and not device.startswith("cuda")
    if probe and fresh_process is None:
        raise ShedderError("the CPU peak-memory measurement needs a fresh process to load each saved model in")
    costs = {"original": estimate(original, None, seq_len, batch_size),
             "pruned": estimate(pruned, None, seq_len, batch_size)}
    models = {"original": original, "pruned": pruned}
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, original.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    pad_id = pad_token_id(original, tokenizer)
    cache = {name: supports_cache(model, pad_id) for name, model in models.items()}
    extra = 1 + (2 if memory else 0)  # the outside-the-layers passes, then the memory runs
    low = protocol.warmup + protocol.min_rounds

    def on_round(r: int, message: str) -> None:
        _report(progress, r, max(low, r + 1) + extra, f"bench: {message}")

    samples = {name: timed_samples(model, ids, new_tokens, pad_id, cache[name], device) for name, model in models.items()}
    run = paired_rounds(samples, ["prefill_s", "decode_s"], protocol, on_round=on_round)
    total_steps = protocol.warmup + run.rounds + extra
    layers = adapter_for(original).layers()
    outside = {"prefill": outside_share(layers, lambda: _time_prefill(original, ids, device), device),
               "decode": outside_share(layers, lambda: _time_generate(original, ids, new_tokens, pad_id,
                                                                      cache["original"], device), device)}
    _report(progress, total_steps - extra + 1, total_steps, "bench: time outside the decoder layers")

    results: dict[str, dict] = {}
    # Saved only for the CPU memory probe, which loads each model in a fresh process: a 7B model
    # is not written to a temporary directory just to read its size.
    for i, (name, model) in enumerate(models.items()):
        spec = {"batch_size": batch_size, "seq_len": seq_len, "new_tokens": new_tokens, "use_cache": cache[name],
                "dtype": dtype, "seed": seed}
        disk_bytes, peak = fresh_process(name, model, spec) if probe else (_state_bytes(model), None)
        t = run.times[name]
        entry = {
            "params": count_parameters(model),
            "decode_with_cache": cache[name],
            "disk_bytes": disk_bytes,
            "prefill_tokens_per_s": asdict(Spread.of([batch_size * seq_len / s for s in t["prefill_s"]])),
            "decode_tokens_per_s": asdict(Spread.of([batch_size * (new_tokens - 1) / s for s in t["decode_s"]])),
            "ttft_ms": asdict(Spread.of([s * 1000 for s in t["ttft_s"]])),
            "iterations_per_sample": dict(zip(("prefill", "generate"), run.iterations[name])),
            "flops_per_token_prefill": costs[name].flops_per_token_prefill,
            "state_bytes_per_sequence": costs[name].state_bytes_per_sequence,
        }
        if memory:
            entry["memory"] = _cuda_peak(model, ids, new_tokens, pad_id, cache[name]) if not probe else peak
            _report(progress, total_steps - 1 + i, total_steps, f"bench: peak memory of the {name} model")
        results[name] = entry

    measured = {"prefill": run.speedup("prefill_s", protocol.noisy_above).to_dict(),
                "decode": run.speedup("decode_s", protocol.noisy_above).to_dict()}
    expected = expectations(costs["original"], costs["pruned"], outside, kernel_path(device))
    return {
        "model": model_name,
        "plan": plan.describe() if plan is not None else "(plan not recorded in the pruned directory)",
        "device": device,
        "dtype": dtype,
        "kernels": kernel_path(device),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size, "seq_len": seq_len, "new_tokens": new_tokens,
        "protocol": {**asdict(protocol), "text": protocol.describe(), "rounds": run.rounds, "seconds": run.seconds,
                     "stopped": run.stopped, "load_per_cpu": run.load, "loaded": run.loaded},
        "original": results["original"],
        "pruned": results["pruned"],
        "ratios": _ratios(results["original"], results["pruned"], run),
        "measured_prefill_speedup": measured["prefill"],
        "measured_decode_speedup": measured["decode"],
        "expected_prefill_speedup": expected["prefill_flops"],
        "expected_decode_speedup": expected["decode_flops"],
        "expected": expected,
        "measured_over_expected": measured["prefill"]["median"] / expected["prefill_flops"],
        "gap_reasons": gap_reasons(measured, expected),
    }


def pad_token_id(model, tokenizer) -> int:
    """The tokenizer's pad id, else the config's (a directory without a tokenizer), else 0."""
    for pad in (getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None)):
        if isinstance(pad, int):
            return pad
    return 0


def timed_samples(model, ids: torch.Tensor, new_tokens: int, pad_id: int, use_cache: bool, device: str) -> list:
    """The two timed samples of one model (``timing.Sample``): a prefill, and a generation that
    gives its time to first token and its decode time."""
    def prefill() -> dict[str, float]:
        return {"prefill_s": _time_prefill(model, ids, device)}

    def generate() -> dict[str, float]:
        ttft_s, decode_s = _time_generate(model, ids, new_tokens, pad_id, use_cache, device)
        return {"ttft_s": ttft_s, "decode_s": decode_s}

    return [prefill, generate]


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


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rss(model, tokenizer, spec: dict) -> dict:
    """In a fresh process that has just loaded ``model``: reset the peak-RSS mark, run one prefill +
    generate (``spec``: batch_size, seq_len, new_tokens, use_cache, seed), read the peak."""
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


def _ratios(original: dict, pruned: dict, run: PairedRun) -> dict:
    """pruned / original for every figure. Timings: the median of per-round paired ratios (both models
    are timed back to back in every round, so the ratio cancels slow drifts in machine load that a
    ratio of two separate medians would not); throughputs as pruned / original throughput."""
    out = {}
    for key in ("params", "disk_bytes", "flops_per_token_prefill", "state_bytes_per_sequence"):
        out[key] = pruned[key] / original[key] if original[key] else None
    out["prefill_tokens_per_s"] = statistics.median(run.ratios("prefill_s"))
    out["decode_tokens_per_s"] = statistics.median(run.ratios("decode_s"))
    out["ttft_ms"] = statistics.median(1 / r for r in run.ratios("ttft_s"))
    if "memory" in original:
        for key in ("peak_bytes", "delta_bytes"):
            a, b = original["memory"][key], pruned["memory"][key]
            out[f"memory_{key}"] = b / a if a and b is not None else None
    return out


# ---------------------------------------------------------------------------------------- report
def speedup_text(measured: dict) -> str:
    """``1.22× [1.18–1.26], 14 rounds`` for a ``measured_*_speedup`` entry: the one way every face
    (CLI, Prune page, frontier table, model card) prints a measured speedup."""
    return Ratio(measured["median"], tuple(measured["ci95"]), measured["rounds"], measured["noisy"],
                 measured["resolved"]).text()


def format_report(result: dict) -> str:
    """A plain-text table of ``bench_speed``'s result: the paired speedups first, per-model figures as
    supporting information."""
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
        ("prefill tokens/s (per model)", timing(o, "prefill_tokens_per_s", ".0f"),
         timing(p, "prefill_tokens_per_s", ".0f"), None),
        ("decode tokens/s (per model)", timing(o, "decode_tokens_per_s", ".1f"), timing(p, "decode_tokens_per_s", ".1f"),
         None),
        ("time to first token (ms)", timing(o, "ttft_ms", ".1f"), timing(p, "ttft_ms", ".1f"), r["ttft_ms"]),
    ]
    if "memory" in o:
        rows.append(("peak memory", size(o["memory"]["peak_bytes"]), size(p["memory"]["peak_bytes"]),
                     r["memory_peak_bytes"]))
        rows.append(("  of which above loaded", size(o["memory"]["delta_bytes"]), size(p["memory"]["delta_bytes"]),
                     r["memory_delta_bytes"]))
    proto, e = result["protocol"], result["expected"]
    load = ", ".join(f"{k} {v:.2f}" for k, v in proto["load_per_cpu"].items() if v is not None) or "n/a"
    lines = [f"model {result['model']}; removed: {result['plan']}",
             f"{result['device']} {result['dtype']}, {result['threads']} threads; {result['kernels']}",
             f"batch {result['batch_size']}, seq_len {result['seq_len']}, {result['new_tokens']} new tokens",
             f"protocol: {proto['text']}; ran {proto['rounds']} rounds in {proto['seconds']:.1f} s ({proto['stopped']}); "
             f"load average per CPU: {load}" + (" (loaded)" if proto["loaded"] else ""),
             "",
             f"prefill speedup: {speedup_text(result['measured_prefill_speedup'])}; expected {e['prefill_flops']:.2f}× "
             f"from FLOPs, {e['prefill_with_outside_time']:.2f}× with the measured "
             f"{e['outside_layers_share']['prefill']:.0%} of time outside the layers",
             f"decode speedup:  {speedup_text(result['measured_decode_speedup'])}; expected {e['decode_flops']:.2f}× "
             f"from FLOPs, {e['decode_with_outside_time']:.2f}× with the measured "
             f"{e['outside_layers_share']['decode']:.0%} outside the layers, {e['decode_weight_bytes']:.2f}× if "
             "memory-bound",
             "(speedup: median of per-round paired ratios original time / pruned time, [95 % interval], "
             "distribution-free; per-model figures below are supporting information: median [IQR] over the rounds)"]
    lines += [f"why measured and expected differ: {reason}" for reason in result["gap_reasons"]]
    widths = [max(len(str(row[i])) for row in rows + [("figure", "original", "pruned", "")]) for i in range(3)]
    lines += ["", f"{'figure':<{widths[0]}}  {'original':>{widths[1]}}  {'pruned':>{widths[2]}}  pruned/original"]
    for name, a, b, ratio in rows:
        lines.append(f"{name:<{widths[0]}}  {a:>{widths[1]}}  {b:>{widths[2]}}  "
                     + ("(see speedup)" if ratio is None and "per model" in name else "n/a" if ratio is None
                        else f"{ratio:.3f}"))
    if "memory" in o:
        lines.append(f"memory: {o['memory']['how']}")
    for name, entry in (("original", o), ("pruned", p)):
        if not entry["decode_with_cache"]:
            lines.append(f"note: the {name} model cannot generate with a cache here, so it decodes without one")
    return "\n".join(lines)
