"""The two bundled lm-eval tasks, cut from the held-out test split (``assets/data/test.txt``).

lm-eval's paper tasks (LAMBADA, HellaSwag, ...) download their data from the hub; these two run
offline, so ``python -m shedder eval --tasks shedder_lastword,shedder_choice`` works anywhere and the
tests can check lm-eval's numbers on masked and extracted models. They are small and easy next to the
paper's tasks: they show whether a removal hurts, not how the model compares with published ones.

How they are cut (``python -m shedder.measure.local_tasks`` rewrites ``assets/lm_eval/*.jsonl``; a test
checks the shipped files equal what this module builds):

* ``shedder_lastword`` (LAMBADA-style, ``loglikelihood``, metric ``acc``): the first ``ITEMS``
  paragraphs of 30+ words ending in a word (``shedder.measure.metrics.passages``, the same passages as our
  next-word accuracy); the context keeps the paragraph's trailing sentences up to ``CONTEXT_WORDS``
  words (at least the last sentence), the target is the final word without its punctuation.
* ``shedder_choice`` (HellaSwag-style, ``multiple_choice``, metric ``acc_norm``): the first ``ITEMS``
  paragraphs of two or more sentences whose last one has at most ``ENDING_WORDS`` words; the context is the sentences before the last (trailing ones, up to
  ``CONTEXT_WORDS`` words), the right ending is the last sentence, and the three wrong endings are the
  last sentences of the items a quarter, a half and three quarters further round the list. The right
  ending sits at position ``item % 4``. No randomness, so the files rebuild byte for byte.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from shedder.measure.data import DATA_DIR
from shedder.measure.metrics import passages

TASKS_DIR = DATA_DIR.parent / "lm_eval"
#: Items per task.
ITEMS = 200
#: Longest context kept, in words (whole sentences only).
CONTEXT_WORDS = 100
CHOICES = 4
#: Longest ending of a multiple-choice item, in words.
ENDING_WORDS = 30

# A sentence ends at . ! ? (optionally closing quotes) followed by a capital or an opening quote;
# the titles Austen abbreviates do not end one.
_SENTENCE_END = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[\"'A-Z])")


def sentences(paragraph: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(" ".join(paragraph.split())) if s]


def _trailing(sents: list[str], max_words: int = CONTEXT_WORDS) -> str:
    """The last sentences of ``sents`` that fit in ``max_words`` words (at least one)."""
    kept: list[str] = []
    for s in reversed(sents):
        if kept and sum(len(k.split()) for k in kept) + len(s.split()) > max_words:
            break
        kept.insert(0, s)
    return " ".join(kept)


def lastword_items(text: str, n: int = ITEMS) -> list[dict]:
    return [{"context": _trailing(sentences(p.context)), "word": p.word} for p in passages(text, n)]


def choice_items(text: str, n: int = ITEMS) -> list[dict]:
    pairs = []
    for para in re.split(r"\n\s*\n", text):
        sents = sentences(para)
        if len(sents) >= 2 and len(sents[-1].split()) <= ENDING_WORDS:
            pairs.append((_trailing(sents[:-1]), sents[-1]))
        if len(pairs) == n:
            break
    items = []
    for i, (context, ending) in enumerate(pairs):
        wrong = [pairs[(i + k * len(pairs) // CHOICES) % len(pairs)][1] for k in range(1, CHOICES)]
        label = i % CHOICES
        items.append({"context": context, "endings": wrong[:label] + [ending] + wrong[label:], "label": label})
    return items


def build(text: str | None = None) -> dict[str, list[dict]]:
    """The rows of both tasks (from the bundled test split unless ``text`` is given)."""
    text = (DATA_DIR / "test.txt").read_text(encoding="utf-8") if text is None else text
    return {"lastword": lastword_items(text), "choice": choice_items(text)}


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write(out_dir: Path = TASKS_DIR) -> dict[str, Path]:
    paths = {}
    for name, rows in build().items():
        path = out_dir / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text(to_jsonl(rows), encoding="utf-8")
        tmp.replace(path)
        paths[name] = path
    return paths


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    for name, path in write().items():
        print(f"{name:9s} {path.stat().st_size:>8,d} bytes  {path}")


if __name__ == "__main__":
    main()
