"""Recovery after pruning: LoRA, full fine-tuning, or distillation from the unpruned model.

    result = recover(student, tokenizer, RecoverConfig(method="distill", steps=200), "runs/rec",
                     teacher=original, plan=plan, save=shedder.formats.extract.save)

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
recovered model is saved into ``RUN_DIR`` (by the caller's ``save``: the saved-model format is
``shedder.formats``', a layer above) with a model card, and the checkpoint is removed. One
process writes a run directory at a time (its lock, ``fileio.exclusive``, is held for the whole run).

The modules, in the order a run uses them: ``config`` (the recipe, checked), ``lora`` (the student
and what is trained), ``data`` (training windows), ``loop`` (the run), ``checkpoint`` (exact
resumption), ``rundir`` (the run directory: log, checks, cache place), ``reporting`` (the loss curves:
the log, TensorBoard), ``card`` (the model card).
The method comparison (``bench recover``) is ``shedder.dev.recover_bench``: it loads the bundled models.
"""
from shedder.prune.recover.card import model_card
from shedder.prune.recover.checkpoint import CHECKPOINT, LEGACY_CHECKPOINT, SCHEMA_VERSION, TENSORS
from shedder.prune.recover.config import DEFAULT_LR, METHODS, SCHEDULES, TEMPLATES, RecoverConfig, RecoverResult
from shedder.prune.recover.data import ALPACA_PROMPT, format_alpaca, sample_batch, training_ids
from shedder.prune.recover.lora import LoraDelta, add_lora, lora_targets, merge_lora, student_for
from shedder.prune.recover.loop import SaveModel, distill_loss, lm_loss, recover, step_loss
from shedder.prune.recover.reporting import REPORT_TO, TENSORBOARD_DIR, curve
from shedder.prune.recover.rundir import CARD_JSON, LOG, finished, recovery_run_dir, resumable

__all__ = ["ALPACA_PROMPT", "CARD_JSON", "CHECKPOINT", "DEFAULT_LR", "LEGACY_CHECKPOINT", "LOG", "METHODS",
           "REPORT_TO", "SCHEDULES", "SCHEMA_VERSION", "TEMPLATES", "TENSORBOARD_DIR", "TENSORS", "LoraDelta", "RecoverConfig", "RecoverResult",
           "SaveModel", "add_lora", "curve", "distill_loss", "finished", "format_alpaca", "lm_loss", "lora_targets",
           "merge_lora", "model_card", "recover", "recovery_run_dir", "resumable", "sample_batch", "step_loss",
           "student_for", "training_ids"]
