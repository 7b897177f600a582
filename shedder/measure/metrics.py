"""Quality and size numbers, each with the protocol that produced it.

* Perplexity is token-level: exp of the mean negative log-likelihood over every predicted token of
  every window (``seq_len - 1`` per window; windows are non-overlapping and independent).
* Next-word accuracy is LAMBADA-style: the final word of a paragraph, predicted by greedy decoding
  from the rest of the paragraph, counted correct only when every token of the word matches.
* Parameters are those of the model as extracted under a plan (counted by the family adapter).

Sums are accumulated per batch in float64 in batch order, so two code paths that produce the same
logits (the plain masked forward and ``PlanEvaluator``'s cached prefix) give bit-identical totals
and the search's choices do not depend on which path ran.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shedder.arch import adapter_for
from shedder.measure.data import load_text
from shedder.measure.masking import masked
from shedder.core.errors import DataError, NonFiniteError
from shedder.core.progress import Progress


#: Next-word passages: paragraphs with at least this many words ...
MIN_PASSAGE_WORDS = 30
#: ... whose context is cut to its last this-many tokens.
MAX_CONTEXT_TOKENS = 256


def _device(model) -> torch.device:
    return next(model.parameters()).device


def batch_nll(model, input_ids: torch.Tensor) -> float:
    """Sum of the next-token NLL (nats) over one batch ``[b, seq]`` of full windows."""
    logits = model(input_ids=input_ids, use_cache=False).logits  # [b, seq, vocab]
    return logits_nll(logits, input_ids)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``[b * seq]`` in float32: token t+1 given the logits at position t, and 0 at each
    window's last position (an ignored target instead of slicing the logits, which would copy them)."""
    b, seq, vocab = logits.shape
    target = torch.full((b, seq), -100, dtype=torch.long, device=logits.device)  # [b, seq]
    target[:, :-1] = input_ids[:, 1:]
    return F.cross_entropy(logits.reshape(b * seq, vocab).float(), target.view(-1), reduction="none")


def logits_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Sum of the NLL of tokens 1..seq-1 given the logits at positions 0..seq-2 (float64 total)."""
    return float(token_nll(logits, input_ids).double().sum())


def batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of windows; the same split everywhere so totals are comparable."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    return list(torch.split(windows, batch_size))


def predicted_tokens(windows: torch.Tensor) -> int:
    return windows.shape[0] * (windows.shape[1] - 1)


@torch.inference_mode()
def nll_sum(model, windows: torch.Tensor, batch_size: int = 8, progress: Progress | None = None) -> tuple[float, int]:
    """``(total NLL in nats, number of predicted tokens)`` of ``model`` over ``windows`` ``[n, seq]``."""
    device = _device(model)
    parts = batches(windows, batch_size)
    total = 0.0
    for i, batch in enumerate(parts):
        total += batch_nll(model, batch.to(device))
        if progress:
            progress(i + 1, len(parts), "perplexity")
    return total, predicted_tokens(windows)


def perplexity(model, windows: torch.Tensor, batch_size: int = 8, progress: Progress | None = None,
               plan=None) -> float:
    """Token-level perplexity over non-overlapping windows (under ``plan``'s live mask when given)."""
    with _maybe_masked(model, plan):
        total, count = nll_sum(model, windows, batch_size, progress)
    return perplexity_of(total, count)


def perplexity_of(total_nll: float, tokens: int) -> float:
    """``exp(total_nll / tokens)``, or ``NonFiniteError`` with the likely cause when the NLL is nan
    or inf or its exponential overflows: such a perplexity is a broken model, not a result, and
    every command and the studio show this error instead of printing it."""
    mean = total_nll / tokens
    if math.isnan(mean) or mean == math.inf:
        raise NonFiniteError(f"perplexity is {'nan' if math.isnan(mean) else 'inf'}: the model produced non-finite "
                             "logits; its weights or dtype (float16 overflow?) are the likely cause")
    if mean > math.log(torch.finfo(torch.float64).max):
        raise NonFiniteError(f"perplexity is inf: the mean NLL is {mean:.4g} nats per token, far beyond any working "
                             "model; its weights or dtype (float16 overflow?) are the likely cause")
    return math.exp(mean)


@contextlib.contextmanager
def _maybe_masked(model, plan):
    if plan is None:
        yield
    else:
        with masked(model, plan):
            yield


def describe_protocol(windows: torch.Tensor, source: str | None = None) -> str:
    """The perplexity protocol in one line, shown next to the number."""
    n, seq = windows.shape
    where = f" of {source!r}" if source else ""
    return (f"token-level perplexity over {n} non-overlapping windows of {seq} tokens{where} "
            f"({predicted_tokens(windows):,} predicted tokens)")


def calibration_protocol(windows: torch.Tensor, source: str, protocol: str = "shedder", rows: int | None = None) -> str:
    """The calibration protocol in one line, naming which one ran (``shedder.measure.data.PROTOCOLS``)."""
    if protocol == "official":
        return (f"calibration, official Mamba-Shedder protocol ({rows} rows sampled with seed 42 from the 10 % "
                f"part of an 80/10/10 split with seed 42 of {source!r}, joined with blank lines): "
                + describe_protocol(windows))
    return "calibration, shedder protocol: " + describe_protocol(windows, source)


# ---------------------------------------------------------------------------- next-word accuracy
@dataclass(frozen=True)
class Passage:
    context: str  # the paragraph up to (not including) the space before its final word
    word: str  # the final word, without trailing punctuation


_FINAL_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]+)[^A-Za-z0-9]*$", re.S)


def passages(text: str, n: int | None = None, min_words: int = MIN_PASSAGE_WORDS) -> list[Passage]:
    """The first ``n`` paragraphs (blank-line separated) of at least ``min_words`` words that end
    in an alphabetic word, split into context and final word."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if len(para.split()) < min_words:
            continue
        m = _FINAL_WORD.match(para)
        if m:
            out.append(Passage(m.group(1), m.group(2)))
            if n is not None and len(out) >= n:
                break
    return out


def _passages_of(source: str, n: int) -> list[Passage]:
    found = passages(load_text(source), n)
    if not found:
        raise DataError(f"{source!r} has no paragraph of {MIN_PASSAGE_WORDS}+ words ending in a word; "
                        "next-word accuracy needs blank-line separated paragraphs")
    return found


def next_word_protocol(source: str = "test", n: int = 200) -> str:
    """The accuracy protocol in one line (with the number of passages actually used)."""
    count = len(_passages_of(source, n))
    return (f"next-word accuracy (LAMBADA-style) on the first {count} paragraphs of {source!r} with "
            f"{MIN_PASSAGE_WORDS}+ words: greedy decoding of the final word from up to "
            f"{MAX_CONTEXT_TOKENS} context tokens, exact match of all its tokens")


@torch.inference_mode()
def next_word_accuracy(model, tokenizer, source: str = "test", n: int = 200, progress: Progress | None = None,
                       batch_size: int = 8, plan=None) -> float:
    """Fraction of passages whose final word greedy decoding reproduces exactly.

    Greedy decoding matches all target tokens iff the argmax at every target position equals the
    target token given the previous target tokens, so one teacher-forced forward per passage
    decides it. Batches are right-padded, which cannot change earlier positions of a causal model,
    and hold passages of similar length, so the padding costs little.
    """
    items = []
    for p in _passages_of(source, n):
        ctx = tokenizer(p.context, add_special_tokens=False)["input_ids"][-MAX_CONTEXT_TOKENS:]
        tgt = tokenizer(" " + p.word, add_special_tokens=False)["input_ids"]
        items.append((ctx, tgt))
    # Batches of similar lengths (the result does not depend on the order): little padding to run.
    items.sort(key=lambda item: len(item[0]) + len(item[1]))
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct = 0
    with _maybe_masked(model, plan):
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            seqs = [c + t for c, t in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # [b, width], right-padded
            for row, s in enumerate(seqs):
                ids[row, :len(s)] = torch.tensor(s)
            pred = model(input_ids=ids.to(device), use_cache=False).logits.argmax(-1).cpu()  # [b, width]
            for row, (c, t) in enumerate(chunk):
                guess = pred[row, len(c) - 1: len(c) - 1 + len(t)]
                correct += int(guess.tolist() == t)
            if progress:
                progress(min(start + batch_size, len(items)), len(items), "next-word accuracy")
    return correct / len(items)


def param_count(model, plan=None) -> int:
    """Parameters of ``model`` as extracted under ``plan`` (all of them without a plan)."""
    adapter = adapter_for(model, plan.group_sizes if plan is not None else None)
    return adapter.param_count(plan)


def pareto_mask(costs: list[float], qualities: list[float], maximize_quality: bool) -> list[bool]:
    """Which configurations no other one beats: none is at most as costly and at least as good while
    differing (the accuracy–efficiency frontier; quality is perplexity, lower better, or accuracy)."""
    sign = -1 if maximize_quality else 1
    pts = [(c, sign * q) for c, q in zip(costs, qualities)]
    return [not any(oc <= c and oq <= q and (oc, oq) != (c, q) for oc, oq in pts) for c, q in pts]
