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
(``RecoverConfig.data``: any source ``shedder.data`` reads; the default is the shipped training
sample, never the test split, and training on the evaluation text is refused). ``template="alpaca"``
formats instruction records (``instruction``/``input``/``output``) with the Alpaca prompt.

Runs are resumable exactly: every ``checkpoint_every`` steps, and when stopped (``Cancelled``,
Ctrl-C), ``RUN_DIR/checkpoint.pt`` receives the trained tensors, the optimizer state, the step (the
learning rate is a function of the step) and the sampling generator's state, written to a
temporary file and renamed. ``resume=True`` continues from it and refuses other settings.
``RUN_DIR/log.jsonl`` records the recipe, the loss curve and the held-out numbers; at the end the
recovered model is saved into ``RUN_DIR`` with a model card, and the checkpoint is removed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .arch import adapter_for, count_parameters
from .data import load_records, load_text, tokenize, windows_from
from .errors import Cancelled, DataError, ShedderError
from .fileio import RUN_LOCK, RUN_MARKER, atomic_write, claim_run_dir, model_dirs
from .progress import Progress
from .metrics import describe_protocol, perplexity


METHODS = ("lora", "full", "distill")
SCHEDULES = ("cosine", "linear", "constant")
TEMPLATES = (None, "alpaca")
#: Learning rates that recovered the most per token on the bundled models (``bench recover``).
DEFAULT_LR = {"lora": 2e-3, "full": 5e-4, "distill": 5e-4}
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
CARD_JSON = "recovery.json"
SCHEMA_VERSION = 1

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
    tasks: tuple[str, ...] = ()          # lm-eval tasks before and after (needs shedder.downstream)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ShedderError(f"unknown recovery method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.schedule not in SCHEDULES:
            raise ShedderError(f"unknown lr schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.template not in TEMPLATES:
            raise ShedderError(f"unknown template {self.template!r}; the only template is 'alpaca'")
        for name in ("steps", "tokens", "batch_size", "lora_rank", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ShedderError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if self.seq_len < 2:
            raise ShedderError(f"seq-len must be at least 2, got {self.seq_len}")
        if self.temperature <= 0:
            raise ShedderError(f"temperature must be positive, got {self.temperature}")

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


def _fingerprint(config: RecoverConfig, student) -> dict:
    """What must match to resume: the recipe (minus how often to checkpoint) and the student's shape."""
    recipe = asdict(replace(config, checkpoint_every=1))
    shapes = {n: list(p.shape) for n, p in student.state_dict().items()}
    return {"recipe": recipe, "student": hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]}


def _prepare_run_dir(run_dir: Path, resume: bool) -> dict | None:
    """The checkpoint of a claimed run directory when resuming; refuse to reuse anything else."""
    checkpoint = run_dir / CHECKPOINT
    if resume:
        if not checkpoint.is_file():
            raise ShedderError(f"nothing to resume in {run_dir}: no {CHECKPOINT} (the run finished or never started)")
        return torch.load(checkpoint, map_location="cpu", weights_only=False)
    if any(p.name not in (RUN_MARKER, RUN_LOCK) for p in run_dir.iterdir()):
        if checkpoint.is_file():
            raise ShedderError(f"{run_dir} holds an interrupted recovery; add --resume to continue it, or choose another --out")
        raise ShedderError(f"{run_dir} is not empty; choose a new directory for the recovered model")
    return None


# --------------------------------------------------------------------------------------- the run
def recover(student, tokenizer, config: RecoverConfig, run_dir: str | Path, teacher=None, plan=None,
            source: str = "", progress: Progress | None = None, resume: bool = False) -> RecoverResult:
    """Train ``student`` (see ``student_for``) with ``config``; save the recovered model into ``run_dir``.

    ``teacher`` is the unpruned model: required for ``distill``, and when given its held-out
    perplexity is reported as the unpruned baseline. ``plan`` (the pruning plan the student was made
    with) is saved alongside the model. ``progress(done, total, message)`` may raise ``Cancelled``:
    the step that just finished is checkpointed first, so ``resume=True`` continues exactly.
    """
    # The output policy first, before any work: never the working or a model's directory, nor someone else's.
    run_dir = claim_run_dir(run_dir, model_dirs(student, teacher), "recovery run", legacy=(CHECKPOINT,))
    if config.method == "distill" and teacher is None:
        raise ShedderError("distillation needs the unpruned model as teacher (--teacher, or --model with --plan)")
    device = next(student.parameters()).device
    train_ids = training_ids(tokenizer, config)
    eval_windows = windows_from(tokenizer, config.eval_data, samples=config.eval_samples, seq_len=config.seq_len)
    state = _prepare_run_dir(run_dir, resume)
    fingerprint = _fingerprint(config, student)
    if state is not None and state["fingerprint"] != fingerprint:
        raise ShedderError(f"{run_dir} was started with other settings or another model; resume with the same "
                           f"command, or choose another --out (it was: {state['fingerprint']['recipe']})")

    if state is None:
        ppl = {"pruned": perplexity(student, eval_windows)}
        if teacher is not None:
            ppl = {"unpruned": perplexity(teacher, eval_windows), **ppl}
        tasks = {"before": _downstream(student, tokenizer, config.tasks)} if config.tasks else {}
        _log(run_dir, {"event": "start", "recipe": asdict(config), "source": source,
                       "protocol": describe_protocol(eval_windows, config.eval_data), "ppl": ppl,
                       "plan": plan.to_dict() if plan is not None else None})
    else:
        ppl, tasks = state["ppl"], state["tasks"]

    trainable = _trainable(student, config)
    opt = torch.optim.AdamW(list(trainable.values()), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    start_step, elapsed = 0, 0.0
    if state is not None:
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                trainable[name].copy_(tensor)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start_step, elapsed = state["step"], state["seconds"]
        _log(run_dir, {"event": "resume", "step": start_step})

    def save_checkpoint(step: int, seconds: float) -> None:
        payload = {"schema_version": SCHEMA_VERSION, "fingerprint": fingerprint, "step": step, "seconds": seconds,
                   "trainable": {n: p.detach().cpu() for n, p in trainable.items()},
                   "optimizer": opt.state_dict(), "generator": gen.get_state(), "ppl": ppl, "tasks": tasks}
        atomic_write(run_dir / CHECKPOINT, lambda p: torch.save(payload, p))

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
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return result


def recovery_run_dir(source: str, plan, config: RecoverConfig, cache_dir: str | Path | None = None) -> Path:
    """A run directory under the cache keyed by model source, plan and recipe: a caller without a
    place of its own (the app) resumes a cancelled run there and finds a finished one."""
    from .importance import default_cache_dir

    key = json.dumps({"source": str(source), "plan": plan.to_dict() if plan is not None else None,
                      "recipe": asdict(config)}, sort_keys=True, default=str)
    return Path(cache_dir or default_cache_dir()) / "recoveries" / hashlib.sha256(key.encode()).hexdigest()[:16]


def finished(run_dir: str | Path) -> dict | None:
    """The summary (``recovery.json``) of a finished run, or None."""
    path = Path(run_dir) / CARD_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def _downstream(model, tokenizer, tasks: tuple[str, ...]) -> dict:
    """lm-eval accuracies (``{task: score, ..., "average": x}``) through ``shedder.downstream``."""
    from . import downstream

    return downstream.scores(model, tokenizer, downstream.parse_tasks(",".join(tasks))).summary()


def _save(student, tokenizer, result: RecoverResult, plan, source: str) -> None:
    """Write the recovered model and its card into the run directory (each file renamed into place)."""
    from .extract import save

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
then recovered by **{c.method}**. Load it with `shedder.loading.load_model("<this directory>")`; when every
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

    from .loading import load_model
    from .plan import Component, PruningPlan

    if threads:
        torch.set_num_threads(threads)
    rows = []
    for name, specs in BENCH_PLANS.items():
        model, tokenizer = load_model(name)
        adapter = adapter_for(model)
        plan = adapter.validate(PruningPlan(components=[Component.parse(s) for s in specs]))
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
