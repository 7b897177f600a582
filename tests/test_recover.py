"""Recovery after pruning: each method trains what it claims on every kind of mixer (stock, pruned,
masked), held-out loss falls, runs resume exactly, the test split is never trained on, and the saved
model reloads with the same logits."""
from __future__ import annotations

import hashlib
import math
import json
from dataclasses import asdict, replace

import pytest
import torch

from adapter_checks import comps, logits, max_diff, snapshot, tokens
from conftest import make_tiny_model

from shedder import cli
from shedder.prune import recover as recover_module
from shedder.arch import adapter_for
from shedder.measure.data import load_text
from shedder.core.errors import Cancelled, DataError, ShedderError
from shedder.formats.extract import save
from shedder.formats.loading import load_model
from shedder.measure.masking import masked
from shedder.core.plan import Component, PruningPlan
from shedder.prune.recover import (RecoverConfig, add_lora, distill_loss, format_alpaca, lm_loss, recover, student_for,
                             training_ids)

#: A budget that moves a tiny random model measurably in a few seconds.
FAST = dict(steps=8, batch_size=4, seq_len=32, eval_samples=4, lr=3e-2, warmup=0.0)

PLANS = {  # every plan leaves some layer with pruned (uneven) shapes, so the shedder mixers run
    "mamba2": ("head:0:1", "block:2"),
    "nemotron_h": ("head:0:1", "attention:1"),
    "mamba1": ("channel_group:0:0", "ssm:2"),
}


def _pruned(family: str, vocab: int):
    model = make_tiny_model(family, layers=4 if family == "nemotron_h" else 3, vocab_size=vocab)
    plan = adapter_for(model).resolve(comps(*PLANS[family]))
    return model, plan


@pytest.mark.parametrize("family", list(PLANS))
def test_lora_trains_its_targets_on_pruned_mixers_and_held_out_loss_falls(family, bundled_tokenizer, tmp_path):
    model, plan = _pruned(family, len(bundled_tokenizer))
    student = student_for(model, plan)
    before = snapshot(student)
    result = recover(student, bundled_tokenizer, RecoverConfig(method="lora", lora_rank=4, **FAST), tmp_path / "run",
                     teacher=model, plan=plan, save=save)
    assert result.ppl["recovered"] < result.ppl["pruned"]
    after = snapshot(student)
    targets = [n for n in before if n.endswith((".in_proj.weight", ".out_proj.weight", ".up_proj.weight",
                                                ".down_proj.weight"))]
    assert targets and all(max_diff(before[n], after[n]) > 0 for n in targets)  # the merged adapters moved them
    assert all(torch.equal(before[n], after[n]) for n in before if n not in targets)  # and nothing else
    assert set(after) == set(before)  # merged: an ordinary checkpoint, no LoRA tensors left
    reloaded, _ = load_model(str(tmp_path / "run"))
    ids = tokens(vocab=len(bundled_tokenizer))
    assert max_diff(logits(reloaded, ids), logits(student, ids)) == 0


def test_lora_factors_get_gradients_through_a_live_mask(bundled_tokenizer):
    """Masks read ``mixer.in_proj.weight`` directly; the factors are part of that weight, so they train."""
    model, plan = _pruned("mamba2", 128)
    deltas = add_lora(model, rank=4, alpha=8)
    ids = tokens(vocab=128)
    with masked(model, plan):
        lm_loss(model(input_ids=ids).logits, ids).backward()
    removed_block = "backbone.layers.2."
    for name, delta in deltas.items():
        trained = delta.B.grad is not None and delta.B.grad.abs().sum() > 0
        assert trained != name.startswith(removed_block), name


def test_distillation_leaves_the_teacher_untouched_and_moves_towards_it(bundled_tokenizer, tmp_path):
    teacher, plan = _pruned("mamba2", len(bundled_tokenizer))
    original = snapshot(teacher)
    result = recover(student_for(teacher, plan), bundled_tokenizer, RecoverConfig(method="distill", **FAST),
                     tmp_path / "run", teacher=teacher, plan=plan, save=save)
    assert all(torch.equal(original[n], p) for n, p in snapshot(teacher).items())
    assert result.ppl["recovered"] < result.ppl["pruned"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log][0] == "start" and log[-1]["event"] == "done"
    card = (tmp_path / "run" / "README.md").read_text()
    assert "distill" in card and "recovered" in card and f"{result.tokens:,} tokens" in card


def test_distill_loss_is_zero_for_the_teacher_itself():
    t = torch.randn(2, 5, 11)
    assert distill_loss(t, t, 2.0).abs() < 1e-6
    assert distill_loss(torch.randn(2, 5, 11), t, 2.0) > 0


def test_an_interrupted_run_resumes_exactly(bundled_tokenizer, tmp_path):
    teacher, plan = _pruned("mamba2", len(bundled_tokenizer))
    config = RecoverConfig(method="full", checkpoint_every=2, **{**FAST, "steps": 4, "eval_samples": 1})
    straight = student_for(teacher, plan)
    recover(straight, bundled_tokenizer, config, tmp_path / "straight", plan=plan, save=save)

    def stop_at_3(done, total, message):
        if done == 3:
            raise Cancelled("stop")

    interrupted = student_for(teacher, plan)
    with pytest.raises(Cancelled):
        recover(interrupted, bundled_tokenizer, config, tmp_path / "run", plan=plan, progress=stop_at_3, save=save)
    with pytest.raises(ShedderError, match="--resume"):
        recover(student_for(teacher, plan), bundled_tokenizer, config, tmp_path / "run", plan=plan, save=save)
    with pytest.raises(ShedderError, match="other settings"):
        recover(student_for(teacher, plan), bundled_tokenizer, replace(config, lr=1e-3),
                tmp_path / "run", plan=plan, resume=True, save=save)
    resumed = student_for(teacher, plan)
    result = recover(resumed, bundled_tokenizer, config, tmp_path / "run", plan=plan, resume=True, save=save)
    assert result.resumed_from == 3
    assert all(torch.equal(p, snapshot(straight)[n]) for n, p in snapshot(resumed).items())
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint")]


def test_never_trains_on_the_test_split(bundled_tokenizer, tmp_path):
    with pytest.raises(DataError, match="evaluation text"):
        training_ids(bundled_tokenizer, RecoverConfig(data="test"))
    copy = tmp_path / "copy.txt"
    copy.write_text(load_text("test"))
    with pytest.raises(DataError, match="evaluation text"):
        training_ids(bundled_tokenizer, RecoverConfig(data=str(copy)))
    train, test = load_text(RecoverConfig().data), load_text("test")
    test_chapters = [c for c in test.split("\n\n\n") if c.strip()]
    assert len(train) > 500_000 and not any(c in train for c in test_chapters)


def test_alpaca_template(bundled_tokenizer, tmp_path):
    text = format_alpaca({"instruction": "Name a colour.", "input": "", "output": "Blue."})
    assert "### Instruction:\nName a colour.\n\n### Response:\nBlue." in text and "### Input" not in text
    assert "### Input:\nsky\n\n" in format_alpaca({"instruction": "Colour?", "input": "sky", "output": "Blue."})
    records = tmp_path / "alpaca.jsonl"
    records.write_text("\n".join(json.dumps({"instruction": f"Count to {i}.", "input": "", "output": " ".join(
        str(j) for j in range(i))}) for i in range(40, 60)))
    ids = training_ids(bundled_tokenizer, RecoverConfig(data=str(records), template="alpaca", seq_len=32))
    assert "### Response:" in bundled_tokenizer.decode(ids[:200].tolist())
    with pytest.raises(DataError, match="instruction"):
        format_alpaca({"text": "plain"})


def test_bad_settings_are_refused():
    with pytest.raises(ShedderError, match="method"):
        RecoverConfig(method="magic")
    with pytest.raises(ShedderError, match="steps"):
        RecoverConfig(steps=0)
    model, _ = _pruned("mamba2", 128)
    with pytest.raises(ShedderError, match="in_proj"):
        add_lora(model, 4, 8, targets=("q_proj",))


def test_lr_schedule_warms_up_then_decays():
    c = RecoverConfig(steps=100, lr=1.0, warmup=0.1)
    lrs = [c.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=0.01)
    assert RecoverConfig(tokens=10_000, batch_size=4, seq_len=256).total_steps == 10


def test_cli_recover(capsys, tiny_model_dir, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pruned_mamba_block_idx": [1]}))
    out = tmp_path / "rec"
    args = ["recover", "--model", str(tiny_model_dir), "--plan", str(plan), "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--eval-samples", "2", "--no-progress"]
    assert cli.main(args + ["--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert set(payload["ppl"]) == {"unpruned", "pruned", "recovered"} and payload["recipe"]["method"] == "lora"
    assert (out / "model.safetensors").is_file() and (out / "pruning_plan.json").is_file()
    assert cli.main(args) == 2
    assert "not empty" in capsys.readouterr().err


def test_the_app_does_not_reuse_a_run_directory_of_the_pickle_format():
    """Cache run directories are keyed by the checkpoint format: an old pickle run is left alone."""
    config = RecoverConfig(steps=2)
    plan = PruningPlan(frozenset({Component("block", 1)}))
    new = recover_module.recovery_run_dir("m", plan, config, cache_dir="/cache")
    old_key = json.dumps({"source": "m", "plan": plan.to_dict(), "recipe": asdict(config)}, sort_keys=True, default=str)
    assert new.name != hashlib.sha256(old_key.encode()).hexdigest()[:16]


# -- the loss curves: in the run's log, read back by the studio, and in TensorBoard ------------------

def test_the_log_holds_the_training_and_held_out_curve_and_a_resumed_run_holds_each_point_once(bundled_tokenizer,
                                                                                                tmp_path):
    teacher, plan = _pruned("mamba2", len(bundled_tokenizer))
    config = RecoverConfig(method="full", checkpoint_every=10, **{**FAST, "steps": 30, "eval_samples": 2})
    assert recover_module.reporting.held_out_every(30) == 10 and recover_module.reporting.held_out_every(1000) == 50

    def stop_at_25(done, total, message):
        if done == 25:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        recover(student_for(teacher, plan), bundled_tokenizer, config, tmp_path / "run", plan=plan,
                progress=stop_at_25, save=save)
    partial = recover_module.curve(tmp_path / "run")
    assert [(r["series"], r["step"]) for r in partial] == [("held-out", 0), ("train", 10), ("held-out", 10),
                                                           ("train", 20), ("held-out", 20)]
    result = recover(student_for(teacher, plan), bundled_tokenizer, config, tmp_path / "run", plan=plan,
                     resume=True, save=save)
    rows = recover_module.curve(tmp_path / "run")
    held = [r for r in rows if r["series"] == "held-out"]
    train = [r for r in rows if r["series"] == "train"]
    assert [r["step"] for r in held] == [0, 10, 20, 30] and [r["step"] for r in train] == [10, 20, 30]
    assert held[0]["loss"] == pytest.approx(math.log(result.ppl["pruned"]))
    assert held[-1]["loss"] == pytest.approx(math.log(result.ppl["recovered"]))
    assert recover_module.curve(tmp_path / "nothing") == []


def test_report_to_tensorboard_writes_the_curves_under_trainer_names(capsys, tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pruned_mamba_block_idx": [1]}))
    out = tmp_path / "rec"
    args = ["recover", "--model", str(tiny_model_dir), "--plan", str(plan), "--out", str(out), "--steps", "20",
            "--batch-size", "2", "--seq-len", "32", "--eval-samples", "2", "--no-progress"]
    with pytest.raises(SystemExit) as refused:
        cli.main(args + ["--report-to", "bogus"])
    assert refused.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(args + ["--report-to", "tensorboard"]) == 0
    assert f"tensorboard --logdir {out / 'tensorboard'}" in capsys.readouterr().out
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "eval/loss"} <= set(scalars)
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 10, 20]
    assert [e.step for e in events.Scalars("train/loss")] == [10, 20]
