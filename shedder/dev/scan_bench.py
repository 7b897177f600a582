"""``bench scan``: the engine's SSD scan against transformers' torch reference at the Mamba-2 130M
shape, timed by the paired-rounds protocol, with its exactness (fp32 and bf16) alongside.

Two paired measurements in one run: one scan call (4 × 256 tokens, 24 heads × 64, state 128, one
group, the config's chunk 256 for the reference) and the whole 130M-shape model's prefill of the same
tokens (24 layers, random weights in the published shape), where the scan is one part among the
projections; both with the reference first, so each ratio is the engine's speed-up.
"""
from __future__ import annotations

import contextlib
import time

import torch

from shedder.arch import ssd_scan
from shedder.dev import realshape
from shedder.measure.timing import Protocol, paired_rounds
from shedder.prune.search import StopWhen, greedy_search

#: The Mamba-2 130M scan shape: batch, tokens, heads, head_dim, groups, state, config chunk.
SHAPE = dict(batch=4, seq_len=256, heads=24, head_dim=64, groups=1, state=128, chunk=256)


def scan_inputs(seed: int = 0, dtype=torch.float32, **shape) -> dict:
    """Random scan inputs of ``SHAPE`` (overridable), with dt and A in the published ranges."""
    s = {**SHAPE, **shape}
    g = torch.Generator().manual_seed(seed)
    b, l, H, P, G, N = (s[k] for k in ("batch", "seq_len", "heads", "head_dim", "groups", "state"))
    rnd = lambda *size: torch.randn(*size, generator=g)  # noqa: E731  (one draw order for every input)
    out = dict(hidden_states=rnd(b, l, H, P), dt=rnd(b, l, H) - 2.0, A=-torch.rand(H, generator=g) * 15 - 1,
               B=rnd(b, l, G, N), C=rnd(b, l, G, N), D=rnd(H), dt_bias=rnd(H) * 0.5)
    out = {k: v.to(dtype) if k in ("hidden_states", "dt", "B", "C") else v for k, v in out.items()}
    return {**out, "chunk_size": s["chunk"], "dt_softplus": True}


def run_scan(inputs: dict, reference: bool) -> torch.Tensor:
    """One scan call on ``inputs``, through the engine or (``reference``) transformers' function."""
    with ssd_scan.reference() if reference else contextlib.nullcontext():
        return ssd_scan.chunk_scan(**inputs)


def compare_scan(protocol: Protocol = Protocol(), model: bool = True, on_round=None) -> dict:
    """Speed-ups (``Ratio`` dicts) and max differences of the engine scan vs the reference."""
    fp32 = scan_inputs()
    ref, eng = run_scan(fp32, True), run_scan(fp32, False)
    bf16 = scan_inputs(dtype=torch.bfloat16)
    ref16, eng16 = run_scan(bf16, True), run_scan(bf16, False)
    scale = ref.abs().max().item()
    out = {"shape": SHAPE, "chunk": ssd_scan.CHUNK, "max_abs_diff": (eng - ref).abs().max().item(),
           "max_rel_diff": (eng - ref).abs().max().item() / scale,
           # bf16 inputs: engine vs the fp32 reference of the same (rounded) inputs and vs bf16 reference
           "bf16_max_rel_diff_vs_fp32": (eng16 - ref).abs().max().item() / scale,
           "bf16_max_rel_diff_vs_reference": (eng16 - ref16).abs().max().item() / ref16.abs().max().item()}

    def timed(reference: bool, fn):
        def sample():
            with ssd_scan.reference() if reference else contextlib.nullcontext():
                start = time.perf_counter()
                fn()
                return {"s": time.perf_counter() - start}
        return sample

    with torch.no_grad():
        run = paired_rounds({"reference": [timed(True, lambda: ssd_scan.chunk_scan(**fp32))],
                             "engine": [timed(False, lambda: ssd_scan.chunk_scan(**fp32))]}, ["s"], protocol,
                            on_round=on_round)
        out["speedup"] = run.speedup("s").median
        out["scan"] = {**run.speedup("s").to_dict(), "reference_s": _median(run.times["reference"]["s"]),
                       "engine_s": _median(run.times["engine"]["s"])}
        if model:
            m = realshape.build("mamba2")
            ids = torch.randint(0, m.config.vocab_size, (SHAPE["batch"], SHAPE["seq_len"]),
                                generator=torch.Generator().manual_seed(0))
            run = paired_rounds({"reference": [timed(True, lambda: m(ids))], "engine": [timed(False, lambda: m(ids))]},
                                ["s"], protocol, on_round=on_round)
            out["model_prefill"] = {**run.speedup("s").to_dict(), "reference_s": _median(run.times["reference"]["s"]),
                                    "engine_s": _median(run.times["engine"]["s"])}
    return out


def compare_step(protocol: Protocol = Protocol(), layers: int = 24, on_round=None) -> dict:
    """One greedy SSM step (the search's candidates and prefix cache, ``StopWhen(steps=1)``) on the
    130M shape with ``layers`` layers and 4 × 256 random tokens: the reference scan vs the engine's,
    paired rounds, each sample a fresh search (nothing cached between samples)."""
    m = realshape.build("mamba2", layers)
    ids = torch.randint(0, m.config.vocab_size, (SHAPE["batch"], SHAPE["seq_len"]),
                        generator=torch.Generator().manual_seed(0))
    chosen = {}

    def timed(reference: bool):
        def sample():
            with ssd_scan.reference() if reference else contextlib.nullcontext():
                start = time.perf_counter()
                result = greedy_search(m, ids, ["ssm"], StopWhen(steps=1), batch_size=SHAPE["batch"])
                elapsed = time.perf_counter() - start
            chosen["reference" if reference else "engine"] = [str(c) for c in result.components]
            return {"s": elapsed}
        return sample

    run = paired_rounds({"reference": [timed(True)], "engine": [timed(False)]}, ["s"], protocol, on_round=on_round)
    return {**run.speedup("s").to_dict(), "layers": layers, "reference_s": _median(run.times["reference"]["s"]),
            "engine_s": _median(run.times["engine"]["s"]), "same_choice": chosen["reference"] == chosen["engine"],
            "load_per_cpu": run.load}


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]
