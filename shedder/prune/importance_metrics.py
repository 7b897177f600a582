"""Importance metrics side by side: the Mamba-Shedder perplexity score and three one-pass signals.

Every metric returns the same table, ``[layer, kind, index, score, params_removed]``, where a
higher ``score`` means the model needs the component more (so the lowest scores are pruned first):

* ``ppl`` — perplexity increase when the component alone is removed (``importance.score``; one
  calibration pass per component, cached on disk and resumable);
* ``block_influence`` — ShortGPT: ``1 − cos(input, output)`` of a decoder layer's hidden states,
  averaged over calibration tokens; blocks only;
* ``activation`` — Minitron-style: the mean over calibration tokens of the L2 norm of the
  component's output activations. For heads and channel groups these are the component's channels
  at the input of the layer's output projection (the ``nn.Linear`` back to the hidden size whose
  input columns extraction deletes with the component); for attention / MLP sub-blocks the output
  of the sub-block the live mask switches off (for a layer that is only that sub-block, and for a
  block: the layer's output minus its input, i.e. its contribution to the residual stream). Not
  defined for SSMs (the SSM's output is mixed with the conv path inside the mixer);
* ``taylor`` — first order: ``Σ |∂L/∂w · w|`` over exactly the parameters that extraction deletes
  with the component, from one backward pass of the calibration loss.

The one-pass metrics cost one forward (``taylor``: one forward and one backward) over the
calibration windows for the whole map, whatever the number of components; the table says what it
cost in ``attrs`` (``seconds``, ``forwards``, ``backwards``), so it can be shown next to the numbers.

Each metric is registered once, where it is defined (``@register(name, kinds=..., one_pass=...)``),
under the name and description listed in ``shedder.core.defaults.METRICS`` (which the command line
reads without importing torch); ``REGISTRY`` is the one list that the studio's lists and
``metric_scores`` read, so a new metric is one decorated function and its line in ``METRICS``.

Which parameters, and which channels, belong to a component is not written down per family: it is
read off the family's own extraction (``adapter.pruned_state_dict``) with every parameter element
temporarily replaced by its float64 serial number — what the extracted model lacks is what the
component owns. So the metrics agree with extraction by construction, for every family.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
from torch import nn

from shedder.arch import adapter_for
from shedder.arch.runtime import model_lock
from shedder.core.defaults import METRICS
from shedder.core.errors import ShedderError
from shedder.measure.evaluator import check_kinds, hidden_input
from shedder.prune.importance import score, tidy
from shedder.measure.metrics import Progress, batches, token_nll
from shedder.core.plan import KINDS, Component, PruningPlan

COLUMNS = ["layer", "kind", "index", "score", "params_removed"]


@dataclass(frozen=True)
class Metric:
    """One registered importance metric. ``one_pass``: ``fn(model, adapter, windows, components,
    batch_size, progress) -> {component: score}`` from one forward (and ``backwards`` backward
    passes) over the unpruned model; otherwise ``fn(model, windows, kinds, base_plan, progress,
    cache_dir, batch_size) -> (table with COLUMNS, forwards)``."""
    name: str
    kinds: tuple[str, ...]  # the kinds it scores (the others are left out of its map, and said so)
    description: str
    one_pass: bool
    backwards: int
    fn: Callable


#: Every metric, by name, in the order registered (the CLI's choices and the studio's list).
REGISTRY: dict[str, Metric] = {}


def register(name: str, *, kinds=KINDS, one_pass: bool = True, backwards: int = 0):
    """Decorator: register ``fn`` as the importance metric ``name``, described by ``METRICS[name]``."""
    def add(fn: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"importance metric {name!r} is registered twice")
        REGISTRY[name] = Metric(name, tuple(kinds), METRICS[name], one_pass, backwards, fn)
        return fn
    return add


def metric_names() -> tuple[str, ...]:
    return tuple(REGISTRY)




class MetricError(ShedderError):
    """A metric asked for kinds it does not score, or for a setting it does not support."""


def applicable(metric: str, kinds) -> list[str]:
    """The kinds among ``kinds`` that ``metric`` scores."""
    return [k for k in kinds if k in _metric(metric).kinds]


def metric_scores(model, windows: torch.Tensor, kinds, metric: str = "ppl", *, base_plan: PruningPlan | None = None,
                  progress: Progress | None = None, cache_dir=None, batch_size: int = 8) -> pd.DataFrame:
    """Scores ``[layer, kind, index, score, params_removed]`` of ``metric`` for the kinds it applies
    to (sorted by layer, kind, index). ``attrs``: ``metric``, ``seconds``, ``forwards``,
    ``backwards``, ``left_out`` (requested kinds the metric does not score). Raises ``MetricError``
    when it scores none of them."""
    m = _metric(metric)
    base_plan = base_plan or PruningPlan()
    adapter = adapter_for(model, base_plan.group_sizes)
    kinds = check_kinds(adapter, kinds)
    scored = applicable(metric, kinds)
    left_out = [k for k in kinds if k not in scored]
    if not scored:
        raise MetricError(f"{metric} does not score {', '.join(kinds)} (it scores {', '.join(m.kinds)})")
    started = time.perf_counter()  # the metric's own cost: parameter counts are bookkeeping
    if not m.one_pass:
        out, forwards = m.fn(model, windows, scored, base_plan, progress, cache_dir, batch_size)
        passes = {"forwards": forwards, "backwards": m.backwards}
        seconds = time.perf_counter() - started
    else:
        if adapter.resolve(base_plan).components:
            raise MetricError(f"{metric} scores the unpruned model only; a base plan is supported by ppl")
        comps = adapter.candidates(PruningPlan(), scored)  # what can go alone, as ``ppl`` scores
        with model_lock(model):
            values = m.fn(model, adapter, windows, comps, batch_size, progress)
        seconds = time.perf_counter() - started
        out = pd.DataFrame([{"layer": c.layer, "kind": c.kind, "index": c.index, "score": values[c],
                             "params_removed": adapter.component_params(c)} for c in comps], columns=COLUMNS)
        passes = {"forwards": 1, "backwards": m.backwards}
    out = tidy(out)
    out.attrs.update(metric=metric, seconds=seconds, left_out=left_out, **passes)
    return out


def _metric(metric: str) -> Metric:
    if metric not in REGISTRY:
        raise MetricError(f"unknown importance metric {metric!r} (choose from {', '.join(REGISTRY)})")
    return REGISTRY[metric]


# ---------------------------------------------------------------------------- ppl
@register("ppl", kinds=KINDS, one_pass=False)
def _ppl(model, windows, kinds, base_plan, progress, cache_dir, batch_size) -> tuple[pd.DataFrame, int]:
    """``importance.score``: one calibration pass per component (and one for the base plan)."""
    table = score(model, windows, kinds, base_plan=base_plan, progress=progress, cache_dir=cache_dir,
                  batch_size=batch_size)
    return table.rename(columns={"delta_ppl": "score"})[COLUMNS], len(table) + 1


def _tick(progress, done, total, what):
    if progress:
        progress(done, total, what)


# ---------------------------------------------------------------------------- block influence
@register("block_influence", kinds=("block",))
@torch.inference_mode()
def _block_influence(model, adapter, windows, comps, batch_size, progress) -> dict[Component, float]:
    layers = adapter.layers()
    sums = {c: 0.0 for c in comps}
    inputs: dict[int, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        for c in comps:
            layer = layers[c.layer]

            def pre(module, args, kwargs, i=c.layer):
                inputs[i] = hidden_input(args, kwargs)

            def post(module, args, kwargs, output, c=c):
                out = output[0] if isinstance(output, tuple) else output
                cos = torch.nn.functional.cosine_similarity(inputs.pop(c.layer).float(), out.float(), dim=-1)
                sums[c] += float((1 - cos).double().sum())

            stack.enter_context(layer.register_forward_pre_hook(pre, with_kwargs=True))
            stack.enter_context(layer.register_forward_hook(post, with_kwargs=True))
        _run_forward(model, windows, batch_size, progress, "block influence")
    tokens = windows.numel()
    return {c: s / tokens for c, s in sums.items()}


def _run_forward(model, windows, batch_size, progress, what) -> None:
    device = next(model.parameters()).device
    parts = batches(windows, batch_size)
    for i, batch in enumerate(parts):
        model(input_ids=batch.to(device), use_cache=False)
        _tick(progress, i + 1, len(parts), what)


# ---------------------------------------------------------------------------- ownership
class _Ownership:
    """Which parameter elements extraction deletes with a component, by float64 serial number."""

    def __init__(self, model, adapter):
        self.model, self.adapter = model, adapter
        self.params = list(dict.fromkeys(p for p in model.parameters()))  # tied weights once
        self.offsets, self.position, total = [], {}, 0
        for i, p in enumerate(self.params):
            self.offsets.append(total)
            self.position[id(p)] = i
            total += p.numel()
        self.total = total

    @contextlib.contextmanager
    def numbered(self):
        """Inside, every parameter holds its elements' serial numbers (float64); restored on exit."""
        saved = [p.data for p in self.params]
        try:
            self.whole = {}
            for i, (p, start) in enumerate(zip(self.params, self.offsets)):
                p.data = torch.arange(start, start + p.numel(), dtype=torch.float64, device=p.device).view(p.shape)
                self.whole[p.data.data_ptr()] = i
            yield
        finally:
            for p, data in zip(self.params, saved):
                p.data = data

    def removed(self, comp: Component) -> torch.Tensor:
        """Bool [total]: the elements that the model extracted without ``comp`` no longer has (call
        inside ``numbered``). Tensors extraction passes through untouched are the same storage, so
        only the sliced ones are read element by element."""
        present = torch.zeros(self.total, dtype=torch.bool)
        for t in self.adapter.pruned_state_dict(PruningPlan([comp], self.adapter.identity())).values():
            if t.dtype != torch.float64:
                continue
            i = self.whole.get(t.data_ptr())
            if i is not None and t.numel() == self.params[i].numel():
                present[self.offsets[i]: self.offsets[i] + t.numel()] = True
                continue
            ids = t.reshape(-1).cpu()
            if not bool(((ids >= 0) & (ids < self.total) & (ids == ids.round())).all()):
                raise MetricError(f"{type(self.model).__name__}: extraction computes new values for {comp}, "
                                  "so its parameters cannot be attributed")
            present[ids.long()] = True
        return ~present

    def slice_of(self, mask: torch.Tensor, param) -> torch.Tensor:
        i = self.position[id(param)]
        return mask[self.offsets[i]: self.offsets[i] + param.numel()].view(param.shape)


# ---------------------------------------------------------------------------- activation
@register("activation", kinds=("block", "head", "channel_group", "mlp_channel_group", "attention", "mlp"))
def _activation(model, adapter, windows, comps, batch_size, progress) -> dict[Component, float]:
    """One forward with hooks on each component's site; see the module docstring for the sites."""
    channel_sites: dict[nn.Module, list[tuple[Component, torch.Tensor]]] = {}
    branch_sites: dict[Component, tuple[nn.Module, bool]] = {}
    grouped = [c for c in comps if c.kind not in ("block", "attention", "mlp")]
    if grouped:
        own = _Ownership(model, adapter)
        with torch.no_grad(), own.numbered():
            for c in grouped:
                linear, columns = _output_columns(model, adapter, own, c)
                channel_sites.setdefault(linear, []).append((c, columns))
    for c in comps:
        if c.kind == "block":
            branch_sites[c] = (adapter.layers()[c.layer], True)
        elif c.kind in ("attention", "mlp"):
            branch_sites[c] = _switched_off_branch(adapter, c)
    sums = {c: 0.0 for c in comps}
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for linear, entries in channel_sites.items():
            def pre(module, args, entries=entries):
                x = args[0].float()
                for c, cols in entries:
                    sums[c] += float(x[..., cols.to(x.device)].norm(dim=-1).double().sum())
            stack.enter_context(linear.register_forward_pre_hook(pre))
        for c, (module, residual) in branch_sites.items():
            def post(module, args, kwargs, output, c=c, residual=residual):
                out = (output[0] if isinstance(output, tuple) else output).float()
                if residual:
                    out = out - hidden_input(args, kwargs).float()
                sums[c] += float(out.norm(dim=-1).double().sum())
            stack.enter_context(module.register_forward_hook(post, with_kwargs=True))
        _run_forward(model, windows, batch_size, progress, "activation")
    tokens = windows.numel()
    return {c: s / tokens for c, s in sums.items()}


def _output_columns(model, adapter, own: _Ownership, comp: Component) -> tuple[nn.Module, torch.Tensor]:
    """The layer's projection back to the hidden size whose input columns extraction deletes with
    ``comp``, and those columns."""
    hidden = model.config.get_text_config().hidden_size
    removed = own.removed(comp)
    for module in adapter.layers()[comp.layer].modules():
        if isinstance(module, nn.Linear) and module.out_features == hidden:
            gone = own.slice_of(removed, module.weight)  # [out, in]
            columns = gone.all(dim=0).nonzero().flatten()
            if len(columns) and bool(gone[:, columns].all()):
                return module, columns
    raise MetricError(f"{comp}: no output projection loses input channels with it, so activation does not apply")


def _switched_off_branch(adapter, comp: Component) -> tuple[nn.Module, bool]:
    """(module, residual): the largest module of the layer the live mask replaces for ``comp``;
    ``residual`` when that is the whole layer (its contribution is output − input)."""
    layer = adapter.layers()[comp.layer]
    with adapter.apply(PruningPlan([comp], adapter.identity())):
        patched = [m for m in layer.modules() if "forward" in m.__dict__]
    if not patched:
        raise MetricError(f"{comp}: the live mask switches off no module, so activation does not apply")
    module = max(patched, key=lambda m: sum(p.numel() for p in m.parameters()))
    return module, module is layer


# ---------------------------------------------------------------------------- taylor
@register("taylor", kinds=KINDS, backwards=1)
def _taylor(model, adapter, windows, comps, batch_size, progress) -> dict[Component, float]:
    own = _Ownership(model, adapter)
    grads = _loss_gradients(model, own.params, windows, batch_size, progress)
    flat = torch.cat([(g.double() * p.detach().double()).abs().reshape(-1).cpu() for g, p in zip(grads, own.params)])
    out = {}
    with torch.no_grad(), own.numbered():
        for i, c in enumerate(comps):
            out[c] = float(flat[own.removed(c)].sum())
            _tick(progress, i + 1, len(comps), f"taylor: {c}")
    return out


def _loss_gradients(model, params, windows, batch_size, progress) -> list[torch.Tensor]:
    """Gradients of the mean calibration NLL for ``params`` (one forward and backward per batch);
    the parameters' own ``grad`` and ``requires_grad`` are left as they were."""
    device = next(model.parameters()).device
    flags = [p.requires_grad for p in params]
    saved = [p.grad for p in params]
    parts = batches(windows, batch_size)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for i, batch in enumerate(parts):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                (token_nll(logits, batch).sum() / tokens).backward()
                _tick(progress, i + 1, len(parts), "taylor: gradients")
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    finally:
        for p, flag, g in zip(params, flags, saved):
            p.grad = g
            p.requires_grad_(flag)
