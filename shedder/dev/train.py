"""Train the bundled tiny models from scratch on the Austen corpus, on a CPU.

    python -m shedder.dev.train --model mamba2-tiny            # defaults = what the bundled models ran

The bundled models exist so that the app, the CLI and the tests have real, trained Mamba-family
networks to prune offline: random weights would make every importance score meaningless. This
module rebuilds everything they depend on deterministically (corpus splits, then the byte-level BPE
tokenizer), trains with AdamW and a cosine schedule, measures test perplexity against a unigram
baseline, and writes a ``transformers`` model directory with a model card and ``shedder_card.json``.

Evaluation protocol (also written into every card): the test split is tokenized as one string,
cut into non-overlapping windows of ``SEQ_LEN`` tokens (the incomplete tail is dropped), and
perplexity is exp(mean next-token negative log-likelihood) over every predicted position. The
unigram baseline scores exactly the same positions with token frequencies counted on the train
split (add-one smoothing over the whole vocabulary).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Mamba2Config,
    MambaConfig,
    NemotronHConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
)

from shedder.dev import corpus
from shedder.measure.data import cut_windows, tokenize
from shedder.measure.metrics import perplexity
from shedder.dev.train_scan import training_scan

SEQ_LEN = 256
#: The tests re-measure perplexity on this many leading test windows (cheap enough for every run).
CHECK_WINDOWS = 8
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"
PAD = "<pad>"
TOKENIZER_DIR = corpus.ASSETS / "tokenizer"
MODELS_DIR = corpus.ASSETS / "models"


# --- tokenizer ------------------------------------------------------------------------------------

def build_tokenizer(train_text: str, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on the train split only, so test text is never seen.

    Byte-level means every string encodes without an unknown token; ``<|endoftext|>`` doubles as
    bos/eos/unk (as in GPT-2) and ``<pad>`` is a separate id so padding never looks like text.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_text.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD,
    )


def load_tokenizer() -> PreTrainedTokenizerFast:
    """The shared tokenizer in ``assets/tokenizer``, built from the train split if missing."""
    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        build_tokenizer(corpus.load_split("train")).save_pretrained(TOKENIZER_DIR)
    return PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR)


# --- model shapes ---------------------------------------------------------------------------------

def _special_ids(tok) -> dict:
    return dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def mamba2_config(tok) -> PreTrainedConfig:
    """8 Mamba-2 blocks; 2 groups of 4 heads so head pruning must respect groups."""
    return Mamba2Config(
        vocab_size=len(tok), hidden_size=128, num_hidden_layers=8, expand=2,
        num_heads=8, head_dim=32, n_groups=2, state_size=32, chunk_size=64, conv_kernel=4,
        initializer_range=0.02, tie_word_embeddings=True, use_cache=False, **_special_ids(tok),
    )


def mamba1_config(tok) -> PreTrainedConfig:
    """8 Mamba-1 blocks with the stock scan (training swaps in ``shedder.dev.train_scan``)."""
    return MambaConfig(
        vocab_size=len(tok), hidden_size=128, num_hidden_layers=8, state_size=16, expand=2,
        conv_kernel=4, initializer_range=0.02, tie_word_embeddings=True, use_cache=False,
        use_mambapy=False, **_special_ids(tok),
    )


#: Nemotron-H layer pattern: each layer is exactly one sub-block (M = Mamba-2, * = attention, - = MLP).
HYBRID_PATTERN = "M-M*-M-M*-M-"


def hybrid_config(tok) -> PreTrainedConfig:
    """Nemotron-H with 12 single-type layers: 5 Mamba-2 (2 groups), 2 attention, 5 MLP.

    ``NemotronHForCausalLM`` declares no tied weights, so its LM head is a separate matrix.
    """
    kinds = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    return NemotronHConfig(
        vocab_size=len(tok), hidden_size=128, layers_block_type=[kinds[c] for c in HYBRID_PATTERN],
        mamba_num_heads=8, mamba_head_dim=32, n_groups=2, ssm_state_size=32, expand=2, chunk_size=64,
        conv_kernel=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=512, mlp_hidden_act="relu2", max_position_embeddings=2048,
        initializer_range=0.02, tie_word_embeddings=False, use_cache=False, **_special_ids(tok),
    )


@dataclass(frozen=True)
class Recipe:
    """What differs between the bundled models: shape, training defaults and the card's prose."""

    config: object
    steps: int
    batch_size: int = 8
    lr: float = 3e-3
    why: str = ""


RECIPES = {
    "mamba2-tiny": Recipe(mamba2_config, steps=400, why=(
        "Pure Mamba-2 (SSD) stack, the app's default model. Two groups of four heads exercise "
        "group-aware head pruning; every block has an SSM that can be removed on its own.")),
    "mamba1-tiny": Recipe(mamba1_config, steps=250, why=(
        "Pure Mamba-1 stack (selective scan), for block, SSM and channel-group pruning. Trained "
        "with a fast-backward scan (`shedder/dev/train_scan.py`); the saved model uses the stock "
        "`transformers` forward, whose logits match the training forward (checked after training).")),
    "hybrid-tiny": Recipe(hybrid_config, steps=400, why=(
        "Nemotron-H was chosen for the hybrid because each of its layers is a single sub-block "
        "type (Mamba-2, self-attention or MLP). That maps one-to-one onto the Mamba-Shedder "
        "component kinds (block / ssm / head for Mamba-2 layers, attention and MLP sub-blocks, MLP "
        "channel groups) and onto the app's architecture strip. Its Mamba-2 mixers use two groups, "
        "so head pruning with groups is exercised here too.")),
}


# --- training and evaluation ----------------------------------------------------------------------

def unigram_perplexity(train_ids: torch.Tensor, test_ids: torch.Tensor, vocab_size: int,
                       seq_len: int = SEQ_LEN) -> float:
    """Add-one-smoothed unigram perplexity on the same positions ``perplexity`` scores."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    targets = cut_windows(test_ids, seq_len)[:, 1:].reshape(-1)
    return math.exp(-logp[targets].mean().item())


def train(model, train_ids: torch.Tensor, steps: int, batch_size: int, lr: float,
          seq_len: int = SEQ_LEN, seed: int = 0, log_every: int = 25) -> list[dict]:
    """AdamW + linear warm-up + cosine decay to 10% on random windows of the train split."""
    gen = torch.Generator().manual_seed(seed)
    # Like the reference Mamba recipe: no weight decay on the SSM dynamics (A_log), biases or norms.
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and not n.endswith("A_log")]
    no_decay = [p for n, p in named if p.dim() < 2 or n.endswith("A_log")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    log, start, running = [], time.time(), None
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([train_ids[s: s + seq_len] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if (step + 1) % log_every == 0 or step == steps - 1:
            entry = {"step": step + 1, "loss": round(running, 4), "lr": lr_at(step), "s": round(time.time() - start, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    model.eval()
    return log


# --- model card -----------------------------------------------------------------------------------

def write_card(out: Path, name: str, model, card: dict, why: str) -> None:
    """README.md model card for humans, shedder_card.json for the tests and the app."""
    (out / "shedder_card.json").write_text(json.dumps(card, indent=2) + "\n")
    cfg = model.config
    readme = f"""---
license: mit
library_name: transformers
language: en
tags: [mamba, tiny, shedder-studio]
---
# {name}

A tiny `{type(model).__name__}` trained from scratch on Jane Austen's novels, bundled with Shedder
Studio so the app, CLI and tests work offline with a real trained network. It is a toy: good for
exercising pruning and measuring relative perplexity changes, not for generating useful text.

{why}

| | |
| --- | --- |
| architecture | `{type(model).__name__}` (`model_type: {cfg.model_type}`) |
| layers | {card["layers"]}{f' (`{card["layer_pattern"]}`: M = Mamba-2, * = attention, - = MLP)' if "layer_pattern" in card else ""} |
| hidden size | {cfg.hidden_size} |
| parameters | {card["parameters"]:,} ({"embeddings tied to the LM head" if cfg.tie_word_embeddings else "separate LM head"}) |
| tokenizer | byte-level BPE, {card["vocab_size"]} tokens, trained on the train split (`assets/tokenizer`) |
| data | Jane Austen's six novels from Debian `{corpus.PACKAGE}`, split by chapter (see `assets/data/SOURCE.md`) |
| training | {card["steps"]} steps × {card["batch_size"]} windows × {card["seq_len"]} tokens, AdamW (lr {card["lr"]}, cosine), {card["train_minutes"]:.1f} min on {card["threads"]} CPU thread(s) |
| **test perplexity** | **{card["test_ppl"]:.2f}** |
| unigram perplexity (same tokens) | {card["unigram_ppl"]:.2f} |

Evaluation protocol: the test split (`assets/data/test.txt`, {card["test_tokens"]:,} tokens) is
tokenized as one string and cut into {card["test_windows"]} non-overlapping windows of
{card["seq_len"]} tokens; perplexity is exp(mean next-token NLL) over every predicted position.
The unigram baseline scores the same positions with add-one-smoothed token frequencies from the
train split.

Reproduce (rebuilds the corpus splits and tokenizer if missing):

```
{card["command"]}
```
"""
    (out / "README.md").write_text(readme)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a bundled tiny model from scratch (CPU).")
    parser.add_argument("--model", choices=sorted(RECIPES), required=True)
    parser.add_argument("--steps", type=int, help="default: the recipe's steps (what the bundled model ran)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="more threads only help on an idle machine")
    parser.add_argument("--out", type=Path, help="default: assets/models/<model>")
    args = parser.parse_args()

    recipe = RECIPES[args.model]
    steps = args.steps or recipe.steps
    batch_size = args.batch_size or recipe.batch_size
    lr = args.lr or recipe.lr
    out = args.out or MODELS_DIR / args.model
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tok = load_tokenizer()
    train_ids = torch.tensor(tokenize(tok, corpus.load_split("train")))
    test_ids = torch.tensor(tokenize(tok, corpus.load_split("test")))
    print(f"train tokens {len(train_ids):,}  test tokens {len(test_ids):,}", flush=True)

    model = AutoModelForCausalLM.from_config(recipe.config(tok))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {type(model).__name__}, {n_params:,} parameters", flush=True)

    # Mamba-1 trains with the fast-backward scan; everything after training uses the stock one.
    is_mamba1 = model.config.model_type == "mamba"
    test_windows = cut_windows(test_ids, SEQ_LEN)
    probe = test_windows[:2]
    start = time.time()
    with training_scan() if is_mamba1 else contextlib.nullcontext():
        log = train(model, train_ids, steps, batch_size, lr, seed=args.seed)
        with torch.no_grad():
            trained_logits = model(input_ids=probe).logits
    minutes = (time.time() - start) / 60
    with torch.no_grad():
        diff = (model(input_ids=probe).logits - trained_logits).abs().max().item()
    print(f"stock forward vs training forward: max |logit diff| = {diff:.2e}", flush=True)
    if diff > 1e-4:
        raise SystemExit("the training forward and the stock forward disagree; not saving")

    test_ppl = perplexity(model, test_windows)
    check_ppl = perplexity(model, test_windows[:CHECK_WINDOWS])
    uni_ppl = unigram_perplexity(train_ids, test_ids, len(tok))
    print(f"test ppl {test_ppl:.2f}  unigram ppl {uni_ppl:.2f}  ratio {test_ppl / uni_ppl:.3f}", flush=True)

    if out.exists():
        shutil.rmtree(out)
    model.config.use_cache = True
    model.save_pretrained(out)
    tok.save_pretrained(out)
    command = f"python -m shedder.dev.train --model {args.model}"
    if (steps, batch_size, lr, args.seed) != (recipe.steps, recipe.batch_size, recipe.lr, 0):
        command += f" --steps {steps} --batch-size {batch_size} --lr {lr} --seed {args.seed}"
    card = {
        "name": args.model, "architecture": type(model).__name__, "model_type": model.config.model_type,
        "layers": model.config.num_hidden_layers, "parameters": n_params, "vocab_size": len(tok),
        "seq_len": SEQ_LEN, "test_ppl": round(test_ppl, 4), "unigram_ppl": round(uni_ppl, 4),
        "check_windows": CHECK_WINDOWS, "check_ppl": round(check_ppl, 4),
        "test_tokens": len(test_ids), "test_windows": len(test_windows),
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": args.seed, "threads": args.threads,
        "train_minutes": round(minutes, 2), "final_train_loss": log[-1]["loss"], "command": command,
        "data": f"Debian {corpus.PACKAGE} (Jane Austen), test split assets/data/test.txt",
    }
    if args.model == "hybrid-tiny":
        card["layer_pattern"] = HYBRID_PATTERN
    write_card(out, args.model, model, card, recipe.why)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
