"""Calibration and evaluation text, cut into token windows.

A text source is a string, so the CLI, the app and plan files can name it:

* ``"calibration"`` / ``"test"`` — the bundled splits in ``assets/data`` (disjoint chapters, so the
  text a search calibrates on is never the text it is judged on);
* a local ``.txt`` file (read whole) or ``.jsonl`` file (one JSON object with a ``"text"`` field per line);
* ``"hf:DATASET[:CONFIG]:SPLIT"`` — any ``datasets`` id, e.g. ``hf:wikitext:wikitext-2-raw-v1:test``.

Perplexity is measured over non-overlapping windows of ``seq_len`` tokens cut from the start of the
tokenised text (the remainder that does not fill a window is dropped), which is the protocol
``metrics.describe_protocol`` states next to every number.
"""
from __future__ import annotations

import contextlib

import hashlib
import json
from pathlib import Path

import torch

from .errors import DataError

DATA_DIR = Path(__file__).resolve().parent.parent / "assets" / "data"
BUNDLED = ("calibration", "test")


def load_text(source: str) -> str:
    """The whole text of ``source`` (see the module docstring for the accepted forms)."""
    source = str(source)
    if source in BUNDLED:
        path = DATA_DIR / f"{source}.txt"
        if not path.is_file():
            raise DataError(f"the bundled {source!r} text is missing ({path}); rebuild it with `python -m shedder.corpus`")
        return _non_empty(path.read_text(encoding="utf-8"), source)
    if source.startswith("hf:"):
        return _non_empty(_load_hf(source), source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"text source not found: {source!r} (use 'calibration', 'test', a .txt/.jsonl file, "
                        "or hf:DATASET[:CONFIG]:SPLIT)")
    if path.suffix == ".jsonl":
        return _non_empty(_read_jsonl(path), source)
    try:
        return _non_empty(path.read_text(encoding="utf-8"), source)
    except UnicodeDecodeError:
        raise DataError(f"{source} is not UTF-8 text") from None


def _non_empty(text: str, source: str) -> str:
    if not text.strip():
        raise DataError(f"the text source {source!r} is empty")
    return text


def _read_jsonl(path: Path) -> str:
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: each line needs a string field 'text'")
        texts.append(record["text"])
    return "\n\n".join(texts)


def parse_hf(source: str) -> tuple[str, str | None, str]:
    """``hf:DATASET[:CONFIG]:SPLIT`` -> (dataset, config or None, split)."""
    parts = source[len("hf:"):].split(":")
    if len(parts) == 2 and all(parts):
        return parts[0], None, parts[1]
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    raise DataError(f"cannot read {source!r}: expected hf:DATASET[:CONFIG]:SPLIT, e.g. hf:wikitext:wikitext-2-raw-v1:test")


def _load_hf(source: str) -> str:
    dataset, config, split = parse_hf(source)
    try:
        with _offline_when_unreachable():
            import datasets

            ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # offline, unknown id, unknown split: all reach the user as one message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load {source!r} with `datasets` (hub unreachable or no such dataset/split?): {first}") from None
    column = text_column(ds.features)
    if column is None:
        raise DataError(f"{source!r} has no text column (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds[column] if t)


@contextlib.contextmanager
def _offline_when_unreachable():
    """With no route to the hub, let `datasets` use its local cache at once instead of retrying the
    network for half a minute (the same check ``shedder.loading`` makes for models)."""
    from .loading import hub_unreachable

    if not hub_unreachable():
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def text_column(features) -> str | None:
    """``"text"`` when present, else the first string-valued column."""
    names = list(features)
    if "text" in names:
        return "text"
    for name in names:
        if getattr(features[name], "dtype", None) in ("string", "large_string"):
            return name
    return None


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of the whole text in one pass (no special tokens: windows are plain text)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


#: Tokens beyond the ones needed that a prefix must yield before they are trusted: a word cut at
#: the prefix's end tokenises differently, and only the last few tokens can be affected.
PREFIX_MARGIN = 64


def tokenize_prefix(tokenizer, text: str, needed: int) -> list[int]:
    """The first ``needed`` token ids of ``text`` (all of them when it has fewer), tokenising a
    growing prefix instead of the whole text: a 20 MB text evaluated on 2 windows costs 2 windows.

    The prefix ends where a word ends (before whitespace), and tokens are taken only when the
    prefix gives ``PREFIX_MARGIN`` more than needed, so they equal the whole text's first tokens."""
    chars = max(1024, needed * 8)
    while chars < len(text):
        cut = chars
        while cut < len(text) and not (text[cut].isspace() and not text[cut - 1].isspace()):
            cut += 1
            if cut - chars > 4096:  # no word boundary nearby (e.g. text without spaces): cut here
                break
        ids = tokenize(tokenizer, text[:cut])
        if len(ids) >= needed + PREFIX_MARGIN:
            return ids[:needed]
        chars *= 2
    return tokenize(tokenizer, text)[:needed]


def token_windows(tokenizer, text: str, seq_len: int = 256, samples: int | None = None,
                  source: str = "the text") -> torch.LongTensor:
    """Non-overlapping windows ``[n, seq_len]`` from the start of ``text``; at most ``samples`` of them."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2 tokens, got {seq_len}")
    if samples is not None and samples < 1:
        raise DataError(f"samples must be at least 1, got {samples}")
    if not text.strip():
        raise DataError(f"{source} is empty")
    ids = tokenize(tokenizer, text) if samples is None else tokenize_prefix(tokenizer, text, samples * seq_len)
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"{source} has {len(ids)} tokens, fewer than one window of {seq_len}")
    windows = cut_windows(torch.tensor(ids, dtype=torch.long), seq_len)
    return windows if samples is None else windows[:samples]


def cut_windows(ids: torch.Tensor, seq_len: int) -> torch.LongTensor:
    """Flat ids ``[t]`` as non-overlapping windows ``[t // seq_len, seq_len]``; the incomplete tail
    is dropped (the one windowing every perplexity in the project uses)."""
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def windows_from(tokenizer, source: str, samples: int | None = None, seq_len: int = 256) -> torch.LongTensor:
    """Load ``source`` and cut it into windows (errors name the source)."""
    return token_windows(tokenizer, load_text(source), seq_len=seq_len, samples=samples, source=repr(source))


def calibration_windows(tokenizer, source: str = "calibration", samples: int = 16, seq_len: int = 256) -> torch.LongTensor:
    """The search's calibration set: ``samples`` windows of ``seq_len`` tokens (paper: 256 × 2048)."""
    return windows_from(tokenizer, source, samples=samples, seq_len=seq_len)


def windows_hash(windows: torch.Tensor) -> str:
    """A short hash of the exact token windows (keys caches and search logs)."""
    w = windows.detach().to("cpu", torch.long).contiguous()
    h = hashlib.sha256(str(tuple(w.shape)).encode())
    h.update(w.numpy().tobytes())
    return h.hexdigest()[:16]
