"""Pruning plans: which components of which model are removed.

A plan is a set of ``Component`` (kind, layer, index) plus the identity of the model it was made
for, so a plan can never be applied silently to a model of another shape. ``PruningPlan`` is our
schema only, what a user writes and reads: it round-trips through JSON with a ``schema_version``
(older versions still read). It knows nothing of the official Mamba-Shedder configs (those are read
by ``shedder.formats.official``) nor of any model: checks that depend on the model (does layer 7
have an SSM? would this head removal leave groups of unequal size?) belong to the family adapter,
and ``Adapter.resolve`` turns a plan into the ``ResolvedPlan`` everything downstream accepts.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from shedder.core.errors import PlanError
from shedder.core.fileio import atomic_write_text

SCHEMA_VERSION = 2
#: Older versions still read. Schema 1 predates the official Zamba2 semantics: its Zamba2
#: ``attention`` removed the whole shared-block application (now ``shared_block``). A plan read from
#: schema 1 keeps ``schema_version == 1`` (and is written back as such) until an adapter resolves
#: it (``Adapter.upgrade_schema1``), since only the family knows what the old kinds meant.
READABLE_VERSIONS = (1, 2)

#: Every kind the project knows. Which ones a given model offers is the adapter's business.
KINDS = ("block", "mixer", "shared_block", "ssm", "head", "channel_group", "attention", "mlp", "mlp_channel_group",
         "expert")
def in_kind_order(kinds) -> list[str]:
    """``kinds`` once each, in ``KINDS`` order: the one order every view lists kinds in (a score table
    is sorted by layer first, a multiselect keeps the order things were picked in)."""
    return sorted(set(kinds), key=KINDS.index)


#: Kinds with at most one component per layer (``index`` is always 0).
ONCE_PER_LAYER = ("block", "mixer", "shared_block", "ssm", "attention", "mlp")

#: How a kind is named in sentences (``Component.words``).
WORDS = {"block": "block", "mixer": "mixer", "shared_block": "shared block", "ssm": "SSM", "head": "head",
         "channel_group": "channel group", "attention": "attention", "mlp": "MLP",
         "mlp_channel_group": "MLP channel group", "expert": "expert"}

#: Kinds whose index counts groups of channels; a plan's ``group_sizes`` says how many per group.
GROUPED_KINDS = ("channel_group", "mlp_channel_group")

#: The fields of a plan in our format.
PLAN_KEYS = {"schema_version", "model", "group_sizes", "components", "meta"}

# Config fields that do not change the function a model computes (or are bookkeeping); they are
# left out of the config hash so that e.g. a model saved in bf16 keeps the identity of its fp32 source.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache",
    "_attn_implementation_autoset", "_commit_hash", "output_hidden_states", "output_attentions",
    "return_dict", "use_mambapy", "use_associative_scan", "use_mamba_kernels",
}


@dataclass(frozen=True, order=True)
class Component:
    """One removable part of a model: ``kind`` at decoder layer ``layer``, ``index`` within it.

    ``index`` is 0 for kinds that exist once per layer (block, ssm, attention, mlp) and the
    head / group number for the finer kinds.
    """

    kind: str
    layer: int
    index: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.layer}:{self.index}"

    def words(self) -> str:
        """For people, not parsers: ``SSM of layer 2``, ``head 7 of layer 0`` (progress, hovers)."""
        name = WORDS.get(self.kind, self.kind)
        if self.kind in ONCE_PER_LAYER:
            return f"{name} {self.layer}" if self.kind == "block" else f"{name} of layer {self.layer}"
        return f"{name} {self.index} of layer {self.layer}"

    @classmethod
    def parse(cls, text: str) -> "Component":
        """Read ``kind:layer[:index]`` (the CLI and the app's notation)."""
        parts = text.strip().split(":")
        if len(parts) not in (2, 3) or parts[0] not in KINDS:
            raise PlanError(f"cannot read component {text!r}: expected KIND:LAYER[:INDEX] with KIND one of {', '.join(KINDS)}")
        try:
            nums = [int(p) for p in parts[1:]]
        except ValueError:
            raise PlanError(f"cannot read component {text!r}: layer and index must be integers") from None
        return cls(parts[0], *nums)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "layer": self.layer, "index": self.index}


@dataclass(frozen=True)
class ModelIdentity:
    """What a plan was made for: enough to refuse a plan for another architecture or shape."""

    architecture: str
    num_layers: int
    config_hash: str
    name: str = ""

    @classmethod
    def of(cls, model, name: str = "") -> "ModelIdentity":
        config = model.config
        arch = type(model).__name__
        return cls(arch, int(config.num_hidden_layers), config_hash(config), name or str(getattr(config, "_name_or_path", "")))

    def to_dict(self) -> dict:
        return {"architecture": self.architecture, "num_layers": self.num_layers,
                "config_hash": self.config_hash, "name": self.name}


def config_hash(config) -> str:
    """A short stable hash of the structural part of a transformers config."""
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class PruningPlan:
    """An immutable set of removed components, for one model.

    ``group_sizes`` fixes what one ``channel_group`` / ``mlp_channel_group`` index means (channels
    per group); kinds missing from it use the adapter's default. ``meta`` carries free-form
    provenance (search step, measured perplexity, ...) through the JSON round trip.
    ``schema_version`` is the version whose meaning the components have (1 only for a plan read
    from a schema-1 file and not yet resolved). Two plans are equal when they remove the same
    components of the same model, whatever their provenance or state.
    """

    components: frozenset[Component] = frozenset()
    model: ModelIdentity | None = None
    group_sizes: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __eq__(self, other) -> bool:
        if not isinstance(other, PruningPlan):
            return NotImplemented
        return (self.components, self.model) == (other.components, other.model)

    def __hash__(self) -> int:
        return hash((self.components, self.model))

    # -- set operations (plans are values: each returns a new plan) ---------------------------
    def with_components(self, comps: Iterable[Component]) -> "PruningPlan":
        return self._replace(self.components | frozenset(comps))

    def restoring(self, comps: Iterable[Component]) -> "PruningPlan":
        """The plan with ``comps`` put back (no longer removed)."""
        return self._replace(self.components - frozenset(comps))

    def in_removed_block(self, comp: Component) -> bool:
        """Whether ``comp`` is a finer component of a layer whose whole block the plan removes (the
        block subsumes it: naming it too is redundant)."""
        return comp.kind != "block" and Component("block", comp.layer) in self.components

    def blocks_subsuming(self) -> "PruningPlan":
        """This plan without the finer components its removed blocks already take away."""
        return self.restoring([c for c in self.components if self.in_removed_block(c)])

    def toggle(self, comp: Component) -> "PruningPlan":
        return self.restoring([comp]) if comp in self.components else self.with_components([comp])

    def _replace(self, comps: frozenset[Component]) -> "PruningPlan":
        return PruningPlan(frozenset(comps), self.model, dict(self.group_sizes), dict(self.meta), self.schema_version)

    def sorted(self) -> list[Component]:
        return sorted(self.components, key=lambda c: (c.layer, KINDS.index(c.kind), c.index))

    def of_kind(self, kind: str) -> list[Component]:
        return [c for c in self.sorted() if c.kind == kind]

    def __contains__(self, comp) -> bool:
        return comp in self.components

    def describe(self) -> str:
        """One line, e.g. ``block ×2 (3, 5), ssm ×1 (7)`` — for progress logs and the UI."""
        if not self.components:
            return "nothing removed"
        parts = []
        for kind in KINDS:
            comps = self.of_kind(kind)
            if comps:
                where = ", ".join(f"{c.layer}" if c.index == 0 and kind in ONCE_PER_LAYER
                                  else f"{c.layer}.{c.index}" for c in comps)
                parts.append(f"{kind} ×{len(comps)} ({where})")
        return ", ".join(parts)

    def in_words(self) -> str:
        """``removed: SSM of layer 2, block 4`` — the plan as a sentence, for hovers and labels."""
        if not self.components:
            return "nothing removed"
        return "removed: " + ", ".join(c.words() for c in self.sorted())

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "model": self.model.to_dict() if self.model else None,
            "group_sizes": dict(self.group_sizes),
            "components": [c.to_dict() for c in self.sorted()],
            "meta": dict(self.meta),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        """Write the JSON atomically (a temporary file, then a rename)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data) -> "PruningPlan":
        """Read our format (any of ``READABLE_VERSIONS``); ``PlanError`` naming the field at fault."""
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        if "schema_version" not in data:
            raise PlanError("not a pruning plan: no 'schema_version'")
        unknown = sorted(set(data) - PLAN_KEYS)
        if unknown:
            raise PlanError(f"unknown plan field(s) {', '.join(map(repr, unknown))} "
                            f"(a plan has {', '.join(sorted(PLAN_KEYS))})")
        version = data["schema_version"]
        if not _is_int(version) or version not in READABLE_VERSIONS:
            raise PlanError(f"plan schema_version {version!r} is not supported (this version reads "
                            f"{', '.join(map(str, READABLE_VERSIONS))})")
        raw = data.get("components")
        if not isinstance(raw, list):
            raise PlanError("plan field 'components' must be a list")
        comps = [_component_from(item, i) for i, item in enumerate(raw)]
        seen = set()
        for c in comps:
            if c in seen:
                raise PlanError(f"component {c} is listed twice")
            seen.add(c)
        return cls(frozenset(comps), _identity_from(data.get("model")), _group_sizes_from(data.get("group_sizes")),
                   _meta_from(data.get("meta")), version)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        return cls.from_dict(parse_json(text))

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        """A plan file of ours (``shedder.formats.official.read_plan`` also reads official configs)."""
        text = read_text(path)
        try:
            return cls.from_json(text)
        except PlanError as e:
            raise PlanError(f"{Path(path)}: {e}") from None


def parse_json(text: str):
    """The JSON value of a plan file's text; ``PlanError`` saying where and why it cannot be read."""
    if not text.strip():
        raise PlanError("the plan file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"the plan is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise PlanError("the plan is not a pruning plan: its JSON is nested too deeply") from None
    except ValueError:  # Python's limit on converting long digit strings to int
        raise PlanError("the plan is not a pruning plan: it holds a number too long to read "
                        f"(more than {sys.get_int_max_str_digits()} digits)") from None


def read_text(path: str | Path) -> str:
    """The text of a plan file; ``PlanError`` for a missing, empty-named or non-UTF-8 file."""
    if not str(path).strip():
        raise PlanError("no plan file given (the name is empty)")
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"plan file not found: {p}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PlanError(f"{p} is not a plan: it is not UTF-8 text") from None


def _is_int(value) -> bool:
    """An integer that is not a boolean (JSON ``true`` is not the number 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _component_from(item, position: int) -> Component:
    if isinstance(item, str):
        return Component.parse(item)
    if not isinstance(item, dict) or "kind" not in item or "layer" not in item:
        raise PlanError(f"component #{position} must be an object with 'kind' and 'layer' (and optional 'index')")
    unknown = sorted(set(item) - {"kind", "layer", "index"})
    if unknown:
        raise PlanError(f"component #{position}: unknown field(s) {', '.join(map(repr, unknown))} "
                        "(a component has kind, layer and index)")
    kind = item["kind"]
    if kind not in KINDS:
        raise PlanError(f"component #{position}: unknown kind {kind!r} (known kinds: {', '.join(KINDS)})")
    layer, index = item["layer"], item.get("index", 0)
    if not _is_int(layer) or not _is_int(index):
        raise PlanError(f"component #{position}: layer and index must be integers, got {layer!r} and {index!r}")
    return Component(kind, layer, index)


def _identity_from(m) -> ModelIdentity | None:
    if m is None:
        return None
    fields = {"architecture": str, "num_layers": int, "config_hash": str, "name": str}
    if (not isinstance(m, dict) or set(m) - set(fields) or not {"architecture", "num_layers", "config_hash"} <= set(m)
            or not all(isinstance(m[k], t) and not isinstance(m[k], bool) for k, t in fields.items() if k in m)):
        raise PlanError("plan field 'model' needs architecture (text), num_layers (integer) and config_hash "
                        "(text), optionally name (text), and nothing else")
    return ModelIdentity(m["architecture"], m["num_layers"], m["config_hash"], m.get("name", ""))


def _group_sizes_from(sizes) -> dict:
    if sizes is None:
        return {}
    if not isinstance(sizes, dict) or not all(k in GROUPED_KINDS and _is_int(v) and v > 0 for k, v in sizes.items()):
        raise PlanError(f"plan field 'group_sizes' must map kinds ({', '.join(GROUPED_KINDS)}) to positive integers, "
                        f"got {json.dumps(sizes)[:200]}")
    return dict(sizes)


def _meta_from(meta) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise PlanError(f"plan field 'meta' must be an object, got {type(meta).__name__}")
    return dict(meta)
