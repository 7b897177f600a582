"""Expected speedups next to the measured ones, and the measured reasons when they differ.

The cost model (``shedder.measure.cost``) predicts the speedup of an ideal, compute-bound run:
original / pruned FLOPs. Three things it leaves out are measured here, so a gap comes with its cause:

* **time outside the decoder layers**: embedding, final norm, LM head and the framework around them
  (for decode also ``generate``'s own loop). Pruning does not shorten it, so it caps the speedup.
  Measured on the original model by stamping the clock before and after every decoder layer (forward
  hooks) during prefills and generations that are not part of the timed rounds; the layer-adjusted
  expectation is ``1 / (outside + (1 - outside) · pruned layer FLOPs / original layer FLOPs)``.
* **memory-bound decode**: one decoded token reads every weight once, so decode may follow the
  weight bytes rather than the FLOPs; the weight-bytes expectation is printed beside the FLOPs one.
* **kernel path**: which scan and conv implementation runs (``bench.kernel_path``), since a pruned
  model with non-stock shapes may leave a fused kernel.
"""
from __future__ import annotations

import statistics
import time

import torch

from shedder.measure.cost import CostEstimate

#: A measurement further than this from its expectation gets its reasons spelled out.
GAP = 0.10
#: Hooked (untimed) passes whose median share of time outside the layers is reported.
SHARE_PASSES = 3


def _layer_flops(cost: CostEstimate, decode: bool) -> int:
    return sum(c.flops_decode if decode else c.flops_prefill for c in cost.layers)


def outside_share(layers, run, device: str, passes: int = SHARE_PASSES) -> float:
    """Median share of the wall time of ``run()`` spent outside the modules ``layers`` (after one
    warm-up pass), measured with forward hooks that stamp the clock around every layer."""
    inside = [0.0]
    starts: list[float] = []

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def before(module, args):
        sync()
        starts.append(time.perf_counter())

    def after(module, args, output):
        sync()
        inside[0] += time.perf_counter() - starts.pop()

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(before), layer.register_forward_hook(after))]
    try:
        run()
        shares = []
        for _ in range(passes):
            inside[0] = 0.0
            sync()
            start = time.perf_counter()
            run()
            sync()
            total = time.perf_counter() - start
            shares.append(max(0.0, 1.0 - inside[0] / total))
    finally:
        for h in handles:
            h.remove()
    return statistics.median(shares)


def expectations(original: CostEstimate, pruned: CostEstimate, outside: dict[str, float], kernels: str) -> dict:
    """Expected prefill and decode speedups: ideal FLOPs, FLOPs with the measured time outside the
    layers, and (decode) weight bytes; ``outside``: the original's share per phase ("prefill", "decode")."""
    out = {"kernels": kernels, "outside_layers_share": outside}
    for phase, decode in (("prefill", False), ("decode", True)):
        total_o = original.flops_per_token_decode if decode else original.flops_per_token_prefill
        total_p = pruned.flops_per_token_decode if decode else pruned.flops_per_token_prefill
        layers_o, layers_p = _layer_flops(original, decode), _layer_flops(pruned, decode)
        share = outside[phase]
        out[f"{phase}_flops"] = total_o / total_p
        out[f"{phase}_with_outside_time"] = 1.0 / (share + (1 - share) * layers_p / layers_o) if layers_o else 1.0
    out["decode_weight_bytes"] = original.params / pruned.params
    return out


def gap_reasons(measured: dict, expected: dict) -> list[str]:
    """Why measured and expected differ, from what was measured (empty when they agree within ``GAP``
    or the measured interval contains the FLOPs expectation)."""
    reasons = []
    for phase in ("prefill", "decode"):
        m, e = measured[phase], expected[f"{phase}_flops"]
        lo, hi = m["ci95"]
        if lo <= e <= hi or abs(m["median"] / e - 1) <= GAP:
            continue
        share = expected["outside_layers_share"][phase]
        line = (f"{phase}: measured {m['median']:.2f}× vs {e:.2f}× from FLOPs; {share:.0%} of the original's "
                f"{phase} time is outside the decoder layers (embedding, head, framework"
                + (", the generate loop" if phase == "decode" else "") + "), which pruning does not shorten: "
                f"with it, FLOPs predict {expected[f'{phase}_with_outside_time']:.2f}×")
        if phase == "decode":
            line += f"; if decode is memory-bound (weights read once per token), {expected['decode_weight_bytes']:.2f}×"
        if m["noisy"]:
            line += "; the measurement is noisy (wide interval or a loaded machine)"
        reasons.append(line)
    if reasons:
        reasons.append(f"kernel path in use: {expected['kernels']}")
    return reasons
