"""The adapter contract: one subclass per model family, registered in ``shedder.arch``.

An adapter answers three questions about a loaded ``transformers`` model:

* **inventory** — which components exist (``components``), what each layer is (``layer_kind``);
* **live masks** — how to make the model compute as if a plan's components were gone, by patching
  ``forward`` on module instances (never copying or touching weights), undone on exit;
* **extraction** — the config and state dict of the physically smaller model, and how to build the
  module tree for such a config (``build``), so that extraction and loading a saved pruned model
  share one code path.

Exactness rule: for every plan, ``extract(plan)`` computes the same logits as the masked model.
The simplest way to keep that rule is for a family to write its mixer forward once, as a function
that takes the mask (SSM on/off, kept heads or channels) as arguments, and to use it both as the
live-mask forward and as the forward of the pruned module class.

Everything generic — grouping a plan by layer, the block-skip patch, counting parameters under a
plan, extraction, validation messages — lives here so the family files stay about their family.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import threading
import weakref
from typing import Callable, ClassVar, Iterator

import torch
from torch import nn

from ..errors import PlanError
from ..plan import KINDS, SCHEMA1_MARK, Component, ModelIdentity, PruningPlan


class Adapter:
    #: ``transformers`` class names this adapter handles, e.g. ("MambaForCausalLM",).
    architectures: ClassVar[tuple[str, ...]] = ()
    #: ``config.model_type`` values handled (used when loading a config without instantiating).
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Kinds this family can offer; ``components()`` lists those a given model actually has.
    kinds: ClassVar[tuple[str, ...]] = ("block",)
    #: Channels per group for the grouped kinds, when the plan does not say.
    default_group_sizes: ClassVar[dict[str, int]] = {}
    #: What each official Mamba-Shedder config key removes in this family (``shedder.official``);
    #: a key mapped to a kind the family does not offer is refused when it is not empty.
    official_keys: ClassVar[dict[str, str]] = {"pruned_mamba_block_idx": "block", "pruned_ssm_idx": "ssm",
                                               "pruned_mha_idx": "attention", "pruned_mlp_idx": "mlp"}

    def __init__(self, model: nn.Module, group_sizes: dict[str, int] | None = None):
        self.model = model
        self.config = model.config
        self.group_sizes = {**self.default_group_sizes, **(group_sizes or {})}

    # ------------------------------------------------------------------ inventory (per family)
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order (the ``layer`` of a Component indexes this list)."""
        raise NotImplementedError

    def layer_kind(self, layer: int) -> str:
        """What a layer is, for display: 'mamba', 'attention', 'mlp', 'moe', 'hybrid', ..."""
        return "mamba"

    def layer_components(self, layer: int) -> list[Component]:
        """Every component of one layer of the *unpruned* model, all kinds."""
        raise NotImplementedError

    def kept_layers(self, plan: PruningPlan) -> list[int]:
        """Indices (in this model) of the layers the model extracted under ``plan`` keeps, in order:
        extracted layer ``j`` is layer ``kept_layers(plan)[j]``. Default: every layer whose block is
        not removed; a family whose extraction also drops layers a plan empties overrides this."""
        removed = {c.layer for c in plan.of_kind("block")}
        return [i for i in range(self.num_layers) if i not in removed]

    def layer_cost_modules(self, layer: int) -> list[nn.Module]:
        """The modules one pass through ``layer`` runs for every token (``shedder.cost`` counts
        their FLOPs and state). Default: every module under the layer. Override when a layer holds
        modules it does not run, e.g. the per-application adapters of a shared block."""
        return list(self.layers()[layer].modules())

    def check(self, plan: PruningPlan) -> None:
        """Family rules beyond membership (e.g. head removal must keep groups equal).

        Raise ``PlanError`` naming the layer (and group) at fault. Default: no extra rules.
        """

    # ------------------------------------------------------------------ live masks (per family)
    def mask_layer(self, layer: int, comps: list[Component], stack: contextlib.ExitStack) -> None:
        """Patch the modules of one layer so it computes as if ``comps`` were removed.

        Never called with a ``block`` component (the base skips whole layers itself). Use
        ``patch_forward`` so the patch is undone when ``stack`` closes.
        """
        raise NotImplementedError

    def skip_forward(self, layer: int) -> Callable:
        """A forward for layer ``layer`` that returns its input unchanged, in the layer's output
        format (override when the layer returns a tuple or takes hidden states by keyword)."""
        def forward(hidden_states, *args, **kwargs):
            return hidden_states
        return forward

    # ------------------------------------------------------------------ extraction (per family)
    def pruned_config(self, plan: PruningPlan):
        """The config of the extracted model. Uneven per-layer shapes go into ``config.shedder``
        (a JSON-able dict) so that ``build`` can recreate them; when every layer keeps the same
        dimensions, the config must be one stock ``transformers`` loads as is."""
        raise NotImplementedError

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        """The extracted model's weights (sliced copies; layer indices renumbered)."""
        raise NotImplementedError

    @classmethod
    def build(cls, config) -> nn.Module:
        """Module tree (uninitialised weights are fine) for a config, pruned or not: the stock
        class, with modules swapped for pruned variants as ``config.shedder`` describes."""
        raise NotImplementedError

    # ------------------------------------------------------------------ generic machinery
    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def identity(self, name: str = "") -> ModelIdentity:
        return ModelIdentity.of(self.model, name)

    @functools.cached_property
    def _all_components(self) -> tuple[Component, ...]:
        return tuple(c for i in range(self.num_layers) for c in self.layer_components(i))

    def components(self, kind: str | None = None) -> list[Component]:
        """All components of the unpruned model, optionally of one kind, ordered by layer."""
        return [c for c in self._all_components if kind is None or c.kind == kind]

    def kind_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self.components():
            counts[c.kind] = counts.get(c.kind, 0) + 1
        return {k: counts[k] for k in KINDS if k in counts}

    def candidates(self, plan: PruningPlan, kinds: list[str]) -> list[Component]:
        """Components of ``kinds`` that can still be removed on top of ``plan`` (the search's
        candidate list): not already removed, not inside a removed block, and leaving a plan that
        passes ``check``."""
        out = []
        for c in self.components():
            if c.kind not in kinds or c in plan:
                continue
            if c.kind != "block" and Component("block", c.layer) in plan:
                continue
            if c.kind == "block" and any(p.layer == c.layer for p in plan.components):
                continue  # the plan already removes parts of this layer; a block on top is redundant
            try:
                self.check(plan.with_components([c]))
            except PlanError:
                continue
            out.append(c)
        return out

    def resolve(self, plan: PruningPlan) -> PruningPlan:
        """Attach this model's identity to an anonymous plan; turn an official config into components."""
        if SCHEMA1_MARK in plan.meta:
            plan = self.upgrade_schema1(plan)
            plan = PruningPlan(plan.components, plan.model, dict(plan.group_sizes),
                               {k: v for k, v in plan.meta.items() if k != SCHEMA1_MARK})
        if "official" in plan.meta:
            from ..official import plan_from_official

            official = plan_from_official(self, plan.meta["official"])
            meta = {k: v for k, v in plan.meta.items() if k != "official"}
            plan = PruningPlan(official.components, plan.model, official.group_sizes, meta)
        if plan.model is None:
            plan = PruningPlan(plan.components, self.identity(), dict(plan.group_sizes), dict(plan.meta))
        return plan

    def upgrade_schema1(self, plan: PruningPlan) -> PruningPlan:
        """A plan read from schema 1 in today's kinds (default: unchanged)."""
        return plan

    def same_removal_as_official(self, comp: Component) -> Component:
        """``comp``, or the component of an official kind that removes exactly the same (written to
        official configs in its place); default: ``comp``."""
        return comp

    def official_mlp_width(self, layer: int) -> int:
        """Intermediate channels of the MLP at ``layer`` (what an official ``pruned_mlp_channels``
        width counts); the families with MLP channel groups define ``mlp_width``."""
        return self.mlp_width(layer)

    def validate(self, plan: PruningPlan) -> PruningPlan:
        """Check a plan against this model; return it resolved. Raises ``PlanError``."""
        plan = self.resolve(plan)
        mine = self.identity()
        theirs = plan.model
        if theirs.architecture != mine.architecture:
            raise PlanError(f"the plan was made for {theirs.architecture}, but this model is {mine.architecture}")
        if theirs.num_layers != mine.num_layers:
            raise PlanError(f"the plan was made for a model with {theirs.num_layers} layers; this one has {mine.num_layers}")
        if theirs.config_hash != mine.config_hash:
            raise PlanError(f"the plan was made for another {mine.architecture} configuration "
                            f"(config hash {theirs.config_hash}, this model {mine.config_hash}{self._named(theirs)})")
        for kind, size in plan.group_sizes.items():
            if kind in self.group_sizes and size != self.group_sizes[kind]:
                raise PlanError(f"the plan uses {kind} groups of {size} channels; this adapter was set up for {self.group_sizes[kind]}")
        offered = set(self._all_components)
        for c in plan.sorted():
            if c.kind not in self.kinds:
                raise PlanError(f"{c}: {mine.architecture} has no component kind {c.kind!r} (it offers {', '.join(self.kinds)})")
            if not 0 <= c.layer < self.num_layers:
                raise PlanError(f"{c}: layer {c.layer} is out of range (the model has layers 0..{self.num_layers - 1})")
            if c not in offered:
                have = [x.index for x in self.layer_components(c.layer) if x.kind == c.kind]
                if not have:
                    raise PlanError(f"{c}: layer {c.layer} ({self.layer_kind(c.layer)}) has no {c.kind}")
                raise PlanError(f"{c}: layer {c.layer} has {c.kind} indices 0..{max(have)}, not {c.index}")
            if c.kind != "block" and Component("block", c.layer) in plan:
                raise PlanError(f"{c} is redundant: block {c.layer} is removed as a whole")
        self.check(plan)
        return plan

    @staticmethod
    def _named(identity: ModelIdentity) -> str:
        return f", made for {identity.name}" if identity.name else ""

    def by_layer(self, plan: PruningPlan) -> dict[int, list[Component]]:
        out: dict[int, list[Component]] = {}
        for c in plan.sorted():
            out.setdefault(c.layer, []).append(c)
        return out

    @contextlib.contextmanager
    def apply(self, plan: PruningPlan) -> Iterator[PruningPlan]:
        """Live mask: inside the block the model computes as if ``plan`` were extracted."""
        plan = self.validate(plan)
        with model_lock(self.model), contextlib.ExitStack() as stack:
            layers = self.layers()
            for layer, comps in self.by_layer(plan).items():
                if any(c.kind == "block" for c in comps):
                    patch_forward(layers[layer], self.skip_forward(layer), stack)
                else:
                    self.mask_layer(layer, comps, stack)
            yield plan

    def extract(self, plan: PruningPlan) -> nn.Module:
        """A physically smaller model computing the masked model's function."""
        plan = self.validate(plan)
        config = self.pruned_config(plan)
        ref = next(self.model.parameters())
        model = instantiate(type(self), config, device=ref.device, dtype=ref.dtype)
        model.load_state_dict(self.pruned_state_dict(plan), strict=True)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return model.eval()

    def param_count(self, plan: PruningPlan | None = None) -> int:
        """Parameters of the model as extracted under ``plan`` (tied weights counted once),
        counted on a meta-device skeleton, so it is exact and costs no memory."""
        plan = self.validate(plan or PruningPlan())
        config = self.pruned_config(plan) if plan.components else copy.deepcopy(self.config)
        with torch.device("meta"):
            skeleton = type(self).build(config)
        if hasattr(skeleton, "tie_weights"):
            skeleton.tie_weights()
        return count_parameters(skeleton)

    def component_params(self, comp: Component, base: PruningPlan | None = None) -> int:
        """Parameters removed by ``comp`` on top of ``base``."""
        base = base or PruningPlan()
        return self.param_count(base) - self.param_count(base.with_components([comp]))


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied embedding / lm_head pair counts once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def instantiate(adapter_cls: type[Adapter], config, device="cpu", dtype=torch.float32) -> nn.Module:
    """Allocate (without the cost of random init) the module tree ``adapter_cls.build`` describes."""
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            return adapter_cls.build(config)
    finally:
        torch.set_default_dtype(previous)


_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """One re-entrant lock per model object. Masks patch shared module instances, so whoever runs a
    masked forward holds it: app sessions sharing cached weights never see each other's masks."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def patch_forward(module: nn.Module, forward: Callable, stack: contextlib.ExitStack) -> None:
    """Replace ``module.forward`` for the lifetime of ``stack`` (instance attribute, so the class and
    every other instance are untouched); restored exactly on exit, exceptions included."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward

    def restore():
        if had_own:
            module.forward = previous
        else:
            del module.forward

    stack.callback(restore)
