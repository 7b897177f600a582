"""What a perplexity change means in words: greedy continuations of one prompt, side by side.

The continuation runs on the live-masked model, which computes what the extracted model computes,
so the text is the pruned model's own. Decoding is greedy and recomputes the whole sequence each
step (no cache): for a few dozen tokens that is cheap, and it behaves the same for every family and
plan.
"""
from __future__ import annotations

import contextlib

import torch

from shedder.core.errors import DataError
from shedder.measure.masking import masked
from shedder.core.plan import PruningPlan

#: Prompt tokens kept (the end of a longer prompt).
MAX_PROMPT_TOKENS = 256


@torch.inference_mode()
def continue_text(model, tokenizer, prompt: str, plan: PruningPlan | None = None, new_tokens: int = 32,
                  adapter=None) -> str:
    """The ``new_tokens`` tokens greedy decoding appends to ``prompt`` (decoded, prompt excluded),
    under ``plan``'s live mask when given."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-MAX_PROMPT_TOKENS:]
    if not ids:
        raise DataError("the prompt is empty: type some text to continue")
    device = next(model.parameters()).device
    seq = torch.tensor([ids], device=device)  # [1, seq]
    with masked(model, plan, adapter) if plan is not None and plan.components else contextlib.nullcontext():
        for _ in range(new_tokens):
            logits = model(input_ids=seq, use_cache=False).logits  # [1, seq, vocab]
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokenizer.decode(seq[0, len(ids):].tolist(), skip_special_tokens=True)

