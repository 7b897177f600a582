"""The adapter contract: one subclass per model family, one file in ``shedder/arch/``.

An adapter answers three questions about a loaded ``transformers`` model:

* **inventory** — which components exist (``layer_components``), what each layer is (``layer_kind``);
* **live masks** — how to make the model compute as if a plan's components were gone, by patching
  ``forward`` on module instances (never copying or touching weights), undone on exit (``mask_layer``);
* **extraction** — what each kept layer keeps (``layer_spec``, a typed ``spec.LayerSpec``), the
  sliced weights (``pruned_state_dict``), and how a freshly built stock layer is made to match a
  spec (``apply_layer``). Extraction and loading a saved pruned model share ``build``.

Exactness rule: for every plan, ``extract(plan)`` computes the same logits as the masked model.
The simplest way to keep that rule is for a family to write its mixer forward once, as a function
that takes the mask (SSM on/off, kept heads or channels) as arguments, and to use it both as the
live-mask forward and as the forward of the pruned module class (``mamba2_mixer``, ``mamba1_mixer``).

Following one removal, e.g. "head 3 of layer 2" of a Bamba model, from plan to weight::

    plan ─ resolve ─ layer_components(2) offers Component("head", 2, 3)       (bamba.py)
         ├ apply(plan)            ─ mask_layer(2, [head:2:3]) ─ mamba2_mixer.mask
         └ extract(plan)          ─ pruned_config ─ pruned_spec ─ layer_spec(2, [head:2:3])  (bamba.py)
                                      → LayerSpec(source=2, heads_per_group=(4, 3))
                                  ─ pruned_state_dict ─ mamba2_mixer.pruned_state (sliced rows)
                                  ─ build(config) ─ stock model, then apply_layer(layer, j, spec)  (bamba.py)
                                      → layer.mamba = mamba2_mixer.build(...): PrunedMamba2Mixer

How a family adds a component kind (say ``"foo"``):

1. name it in ``plan.KINDS`` and in the family's ``kinds``;
2. inventory: ``layer_components`` lists ``Component("foo", layer, index)`` where it exists (read
   from the modules, so an already-pruned model offers what it still has); ``check`` refuses
   plans that would leave a layer broken;
3. mask: ``mask_layer`` patches the modules of the layer for the ``foo`` components (``patch_forward``);
4. spec: a ``LayerSpec`` field (``spec.py``, with its type and bound in ``Limits``) says what the
   layer keeps; ``layer_spec`` sets it, ``apply_layer`` rebuilds it, ``configure`` folds it into a
   stock config when every layer agrees;
5. extract: ``pruned_state_dict`` slices the tensors (``layers.sliced_state_dict`` renumbers layers
   and swaps sub-modules' tensors).

The tests in ``tests/adapter_checks.py`` then prove masked == extracted for the new kind.

Everything generic — resolving a plan (``resolved.py``: the ``ResolvedPlan`` masking, extraction,
cost and counting accept), grouping it by layer, the block-skip patch, the old→new layer map,
extraction — lives here or beside it: counting parameters in ``counting.py``, building in a dtype,
the model lock and the ``forward`` patch in ``runtime.py``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from typing import Callable, ClassVar, Iterator

import torch
from torch import nn

from shedder.core.errors import PlanError
from shedder.core.plan import KINDS, SCHEMA_VERSION, Component, ModelIdentity, PruningPlan
from shedder.arch.counting import component_params, param_count
from shedder.arch.resolved import PlanSource, ResolvedPlan, check_plan
from shedder.arch.runtime import instantiate, model_lock, patch_forward
from shedder.arch.spec import LayerSpec, Limits, PrunedSpec


#: Kinds whose removal can delete a whole layer (the only ones that can leave a model with none).
LAYER_DELETING_KINDS = frozenset({"block", "mixer", "shared_block", "attention", "mlp"})


class Adapter:
    #: ``transformers`` class names this adapter handles, e.g. ("MambaForCausalLM",).
    architectures: ClassVar[tuple[str, ...]] = ()
    #: ``config.model_type`` values handled (used when loading a config without instantiating).
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Kinds this family can offer; ``components()`` lists those a given model actually has.
    kinds: ClassVar[tuple[str, ...]] = ("block",)
    #: Kinds whose equal removal in every layer the family's stock config can state (``configure``),
    #: so ``shedder.prune.stock`` can prune them stock-shaped.
    stock_kinds: ClassVar[tuple[str, ...]] = ()
    #: Channels per group for the grouped kinds, when the plan does not say.
    default_group_sizes: ClassVar[dict[str, int]] = {}
    #: Linear modules (last name part) that LoRA recovery adapts by default: the official recipe's
    #: ``in_proj,out_proj,down_proj,up_proj`` plus gated MLPs' ``gate_proj``, where the family has them.
    lora_targets: ClassVar[tuple[str, ...]] = ("in_proj", "out_proj", "up_proj", "down_proj", "gate_proj")
    #: Config fields that size what ``build`` allocates; each is bounded (``spec.check_config_sizes``)
    #: before anything is built. Families add their own (heads, state, MLP widths, experts).
    size_fields: ClassVar[tuple[str, ...]] = ("num_hidden_layers", "hidden_size", "vocab_size")
    #: Where the decoder layers are (``model.get_submodule``); also their state-dict prefix.
    layers_path: ClassVar[str] = "model.layers"
    #: The stock ``transformers`` class ``build`` starts from.
    model_class: ClassVar[type[nn.Module]]
    #: What each official Mamba-Shedder config key removes in this family (``shedder.formats.official``);
    #: a key mapped to a kind the family does not offer is refused when it is not empty.
    official_keys: ClassVar[dict[str, str]] = {"pruned_mamba_block_idx": "block", "pruned_ssm_idx": "ssm",
                                               "pruned_mha_idx": "attention", "pruned_mlp_idx": "mlp"}

    def __init__(self, model: nn.Module, group_sizes: dict[str, int] | None = None):
        self.model = model
        self.config = model.config
        self.group_sizes = {**self.default_group_sizes, **self.config_group_sizes(), **(group_sizes or {})}

    def config_group_sizes(self) -> dict[str, int]:
        """Channels per group for the grouped kinds that depend on the config (below a plan's own)."""
        return {}

    # ------------------------------------------------------------------ inventory (per family)
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order (the ``layer`` of a Component indexes this list)."""
        return self.model.get_submodule(self.layers_path)

    @property
    def layer_prefix(self) -> str:
        """State-dict prefix of the layer list (``"model.layers."``)."""
        return self.layers_path + "."

    def layer_kind(self, layer: int) -> str:
        """What a layer is, for display: 'mamba', 'attention', 'mlp', 'moe', 'hybrid', ..."""
        return "mamba"

    def layer_components(self, layer: int) -> list[Component]:
        """Every component of one layer of the *unpruned* model, all kinds."""
        raise NotImplementedError

    def layer_cost_modules(self, layer: int) -> list[nn.Module]:
        """The modules one pass through ``layer`` runs for every token (``shedder.measure.cost`` counts
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
    def layer_spec(self, layer: int, comps: list[Component]) -> LayerSpec | None:
        """What ``layer`` keeps when ``comps`` (the plan's components in it; never a ``block``) are
        removed, as differences from a stock layer; None when nothing is left (the layer computes
        the identity and extraction deletes it). ``source`` is filled in by ``pruned_spec``."""
        raise NotImplementedError

    def configure(self, config, spec: PrunedSpec, plan: PruningPlan) -> bool:
        """Make ``config`` (a copy of the model's) describe the kept layers: the layer count, the
        layer types. Return True when the stock config then expresses ``spec`` entirely (its
        fields changed accordingly, e.g. a uniform head count), so no ``shedder`` section is needed."""
        raise NotImplementedError

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        """The extracted model's weights (sliced copies; layer indices renumbered)."""
        raise NotImplementedError

    @classmethod
    def limits(cls, config) -> Limits:
        """What ``config`` allows a ``shedder`` section to say (layer count, stock sizes)."""
        return Limits(int(config.num_hidden_layers))

    @classmethod
    def stock_model(cls, config, spec: PrunedSpec | None) -> nn.Module:
        """The stock module tree ``build`` starts from (override when the layer pattern is in ``spec``)."""
        return cls.model_class(config)

    @classmethod
    def apply_layer(cls, layers: nn.ModuleList, index: int, spec: LayerSpec) -> None:
        """Swap the modules of freshly built stock layer ``layers[index]`` (or the layer itself) so
        it holds what ``spec`` keeps: pruned mixers, resized MLPs, parameterless stand-ins. Modules
        are created on the device and in the dtype of the ones they replace."""

    @classmethod
    def apply_spec(cls, model: nn.Module, spec: PrunedSpec) -> None:
        """Apply every layer's spec (override for structure shared across layers, e.g. Zamba2)."""
        layers = model.get_submodule(cls.layers_path)
        for index, layer_spec in enumerate(spec.layers):
            cls.apply_layer(layers, index, layer_spec)

    # ------------------------------------------------------------------ generic machinery
    def pruned_spec(self, plan: PruningPlan) -> PrunedSpec:
        """One ``LayerSpec`` per layer the model extracted under ``plan`` keeps, in order."""
        by_layer = self.by_layer(plan)
        specs = []
        for i in range(self.num_layers):
            comps = by_layer.get(i, [])
            if any(c.kind == "block" for c in comps):
                continue
            spec = self.layer_spec(i, comps)
            if spec is not None:
                specs.append(dataclasses.replace(spec, source=i))
        anchors = self.cache_anchor_layers()
        if specs and anchors and not any(s.source in anchors for s in specs):  # keep the first, emptied
            specs = sorted(specs + [dataclasses.replace(self.emptied_anchor_spec(anchors[0]), source=anchors[0])],
                           key=lambda s: s.source)
        return PrunedSpec(tuple(specs))

    def resume_points(self) -> list[int]:
        """Layers a forward may start at from their cached input alone (``PlanEvaluator``): every
        layer, unless a later layer reads state an earlier one makes in the same forward (Hymba's
        shared keys and values)."""
        return list(range(self.num_layers))

    def cache_anchor_layers(self) -> list[int]:
        """Attention-type layers of which extraction keeps at least one, emptied if a plan removes
        them all: ``transformers`` reads the cache's sequence length from an attention slot
        (Nemotron-H, Jamba). Default: none."""
        return []

    def emptied_anchor_spec(self, layer: int) -> LayerSpec:
        """The spec of an anchor layer kept only to hold its cache slot (nothing inside)."""
        raise NotImplementedError

    def layer_map(self, plan: PruningPlan) -> dict[int, int]:
        """Old layer index → new layer index of the model extracted under ``plan`` (kept layers only,
        in order): the one answer to "which layer did this become"."""
        return self.pruned_spec(plan).layer_map()

    def pruned_config(self, plan: PruningPlan):
        """The config of the extracted model: stock when every kept layer has stock shapes (or the
        family's stock config can say them), else with a ``shedder`` section (``spec.PrunedSpec``)."""
        spec = self.pruned_spec(plan)
        config = copy.deepcopy(self.config)
        if self.configure(config, spec, plan) or spec.stock:
            if hasattr(config, "shedder"):
                del config.shedder
        else:
            config.shedder = spec.to_json()
        return config

    @classmethod
    def build(cls, config) -> nn.Module:
        """Module tree (uninitialised weights are fine) for a config, pruned or not: the stock
        class, with each layer matched to its ``LayerSpec``. Allocates on the ambient device and
        dtype (``instantiate`` sets them for one thread; the meta device costs nothing)."""
        spec = PrunedSpec.of_config(config, cls.limits(config))
        model = cls.stock_model(config, spec)
        if spec is not None:
            cls.apply_spec(model, spec)
        return model

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
        passes ``check`` and keeps a layer."""
        out = []
        for c in self.components():
            if c.kind not in kinds or c in plan:
                continue
            if plan.in_removed_block(c):
                continue
            if c.kind == "block" and any(p.layer == c.layer for p in plan.components):
                continue  # the plan already removes parts of this layer; a block on top is redundant
            after = plan.with_components([c])
            try:
                self.check(after)
            except PlanError:
                continue
            if c.kind in LAYER_DELETING_KINDS and not self.layer_map(after):
                continue
            out.append(c)
        return out

    def resolve(self, plan: PruningPlan | PlanSource) -> ResolvedPlan:
        """The plan checked against this model: the one entry point every plan passes once.

        Takes our plan or an official config (any ``PlanSource``); a schema-1 plan is upgraded
        (``upgrade_schema1``), an anonymous one gets this model's identity. Raises ``PlanError``.
        A plan already resolved for this model is returned as it is, without checking again."""
        if isinstance(plan, ResolvedPlan) and plan.resolved_for(self):
            return plan
        if not isinstance(plan, PruningPlan):
            plan = plan.plan_for(self)
        if plan.schema_version != SCHEMA_VERSION:
            plan = self.upgrade_schema1(plan)
        plan = ResolvedPlan(plan.components, plan.model or self.identity(), dict(plan.group_sizes), dict(plan.meta),
                            adapter=self)
        check_plan(self, plan)
        return plan

    def upgrade_schema1(self, plan: PruningPlan) -> PruningPlan:
        """A plan read from schema 1 in today's kinds (default: unchanged)."""
        return plan

    def same_removal_as_official(self, comp: Component) -> Component:
        """``comp``, or the component of an official kind that removes exactly the same (written to
        official configs in its place); default: ``comp``."""
        return comp

    def reorder_mlp_channels(self) -> int:
        """The official ``--weight_reorder``: permute every per-layer MLP's channels by L1 norm
        (``feed_forward.l1_reorder``; the function is unchanged, so a width keeps the strongest
        channels). Returns the number of MLPs reordered; families without their own per-layer MLP
        channels refuse."""
        raise PlanError(f"{type(self.model).__name__}: --weight-reorder is not available for this family "
                        "(it reorders per-layer MLP channels)")

    def official_mlp_width(self, layer: int) -> int:
        """Intermediate channels of the MLP at ``layer`` (what an official ``pruned_mlp_channels``
        width counts); the families with MLP channel groups define ``mlp_width``."""
        return self.mlp_width(layer)

    def by_layer(self, plan: PruningPlan) -> dict[int, list[Component]]:
        out: dict[int, list[Component]] = {}
        for c in plan.sorted():
            out.setdefault(c.layer, []).append(c)
        return out

    @contextlib.contextmanager
    def apply(self, plan: PruningPlan) -> Iterator[PruningPlan]:
        """Live mask: inside the block the model computes as if ``plan`` were extracted."""
        plan = self.resolve(plan)
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
        plan = self.resolve(plan)
        config = self.pruned_config(plan)
        ref = next(self.model.parameters())
        model = instantiate(type(self), config, device=ref.device, dtype=ref.dtype)
        model.load_state_dict(self.pruned_state_dict(plan), strict=True)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return model.eval()

    def param_count(self, plan: PruningPlan | None = None) -> int:
        """Parameters of the model as extracted under ``plan`` (``counting.param_count``)."""
        return param_count(self, self.resolve(plan if plan is not None else PruningPlan()))

    def component_params(self, comp: Component, base: PruningPlan | None = None) -> int:
        """Parameters removed by ``comp`` on top of ``base``."""
        return component_params(self, comp, base if base is not None else PruningPlan())
