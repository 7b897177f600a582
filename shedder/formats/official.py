"""The official Mamba-Shedder files, in and out: pruning configs and run directories.

The official code (IntelLabs Hardware-Aware-Automated-Machine-Learning, folder ``Mamba-Shedder``)
writes a pruning config as a JSON object of ``pruned_*`` keys:

* ``pruned_mamba_block_idx``, ``pruned_ssm_idx`` — layer indices;
* ``pruned_mha_idx``, ``pruned_mlp_idx`` — ordinals of the attention / MLP sub-blocks (Zamba2: of
  the hybrid layers, i.e. of the shared-block applications);
* ``pruned_mlp_channels`` — ``{ordinal: remaining width}`` per MLP, string keys after JSON; the
  first ``width`` channels stay;
* Hymba: ``pruned_hymba_block_idx``, ``pruned_self_attn_idx``, ``pruned_moe_idx`` (layer indices).

What a key means depends on the family (on Zamba2 a "mamba block" is the Mamba mixer of a layer,
the shared block still runs: our ``mixer``; on Mamba it is the whole layer: our ``block``), so the
mapping lives on the adapter (``Adapter.official_keys``) and a config is turned into a plan only
against a model: a config file is read as an ``OfficialConfig`` (every value checked,
``read_plan``) and ``Adapter.resolve`` asks it for its components
(``OfficialConfig.plan_for``). A key whose kind the family lacks, a Hymba key on another family
and any unknown key are refused by name; empty lists are accepted.

A run directory of the official code holds ``log.json`` (``args``, ``total_params``,
``pruning_results``: one ``{"step", "prune_target" | "pruning_target", "importance", "config_save_to"}``
per step, the importance being the calibration perplexity; ``num_evals``),
``pruned_model_configs/config.{target}.{step}.json`` (the config after each step, steps from 0) and
``pruning_config.json`` (the last config). ``write_official_run`` writes that layout for one of our
searches (``search --official-layout``); ``import_run`` turns an official run into one of ours.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from shedder.core.errors import PlanError, ShedderError
from shedder.arch import adapter_for
from shedder.core.fileio import atomic_write_text
from shedder.core.plan import Component, PruningPlan, parse_json, read_text
from shedder.core.cache import model_fingerprint, plan_key
from shedder.prune.runs import RunLog, claim_import_dir, run_settings, search_step

#: Every key the official code writes, in the order it writes them.
LIST_KEYS = ("pruned_mamba_block_idx", "pruned_mha_idx", "pruned_mlp_idx", "pruned_ssm_idx",
             "pruned_hymba_block_idx", "pruned_self_attn_idx", "pruned_moe_idx")
WIDTH_KEY = "pruned_mlp_channels"
OFFICIAL_KEYS = LIST_KEYS + (WIDTH_KEY,)
#: Keys written only by the Hymba scripts (other families refuse them).
HYMBA_KEYS = ("pruned_hymba_block_idx", "pruned_self_attn_idx", "pruned_moe_idx")
#: Keys whose indices count sub-blocks of one kind in order instead of naming layers.
ORDINAL_KEYS = ("pruned_mha_idx", "pruned_mlp_idx")
#: The name the official scripts give each key's target (file names, ``log.json``).
TARGET_NAMES = {"pruned_mamba_block_idx": "mamba_block", "pruned_ssm_idx": "ssm", "pruned_mha_idx": "mha",
                "pruned_mlp_idx": "mlp", WIDTH_KEY: "mlp_width", "pruned_hymba_block_idx": "hymba_block",
                "pruned_self_attn_idx": "self_attn", "pruned_moe_idx": "moe"}


# ---------------------------------------------------------------------------------------- configs in
@dataclass(frozen=True)
class OfficialConfig:
    """An official Mamba-Shedder pruning config, every value checked (lists of distinct non-negative
    integers; widths as ``{int: positive int}``). What its keys remove depends on the family, so it
    holds no components: ``plan_for`` gives them against one model (``Adapter.resolve`` calls it)."""

    keys: dict

    @classmethod
    def of(cls, data: dict) -> "OfficialConfig":
        """Check a config read from JSON; ``PlanError`` naming the first key at fault."""
        if not isinstance(data, dict):
            raise PlanError(f"an official config must be a JSON object, got {type(data).__name__}")
        unknown = [k for k in data if k not in OFFICIAL_KEYS]
        if unknown:
            raise PlanError(f"official config key {unknown[0]!r} is not known (the official keys are {', '.join(OFFICIAL_KEYS)})")
        out: dict = {}
        for key in LIST_KEYS:
            if key not in data:
                continue
            idx = data[key]
            if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idx):
                raise PlanError(f"official config key {key!r} must be a list of integers (layer indices or ordinals, >= 0)")
            if len(set(idx)) != len(idx):
                raise PlanError(f"official config key {key!r} lists an index twice")
            out[key] = list(idx)
        if WIDTH_KEY in data:
            widths = data[WIDTH_KEY]
            if not isinstance(widths, dict):
                raise PlanError(f"official config key {WIDTH_KEY!r} must map MLP ordinals to remaining widths")
            out[WIDTH_KEY] = {}
            for k, w in widths.items():
                try:
                    ordinal = int(k)
                except (TypeError, ValueError):
                    raise PlanError(f"{WIDTH_KEY}: key {k!r} is not an MLP ordinal") from None
                if not isinstance(w, int) or isinstance(w, bool) or w <= 0 or ordinal < 0:
                    raise PlanError(f"{WIDTH_KEY}[{k!r}]: the remaining width must be a positive integer, got {w!r}")
                out[WIDTH_KEY][ordinal] = w
        return cls(out)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.keys)

    def plan_for(self, adapter) -> PruningPlan:
        """Our plan (components, this model's identity) for this config on ``adapter``'s model."""
        config = self.keys
        family = _family(adapter)
        for key in HYMBA_KEYS:
            if config.get(key) and key not in adapter.official_keys:
                raise PlanError(f"official config key {key!r} is for Hymba models; {family} has no Hymba blocks "
                                "(they apply to HymbaForCausalLM)")
        comps: list[Component] = []
        for key in ("pruned_mamba_block_idx", "pruned_ssm_idx", "pruned_mha_idx", "pruned_mlp_idx") + HYMBA_KEYS:
            idx = config.get(key) or []
            if not idx:
                continue
            kind = adapter.official_keys.get(key)
            if kind is None or kind not in adapter.kinds:
                raise PlanError(f"official config key {key!r} does not apply to {family} (it has no such component)")
            if key in ORDINAL_KEYS:
                offered = adapter.components(kind)
                for i in idx:
                    if i >= len(offered):
                        raise PlanError(f"official config ({key}): {kind} #{i} does not exist (the model has {len(offered)})")
                comps += [offered[i] for i in idx]
            else:
                for i in idx:
                    if i >= adapter.num_layers:
                        raise PlanError(f"official config: {key} names layer {i}, but {family} has layers "
                                        f"0..{adapter.num_layers - 1}")
                comps += [Component(kind, i) for i in idx]
        group_sizes = {}
        widths = config.get(WIDTH_KEY) or {}
        narrowed = {o: w for o, w in widths.items() if w != _mlp_full_width(adapter, o)}
        if narrowed:
            comps += _width_components(adapter, narrowed, family)
            group_sizes["mlp_channel_group"] = adapter.group_sizes["mlp_channel_group"]
        meta = {"source": "official Mamba-Shedder config"}
        return PruningPlan(frozenset(comps), adapter.identity(), group_sizes, meta)




def _family(adapter) -> str:
    return type(adapter.model).__name__


def _mlps(adapter) -> list[int]:
    """Layers of the MLPs the official ordinals count, in order."""
    return [c.layer for c in adapter.components("mlp")]


def _mlp_full_width(adapter, ordinal: int) -> int | None:
    mlps = _mlps(adapter)
    if not 0 <= ordinal < len(mlps):
        raise PlanError(f"official config: {WIDTH_KEY} names MLP #{ordinal}, but {_family(adapter)} has {len(mlps)}")
    return adapter.official_mlp_width(mlps[ordinal])


def _width_components(adapter, narrowed: dict[int, int], family: str) -> list[Component]:
    """``mlp_channel_group`` components removing every channel past each remaining width."""
    if "mlp_channel_group" not in adapter.kinds:
        raise PlanError(f"official config: {WIDTH_KEY} narrows MLP #{min(narrowed)}, but {family} has no per-layer "
                        "MLP channels to remove (its MLP weights are shared between layers)")
    size = adapter.group_sizes["mlp_channel_group"]
    comps = []
    mlps = _mlps(adapter)
    for ordinal, width in sorted(narrowed.items()):
        layer = mlps[ordinal]
        full = adapter.official_mlp_width(layer)
        if width > full:
            raise PlanError(f"official config: MLP #{ordinal} (layer {layer}) has {full} channels, not {width}")
        if width % size:
            raise PlanError(f"official config: MLP #{ordinal} keeps {width} channels, not a whole number of "
                            f"{size}-channel groups (load the plan with a group size dividing {width})")
        groups = math.ceil(full / size)
        comps += [Component("mlp_channel_group", layer, g) for g in range(width // size, groups)]
    return comps


# ---------------------------------------------------------------------------------------- plan files
# Every caller that reads ``--plan`` (the CLI, the app's upload, the benchmarks) goes through
# ``read_plan``: our file (it has a ``schema_version``) becomes a ``PruningPlan``, an official config
# (only ``pruned_*`` keys) an ``OfficialConfig``; anything else is refused naming both formats.
def read_plan(source: str | Path | bytes) -> PruningPlan | OfficialConfig:
    """The plan in a file named by ``source`` (text or a ``Path``), or in the file's content when
    ``source`` is ``bytes`` (an upload). ``PlanError`` naming the file and what is wrong."""
    if isinstance(source, bytes):
        return plan_from_json(source.decode("utf-8", errors="replace"))
    text = read_text(source)
    try:
        return plan_from_json(text)
    except PlanError as e:
        raise PlanError(f"{Path(source)}: {e}") from None


def plan_from_json(text: str) -> PruningPlan | OfficialConfig:
    """The plan a plan file's text holds (ours or official)."""
    return plan_from_dict(parse_json(text))


def plan_from_dict(data) -> PruningPlan | OfficialConfig:
    if isinstance(data, dict) and "schema_version" not in data:
        if any(k in data for k in OFFICIAL_KEYS):
            return OfficialConfig.of(data)
        raise PlanError("not a pruning plan: no 'schema_version' and none of the official keys "
                        f"({', '.join(OFFICIAL_KEYS)})")
    return PruningPlan.from_dict(data)


# ---------------------------------------------------------------------------------------- configs out
def to_official(adapter, plan: PruningPlan, order: list[Component] | None = None) -> dict:
    """The official config for a plan on ``adapter``'s model (every key this family maps, lists in
    removal ``order`` when given, else by layer). ``PlanError`` for a kind without an official
    counterpart, or MLP channels that are not the trailing ones."""
    plan = adapter.resolve(plan)
    family = _family(adapter)
    rank = {c: i for i, c in enumerate(order or [])}
    comps = sorted(plan.components, key=lambda c: (rank.get(c, len(rank)), c.layer, c.index))
    key_of = _keys_of_kinds(adapter)
    out: dict = {key: [] for key in LIST_KEYS if key in adapter.official_keys.keys() and
                 adapter.official_keys[key] in adapter.kinds}
    mlps = _mlps(adapter)
    for c in comps:
        if c.kind == "mlp_channel_group":
            continue
        c = adapter.same_removal_as_official(c)
        key = key_of.get(c.kind)
        if key is None:
            raise PlanError(f"{c}: {_no_counterpart(c.kind, family)}")
        if key in ORDINAL_KEYS:
            out[key].append([x.layer for x in adapter.components(c.kind)].index(c.layer))
        else:
            out[key].append(c.layer)
    groups = plan.of_kind("mlp_channel_group")
    if groups:
        size = plan.group_sizes.get("mlp_channel_group", adapter.group_sizes["mlp_channel_group"])
        widths = {}
        for ordinal, layer in enumerate(mlps):
            full = adapter.official_mlp_width(layer)
            gone = sorted(c.index for c in groups if c.layer == layer)
            first = gone[0] if gone else math.ceil(full / size)
            if gone != list(range(first, math.ceil(full / size))):
                raise PlanError(f"layer {layer}: the official format keeps the first channels of an MLP, but the "
                                f"plan removes groups {gone} of {math.ceil(full / size)} (not the trailing ones)")
            widths[str(ordinal)] = min(full, first * size)
        out[WIDTH_KEY] = widths
    return out


def check_official_kinds(adapter, kinds) -> None:
    """``PlanError`` when removals of one of ``kinds`` (those this model offers) cannot be written
    in the official config format: ``search --official-layout`` checks this before any work, so an
    impossible layout is refused at once instead of after the whole search."""
    key_of = _keys_of_kinds(adapter)
    family = _family(adapter)
    for kind in dict.fromkeys(kinds):
        if kind == "mlp_channel_group" or kind not in adapter.kinds:  # widths: checked per plan; unknown: elsewhere
            continue
        if any(adapter.same_removal_as_official(c).kind not in key_of for c in adapter.components(kind)):
            raise PlanError(f"--official-layout: {_no_counterpart(kind, family)}; search other kinds, or "
                            "leave out --official-layout")


def _keys_of_kinds(adapter) -> dict[str, str]:
    """Our kind -> the official list key recording its removals, for the kinds this family offers."""
    return {kind: key for key, kind in adapter.official_keys.items() if kind in adapter.kinds}


def _no_counterpart(kind: str, family: str) -> str:
    return f"{kind!r} on {family} has no counterpart in the official config format"


def target_name(adapter, kinds: list[str]) -> str:
    """The ``{target}`` of ``config.{target}.{step}.json`` for a search over ``kinds``."""
    keys = [key for key, kind in adapter.official_keys.items() if kind in kinds and key in TARGET_NAMES]
    if "mlp_channel_group" in kinds:
        keys.append(WIDTH_KEY)
    if len(keys) == 1:
        return TARGET_NAMES[keys[0]]
    return "block_pruning" if keys else "_".join(kinds)


# ---------------------------------------------------------------------------------------- run directories
CONFIG_DIR = "pruned_model_configs"
OFFICIAL_LOG = "log.json"
FINAL_CONFIG = "pruning_config.json"


def write_official_run(adapter, run_dir: str | Path, steps, kinds: list[str], args: dict) -> list[Path]:
    """Write the official layout for a finished (or partial) search of ours into ``run_dir``:
    one config per step (official steps count from 0), ``log.json`` and the final
    ``pruning_config.json``. Every file goes through a temporary name. Returns the paths written."""
    check_official_kinds(adapter, kinds)
    run_dir = Path(run_dir)
    target = target_name(adapter, kinds)
    order = [s.component for s in steps]
    written, results = [], []
    for k, s in enumerate(steps):
        config = to_official(adapter, s.plan, order)
        path = run_dir / CONFIG_DIR / f"config.{target}.{k}.json"
        write_json(path, config)
        written.append(path)
        results.append({"step": k, _target_field(adapter): target, "importance": s.ppl,
                        "config_save_to": str(path)})
    log = {"args": args, "total_params": adapter.param_count(), "pruning_results": results}
    write_json(run_dir / OFFICIAL_LOG, log)
    written.append(run_dir / OFFICIAL_LOG)
    if steps:
        write_json(run_dir / FINAL_CONFIG, to_official(adapter, steps[-1].plan, order))
        written.append(run_dir / FINAL_CONFIG)
    return written


def _target_field(adapter) -> str:
    """``prune_target`` in the Mamba script's log, ``pruning_target`` in the hybrid scripts'."""
    return "pruning_target" if any(k in adapter.kinds for k in ("attention", "mlp")) else "prune_target"


def write_json(path: Path, data) -> None:
    """An official JSON file (4-space indent, as the official scripts write them), atomically."""
    atomic_write_text(path, json.dumps(data, indent=4, default=str))


def read_official_run(run_dir: str | Path) -> list[tuple[dict, float, Path]]:
    """``(config, importance, config path)`` for every step of an official run, in step order."""
    if not str(run_dir).strip():
        raise ShedderError("no official run directory given (the name is empty)")
    run_dir = Path(run_dir)
    log_path = run_dir / OFFICIAL_LOG
    if not log_path.is_file():
        raise ShedderError(f"{run_dir} is not an official Mamba-Shedder run: {OFFICIAL_LOG} not found")
    log = _read_json(log_path)
    results = log.get("pruning_results") if isinstance(log, dict) else None
    if not isinstance(results, list) or not results:
        raise ShedderError(f"{log_path} has no 'pruning_results' (the run recorded no step)")
    out = []
    for expected, r in enumerate(sorted(results, key=lambda r: r.get("step", -1) if isinstance(r, dict) else -1)):
        if not isinstance(r, dict) or r.get("step") != expected or not isinstance(r.get("importance"), (int, float)):
            raise ShedderError(f"{log_path}: pruning_results must hold steps 0, 1, ... with an 'importance'; "
                               f"entry for step {expected} is {r!r}")
        # config_save_to is a path on the machine that ran the search: look next to the log instead
        path = run_dir / CONFIG_DIR / Path(str(r.get("config_save_to", ""))).name
        if not path.is_file():
            raise ShedderError(f"{log_path}: the config of step {expected} ({path.name}) is not in {run_dir / CONFIG_DIR}")
        config = _read_json(path)
        if not isinstance(config, dict):
            raise PlanError(f"{path}: an official config must be a JSON object")
        out.append((config, float(r["importance"]), path))
    return out


def _read_json(path: Path):
    """The JSON in ``path``, or one ShedderError naming the file and where it is broken."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ShedderError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except UnicodeDecodeError:
        raise ShedderError(f"{path} is not valid JSON: it is not UTF-8 text") from None
    except RecursionError:
        raise ShedderError(f"{path} is not valid JSON that can be read: it is nested too deeply") from None
    except ValueError:  # Python's limit on converting long digit strings to int
        raise ShedderError(f"{path} holds a number too long to read (more than {sys.get_int_max_str_digits()} "
                           "digits)") from None


def import_run(model, official_dir: str | Path, out_dir: str | Path):
    """Turn an official run into a run directory of ours (``log.jsonl`` + ``step_XX/pruning_config.json``),
    one step per official step, its perplexity the official importance. Returns the ``SearchStep`` list.

    The official log does not record the calibration text, so the header's ``data`` says where the
    run came from and the unpruned perplexity is unknown (``None``): resuming such a run with our
    data is refused as a change of settings."""
    adapter = adapter_for(model)
    claim_import_dir(out_dir, model, official_dir)  # a new (or empty) directory only
    out = RunLog(out_dir)
    steps, previous = [], adapter.resolve(PruningPlan())
    records = read_official_run(official_dir)
    plans = []
    for config, ppl, path in records:
        try:
            plan = adapter.resolve(OfficialConfig.of(config))
        except PlanError as e:
            raise PlanError(f"{path.name}: {e}") from None
        added = sorted(plan.components - previous.components)
        if len(added) != 1 or not previous.components <= plan.components:
            raise ShedderError(f"{path.name}: an official step must add exactly one component to the previous "
                               f"step's config; this one adds {len(added)} and removes "
                               f"{len(previous.components - plan.components)}")
        plans.append((added[0], plan, ppl))
        previous = plan
    kinds = list(dict.fromkeys(c.kind for c, _, _ in plans))
    source = str(Path(official_dir).resolve())
    settings = run_settings(adapter, model_fingerprint(model), f"official run {source}", None, kinds,
                            plan_key(adapter.resolve(PruningPlan())))
    out.start(settings, {}, None, adapter.param_count(), imported_from=source)
    for k, (comp, plan, ppl) in enumerate(plans, 1):
        step = search_step(k, comp, plan, ppl, adapter.param_count(plan), settings)
        out.add_step(step)
        steps.append(step)
    return steps
