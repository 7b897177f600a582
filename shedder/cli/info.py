"""``python -m shedder info``: architecture, layers, components and parameters of a model."""
from __future__ import annotations

from shedder.cli.options import common, model_options
from shedder.core.errors import printable


def add(sub) -> None:
    p = sub.add_parser("info", help="architecture, layers, components and parameters of a model")
    model_options(p)
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from shedder import api  # lazy: start-up (--help imports no torch)
    from shedder.cli.common import emit, load  # lazy: start-up (--help imports no torch)

    model, _ = load(args)
    adapter = api.adapter_for(model)
    layers = []
    for i in range(adapter.num_layers):
        counts: dict[str, int] = {}
        for c in adapter.layer_components(i):
            counts[c.kind] = counts.get(c.kind, 0) + 1
        layers.append({"layer": i, "type": adapter.layer_kind(i), "components": counts})
    params = adapter.param_count()
    plan = api.pruned_with(args.model)
    payload = {"model": args.model, "architecture": type(model).__name__, "model_type": model.config.model_type,
               "num_layers": adapter.num_layers, "layers": layers, "components": adapter.kind_counts(),
               "parameters": params, "parameter_notes": adapter.param_notes(),
               "pruned_with": plan.to_dict() if plan else None}
    lines = [f"model: {printable(args.model)} ({type(model).__name__}, model_type {model.config.model_type})",
             f"parameters: {params:,}", *adapter.param_notes(),
             f"layers: {adapter.num_layers}"]
    for row in layers:
        comps = ", ".join(k if n == 1 else f"{k} ×{n}" for k, n in row["components"].items())
        lines.append(f"  {row['layer']:>3}  {row['type']:<10} {comps}")
    lines.append("components: " + ", ".join(f"{k} {n}" for k, n in adapter.kind_counts().items()))
    if plan:
        lines.append(f"pruned with: {plan.describe()}")
    emit(args, payload, "\n".join(lines))
    return 0
