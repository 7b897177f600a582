"""Recovery's training data: one token stream, sampled in seeded random windows.

Any source ``shedder.measure.data`` reads (the default is the shipped training sample, never the
test split, and training on the evaluation text is refused); ``template="alpaca"`` formats
instruction records (``instruction``/``input``/``output``) with the Alpaca prompt.
"""
from __future__ import annotations

import hashlib

import torch

from shedder.core.errors import DataError
from shedder.measure.data import load_records, load_text, tokenize
from shedder.prune.recover.config import RecoverConfig

ALPACA_PROMPT = ("Below is an instruction that describes a task{paired}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n{output}")


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
