"""Recovery after pruning: LoRA, full fine-tuning, or distillation from the unpruned model.

    result = recover(student, tokenizer, RecoverConfig(method="distill", steps=200), "runs/rec",
                     teacher=original, plan=plan)

What is trained (the student):

* The student is always a separate model: the *extracted* pruned model (``student_for``), or a
  pruned checkpoint loaded from disk. A masked view would share its weights with the original, so
  training it would also change the teacher and the unpruned baseline; the extracted student is
  smaller than the original, so teacher + student stay below two full copies.
* ``lora``: low-rank factors ``A [r, in]``, ``B [out, r]`` on the chosen linear layers (per-family
  defaults in each adapter's ``lora_targets``, overridable), merged into the weights at the end, so
  the saved result is an ordinary checkpoint. The factors are a ``torch.nn.utils.parametrize`` parametrization of the
  weight itself (``weight = W + alpha/r · B @ A``): every read of ``layer.weight`` sees them, the
  stock forward as well as our pruned mixers and live masks, which call ``F.linear(x,
  mixer.in_proj.weight)`` directly. (``peft`` wraps the module instead, so those direct reads would
  skip the adapter and nothing would train, and it refuses ``out_proj`` for Mamba-family model types;
  the tests prove the factors change and held-out loss falls on every kind of mixer.)
* ``full``: every parameter of the pruned model.
* ``distill``: every parameter of the pruned model, trained to match the unpruned teacher's
  next-token distribution: ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` per token, plus
  ``lm_weight`` × the next-token cross-entropy. The teacher runs in the same process without grad.

Data: random windows of ``seq_len`` tokens drawn from the training text with a seeded generator
(``RecoverConfig.data``: any source ``shedder.measure.data`` reads; the default is the shipped training
sample, never the test split, and training on the evaluation text is refused). ``template="alpaca"``
formats instruction records (``instruction``/``input``/``output``) with the Alpaca prompt.

Runs are resumable exactly: every ``checkpoint_every`` steps, and when stopped (``Cancelled``,
Ctrl-C), the run directory receives a checkpoint in which nothing is a pickle: the trained tensors,
the optimizer's state tensors and the sampling generator's state in ``checkpoint-<hash>.safetensors``,
the step (the learning rate is a function of the step), the recipe and the numbers so far in
``checkpoint.json``, which names the tensor file by hash and is renamed into place last.
``resume=True`` continues from it after checking every field, tensor name and shape, and refuses
other settings; the pickle ``checkpoint.pt`` of earlier versions is refused, never read.
``RUN_DIR/log.jsonl`` records the recipe, the loss curve and the held-out numbers; at the end the
recovered model is saved into ``RUN_DIR`` with a model card, and the checkpoint is removed. One
process writes a run directory at a time (its lock, ``fileio.exclusive``, is held for the whole run).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from shedder.arch import adapter_for, count_parameters
from shedder.measure.data import load_records, load_text, tokenize, windows_from
from shedder.core.errors import Cancelled, DataError, ShedderError
from shedder.core.fileio import (RUN_LOCK, RUN_MARKER, atomic_write_text, check_place, claim_run_dir, drop_torn_tail, exclusive,
                     model_dirs, temp_path)
from shedder.core.progress import Progress
from shedder.measure.metrics import describe_protocol, perplexity


METHODS = ("lora", "full", "distill")
SCHEDULES = ("cosine", "linear", "constant")
TEMPLATES = (None, "alpaca")
#: Learning rates that recovered the most per token on the bundled models (``bench recover``).
DEFAULT_LR = {"lora": 2e-3, "full": 5e-4, "distill": 5e-4}
#: An interrupted run's state (JSON), naming its tensor file (safetensors) by hash; see "checkpoints".
CHECKPOINT = "checkpoint.json"
TENSORS = "checkpoint-{digest}.safetensors"
#: The pickle checkpoint of earlier versions: refused, never read (unpickling can run any code).
LEGACY_CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
CARD_JSON = "recovery.json"
SCHEMA_VERSION = 2  # of checkpoint.json (1 was the pickle format)

ALPACA_PROMPT = ("Below is an instruction that describes a task{paired}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n{output}")


@dataclass(frozen=True)
class RecoverConfig:
    """The recipe. ``steps`` or ``tokens`` sets the budget (tokens are rounded up to whole steps)."""

    method: str = "lora"
    data: str = "train"
    template: str | None = None
    steps: int | None = None
    tokens: int | None = None
    batch_size: int = 8
    seq_len: int = 256
    lr: float | None = None             # default: DEFAULT_LR[method]
    schedule: str = "cosine"            # warm-up, then cosine to 10 % / linear to 0 / constant
    warmup: float = 0.05                # fraction of the steps
    seed: int = 0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] | None = None   # default: the family adapter's lora_targets
    temperature: float = 2.0
    lm_weight: float = 0.0              # distill: weight of the plain next-token loss
    eval_data: str = "test"
    eval_samples: int | None = 64       # held-out windows before and after (None: the whole split)
    checkpoint_every: int = 50
    tasks: tuple[str, ...] = ()          # lm-eval tasks before and after (needs shedder.measure.downstream)

    def __post_init__(self):
        """Refuse a recipe a user can get wrong (a CLI flag, an app field) with one message naming the
        option and what it allows, before anything is loaded or written."""
        if self.method not in METHODS:
            raise ShedderError(f"unknown recovery method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.schedule not in SCHEDULES:
            raise ShedderError(f"unknown lr schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.template not in TEMPLATES:
            raise ShedderError(f"unknown template {self.template!r}; the only template is 'alpaca'")
        for name in ("steps", "tokens", "batch_size", "lora_rank", "checkpoint_every", "eval_samples"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ShedderError(f"{_flag(name)} must be a whole number of at least 1, got {value!r}")
        if not _is_int(self.seq_len) or self.seq_len < 2:
            raise ShedderError(f"--seq-len must be a whole number of at least 2, got {self.seq_len!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2 ** 63:
            raise ShedderError(f"--seed must be a whole number in [0, 2**63), got {self.seed!r}")
        # beyond 1 an AdamW step outgrows any weight (and past float32's range the optimizer fails)
        _check_number("lr", self.lr, "a positive number at most 1", lambda v: 0 < v <= 1, optional=True)
        _check_number("warmup", self.warmup, "a fraction of the steps in [0, 1)", lambda v: 0 <= v < 1)
        _check_number("lora_alpha", self.lora_alpha, "a positive number", lambda v: v > 0)
        _check_number("temperature", self.temperature, "a positive number", lambda v: v > 0)
        _check_number("lm_weight", self.lm_weight, "a number of at least 0", lambda v: v >= 0)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return math.ceil(self.tokens / (self.batch_size * self.seq_len))
        return 100

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warm-up, then the schedule."""
        total, peak = self.total_steps, self.learning_rate
        warmup = max(1, round(self.warmup * total)) if self.warmup > 0 else 0
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if self.schedule == "cosine":
            return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        if self.schedule == "linear":
            return peak * (1 - progress)
        return peak

    def describe(self) -> str:
        return (f"{self.method}, {self.total_steps} steps × {self.batch_size} windows × {self.seq_len} tokens of "
                f"{self.data!r}{' (alpaca template)' if self.template else ''}, lr {self.learning_rate:g} "
                f"({self.schedule})")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(name: str, value, allowed: str, ok, optional: bool = False) -> None:
    """``value`` must be a finite real number for which ``ok`` holds (NaN and infinity never pass)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ShedderError(f"{_flag(name)} must be {allowed}, got {value!r}")


@dataclass
class RecoverResult:
    run_dir: Path
    config: RecoverConfig
    steps: int
    tokens: int
    seconds: float
    ppl: dict = field(default_factory=dict)     # {"unpruned", "pruned", "recovered"} held-out perplexity
    protocol: str = ""
    trained_params: int = 0
    resumed_from: int = 0
    tasks: dict = field(default_factory=dict)

    @property
    def recovered_fraction(self) -> float | None:
        """Share of the perplexity lost to pruning that recovery won back (log scale: of the NLL)."""
        p = self.ppl
        if not all(k in p for k in ("unpruned", "pruned", "recovered")):
            return None
        lost = math.log(p["pruned"]) - math.log(p["unpruned"])
        return (math.log(p["pruned"]) - math.log(p["recovered"])) / lost if lost > 0 else None

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "recipe": asdict(self.config), "steps": self.steps,
                "tokens": self.tokens, "seconds": round(self.seconds, 2), "ppl": self.ppl, "protocol": self.protocol,
                "recovered_fraction": self.recovered_fraction, "trained_params": self.trained_params,
                "resumed_from": self.resumed_from, "tasks": self.tasks}


# --------------------------------------------------------------------------------------- student
def student_for(model, plan, adapter=None) -> nn.Module:
    """The model recovery trains: the extracted pruned model, a separate copy (``model`` is left as
    it is, to serve as the teacher and the unpruned baseline). ``model`` itself when nothing is removed."""
    if plan is None or not plan.components:
        return model
    adapter = adapter or adapter_for(model, plan.group_sizes)
    return adapter.extract(plan)


class LoraDelta(nn.Module):
    """``weight -> weight + scale · B @ A`` (``A [r, in]``, ``B [out, r]``, B starting at zero, so the
    model starts exactly as pruned); registered as a parametrization, it applies to every read."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        out_features, in_features = weight.shape
        a = torch.empty(rank, in_features, dtype=weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # peft's / LoRA paper's init
        self.A = nn.Parameter(a.to(weight.device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A)


def lora_targets(model, names: tuple[str, ...] | None = None) -> list[str]:
    """Names of the linear modules LoRA adapts: those whose last name part is in ``names`` (default:
    the family adapter's ``lora_targets``); the LM head and embeddings never."""
    names = tuple(names or adapter_for(model).lora_targets)
    found = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names and "lm_head" not in n]
    if not found:
        raise ShedderError(f"no linear layer of this {model.config.model_type} model is named "
                           f"{', '.join(names)}; pick LoRA targets among: {', '.join(_linear_names(model))}")
    return found


def _linear_names(model) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def add_lora(model, rank: int, alpha: float, targets: tuple[str, ...] | None = None, seed: int = 0) -> dict[str, LoraDelta]:
    """Freeze ``model`` and attach LoRA factors to its target layers; returns them by layer name."""
    gen = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    deltas = {}
    for name in lora_targets(model, targets):
        linear = model.get_submodule(name)
        delta = LoraDelta(linear.weight, rank, alpha, gen)
        parametrize.register_parametrization(linear, "weight", delta)
        deltas[name] = delta
    return deltas


def merge_lora(model) -> int:
    """Fold every LoRA factor pair into its weight and remove the parametrizations; returns how many."""
    merged = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, LoraDelta) for p in module.parametrizations["weight"]):
            with torch.no_grad():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            merged += 1
    return merged


def _trainable(model, config: RecoverConfig) -> dict[str, nn.Parameter]:
    """The tensors the method trains, by name (LoRA: the factors; otherwise every kept parameter)."""
    if config.method == "lora":
        add_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets, config.seed)
        return {n: p for n, p in model.named_parameters() if ".parametrizations.weight.0." in n}
    model.requires_grad_(True)
    return dict(model.named_parameters())


# --------------------------------------------------------------------------------------- data
def format_alpaca(record: dict) -> str:
    """One instruction record in the Alpaca prompt (``input`` optional), response included."""
    try:
        instruction, output = record["instruction"], record["output"]
    except KeyError as e:
        raise DataError(f"the alpaca template needs 'instruction' and 'output' fields; a record lacks {e}") from None
    extra = (record.get("input") or "").strip()
    return ALPACA_PROMPT.format(paired=", paired with an input that provides further context" if extra else "",
                                instruction=instruction, output=output,
                                input_block=f"### Input:\n{extra}\n\n" if extra else "")


def training_ids(tokenizer, config: RecoverConfig) -> torch.Tensor:
    """The training text as one token stream ``[t]``; refuses the evaluation text."""
    if config.template == "alpaca":
        eos = tokenizer.eos_token or ""
        text = "".join(format_alpaca(r) + eos + "\n\n" for r in load_records(config.data))
    else:
        text = load_text(config.data)
    if config.data == config.eval_data or _digest(text) == _digest(load_text(config.eval_data)):
        raise DataError(f"recovery would train on the evaluation text {config.eval_data!r}; "
                        "train on 'train', a file or a datasets split instead")
    ids = torch.tensor(tokenize(tokenizer, text), dtype=torch.long)
    if len(ids) <= config.seq_len:
        raise DataError(f"{config.data!r} has {len(ids)} tokens, fewer than one window of {config.seq_len} + 1")
    return ids


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sample_batch(ids: torch.Tensor, config: RecoverConfig, gen: torch.Generator) -> torch.Tensor:
    """``[batch, seq_len]`` windows at random offsets (the generator's state is the data position)."""
    starts = torch.randint(0, len(ids) - config.seq_len, (config.batch_size,), generator=gen)
    return torch.stack([ids[s: s + config.seq_len] for s in starts.tolist()])


# --------------------------------------------------------------------------------------- losses
def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: ``logits [b, l, v]`` at positions 0..l-2 predict ids 1..l-1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean per-token ``T² · KL(p_teacher,T ‖ p_student,T)`` (the T² keeps gradients comparable across T)."""
    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, 1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def step_loss(student, teacher, batch: torch.Tensor, config: RecoverConfig) -> torch.Tensor:
    logits = student(input_ids=batch, use_cache=False).logits
    if config.method != "distill":
        return lm_loss(logits, batch)
    with torch.no_grad():
        target = teacher(input_ids=batch, use_cache=False).logits
    loss = distill_loss(logits, target, config.temperature)
    return loss + config.lm_weight * lm_loss(logits, batch) if config.lm_weight else loss


# --------------------------------------------------------------------------------------- run files
def _log(run_dir: Path, entry: dict) -> None:
    with open(run_dir / LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, default=str) + "\n")


def _rewind_log(run_dir: Path, step: int) -> None:
    """Before resuming from ``step``: cut a line a kill left torn, and the step entries after
    ``step`` (a kill came after them but before the next checkpoint; those steps are redone), so the
    log holds each step once."""
    log = run_dir / LOG
    if not log.is_file():
        return
    drop_torn_tail(log)
    lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if not _step_after(line, step)]
    if kept != lines:
        atomic_write_text(log, "".join(kept))


def _step_after(line: str, step: int) -> bool:
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    return isinstance(entry, dict) and entry.get("event") == "step" and _is_int(entry.get("step")) \
        and entry["step"] > step


def _fingerprint(config: RecoverConfig, student) -> dict:
    """What must match to resume: the recipe (minus how often to checkpoint) and the student's shape,
    as JSON gives it back (tuples become lists)."""
    recipe = asdict(replace(config, checkpoint_every=1))
    shapes = {n: list(p.shape) for n, p in student.state_dict().items()}
    fingerprint = {"recipe": recipe,
                   "student": hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]}
    return json.loads(json.dumps(fingerprint, default=str))


def resumable(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds an interrupted run's checkpoint (``resume=True`` continues it)."""
    return (Path(run_dir) / CHECKPOINT).is_file()


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    """What the run directory allows, read-only: an old pickle checkpoint is refused (never read),
    resuming needs a checkpoint, and a new run needs a directory holding nothing yet."""
    if (run_dir / LEGACY_CHECKPOINT).is_file():
        raise ShedderError(f"{run_dir} holds a checkpoint in the old pickle format ({LEGACY_CHECKPOINT}), which is "
                           "not read for safety; start a new run in another directory")
    if resume and not resumable(run_dir):
        raise ShedderError(f"nothing to resume in {run_dir}: no {CHECKPOINT} (the run finished or never started)")
    if not resume and resumable(run_dir):
        raise ShedderError(f"{run_dir} holds an interrupted recovery; add --resume to continue it, "
                           "or choose another --out")
    if not resume and run_dir.is_dir() and any(p.name not in (RUN_MARKER, RUN_LOCK) for p in run_dir.iterdir()):
        raise ShedderError(f"{run_dir} is not empty; choose a new directory for the recovered model")


# --------------------------------------------------------------------------------------- checkpoints
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


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run_state(trainable: dict, opt, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], list]:
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


def _write_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Tensors into a new file named by its hash, then the JSON naming it, then older tensor files go."""
    tmp = temp_path(run_dir / "checkpoint.safetensors")
    try:
        save_file(tensors, str(tmp))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())  # on disk before the JSON that names it
        digest = _file_sha256(tmp)
        name = TENSORS.format(digest=digest[:16])
        tmp.replace(run_dir / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_text(run_dir / CHECKPOINT, json.dumps({**meta, "tensors": name, "sha256": digest}, default=str) + "\n")
    for old in run_dir.glob(TENSORS.format(digest="*")):
        if old.name != name:
            old.unlink(missing_ok=True)


def _remove_checkpoint(run_dir: Path) -> None:
    """Delete the checkpoint, the JSON first (never a checkpoint naming a missing file), and the
    temporary files of checkpoints a kill interrupted (this run holds the lock: nobody else writes them)."""
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    for path in [*run_dir.glob(TENSORS.format(digest="*")), *run_dir.glob(".checkpoint*.tmp")]:
        path.unlink(missing_ok=True)


def _read_checkpoint(run_dir: Path, fingerprint: dict) -> tuple[dict, dict[str, torch.Tensor]]:
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
        if _file_sha256(path) != meta["sha256"]:
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
    if not _is_int(version) or version != SCHEMA_VERSION:
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


def _restore(run_dir: Path, meta: dict, tensors: dict[str, torch.Tensor], trainable: dict, opt, gen,
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


# --------------------------------------------------------------------------------------- the run
def recover(student, tokenizer, config: RecoverConfig, run_dir: str | Path, teacher=None, plan=None,
            source: str = "", progress: Progress | None = None, resume: bool = False) -> RecoverResult:
    """Train ``student`` (see ``student_for``) with ``config``; save the recovered model into ``run_dir``.

    ``teacher`` is the unpruned model: required for ``distill``, and when given its held-out
    perplexity is reported as the unpruned baseline. ``plan`` (the pruning plan the student was made
    with) is saved alongside the model. ``progress(done, total, message)`` may raise ``Cancelled``:
    the step that just finished is checkpointed first, so ``resume=True`` continues exactly.

    One writer per run directory: the run holds its lock from before the first read of the
    directory to the saved model. Another process is refused at once (``Busy``), before anything is
    loaded, measured or written; another thread of this process (an app session) waits, shown
    through ``progress``, which may cancel the wait.
    """
    protected = model_dirs(student, teacher)
    run_dir = check_place(run_dir, protected, "recovery run directory")  # never the working or a model's directory
    if config.method == "distill" and teacher is None:
        raise ShedderError("distillation needs the unpruned model as teacher (--teacher, or --model with --plan)")
    _check_teacher(student, teacher)
    _check_run_dir(run_dir, resume)  # read-only: a plain mistake creates nothing
    claim_run_dir(run_dir, protected, "recovery run", legacy=(LEGACY_CHECKPOINT,))
    with exclusive(run_dir / RUN_LOCK, f"the recovery run {run_dir}", progress):
        _check_run_dir(run_dir, resume)  # again: another writer may have finished or started meanwhile
        return _run(student, tokenizer, config, run_dir, teacher, plan, source, progress, resume)


def _check_teacher(student, teacher) -> None:
    """The teacher must read the student's tokens and predict over the same vocabulary (its
    perplexity is the baseline, and distillation compares the two distributions token by token)."""
    if teacher is None:
        return
    ours, theirs = student.get_input_embeddings().num_embeddings, teacher.get_input_embeddings().num_embeddings
    if ours != theirs:
        raise ShedderError(f"the teacher's vocabulary has {theirs} tokens, the student's {ours}; the teacher must be "
                           "the unpruned model the student was pruned from (same tokenizer and vocabulary)")


def _run(student, tokenizer, config: RecoverConfig, run_dir: Path, teacher, plan, source: str,
         progress: Progress | None, resume: bool) -> RecoverResult:
    """The recovery itself, under the run directory's lock."""
    device = next(student.parameters()).device
    train_ids = training_ids(tokenizer, config)
    eval_windows = windows_from(tokenizer, config.eval_data, samples=config.eval_samples, seq_len=config.seq_len)
    fingerprint = _fingerprint(config, student)
    checkpoint = _read_checkpoint(run_dir, fingerprint) if resume else None

    if checkpoint is None:
        ppl = {"pruned": perplexity(student, eval_windows)}
        if teacher is not None:
            ppl = {"unpruned": perplexity(teacher, eval_windows), **ppl}
        tasks = {"before": _downstream(student, tokenizer, config.tasks)} if config.tasks else {}
        _log(run_dir, {"event": "start", "recipe": asdict(config), "source": source,
                       "protocol": describe_protocol(eval_windows, config.eval_data), "ppl": ppl,
                       "plan": plan.to_dict() if plan is not None else None})
    else:
        ppl, tasks = checkpoint[0]["ppl"], checkpoint[0]["tasks"]

    trainable = _trainable(student, config)
    opt = torch.optim.AdamW(list(trainable.values()), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    start_step, elapsed = 0, 0.0
    if checkpoint is not None:
        meta, tensors = checkpoint
        _restore(run_dir, meta, tensors, trainable, opt, gen, config.total_steps)
        start_step, elapsed = meta["step"], meta["seconds"]
        _rewind_log(run_dir, start_step)
        _log(run_dir, {"event": "resume", "step": start_step})

    def save_checkpoint(step: int, seconds: float) -> None:
        tensors, groups = _run_state(trainable, opt, gen)
        _write_checkpoint(run_dir, tensors, {"schema_version": SCHEMA_VERSION, "fingerprint": fingerprint,
                                             "step": step, "seconds": seconds, "ppl": ppl, "tasks": tasks,
                                             "param_groups": groups})

    if teacher is not None:
        teacher.eval()
    student.train()
    total, tokens_per_step = config.total_steps, config.batch_size * config.seq_len
    started, running, completed, step = time.perf_counter(), None, start_step, start_step
    try:
        for step in range(start_step, total):
            position = gen.get_state()  # the data position before this step's batch
            for group in opt.param_groups:
                group["lr"] = config.lr_at(step)
            batch = sample_batch(train_ids, config, gen).to(device)
            with parametrize.cached():
                loss = step_loss(student, teacher, batch, config)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
            opt.step()
            value = loss.item()
            if not math.isfinite(value):
                raise ShedderError(f"the loss diverged at step {step + 1} ({value}); lower the learning rate")
            running = value if running is None else 0.9 * running + 0.1 * value
            completed = step + 1
            seconds = elapsed + time.perf_counter() - started
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < total:
                save_checkpoint(step + 1, seconds)
            if (step + 1) % 10 == 0 or step + 1 == total:
                _log(run_dir, {"event": "step", "step": step + 1, "loss": round(running, 4),
                               "lr": config.lr_at(step), "tokens": (step + 1) * tokens_per_step, "s": round(seconds, 1)})
            if progress:
                progress(step + 1, total, f"recover: loss {running:.4f}")
    except (Cancelled, KeyboardInterrupt):
        if completed <= step:
            gen.set_state(position)  # stopped inside a step: it is redone on resume
        save_checkpoint(completed, elapsed + time.perf_counter() - started)
        _log(run_dir, {"event": "stopped", "step": completed})
        raise
    student.eval()
    seconds = elapsed + time.perf_counter() - started
    if config.method == "lora":
        merge_lora(student)
    student.requires_grad_(False)
    ppl["recovered"] = perplexity(student, eval_windows)
    if config.tasks:
        tasks["after"] = _downstream(student, tokenizer, config.tasks)
    result = RecoverResult(run_dir, config, total, total * tokens_per_step, seconds, ppl,
                           describe_protocol(eval_windows, config.eval_data),
                           sum(p.numel() for p in trainable.values()), start_step, tasks)
    _save(student, tokenizer, result, plan, source)
    _log(run_dir, {"event": "done", **result.to_dict()})
    _remove_checkpoint(run_dir)
    return result


def recovery_run_dir(source: str, plan, config: RecoverConfig, cache_dir: str | Path | None = None) -> Path:
    """A run directory under the cache keyed by model source, plan and recipe: a caller without a
    place of its own (the app) resumes a cancelled run there and finds a finished one."""
    from shedder.prune.importance import default_cache_dir

    # The checkpoint format is part of the key: a run left in the old pickle format (refused, never
    # read) is not reused, so the app starts that recipe afresh instead of being blocked by it.
    key = json.dumps({"source": str(source), "plan": plan.to_dict() if plan is not None else None,
                      "recipe": asdict(config), "checkpoint_schema": SCHEMA_VERSION}, sort_keys=True, default=str)
    return Path(cache_dir or default_cache_dir()) / "recoveries" / hashlib.sha256(key.encode()).hexdigest()[:16]


def finished(run_dir: str | Path) -> dict | None:
    """The summary (``recovery.json``) of a finished run, or None."""
    path = Path(run_dir) / CARD_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def _downstream(model, tokenizer, tasks: tuple[str, ...]) -> dict:
    """lm-eval accuracies (``{task: score, ..., "average": x}``) through ``shedder.measure.downstream``."""
    from shedder.measure import downstream

    return downstream.scores(model, tokenizer, downstream.parse_tasks(",".join(tasks))).summary()


def _save(student, tokenizer, result: RecoverResult, plan, source: str) -> None:
    """Write the recovered model and its card into the run directory (each file renamed into place)."""
    from shedder.formats.extract import save

    run_dir = result.run_dir
    tmp = run_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(student, tokenizer, tmp, plan=plan, card=model_card(result, source, plan, count_parameters(student)))
        (tmp / CARD_JSON).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        for path in tmp.iterdir():
            os.replace(path, run_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_card(result: RecoverResult, source: str, plan, params: int) -> str:
    """README.md of a recovered model: where it came from, the recipe and the numbers before and after."""
    c, p = result.config, result.ppl
    rows = "\n".join(f"| {name} | {p[name]:.3f} |" for name in ("unpruned", "pruned", "recovered") if name in p)
    fraction = result.recovered_fraction
    return f"""# Recovered pruned model

Pruned from `{source or 'the source model'}` with Shedder Studio ({plan.describe() if plan is not None else 'plan not recorded'}),
then recovered by **{c.method}**. Load it with `shedder.formats.loading.load_model("<this directory>")`; when every
layer kept the stock shape, plain `transformers.AutoModelForCausalLM.from_pretrained` works too.

| recipe | |
| --- | --- |
| method | {c.method}{f' (rank {c.lora_rank}, alpha {c.lora_alpha:g}, merged)' if c.method == 'lora' else ''}{f' (temperature {c.temperature:g}, LM loss weight {c.lm_weight:g})' if c.method == 'distill' else ''} |
| data | `{c.data}`{' with the Alpaca template' if c.template else ''} |
| steps, tokens | {result.steps} steps × {c.batch_size} windows × {c.seq_len} tokens = {result.tokens:,} tokens |
| learning rate | {c.learning_rate:g}, {c.schedule} schedule, {c.warmup:.0%} warm-up, AdamW, seed {c.seed} |
| wall time | {result.seconds / 60:.1f} min |
| trained parameters | {result.trained_params:,} (model: {params:,}) |

| held-out perplexity | |
| --- | --- |
{rows}

Recovered {'' if fraction is None else f'{100 * fraction:.0f} % of '}the perplexity lost to pruning
(as a share of the log-perplexity increase). Protocol: {result.protocol}.
Recipe and loss curve: `log.jsonl`, `{CARD_JSON}`.
"""


# --------------------------------------------------------------------------------------- benchmark
#: ``bench recover``: the bundled models and their plans (a quarter of mamba2-tiny's blocks; a plan
#: on hybrid-tiny mixing a block, an SSM, heads, an attention sub-block and MLP channel groups).
BENCH_PLANS = {
    "mamba2-tiny": ["block:4", "block:7"],
    "hybrid-tiny": ["block:7", "ssm:5", "head:2:1", "head:2:6", "attention:8",
                    "mlp_channel_group:4:0", "mlp_channel_group:4:1", "mlp_channel_group:4:2", "mlp_channel_group:4:3"],
}


def compare_methods(methods=METHODS, steps: int = 12, batch_size: int = 8, seq_len: int = 64,
                    eval_samples: int = 32, threads: int | None = 2, progress: Progress | None = None) -> list[dict]:
    """Recover each bundled benchmark model with every method for the same budget, in one run.

    Each method starts from a fresh extraction of the same plan and trains on the same windows (same
    seed); the row reports held-out perplexity unpruned / pruned / recovered and the recovered share.
    """
    import tempfile

    from shedder.formats.loading import load_model
    from shedder.core.plan import Component, PruningPlan

    if threads:
        torch.set_num_threads(threads)
    rows = []
    for name, specs in BENCH_PLANS.items():
        model, tokenizer = load_model(name)
        adapter = adapter_for(model)
        plan = adapter.resolve(PruningPlan(components=[Component.parse(s) for s in specs]))
        for method in methods:
            config = RecoverConfig(method=method, steps=steps, batch_size=batch_size, seq_len=seq_len,
                                   eval_samples=eval_samples, checkpoint_every=steps)
            with tempfile.TemporaryDirectory() as tmp:
                result = recover(student_for(model, plan, adapter), tokenizer, config, Path(tmp) / "run",
                                 teacher=model, plan=plan, source=name, progress=progress)
            rows.append({"model": name, "plan": plan.describe(), "method": method, "lr": config.learning_rate,
                         "tokens": result.tokens, "ppl": result.ppl, "recovered_fraction": result.recovered_fraction,
                         "seconds": round(result.seconds, 1), "trained_params": result.trained_params,
                         "protocol": result.protocol})
    return rows


def format_comparison(rows: list[dict]) -> str:
    """The benchmark as a Markdown table (the README's)."""
    lines = ["| model | method | tokens | unpruned | pruned | recovered | lost perplexity recovered | train time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = r["ppl"]
        share = "n/a" if r["recovered_fraction"] is None else f"{100 * r['recovered_fraction']:.0f} %"
        lines.append(f"| {r['model']} | {r['method']} | {r['tokens']:,} | {p['unpruned']:.2f} | {p['pruned']:.2f} | "
                     f"{p['recovered']:.2f} | {share} | {r['seconds']:.0f} s |")
    plans = {r["model"]: r["plan"] for r in rows}
    lines += [""] + [f"{m}: {plan}" for m, plan in plans.items()]
    if rows:
        lines.append(f"held-out protocol: {rows[0]['protocol']}")
    return "\n".join(lines)
