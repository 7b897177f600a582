"""Checkpoints of a recovery run: exact resumption, and nothing in them is a pickle.

Every ``checkpoint_every`` steps, and when stopped (``Cancelled``, Ctrl-C), the run directory
receives a checkpoint: the trained tensors, the optimizer's state tensors and the sampling
generator's state in ``checkpoint-<hash>.safetensors``; the step (the learning rate is a function of
the step), the recipe and the numbers so far in ``checkpoint.json``, which names the tensor file by
hash and is renamed into place last. Resuming checks every field, tensor name and shape, and refuses
other settings; the pickle ``checkpoint.pt`` of earlier versions is refused, never read.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shedder.core.cache import digest
from shedder.core.errors import ShedderError
from shedder.core.fileio import atomic_write_text, file_sha256, temp_path
from shedder.prune.recover.config import RecoverConfig, is_int

#: An interrupted run's state (JSON), naming its tensor file (safetensors) by hash; see "checkpoints".
CHECKPOINT = "checkpoint.json"
TENSORS = "checkpoint-{digest}.safetensors"
#: The pickle checkpoint of earlier versions: refused, never read (unpickling can run any code).
LEGACY_CHECKPOINT = "checkpoint.pt"
SCHEMA_VERSION = 2  # of checkpoint.json (1 was the pickle format)


def run_fingerprint(config: RecoverConfig, student) -> dict:
    """What must match to resume: the recipe (minus how often to checkpoint) and the student's shape,
    as JSON gives it back (tuples become lists)."""
    recipe = asdict(replace(config, checkpoint_every=1))
    shapes = {n: list(p.shape) for n, p in student.state_dict().items()}
    return json.loads(json.dumps({"recipe": recipe, "student": digest(shapes)}, default=str))


# A checkpoint is two files, neither of them a pickle: ``checkpoint-<hash>.safetensors`` (every
# tensor: the trained ones, the optimizer's per-parameter state, the sampling generator's state) and
# ``checkpoint.json`` (everything else, naming that file and its SHA-256). The tensors are written
# first, the JSON renamed into place last, older tensor files deleted after: a kill at any moment
# leaves a consistent pair. Reading checks the JSON's form, the hash, and every tensor's name and
# shape against the live run before anything is loaded into it.
_META = {"schema_version": int, "fingerprint": dict, "step": int, "seconds": (int, float), "ppl": dict,
         "tasks": dict, "param_groups": list, "tensors": str, "sha256": str}
#: AdamW's per-parameter state: the step count (a scalar) and moments shaped like the parameter.
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def _damaged(run_dir: Path, why: str) -> ShedderError:
    return ShedderError(f"the checkpoint in {run_dir} cannot be resumed: {why}; start a new run in another directory")


def run_state(trainable: dict, opt, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], list]:
    """The run's state split for the checkpoint: every tensor by name (AdamW's per-parameter state
    is all tensors; a plain number there would become a scalar tensor, which AdamW also reads), and
    the optimizer's param groups, plain JSON."""
    tensors = {f"trainable/{n}": p.detach().cpu().contiguous() for n, p in trainable.items()}
    state = opt.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer/{index}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["generator"] = gen.get_state()
    return tensors, state["param_groups"]


def write_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Tensors into a new file named by its hash, then the JSON naming it, then older tensor files go."""
    tmp = temp_path(run_dir / "checkpoint.safetensors")
    try:
        save_file(tensors, str(tmp))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())  # on disk before the JSON that names it
        digest = file_sha256(tmp)
        name = TENSORS.format(digest=digest[:16])
        tmp.replace(run_dir / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_text(run_dir / CHECKPOINT, json.dumps({**meta, "tensors": name, "sha256": digest}, default=str) + "\n")
    for old in run_dir.glob(TENSORS.format(digest="*")):
        if old.name != name:
            old.unlink(missing_ok=True)


def remove_checkpoint(run_dir: Path) -> None:
    """Delete the checkpoint, the JSON first (never a checkpoint naming a missing file), and the
    temporary files of checkpoints a kill interrupted (this run holds the lock: nobody else writes them)."""
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    for path in [*run_dir.glob(TENSORS.format(digest="*")), *run_dir.glob(".checkpoint*.tmp")]:
        path.unlink(missing_ok=True)


def read_checkpoint(run_dir: Path, fingerprint: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checkpoint's JSON and tensors, checked for form (types, schema, the run it belongs to,
    the tensor file's hash); one ShedderError naming what is wrong."""
    try:
        meta = json.loads((run_dir / CHECKPOINT).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # a UnicodeDecodeError is a ValueError
        raise _damaged(run_dir, f"{CHECKPOINT} is not readable JSON ({type(e).__name__})") from None
    _check_meta(run_dir, meta)
    if meta["fingerprint"] != fingerprint:
        raise ShedderError(f"{run_dir} was started with other settings or another model; resume with the same "
                           f"command, or choose another --out (it was: {meta['fingerprint'].get('recipe')})")
    path = run_dir / meta["tensors"]
    try:
        if file_sha256(path) != meta["sha256"]:
            raise _damaged(run_dir, f"{meta['tensors']} is not the file {CHECKPOINT} records (changed or truncated)")
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise _damaged(run_dir, f"its tensor file {meta['tensors']} is missing") from None
    except (OSError, SafetensorError) as e:
        raise _damaged(run_dir, f"{meta['tensors']} is not a readable safetensors file ({e})") from None
    return meta, tensors


def _check_meta(run_dir: Path, meta) -> None:
    if not isinstance(meta, dict):
        raise _damaged(run_dir, f"{CHECKPOINT} is not a JSON object")
    version = meta.get("schema_version")
    if not is_int(version) or version != SCHEMA_VERSION:
        raise _damaged(run_dir, f"schema_version {version!r} is not supported (this version reads {SCHEMA_VERSION})")
    if set(meta) != set(_META):
        odd = sorted(set(meta) ^ set(_META))
        raise _damaged(run_dir, f"{CHECKPOINT} lacks or adds the field(s) {', '.join(map(repr, odd))}")
    for key, kind in _META.items():
        if isinstance(meta[key], bool) or not isinstance(meta[key], kind):
            raise _damaged(run_dir, f"{key!r} has the wrong type ({type(meta[key]).__name__})")
    if meta["step"] < 0 or not math.isfinite(meta["seconds"]) or meta["seconds"] < 0:
        raise _damaged(run_dir, f"step {meta['step']} / seconds {meta['seconds']} are out of range")
    own = TENSORS.format(digest=meta["sha256"][:16])
    if not re.fullmatch(r"[0-9a-f]{64}", meta["sha256"]) or meta["tensors"] != own:
        raise _damaged(run_dir, "it does not name a tensor file of its own (tensors, sha256)")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in meta["ppl"].values()):
        raise _damaged(run_dir, "'ppl' must map names to numbers")


def restore(run_dir: Path, meta: dict, tensors: dict[str, torch.Tensor], trainable: dict, opt, gen,
             total: int) -> None:
    """Load a checked checkpoint into the live run, after checking it fits: the step within the
    run, every tensor's name and shape, the optimizer's param groups."""
    if meta["step"] > total:
        raise _damaged(run_dir, f"it is at step {meta['step']} of a {total}-step run")
    _check_tensors(run_dir, tensors, trainable, opt, gen)
    live = opt.state_dict()
    if _without_lr(meta["param_groups"]) != _without_lr(json.loads(json.dumps(live["param_groups"]))):
        raise _damaged(run_dir, "its optimizer settings are not this run's")
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/")
            state.setdefault(int(index), {})[key] = tensor
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(tensors[f"trainable/{name}"])
    opt.load_state_dict({"state": state, "param_groups": live["param_groups"]})
    gen.set_state(tensors["generator"])


def _without_lr(groups: list) -> list:
    """Param groups less the learning rate (set from the step before every step)."""
    return [{k: v for k, v in g.items() if k != "lr"} if isinstance(g, dict) else g for g in groups]


def _check_tensors(run_dir: Path, tensors: dict[str, torch.Tensor], trainable: dict, opt, gen) -> None:
    """Every tensor the run needs is there with its shape (optimizer state per parameter: all of
    it or none, before a parameter's first update), and nothing else."""
    expected = {f"trainable/{n}": (list(p.shape), p.dtype) for n, p in trainable.items()}
    params = [p for group in opt.param_groups for p in group["params"]]
    optional = {}
    for index, param in enumerate(params):
        for key in _ADAM_STATE:
            optional[f"optimizer/{index}/{key}"] = ([] if key == "step" else list(param.shape), None)
    live_gen = gen.get_state()
    expected["generator"] = (list(live_gen.shape), live_gen.dtype)
    unknown = sorted(set(tensors) - set(expected) - set(optional))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise _damaged(run_dir, f"its tensors are not this run's ({len(missing)} missing, e.g. "
                                f"{(missing or ['-'])[0]}; {len(unknown)} unknown, e.g. {(unknown or ['-'])[0]})")
    for index in range(len(params)):
        present = sum(f"optimizer/{index}/{key}" in tensors for key in _ADAM_STATE)
        if present not in (0, len(_ADAM_STATE)):
            raise _damaged(run_dir, f"the optimizer state of parameter {index} is incomplete")
    for name, tensor in tensors.items():
        shape, dtype = {**expected, **optional}[name]
        if list(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype):
            raise _damaged(run_dir, f"{name} is {tensor.dtype} {list(tensor.shape)}, this run needs "
                                    f"{dtype or 'a tensor'} {shape}")
