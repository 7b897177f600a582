"""Checks every family adapter must pass, written once and called by each ``test_arch_*`` file.

The contract (``shedder.arch.base``): the live-masked model computes the logits of the model
extracted under the same plan (fp32, within ``TOL``); masks leave the model exactly as it was, even
when the masked block raises; ``param_count`` counts what extraction builds; an extracted model
saves, loads and decodes with the ``transformers`` cache like full forwards would; the prefix-caching
evaluator reports the masked perplexity. Each family file adds its own structural tests.
"""
from __future__ import annotations

import json
import random

import pytest
import torch
import transformers

from shedder.arch import adapter_for, count_parameters
from shedder.core.errors import PlanError
from shedder.measure.evaluator import PlanEvaluator
from shedder.formats.extract import extract, save
from shedder.formats.loading import load_model
from shedder.measure.masking import masked
from shedder.measure.metrics import perplexity
from shedder.core.plan import Component, PruningPlan

TOL = 1e-4  # masked vs extracted logits, fp32


# ---------------------------------------------------------------------------- plans and inputs
def comps(*specs: str) -> PruningPlan:
    """A plan from component strings such as ``"head:2:5"``."""
    return PruningPlan(frozenset(Component.parse(s) for s in specs))


def tokens(seed: int = 1, length: int = 20, batch: int = 2, vocab: int = 100) -> torch.Tensor:
    """[batch, length] random token ids, the same for a given seed."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def random_plan(adapter, kinds, seed: int, n: int = 3) -> PruningPlan:
    """``n`` random removable components of ``kinds``, added one by one as the search would."""
    rng = random.Random(seed)
    plan = PruningPlan()
    for _ in range(n):
        options = adapter.candidates(plan, kinds)
        if not options:
            break
        plan = plan.with_components([rng.choice(options)])
    return plan


def logits(model, ids, attention_mask=None) -> torch.Tensor:
    """Full-sequence logits without a cache: [batch, seq, vocab]."""
    with torch.no_grad():
        return model(ids, attention_mask=attention_mask, use_cache=False).logits


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------- exactness
def check_plan(model, plan: PruningPlan, tmp_path=None, generate: bool = False, tokenizer=None, *, ids=None,
               adapter=None, padded: bool = False):
    """The exactness contract of one plan: masked logits == extracted logits (within ``TOL``) and
    ``param_count`` == the extracted model's parameters; with ``generate``, the extracted model's
    cached decoding (``check_generation``, a left-padded batch when ``padded``); with ``tmp_path``,
    a save / load round trip (``check_saved``). Returns (masked logits, extracted model)."""
    ids = tokens() if ids is None else ids
    adapter = adapter or adapter_for(model)
    with masked(model, plan, adapter) as resolved:
        got = logits(model, ids)
    small = extract(model, resolved, adapter)
    assert max_diff(logits(small, ids), got) <= TOL
    assert adapter.param_count(resolved) == count_parameters(small)
    if generate:
        check_generation(small, padded=padded)
    if tmp_path is not None:
        check_saved(small, resolved, tokenizer, tmp_path / "pruned", ids)
    return got, small


def check_removal(model, plan: PruningPlan, ids, min_change: float = 1e-3, **kwargs):
    """``check_plan``, and the plan really changes the logits (by more than ``min_change``), so the
    equality could have failed; the extracted model is smaller. Returns the extracted model."""
    got, small = check_plan(model, plan, ids=ids, **kwargs)
    assert max_diff(got, logits(model, ids)) > min_change, "removing components must change the logits"
    assert count_parameters(small) < count_parameters(model)
    return small


# ---------------------------------------------------------------------------- reversibility
def check_mask_restores(model, plan: PruningPlan, ids=None, adapter=None) -> None:
    """An empty plan is the identity; ``plan`` changes the logits while active; after the mask
    closes, normally or through an exception, the logits, every tensor and every module's
    ``forward`` are exactly as before."""
    ids = tokens() if ids is None else ids
    before, base = snapshot(model), logits(model, ids)
    with masked(model, PruningPlan(), adapter):
        assert torch.equal(logits(model, ids), base)
    with masked(model, plan, adapter):
        assert not torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), base)
    with pytest.raises(RuntimeError, match="boom"):
        with masked(model, plan, adapter):
            logits(model, ids)
            raise RuntimeError("boom")
    after = snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(model, ids), base)
    assert all("forward" not in m.__dict__ for m in model.modules())


# ---------------------------------------------------------------------------- save / load
def check_saved(small, plan: PruningPlan | None, tokenizer, out_dir, ids, shedder_entry: bool | None = None):
    """Save an extracted model and load it with ``load_model``: same class, identical logits. With
    ``shedder_entry``, whether config.json must carry a ``shedder`` entry. Returns the loaded model."""
    out = save(small, tokenizer, out_dir, plan)
    if shedder_entry is not None:
        assert ("shedder" in json.loads((out / "config.json").read_text())) == shedder_entry
    loaded, _ = load_model(str(out))
    assert type(loaded) is type(small)
    assert torch.equal(logits(loaded, ids), logits(small, ids))
    return loaded


def check_stock_load(small, plan: PruningPlan | None, tokenizer, out_dir, ids):
    """An extracted model whose shapes a stock config expresses saves without a ``shedder`` entry
    and loads with plain ``transformers`` and with ``load_model`` (identical logits). Returns the
    plainly loaded model."""
    assert not getattr(small.config, "shedder", None)
    out = save(small, tokenizer, out_dir, plan)
    assert "shedder" not in json.loads((out / "config.json").read_text())
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain) is type(small)
    assert torch.equal(logits(plain, ids), logits(small, ids))
    loaded, _ = load_model(str(out))
    assert torch.equal(logits(loaded, ids), logits(small, ids))
    return plain


# ---------------------------------------------------------------------------- generation
def greedy_by_full_forwards(model, ids, steps: int, attention_mask=None):
    """Greedy continuation by full-sequence forwards (no cache): (ids + steps tokens, the last
    position's logits of each step)."""
    step_logits = []
    for _ in range(steps):
        last = logits(model, ids, attention_mask)[:, -1]
        step_logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
    return ids, step_logits


def generation_prompt(padded: bool):
    """(prompt, attention_mask): 7 tokens; two rows with the second left-padded by 3 when ``padded``
    (so the cache's length feeds real causal masks), else one row and no mask."""
    if not padded:
        return tokens()[:1, :7], None
    prompt = tokens()[:, :7]
    attention_mask = torch.ones_like(prompt)
    attention_mask[1, :3] = 0
    return prompt, attention_mask


def check_generation(model, prompt=None, attention_mask=None, steps: int = 6, expected=None, padded: bool = False,
                     step_logits: bool = False):
    """Greedy ``generate`` through the cache (prefill, then one token at a time) equals greedy
    decoding by full forwards: same tokens and, with ``step_logits``, each step's logits within
    ``TOL`` (not for padded batches: a padded row's logits follow the padding convention of each
    path). ``expected`` is a reference from ``greedy_by_full_forwards`` (computed on ``model`` when
    None); without a prompt, ``generation_prompt(padded)``. Returns the reference."""
    if prompt is None:
        prompt, attention_mask = generation_prompt(padded)
    expected = expected or greedy_by_full_forwards(model, prompt, steps, attention_mask)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=attention_mask, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected[0])
    if step_logits:
        assert all(max_diff(got, want) <= TOL for got, want in zip(out.logits, expected[1]))
    return expected


def check_masked_generation(model, plan: PruningPlan, padded: bool = False) -> None:
    """``check_generation`` on the live-masked model (masks keep the cache consistent)."""
    with masked(model, plan):
        check_generation(model, padded=padded)


def check_cached_generation(model, plan: PruningPlan, prompt, steps: int = 5, adapter=None) -> None:
    """The extracted model's cached decoding equals full forwards (on a prompt whose continuation
    is not one repeated token, so it could go wrong), and the live-masked model decodes exactly
    that through its own cache."""
    small = extract(model, plan, adapter)
    attention_mask = torch.ones_like(prompt)
    expected = check_generation(small, prompt, attention_mask, steps, step_logits=True)
    assert len(set(expected[0][:, prompt.shape[1]:].flatten().tolist())) > 1
    with masked(model, plan, adapter):
        check_generation(model, prompt, attention_mask, steps, expected=expected, step_logits=True)


# ---------------------------------------------------------------------------- evaluator, validation
def check_evaluator(model, plans, windows, batch_size: int = 8, rel: float = 1e-6, cost: bool = False) -> None:
    """The prefix-reusing evaluator (resuming mid-model, skipping layers) gives the masked model's
    perplexity (within ``rel``) for each plan in turn; with ``cost``, the analytic cost model's
    parameter total equals ``param_count``."""
    from shedder.measure.cost import estimate

    evaluator = PlanEvaluator(model, windows, batch_size=batch_size)
    adapter = adapter_for(model)
    for plan in plans:
        with masked(model, plan):
            reference = perplexity(model, windows, batch_size=batch_size)
        assert abs(evaluator.perplexity(plan) - reference) <= rel * reference
        if cost:
            assert estimate(model, plan).params == adapter.param_count(plan)


def check_refused(model, plan: PruningPlan, words, adapter=None) -> None:
    """Masking, extracting and counting under ``plan`` each raise ``PlanError`` naming every one of
    ``words``."""
    adapter = adapter or adapter_for(model)
    for action in (lambda: masked(model, plan, adapter).__enter__(), lambda: extract(model, plan, adapter),
                   lambda: adapter.param_count(plan)):
        with pytest.raises(PlanError) as err:
            action()
        assert all(w in str(err.value) for w in words), str(err.value)
