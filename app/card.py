"""The model card written next to an extracted model: the engine's card (source, plan, parameters)
plus what the app measured on the extracted model."""
from __future__ import annotations

from shedder.formats.extract import model_card as engine_card
from shedder.core.plan import PruningPlan


def model_card(source: str, architecture: str, plan: PruningPlan, measured: dict, protocol: str) -> str:
    """Markdown for ``README.md``. ``measured`` holds ``ppl``, ``params`` and ``flops`` of the extracted
    model and ``*_original`` of the source, optionally ``latency_ms`` / ``original_latency_ms`` /
    ``measured_speedup`` / ``expected_speedup`` from the benchmark."""
    rows = [("perplexity", f"{measured['ppl_original']:.4f}", f"{measured['ppl']:.4f}"),
            ("parameters", f"{measured['params_original']:,}", f"{measured['params']:,}"),
            ("FLOPs / token (prefill, analytic)", f"{measured['flops_original']:,.0f}", f"{measured['flops']:,.0f}")]
    if "latency_ms" in measured:
        rows.append(("time to first token (ms, measured)", f"{measured['original_latency_ms']:.2f}",
                     f"{measured['latency_ms']:.2f}"))
    table = "\n".join(f"| {name} | {a} | {b} |" for name, a, b in rows)
    speed = (f"\nMeasured prefill speedup: {measured['measured_speedup']:.2f}× "
             f"(expected from FLOPs: {measured['expected_speedup']:.2f}×).\n" if "measured_speedup" in measured else "")
    base = engine_card(source, architecture, plan, measured["params_original"], measured["params"])
    return f"""{base}
## Measured on the extracted model

| | original | pruned |
| --- | --- | --- |
{table}
{speed}
Protocol: {protocol}.
"""
