"""What a pruned model keeps per layer: the ``shedder`` section of its config.json, defined once.

A saved pruned model is a file format. Its config is the source model's config with the layer
count (and, where the family's config can express them, the layer types) changed; what a stock
config cannot express goes into ``config.json`` → ``"shedder"``::

    {"schema_version": 2,
     "layers": [{"source": 0, "heads_per_group": [2, 4]}, {"source": 2, "ssm": false}, ...],
     "shared_blocks": [0, 0]}            # Zamba2 only: the memory block of each application

``layers`` has one ``LayerSpec`` per layer of the pruned model, in order, holding only what differs
from the layer the stock config builds. ``source`` is the layer's index in the model it was
extracted from, so ``layers`` is also the old→new layer map of the extraction.

``PrunedSpec.of_config`` reads and checks the section (types, unknown keys, layer count, and every
size against the config's own, so an edited file fails with one message instead of allocating
tens of GB); schema 1 (written before versions existed: untyped per-family dicts) is read too.
"""
from __future__ import annotations

from pathlib import Path

import dataclasses
import json
from dataclasses import dataclass

from shedder.core.errors import ModelLoadError

SCHEMA_VERSION = 2

#: Bounds on what a config may ask to build, checked before anything is built: far above every
#: published Mamba-family checkpoint (64 layers, 256k vocabulary, 8,192 wide, 21,504-wide MLPs),
#: far below what would take minutes or gigabytes to build from an edited or hostile file.
MAX_LAYERS = 1_000
MAX_VOCAB = 1 << 20
MAX_WIDTH = 1 << 16


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a pruned model: what it keeps, relative to the stock layer of its config.

    ``None`` (and ``True``) mean "as the stock layer"; only differences are written to JSON.
    """

    #: index of this layer in the model it was extracted from (None: not recorded, schema 1)
    source: int | None = None
    #: the layer's type when the config cannot place it ("mamba" / "attention"; Jamba)
    type: str | None = None
    #: whether the layer's feed-forward is a mixture of experts when the config cannot say (Jamba)
    moe: bool | None = None
    #: the mixer's selective scan / SSD runs
    ssm: bool = True
    #: Mamba-2 mixer: heads kept in each B/C group
    heads_per_group: tuple[int, ...] | None = None
    #: Mamba-1 mixer: inner channels kept
    inner: int | None = None
    #: Zamba (v1) mixer: inner channels kept in each remaining Mamba head, in order
    head_widths: tuple[int, ...] | None = None
    #: the layer's Mamba mixer is there (False also for a Bamba attention layer that lost its
    #: attention: it is rebuilt as a Mamba layer without one). JSON key ``"mixer"``, as since schema 1
    mamba: bool = True
    #: the layer's attention is there
    attention: bool = True
    #: MLP intermediate channels (0: the feed-forward sub-block is removed)
    mlp: int | None = None
    #: experts the layer's mixture of experts keeps (Granite 4.0-H, Jamba; None: the config's count)
    experts: int | None = None

    def to_json(self) -> dict:
        """Only the fields that differ from a stock layer (``source`` always, when known)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default or (f.name == "source" and value is not None):
                out[_KEY_OF_FIELD.get(f.name, f.name)] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def stock(self) -> bool:
        """Whether the layer is exactly what its stock config builds (``source``/``type``/``moe`` aside)."""
        return (self.ssm and self.heads_per_group is None and self.inner is None and self.head_widths is None
                and self.mamba
                and self.attention and self.mlp is None and self.experts is None)


@dataclass(frozen=True)
class PrunedSpec:
    """The whole ``shedder`` section: one ``LayerSpec`` per layer, plus Zamba2's memory blocks."""

    layers: tuple[LayerSpec, ...]
    shared_blocks: tuple[int, ...] | None = None
    schema_version: int = SCHEMA_VERSION

    def layer_map(self) -> dict[int, int]:
        """Old layer index → new layer index (layers whose source is recorded)."""
        return {s.source: j for j, s in enumerate(self.layers) if s.source is not None}

    @property
    def stock(self) -> bool:
        return all(s.stock and s.type is None and s.moe is None for s in self.layers) and self.shared_blocks is None

    def to_json(self) -> dict:
        out = {"schema_version": self.schema_version, "layers": [s.to_json() for s in self.layers]}
        if self.shared_blocks is not None:
            out["shared_blocks"] = list(self.shared_blocks)
        return out

    @classmethod
    def of_config(cls, config, limits: "Limits", where: str = "config.json") -> "PrunedSpec | None":
        """The checked section of ``config`` (None when it has none); raises ``ModelLoadError``
        naming ``where`` and the field at fault."""
        if not hasattr(config, "shedder"):
            return None
        return cls.from_json(config.shedder, model_type=getattr(config, "model_type", ""), limits=limits, where=where)

    @classmethod
    def from_json(cls, data, model_type: str = "", limits: "Limits | None" = None,
                  where: str = "config.json") -> "PrunedSpec":
        def fail(path: str, message: str):
            raise ModelLoadError(f"{where}: shedder{path} {message}")

        if not isinstance(data, dict):
            fail("", f"must be an object, not {json.dumps(data)[:60]}")
        version = data.get("schema_version", 1)
        if type(version) is not int or version not in (1, SCHEMA_VERSION):
            fail(".schema_version", f"is {json.dumps(version)[:40]}; this version reads 1 and {SCHEMA_VERSION}")
        allowed = {"schema_version", "layers", "shared_blocks"}
        for key in data:
            if key not in allowed:
                fail(f".{key}", f"is not a known field (known: {', '.join(sorted(allowed))})")
        layers = data.get("layers")
        if layers is None:  # schema 1 of Zamba2 may hold only shared_blocks: every layer stock
            layers = [{} for _ in range(limits.num_layers if limits else 0)]
        if not isinstance(layers, list):
            fail(".layers", "must be a list with one object per layer")
        if len(layers) > MAX_LAYERS:
            fail(".layers", f"has {len(layers):,} layers; this tool reads at most {MAX_LAYERS:,}")
        if version == 1:
            layers = [_from_schema1(entry, model_type) if isinstance(entry, dict) else entry for entry in layers]
        specs = tuple(_layer(entry, f".layers[{j}]", fail) for j, entry in enumerate(layers))
        _check_sources(specs, fail)
        blocks = data.get("shared_blocks")
        if blocks is not None:
            if not isinstance(blocks, list) or not all(_is_int(b) and b >= 0 for b in blocks):
                fail(".shared_blocks", "must be a list of memory-block indices")
            blocks = tuple(blocks)
        spec = cls(specs, blocks, SCHEMA_VERSION)
        if limits is not None:
            limits.check(spec, fail)
        return spec


@dataclass(frozen=True)
class Limits:
    """What the config a section belongs to allows: its layer count and the stock sizes no pruned
    layer can exceed (None: the family has no such part)."""

    num_layers: int
    heads_per_group: tuple[int, ...] | None = None
    inner: int | None = None
    mlp: int | None = None
    num_mem_blocks: int | None = None
    experts: int | None = None
    #: Zamba (v1): (Mamba heads, channels per head) of the stock mixer
    mamba_heads: tuple[int, int] | None = None

    def check(self, spec: PrunedSpec, fail) -> None:
        if len(spec.layers) != self.num_layers:
            fail(".layers", f"describes {len(spec.layers)} layers, but the config builds {self.num_layers}")
        for j, s in enumerate(spec.layers):
            at = f".layers[{j}]"
            if s.heads_per_group is not None:
                stock = self.heads_per_group
                if stock is None:
                    fail(f"{at}.heads_per_group", "is given, but this family has no Mamba-2 mixer")
                if len(s.heads_per_group) != len(stock):
                    fail(f"{at}.heads_per_group", f"has {len(s.heads_per_group)} groups; the config has {len(stock)}")
                for g, (n, most) in enumerate(zip(s.heads_per_group, stock)):
                    if n > most:
                        fail(f"{at}.heads_per_group[{g}]", f"is {n}, more than the {most} heads per group of the config")
            if s.head_widths is not None:
                if self.mamba_heads is None:
                    fail(f"{at}.head_widths", "is given, but this family has no multi-head Mamba-1 mixer")
                heads, width = self.mamba_heads
                if len(s.head_widths) > heads or not all(0 < w <= width for w in s.head_widths):
                    fail(f"{at}.head_widths", f"is {list(s.head_widths)}; the config has {heads} heads of {width} channels")
            for name, most in (("inner", self.inner), ("mlp", self.mlp), ("experts", self.experts)):
                value = getattr(s, name)
                if value is not None and (most is None or value > most):
                    fail(f"{at}.{name}", f"is {value}, more than the config's {most}" if most is not None
                         else "is given, but this family has no such part")
        if spec.shared_blocks is not None and self.num_mem_blocks is not None:
            bad = [b for b in spec.shared_blocks if b >= self.num_mem_blocks]
            if bad:
                fail(".shared_blocks", f"names memory block {bad[0]}; the config has {self.num_mem_blocks}")


def _is_int(value) -> bool:
    return type(value) is int


def _check_sources(specs: tuple[LayerSpec, ...], fail) -> None:
    """Sources are the kept layers' indices in the model extracted from, so they rise strictly (a
    repeated or out-of-order source would make the old->new layer map, and every plan read
    through it, wrong) and stay below ``MAX_LAYERS``."""
    previous = None
    for j, s in enumerate(specs):
        if s.source is None:
            continue
        if s.source >= MAX_LAYERS:
            fail(f".layers[{j}].source", f"is {s.source:,}, out of range (layer indices are below {MAX_LAYERS:,})")
        if previous is not None and s.source <= previous[1]:
            word = "repeats" if s.source == previous[1] else "comes before"
            fail(f".layers[{j}].source", f"is {s.source}, which {word} the source of layers[{previous[0]}] "
                 f"({previous[1]}); sources are the kept layers' indices, in order")
        previous = (j, s.source)


#: Size fields for which 0 means "none" (a dense Granite 4.0-H has no experts).
MAY_BE_ZERO = frozenset({"num_local_experts", "num_experts_per_tok"})


def check_config_sizes(config, fields: tuple[str, ...], where: str = "config.json") -> None:
    """Every size of ``config`` named in ``fields`` is an integer within this tool's bounds, so a
    config asking for millions of layers or a huge width is refused before anything is built.
    Fields the config does not have, or leaves unset (None, derived later), are skipped; the
    fields of ``MAY_BE_ZERO`` may be 0."""
    for name in fields:
        value = getattr(config, name, None)
        if value is None:
            continue
        most, what = {"num_hidden_layers": (MAX_LAYERS, "layers"), "vocab_size": (MAX_VOCAB, "vocabulary size")}.get(
            name, (MAX_WIDTH, "width"))
        least = 0 if name in MAY_BE_ZERO else 1
        if not _is_int(value) or not least <= value <= most:
            raise ModelLoadError(f"{where}: {name} is {json.dumps(value, default=repr)[:40]}; expected an integer from {least} to "
                                 f"{most:,} (the bound this tool sets on a model's {what})")


_TYPES = {"source": "index", "type": "name", "moe": bool, "ssm": bool, "heads_per_group": "counts", "inner": "size",
          "head_widths": "counts",
          "mixer": bool, "attention": bool, "mlp": "width", "experts": "size"}
#: ``LayerSpec`` fields saved under another key (the on-disk name stays what old files hold)
_KEY_OF_FIELD = {"mamba": "mixer"}
_FIELD_OF_KEY = {v: k for k, v in _KEY_OF_FIELD.items()}


def _layer(entry, at: str, fail) -> LayerSpec:
    if not isinstance(entry, dict):
        fail(at, f"must be an object, not {json.dumps(entry)[:60]}")
    values = {}
    for key, value in entry.items():
        kind = _TYPES.get(key)
        if kind is None:
            fail(f"{at}.{key}", f"is not a known field (known: {', '.join(_TYPES)})")
        ok = {bool: type(value) is bool,
              "index": _is_int(value) and value >= 0,
              "name": value in ("mamba", "attention"),
              "counts": isinstance(value, list) and bool(value) and all(_is_int(n) and n >= 0 for n in value)
              and sum(value) > 0,
              "size": _is_int(value) and value > 0,
              "width": _is_int(value) and value >= 0}[kind]
        if not ok:
            expected = {bool: "true or false", "index": "a layer index", "name": '"mamba" or "attention"',
                        "counts": "a list of head counts (at least one head)", "size": "a positive integer",
                        "width": "an integer >= 0"}[kind]
            fail(f"{at}.{key}", f"is {json.dumps(value)[:60]}; expected {expected}")
        values[_FIELD_OF_KEY.get(key, key)] = tuple(value) if key in ("heads_per_group", "head_widths") else value
    return LayerSpec(**values)


def _from_schema1(entry: dict, model_type: str) -> dict:
    """A schema-1 layer entry (each family's own untyped layout) in schema-2 fields.

    Schema 1: Mamba-1 ``{"ssm", "intermediate_size"}``; Mamba-2 ``{"ssm", "heads_per_group"}``;
    Nemotron-H the same for Mamba layers, ``{"intermediate_size"}`` (the MLP) or ``{"attention": false}``;
    Bamba / Falcon-H1 / Zamba2 / Jamba ``{"mamba": {...}, "mlp": width | false, "mixer": false,
    "attention": false, "type", "moe"}``.
    """
    out = {k: v for k, v in entry.items() if k != "mamba"}
    mixer = entry.get("mamba")
    if isinstance(mixer, dict):
        out.update(mixer)
    elif mixer is not None:
        out["mamba"] = mixer  # refused as an unknown field
    if "intermediate_size" in out:
        out["mlp" if model_type == "nemotron_h" else "inner"] = out.pop("intermediate_size")
    if out.get("mlp") is False:
        out["mlp"] = 0
    return out


def load_line(stock: bool, path: str | Path = "<this directory>") -> str:
    """How to load an extracted model saved in ``path``: plain ``transformers`` for a stock-shaped
    one (``stock``: its config has no ``shedder`` section), else our loader."""
    if stock:
        return f'stock checkpoint: loads with transformers: AutoModelForCausalLM.from_pretrained("{path}")'
    return f'needs shedder.formats.loading.load_model: load_model("{path}") (per-layer shapes)'


def is_stock(model) -> bool:
    """Whether an extracted ``model`` has a stock config that ``from_pretrained`` rebuilds."""
    return not getattr(model.config, "shedder", None)
