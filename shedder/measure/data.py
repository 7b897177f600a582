"""Calibration and evaluation text, cut into token windows.

A text source is a string, so the CLI, the app and plan files can name it:

* ``"calibration"`` / ``"test"`` — the bundled splits in ``assets/data`` (disjoint chapters, so the
  text a search calibrates on is never the text it is judged on); ``"train"`` — the shipped sample
  of the training split (``train.txt.gz``), disjoint from both, which recovery trains on;
* a local ``.txt`` file (read whole) or ``.jsonl`` file (one JSON object with a ``"text"`` field per line);
* ``"hf:DATASET[:CONFIG]:SPLIT"`` — any ``datasets`` id, e.g. ``hf:wikitext:wikitext-2-raw-v1:test``.

Perplexity is measured over non-overlapping windows of ``seq_len`` tokens cut from the start of the
tokenised text (the remainder that does not fill a window is dropped), which is the protocol
``metrics.describe_protocol`` states next to every number.

Calibration windows follow one of two protocols (``PROTOCOLS``): ``"shedder"`` takes the first
``samples`` windows of a text source; ``"official"`` reproduces the official Mamba-Shedder sampling
(``official_windows``), for numbers comparable with the paper's.
"""
from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from shedder.core.errors import DataError
from shedder.core.hub import offline_when_unreachable

DATA_DIR = Path(__file__).resolve().parents[2] / "assets" / "data"
BUNDLED = {"train": "train.txt.gz", "calibration": "calibration.txt", "test": "test.txt"}
PROTOCOLS = ("shedder", "official")


@dataclass(frozen=True)
class Official:
    """The official calibration settings (``prune.py``: alpaca, 256 rows, 2048-token windows, batch 2,
    seed 42; the Hymba script alone uses 1024-token windows and batch 4)."""

    source: str = "hf:tatsu-lab/alpaca:train"
    rows: int = 256
    seq_len: int = 2048
    batch_size: int = 2
    seed: int = 42


OFFICIAL = Official()


def load_text(source: str) -> str:
    """The whole text of ``source`` (see the module docstring for the accepted forms)."""
    source = str(source)
    if source in BUNDLED:
        path = DATA_DIR / BUNDLED[source]
        if not path.is_file():
            raise DataError(f"the bundled {source!r} text is missing ({path}); rebuild it with `python -m shedder.dev.corpus`")
        raw = path.read_bytes()
        return _non_empty((gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8"), source)
    if source.startswith("hf:"):
        return _non_empty(_load_hf(source), source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"text source not found: {source!r} (use 'train', 'calibration', 'test', a .txt/.jsonl file, "
                        "or hf:DATASET[:CONFIG]:SPLIT)")
    try:
        if path.suffix == ".jsonl":
            return _non_empty(_read_jsonl(path), source)
        return _non_empty(path.read_text(encoding="utf-8"), source)
    except UnicodeDecodeError as e:
        raise DataError(f"{source} is not UTF-8 text (byte {e.start} cannot be decoded)") from None


def load_records(source: str) -> list[dict]:
    """The records of a ``.jsonl`` file or a ``datasets`` split, as dicts (for templates such as
    Alpaca's, which need several fields of each record)."""
    source = str(source)
    if source.startswith("hf:"):
        records = list(_hf_dataset(source))
    else:
        path = Path(source).expanduser()
        if path.suffix != ".jsonl" or not path.is_file():
            raise DataError(f"records need a .jsonl file or hf:DATASET[:CONFIG]:SPLIT, not {source!r}")
        records = [_json_line(path, lineno, line) for lineno, line in
                   enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not records:
        raise DataError(f"the text source {source!r} is empty")
    return records


def _json_line(path: Path, lineno: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{path}:{lineno}: not a text record (JSON nested too deeply)") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: each line must be a JSON object")
    return record


def _non_empty(text: str, source: str) -> str:
    if not text.strip():
        raise DataError(f"the text source {source!r} is empty")
    return text


def _read_jsonl(path: Path) -> str:
    return "\n\n".join(_jsonl_texts(path))


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = _json_line(path, lineno, line)
        if not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: each line needs a string field 'text'")
        texts.append(record["text"])
    return texts


def parse_hf(source: str) -> tuple[str, str | None, str]:
    """``hf:DATASET[:CONFIG]:SPLIT`` -> (dataset, config or None, split)."""
    parts = source[len("hf:"):].split(":")
    if len(parts) == 2 and all(parts):
        return parts[0], None, parts[1]
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    raise DataError(f"cannot read {source!r}: expected hf:DATASET[:CONFIG]:SPLIT, e.g. hf:wikitext:wikitext-2-raw-v1:test")


def _load_hf(source: str) -> str:
    ds = _hf_dataset(source)
    column = text_column(ds.features)
    if column is None:
        raise DataError(f"{source!r} has no text column (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds[column] if t)


def _hf_dataset(source: str):
    dataset, config, split = parse_hf(source)
    try:
        with offline_when_unreachable():
            import datasets

            return datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # offline, unknown id, unknown split: all reach the user as one message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load {source!r} with `datasets` (hub unreachable or no such dataset/split?): {first}") from None


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


def calibration_windows(tokenizer, source: str = "calibration", samples: int = 16, seq_len: int = 256,
                        protocol: str = "shedder") -> torch.LongTensor:
    """The search's calibration set. ``"shedder"``: the first ``samples`` windows of ``seq_len`` tokens
    of ``source``. ``"official"``: ``samples`` *rows* sampled as the official code does, joined and cut
    into windows of ``seq_len`` (official: 256 rows, 2048 tokens; see ``official_windows``)."""
    if protocol == "official":
        return official_windows(tokenizer, source, rows=samples, seq_len=seq_len)
    if protocol != "shedder":
        raise DataError(f"unknown calibration protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    return windows_from(tokenizer, source, samples=samples, seq_len=seq_len)


# ---------------------------------------------------------------------------- the official protocol
def official_rows(source: str = OFFICIAL.source, rows: int = OFFICIAL.rows, seed: int = OFFICIAL.seed) -> list[str]:
    """The calibration rows of the official Mamba-Shedder code (``prune.py`` with ``utils.get_dataset``),
    in its order: the ``text`` field of every row of ``source`` (a ``datasets`` id, by default alpaca's
    train split, or a local .json/.jsonl file), split 80/10/10 with ``datasets``' ``train_test_split``
    (20 % off with ``seed``, that part halved with ``seed``; its first half is the "test" part), then
    ``rows`` of that 10 % drawn by Python's ``random.sample`` right after seeding with ``seed``."""
    import datasets

    texts = _official_texts(source)
    ds = datasets.Dataset.from_dict({"text": texts})
    held_out = ds.train_test_split(test_size=0.2, seed=seed, keep_in_memory=True)["test"]
    part = held_out.train_test_split(test_size=0.5, seed=seed, keep_in_memory=True)["train"]
    if not 1 <= rows <= len(part):
        raise DataError(f"the official protocol samples rows from the 10 % part of {source!r}, which has "
                        f"{len(part)} rows; asked for {rows}")
    picked = random.Random(seed).sample(range(len(part)), rows)
    return [part[i]["text"] for i in picked]


def official_windows(tokenizer, source: str = OFFICIAL.source, rows: int = OFFICIAL.rows,
                     seq_len: int = OFFICIAL.seq_len) -> torch.LongTensor:
    """The official calibration windows: ``official_rows`` joined with blank lines, tokenised in one
    pass with the tokenizer's defaults (as the official ``prepare_test_dataloader``: a BOS, for a
    tokenizer that adds one, starts the first window), cut into non-overlapping ``seq_len`` windows
    with the tail dropped."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2 tokens, got {seq_len}")
    ids = tokenizer("\n\n".join(official_rows(source, rows)))["input_ids"]
    if len(ids) < seq_len:
        raise DataError(f"the {rows} official calibration rows of {source!r} make {len(ids)} tokens, "
                        f"fewer than one window of {seq_len}")
    return cut_windows(torch.tensor(ids, dtype=torch.long), seq_len)


def _official_texts(source: str) -> list[str]:
    """Every row's ``text`` field of a datasets id (``hf:ID[:CONFIG][:SPLIT]``, split train by default)
    or of a local .json (a list of objects) / .jsonl (one object a line) file."""
    if source.startswith("hf:"):
        parts = source[len("hf:"):].split(":")
        dataset, config, split = parse_hf(source) if len(parts) > 1 else (parts[0], None, "train")
        try:
            with offline_when_unreachable():
                import datasets

                ds = datasets.load_dataset(dataset, config, split=split)
        except Exception as e:  # offline, unknown id, unknown split: all reach the user as one message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"cannot load {source!r} with `datasets` ({first}); without the hub, pass a local "
                            ".json/.jsonl file with a 'text' field") from None
        if "text" not in ds.column_names:
            raise DataError(f"{source!r} has no 'text' field (columns: {', '.join(ds.column_names)}); "
                            "the official protocol reads 'text'")
        return list(ds["text"])
    path = Path(source).expanduser()
    if path.suffix not in (".json", ".jsonl") or not path.is_file():
        raise DataError(f"the official protocol needs a datasets id (hf:ID[:CONFIG][:SPLIT]) or a local "
                        f".json/.jsonl file with a 'text' field; got {source!r}")
    if path.suffix == ".jsonl":
        return _jsonl_texts(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in records):
        raise DataError(f"{path}: expected a JSON list of objects, each with a string field 'text'")
    return [r["text"] for r in records]
