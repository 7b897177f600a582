"""``bench recover``: every recovery method on the bundled models, for the same budget, in one run."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from shedder.arch import adapter_for
from shedder.core.plan import Component, PruningPlan
from shedder.core.progress import Progress
from shedder.formats.extract import save
from shedder.formats.loading import load_model
from shedder.prune.recover import METHODS, RecoverConfig, recover, student_for

#: ``bench recover``: the bundled models and their plans (a quarter of mamba2-tiny's blocks; a plan
#: on hybrid-tiny mixing a block, an SSM, heads, an attention sub-block and MLP channel groups).
BENCH_PLANS = {
    "mamba2-tiny": ["block:4", "block:7"],
    "hybrid-tiny": ["block:7", "ssm:5", "head:2:1", "head:2:6", "attention:8",
                    "mlp_channel_group:4:0", "mlp_channel_group:4:1", "mlp_channel_group:4:2", "mlp_channel_group:4:3"],
}


def compare_methods(methods=METHODS, steps: int = 12, batch_size: int = 8, seq_len: int = 64,
                    eval_samples: int = 32, threads: int | None = 2, progress: Progress | None = None) -> list[dict]:
    """Recover each bundled benchmark model with every method for the same budget, in one run.

    Each method starts from a fresh extraction of the same plan and trains on the same windows (same
    seed); the row reports held-out perplexity unpruned / pruned / recovered and the recovered share.
    """
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for name, specs in BENCH_PLANS.items():
        model, tokenizer = load_model(name)
        adapter = adapter_for(model)
        plan = adapter.resolve(PruningPlan(components=[Component.parse(s) for s in specs]))
        for method in methods:
            config = RecoverConfig(method=method, steps=steps, batch_size=batch_size, seq_len=seq_len,
                                   eval_samples=eval_samples, checkpoint_every=steps)
            with tempfile.TemporaryDirectory() as tmp:
                result = recover(student_for(model, plan, adapter), tokenizer, config, Path(tmp) / "run",
                                 teacher=model, plan=plan, source=name, progress=progress, save=save)
            rows.append({"model": name, "plan": plan.describe(), "method": method, "lr": config.learning_rate,
                         "tokens": result.tokens, "ppl": result.ppl, "recovered_fraction": result.recovered_fraction,
                         "seconds": round(result.seconds, 1), "trained_params": result.trained_params,
                         "protocol": result.protocol})
    return rows


def format_comparison(rows: list[dict]) -> str:
    """The benchmark as a Markdown table (docs/benchmarks.md, "Recovery")."""
    lines = ["| model | method | tokens | unpruned | pruned | recovered | lost perplexity recovered | train time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = r["ppl"]
        share = "n/a" if r["recovered_fraction"] is None else f"{100 * r['recovered_fraction']:.0f} %"
        lines.append(f"| {r['model']} | {r['method']} | {r['tokens']:,} | {p['unpruned']:.2f} | {p['pruned']:.2f} | "
                     f"{p['recovered']:.2f} | {share} | {r['seconds']:.0f} s |")
    plans = {r["model"]: r["plan"] for r in rows}
    lines += [""] + [f"{m}: {plan}" for m, plan in plans.items()]
    if rows:
        lines.append(f"held-out protocol: {rows[0]['protocol']}")
    return "\n".join(lines)
