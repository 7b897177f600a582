"""The model card (README.md) of a recovered model."""
from __future__ import annotations

from shedder.arch.spec import load_line
from shedder.prune.recover.config import RecoverResult
from shedder.prune.recover.rundir import CARD_JSON


def model_card(result: RecoverResult, source: str, plan, params: int, stock: bool) -> str:
    """README.md of a recovered model: where it came from, the recipe and the numbers before and after."""
    c, p = result.config, result.ppl
    rows = "\n".join(f"| {name} | {p[name]:.3f} |" for name in ("unpruned", "pruned", "recovered") if name in p)
    fraction = result.recovered_fraction
    return f"""# Recovered pruned model

Pruned from `{source or 'the source model'}` with Shedder Studio ({plan.describe() if plan is not None else 'plan not recorded'}),
then recovered by **{c.method}**.

Loading: {load_line(stock)}

| recipe | |
| --- | --- |
| method | {c.method}{f' (rank {c.lora_rank}, alpha {c.lora_alpha:g}, merged)' if c.method == 'lora' else ''}{f' (temperature {c.temperature:g}, LM loss weight {c.lm_weight:g})' if c.method == 'distill' else ''} |
| data | `{c.data}`{' with the Alpaca template' if c.template else ''} |
| steps, tokens | {result.steps} steps × {c.batch_size} windows × {c.seq_len} tokens = {result.tokens:,} tokens |
| learning rate | {c.learning_rate:g}, {c.schedule} schedule, {c.warmup:.0%} warm-up, AdamW, seed {c.seed} |
| wall time | {result.seconds / 60:.1f} min |
| trained parameters | {result.trained_params:,} (model: {params:,}) |

| held-out perplexity | |
| --- | --- |
{rows}

Recovered {'' if fraction is None else f'{100 * fraction:.0f} % of '}the perplexity lost to pruning
(as a share of the log-perplexity increase). Protocol: {result.protocol}.
Recipe and loss curve: `log.jsonl`, `{CARD_JSON}`.
"""
