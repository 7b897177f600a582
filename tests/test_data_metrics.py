"""Text sources, token windows, perplexity, next-word accuracy and parameter counts."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from shedder.core import cache
from shedder.measure import data, metrics
from shedder.arch import adapter_for, count_parameters
from shedder.core.errors import DataError
from shedder.core.plan import Component, PruningPlan


# ------------------------------------------------------------------------------------ sources
def test_bundled_splits_are_separate_and_non_empty():
    cal, test = data.load_text("calibration"), data.load_text("test")
    assert len(cal) > 10_000 and len(test) > 10_000
    assert cal[:2000] not in test


def test_missing_bundled_split_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATA_DIR", tmp_path)
    with pytest.raises(DataError, match="bundled 'test' text is missing"):
        data.load_text("test")


def test_local_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world\n")
    assert data.load_text(str(txt)) == "hello world\n"
    jl = tmp_path / "a.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n")
    assert data.load_text(str(jl)) == "one\n\ntwo"


@pytest.mark.parametrize("name,content,words", [
    ("empty.txt", "  \n", "is empty"),
    ("bad.jsonl", '{"text": "ok"}\n{oops\n', r"bad.jsonl:2: not valid JSON"),
    ("field.jsonl", '{"body": "x"}\n', "needs a string field 'text'"),
])
def test_bad_local_files(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=words):
        data.load_text(str(path))


def test_missing_path_names_the_source():
    with pytest.raises(DataError, match="not found: 'no/such/file.txt'"):
        data.load_text("no/such/file.txt")


def test_hf_sources(monkeypatch):
    import datasets

    assert data.parse_hf("hf:wikitext:wikitext-2-raw-v1:test") == ("wikitext", "wikitext-2-raw-v1", "test")
    assert data.parse_hf("hf:user/corpus:train") == ("user/corpus", None, "train")
    with pytest.raises(DataError, match="expected hf:DATASET"):
        data.parse_hf("hf:onlyname")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="hub unreachable"):
        data.load_text("hf:x:train")

    def fake(name, config, split):
        assert (name, config, split) == ("user/corpus", None, "train")
        return datasets.Dataset.from_dict({"id": [1, 2], "content": ["first doc", "second doc"]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert data.load_text("hf:user/corpus:train") == "first doc\n\nsecond doc"  # column found by type


def test_hf_sources_use_the_local_cache_at_once_when_the_hub_is_unreachable(monkeypatch):
    import datasets
    import datasets.config

    from shedder.core import hub

    seen = []

    def cached(name, config, split):
        seen.append(datasets.config.HF_HUB_OFFLINE)
        return datasets.Dataset.from_dict({"text": ["cached doc"]})

    monkeypatch.setattr(datasets, "load_dataset", cached)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: True)
    before = datasets.config.HF_HUB_OFFLINE
    assert data.load_text("hf:user/corpus:train") == "cached doc"
    assert seen == [True] and datasets.config.HF_HUB_OFFLINE == before  # offline only during the call
    monkeypatch.setattr(hub, "hub_unreachable", lambda: False)
    data.load_text("hf:user/corpus:train")
    assert seen == [True, before]


# ------------------------------------------------------------------------------------ windows
def test_token_windows_are_non_overlapping_from_the_start(bundled_tokenizer):
    text = data.load_text("test")[:20_000]
    ids = data.tokenize(bundled_tokenizer, text)
    w = data.token_windows(bundled_tokenizer, text, seq_len=50)
    assert w.shape == (len(ids) // 50, 50) and w.dtype == torch.long
    assert w.reshape(-1).tolist() == ids[: w.numel()]
    assert data.token_windows(bundled_tokenizer, text, seq_len=50, samples=3).shape == (3, 50)
    assert cache.windows_hash(w) != cache.windows_hash(w[:3])


@pytest.mark.parametrize("needed", [1, 300, 5000, 10 ** 9])
def test_tokenize_prefix_equals_the_whole_texts_first_tokens(bundled_tokenizer, needed):
    text = data.load_text("test")
    assert data.tokenize_prefix(bundled_tokenizer, text, needed) == data.tokenize(bundled_tokenizer, text)[:needed]


def test_a_few_windows_of_a_huge_text_tokenise_only_a_prefix(bundled_tokenizer, monkeypatch):
    one_line = " ".join(data.load_text("test").split()) * 40  # ~5 MB on one line
    seen = []
    real = data.tokenize
    monkeypatch.setattr(data, "tokenize", lambda tok, text: seen.append(len(text)) or real(tok, text))
    windows = data.token_windows(bundled_tokenizer, one_line, seq_len=256, samples=2)
    assert windows.shape == (2, 256) and max(seen) < 100_000
    assert windows.flatten().tolist() == real(bundled_tokenizer, one_line[:100_000])[:512]


def test_short_or_empty_text_is_refused(bundled_tokenizer):
    with pytest.raises(DataError, match="'tiny' has 2 tokens, fewer than one window of 64"):
        data.token_windows(bundled_tokenizer, "a b", seq_len=64, source="'tiny'")
    with pytest.raises(DataError, match="is empty"):
        data.token_windows(bundled_tokenizer, "   ", seq_len=8)


def test_calibration_windows_use_the_calibration_split(bundled_tokenizer):
    w = data.calibration_windows(bundled_tokenizer, samples=2, seq_len=16)
    ids = data.tokenize(bundled_tokenizer, data.load_text("calibration"))
    assert w.reshape(-1).tolist() == ids[:32]


# ------------------------------------------------------------------------------------ perplexity
def test_perplexity_is_token_level_exp_mean_nll(tiny_model_factory):
    model = tiny_model_factory("mamba2")
    torch.manual_seed(0)
    w = torch.randint(0, 128, (5, 12))
    with torch.no_grad():
        logits = model(w).logits  # [5, 12, 128]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), w[:, 1:].reshape(-1))
    seen = []
    ppl = metrics.perplexity(model, w, batch_size=2, progress=lambda d, t, m: seen.append((d, t)))
    assert ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert metrics.perplexity(model, w, batch_size=8) == pytest.approx(ppl, rel=1e-9)
    total, count = metrics.nll_sum(model, w)
    assert count == 5 * 11 and math.exp(total / count) == pytest.approx(ppl, rel=1e-9)


def test_perplexity_under_a_plan_uses_the_mask(tiny_model_factory):
    model = tiny_model_factory("mamba2")
    w = torch.randint(0, 128, (2, 12))
    plan = PruningPlan(frozenset({Component("block", 1)}))
    assert metrics.perplexity(model, w, plan=plan) != metrics.perplexity(model, w)


def test_protocol_lines():
    w = torch.zeros(4, 32, dtype=torch.long)
    line = metrics.describe_protocol(w, "test")
    assert "4 non-overlapping windows of 32 tokens" in line and "'test'" in line and "124 predicted" in line
    acc = metrics.next_word_protocol("test", 10)
    assert "first 10 paragraphs of 'test'" in acc and "greedy" in acc


# ------------------------------------------------------------------------------------ next word
def test_passages_split_context_and_final_word():
    words = " ".join(["word"] * 40)
    text = f"CHAPTER 1\n\n{words} the end of it all.”\n\nshort one\n\n{words} then 42.\n\n{words} and finally dawn!"
    found = metrics.passages(text)
    assert [p.word for p in found] == ["all", "dawn"]  # the numeric ending and short paragraphs are skipped
    assert found[0].context.endswith("the end of it") and not found[0].context.endswith(" ")
    assert len(metrics.passages(text, n=1)) == 1


class _Oracle(nn.Module):
    """Logits whose argmax at position t is the token at t+1 (``cheat=True``) or never is."""

    def __init__(self, vocab: int, cheat: bool):
        super().__init__()
        self.vocab, self.cheat = vocab, cheat
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        nxt = torch.roll(input_ids, -1, dims=1)
        target = nxt if self.cheat else (nxt + 1) % self.vocab
        return type("Out", (), {"logits": nn.functional.one_hot(target, self.vocab).float()})()


@pytest.mark.parametrize("cheat,expected", [(True, 1.0), (False, 0.0)])
def test_next_word_accuracy_scores_exact_greedy_matches(bundled_tokenizer, cheat, expected):
    model = _Oracle(len(bundled_tokenizer), cheat)
    seen = []
    acc = metrics.next_word_accuracy(model, bundled_tokenizer, "test", n=12, batch_size=5,
                                     progress=lambda d, t, m: seen.append((d, t)))
    assert acc == expected
    assert seen[-1] == (12, 12)


def test_next_word_accuracy_needs_paragraphs(tmp_path, bundled_tokenizer):
    path = tmp_path / "lines.txt"
    path.write_text("one two three\nfour five\n")
    with pytest.raises(DataError, match="no paragraph"):
        metrics.next_word_accuracy(None, bundled_tokenizer, str(path))


# ------------------------------------------------------------------------------------ params
def test_param_count(tiny_model_factory):
    model = tiny_model_factory("mamba2")
    assert metrics.param_count(model) == count_parameters(model)
    plan = PruningPlan(frozenset({Component("block", 2)}))
    removed = sum(p.numel() for p in adapter_for(model).layers()[2].parameters())
    assert metrics.param_count(model, plan) == count_parameters(model) - removed


def test_pareto_mask_keeps_only_undominated_points():
    from shedder.measure.metrics import pareto_mask

    costs, ppl = [1.0, 2.0, 3.0, 2.0, 4.0], [30.0, 20.0, 25.0, 20.0, 10.0]
    # (3, 25) is beaten by (2, 20); the two (2, 20) points tie and both stay
    assert pareto_mask(costs, ppl, maximize_quality=False) == [True, True, False, True, True]
    acc = [0.1, 0.3, 0.2, 0.3, 0.05]
    assert pareto_mask(costs, acc, maximize_quality=True) == [True, True, False, True, False]
