"""Calibration perplexity of many nearby plans, re-running only what changed (the prefix trick).

A plan changes the computation only from its first changed layer on: the inputs of every earlier
layer are the same as under any plan that agrees with it up to there. ``PlanEvaluator`` therefore
keeps, per batch of windows, the input hidden states of every layer under recently evaluated plans
(an LRU within ``max_cache_bytes``). For a new plan it picks the cached plan that agrees with it
longest, replaces the layers before that point with an identity forward (``adapter.skip_forward``)
and feeds the cached input to the first layer that must run through a forward pre-hook. The layers
that run see bit-identical inputs, so the NLL equals the full masked forward's.

In a greedy search this means a candidate at layer L re-runs only layers from L on (the step's base
plan is cached), and from the previous step's choice on when that is later (its own plan from the
previous step is cached too). Removed blocks right after the resume point are skipped as well.
After each step the search calls ``keep_for_next_step``: a losing candidate keeps only its input at
the winner's layer (all the next step can resume from it), so one step's memory is what the cache
holds at any time, not one step's worth per step taken.

``nll(plan, bound=...)`` abandons a plan as soon as its partial NLL sum exceeds ``bound`` (exact for
"is it the best?" questions, since the sum only grows), skipping its remaining windows and batches;
that is why the cache is per batch.

The loss head (``lm_head`` + cross-entropy; vocabulary ≫ hidden size) is computed one window at a
time from the final hidden states instead of on the whole batch: it is faster (the logits of one
window stay in cache) and lets ``bound`` be checked after every window, not only after every batch.
The per-token NLLs are bit-identical to the whole-batch ones (each row of the head is the same dot
product), and the batch total is summed from them exactly as ``metrics.logits_nll`` sums its own.
That is verified, not assumed: the first batch of every shape is also scored the plain way and the
per-window head is used only when both agree bit for bit (a model whose logits are more than
``lm_head(h)``, e.g. with a multiplier, keeps the plain whole-batch loss).

Memory: one plan costs up to ``layers × windows × seq × hidden`` activations, shared with the plan
it resumed from up to the resume point. When one plan's activations exceed the cache budget only
every k-th layer is cached and plans resume from the nearest cached layer (still exact, slower).
The budget is ``max_cache_bytes`` when given; by default the evaluators alive in a process (the
app's sessions) share ``shedder.measure.budget.process_cache_budget``, a quarter of the memory available.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from shedder.arch import adapter_for, patch_forward
from shedder.measure.budget import process_cache_budget
from shedder.measure.masking import masked
from shedder.core.errors import PlanError
from shedder.measure.metrics import batches, perplexity_of, predicted_tokens, token_nll
from shedder.core.progress import Progress
from shedder.core.plan import Component, PruningPlan

#: Evaluators sharing the process budget (those created without ``max_cache_bytes``).
_SHARING: "weakref.WeakSet[PlanEvaluator]" = weakref.WeakSet()


#: Within a batch, the windows' NLLs are summed in another order than the batch's own total, which
#: rounds differently by at most ~n·2⁻⁵³ relative (n = tokens per batch); a partial sum must exceed
#: ``bound`` by this relative margin before a plan is abandoned mid-batch, so abandoning stays exact.
MID_BATCH_MARGIN = 1e-9


@dataclass
class _Entry:
    """One batch under one plan: its NLL (None: abandoned before the loss was complete) and the
    inputs of the cached layers."""

    nll: float | None
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> input [b, seq, hidden]


def _key(plan: PruningPlan) -> tuple:
    return plan.components, tuple(sorted(plan.group_sizes.items()))


def _first_change(a: tuple, b: tuple) -> int:
    """First layer whose components differ between two plan keys (0 when group sizes differ)."""
    if a[1] != b[1]:
        return 0
    diff = a[0] ^ b[0]
    return min(c.layer for c in diff) if diff else 1 << 30


class PlanEvaluator:
    """Exact calibration perplexity under plans, fast for plans that share a prefix of layers."""

    def __init__(self, model, windows: torch.Tensor, adapter=None, batch_size: int = 8,
                 max_cache_bytes: int | None = None):
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.windows = windows  # [n, seq]
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.batches = batches(windows, batch_size)
        self.tokens = predicted_tokens(windows)
        self._own_budget = max_cache_bytes
        if max_cache_bytes is None:
            _SHARING.add(self)
        self._cached_layers = self._choose_cached_layers(self.max_cache_bytes)
        self._cache: list[OrderedDict[tuple, _Entry]] = [OrderedDict() for _ in self.batches]
        self._head = model.get_output_embeddings()
        self._split_head: dict[tuple, bool] = {}  # batch shape -> per-window head verified identical
        #: Layer forwards run (summed over batches; removed blocks not counted) and windows whose loss
        #: was computed, since creation: the work the cache and abandoning save, whatever the load.
        self.layers_run = 0
        self.windows_scored = 0

    @property
    def max_cache_bytes(self) -> int:
        """This evaluator's activation budget now: its own, or its share of the process budget."""
        if self._own_budget is not None:
            return self._own_budget
        return process_cache_budget(self.device) // max(len(_SHARING), 1)

    def _choose_cached_layers(self, budget: int) -> list[int]:
        """Layers whose inputs are cached: all of 1..n-1, or every k-th when one plan's do not fit."""
        n_layers = self.adapter.num_layers
        hidden = self.model.config.get_text_config().hidden_size
        per_layer = self.windows.numel() * hidden * 4  # bytes; residual streams may be fp32
        fit = budget // max(per_layer, 1)
        if fit < 1 or n_layers < 2:
            return []
        stride = math.ceil((n_layers - 1) / min(fit, n_layers - 1))
        resumable = set(self.adapter.resume_points())
        return [i for i in range(stride, n_layers, stride) if i in resumable]

    def clear(self) -> None:
        """Forget every cached activation (e.g. after the model's weights changed)."""
        self._cache = [OrderedDict() for _ in self.batches]

    # ------------------------------------------------------------------ public API
    def perplexity(self, plan: PruningPlan | None = None, progress: Progress | None = None) -> float:
        """Calibration perplexity under ``plan`` (same value as a full masked forward)."""
        total = self.nll(plan, progress=progress)
        return perplexity_of(total, self.tokens)

    def nll(self, plan: PruningPlan | None = None, bound: float | None = None,
            progress: Progress | None = None, first_batches: int | None = None) -> float | None:
        """Total NLL (nats) under ``plan``, summed batch by batch in order like ``metrics.nll_sum``.
        ``None`` when a partial sum exceeds ``bound`` before the end (the rest is then skipped; a
        complete total is returned even above ``bound``). ``first_batches`` sums only that many
        leading batches (a cheap first look; the full total reuses them from the cache)."""
        parts = self.batches[:first_batches]
        total = 0.0
        with masked(self.model, plan or PruningPlan(), self.adapter, progress) as plan, torch.inference_mode():
            for b, batch in enumerate(parts):
                last = b == len(parts) - 1
                value = self._batch_nll(b, batch, plan, total, bound)
                if value is None:
                    return None
                total += value
                if progress:
                    progress(b + 1, len(parts), "calibration perplexity")
                if bound is not None and not last and total > bound:  # float sums of NLLs >= 0 never decrease
                    return None
        return total

    # ------------------------------------------------------------------ one batch
    def _batch_nll(self, b: int, batch: torch.Tensor, plan: PruningPlan, before: float = 0.0,
                   bound: float | None = None) -> float | None:
        """NLL of batch ``b``; None when ``before`` plus part of it already exceeds ``bound``."""
        entries = self._cache[b]
        key = _key(plan)
        if key in entries and entries[key].nll is not None:
            entries.move_to_end(key)
            return entries[key].nll
        # Resume at the latest cached layer that some cached plan shares with this one (0: the
        # whole model), then past any removed blocks right after it: their input passes unchanged.
        start, source, source_key = 0, {}, None
        for other, entry in entries.items():
            shared = _first_change(other, key)
            at = max((i for i in entry.inputs if i <= shared), default=0)
            if at >= start:
                start, source, source_key = at, entry.inputs, other
        if start > 0:
            entries.move_to_end(source_key)  # a plan others resume from stays cached
        layers = self.adapter.layers()
        src = source.get(start)  # [b, seq, hidden] input of layer ``start``; None when start == 0
        run_from = start
        if src is not None:
            while run_from < len(layers) - 1 and Component("block", run_from) in plan.components:
                run_from += 1
        cached = set(self._cached_layers)
        recorded = {i: src for i in cached if start < i <= run_from}

        def make_hook(i: int):
            def hook(module, args, kwargs):
                if i == run_from:
                    return _with_hidden(args, kwargs, src.clone())
                recorded[i] = hidden_input(args, kwargs).detach().clone()
                return None
            return hook

        with contextlib.ExitStack() as stack:
            for i in range(run_from):
                patch_forward(layers[i], self.adapter.skip_forward(i), stack)
            hooked = {i for i in cached if i > run_from} | ({run_from} if src is not None else set())
            for i in sorted(hooked):
                handle = layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True)
                stack.callback(handle.remove)
            ids = batch.to(self.device)  # [b, seq]
            final = self._capture_head_input(stack, tuple(ids.shape))
            logits = self.model(input_ids=ids, use_cache=False).logits  # [b, seq, vocab] ([b, seq, 0] when split)
        self.layers_run += sum(Component("block", i) not in plan.components for i in range(run_from, len(layers)))
        value = self._loss(ids, logits, final, before, bound)
        # Inputs up to ``start`` are shared with the source plan (same tensors); the rest are new.
        entries[key] = _Entry(value, {i: t for i, t in source.items() if i <= start} | recorded)
        self._evict(entries)
        return value

    # ------------------------------------------------------------------ the loss head
    def _capture_head_input(self, stack: contextlib.ExitStack, shape: tuple) -> dict:
        """Arrange for the head's input (final hidden states ``[b, seq, hidden]``) to land in the
        returned dict under "h": instead of the head (verified shapes) or besides it (first batch of
        a shape, to verify); nothing when the per-window head is off for this shape."""
        final: dict = {}
        verified = self._split_head.get(shape)
        if self._head is None or verified is False:
            return final
        if verified:
            def forward(hidden):
                final["h"] = hidden
                return hidden[..., :0]  # no logits: they are computed per window afterwards
            patch_forward(self._head, forward, stack)
        else:
            handle = self._head.register_forward_hook(lambda m, args, out: final.update(h=args[0]))
            stack.callback(handle.remove)
        return final

    def _loss(self, ids: torch.Tensor, logits: torch.Tensor, final: dict, before: float,
              bound: float | None) -> float | None:
        """The batch's NLL sum, from the model's logits or window by window from the final hidden
        states (then None once ``before`` plus the windows so far exceed ``bound`` by the margin,
        the remaining windows skipped)."""
        shape = tuple(ids.shape)
        if "h" not in final:
            self.windows_scored += len(ids)
            return float(token_nll(logits, ids).double().sum())
        limit = None if bound is None else bound + abs(bound) * MID_BATCH_MARGIN
        parts, partial = [], before
        for j in range(len(ids)):
            part = token_nll(self._head(final["h"][j:j + 1]), ids[j:j + 1])  # [seq]
            self.windows_scored += 1
            parts.append(part)
            partial += float(part.double().sum())
            # (after a batch's last window, ``nll`` checks the exact batch total instead)
            if limit is not None and j < len(ids) - 1 and partial > limit and self._split_head.get(shape):
                return None
        per_token = torch.cat(parts)  # [b * seq]
        if shape not in self._split_head:
            plain = token_nll(logits, ids)
            self._split_head[shape] = torch.equal(plain, per_token)
            per_token = plain
        return float(per_token.double().sum())

    def keep_for_next_step(self, winner: PruningPlan, others: list[PruningPlan], layer: int) -> None:
        """After a greedy step won by ``winner`` (its change at ``layer``), keep only what the next
        step resumes from: the winner's inputs (the next base plan) and, of another candidate changed
        before ``layer``, its input at the winner's layer (the latest cached one up to it): the next
        step's candidate at the same place differs from it only there. The rest (the old base plan,
        candidates at or after ``layer``, which resume from the winner) is dropped; shared tensors stay
        alive through the entries kept."""
        keep, wanted = _key(winner), {_key(p) for p in others}
        for entries in self._cache:
            for key in list(entries):
                if key == keep:
                    continue
                entry = entries.pop(key)
                at = max((i for i in entry.inputs if i <= layer), default=0)
                if key in wanted and at > _first_change(key, keep):
                    entries[key] = _Entry(entry.nll, {at: entry.inputs[at]})
            if keep in entries:
                entries.move_to_end(keep)

    def _evict(self, entries: OrderedDict) -> None:
        """Drop least recently used plans until this batch's share of the budget holds."""
        budget = self.max_cache_bytes / len(self.batches)
        while len(entries) > 1:
            unique = {id(t): t for e in entries.values() for t in e.inputs.values()}
            if sum(t.numel() * t.element_size() for t in unique.values()) <= budget:
                return
            entries.popitem(last=False)


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state input of a decoder-layer call (a forward hook's ``args, kwargs``)."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor):
    """The (args, kwargs) of a layer call with its hidden-state input replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def check_kinds(adapter, kinds) -> list[str]:
    """``kinds`` as a list (a comma-separated string is accepted), each offered by the model."""
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    kinds = list(dict.fromkeys(kinds))
    if not kinds:
        raise PlanError("no component kind given (e.g. block, ssm)")
    offered = adapter.kind_counts()
    for kind in kinds:
        if kind not in offered:
            raise PlanError(f"{type(adapter.model).__name__} has no component kind {kind!r} "
                            f"(it offers {', '.join(offered)})")
    return kinds


def removing(plan: PruningPlan, comp) -> PruningPlan:
    """``plan`` with ``comp`` removed too; removing a block subsumes what was removed inside it."""
    if comp.kind == "block":
        plan = plan.restoring([c for c in plan.components if c.layer == comp.layer])
    return plan.with_components([comp])
