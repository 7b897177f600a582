"""The Model page's baseline numbers, driven with AppTest like ``tests/test_app.py``: perplexity on the
first run, next-word accuracy only when asked, and both from the disk cache when the studio is reopened."""
import os

import test_app
from shedder.formats.loading import DEFAULT_MODEL
from test_app import assert_clean, metric, open_app, workspace

private_cache = test_app.private_cache  # autouse: each test its own disk cache


def test_model_page_shows_architecture_and_baseline_with_protocol(monkeypatch):
    measured = counting(monkeypatch, "next_word_accuracy")
    at = open_app()
    ws = workspace(at)
    assert ws.settings.model == os.environ.get("SHEDDER_MODEL", DEFAULT_MODEL)
    assert float(metric(at, "perplexity")) > 1
    assert metric(at, "layers") == str(ws.loaded.adapter.num_layers)
    captions = " ".join(c.value for c in at.caption)
    assert "4 non-overlapping windows of 64 tokens" in captions
    assert len(at.get("plotly_chart")) == 1  # the architecture strip
    # next-word accuracy waits for its button: the first paint measures perplexity only
    assert measured == [] and not [m for m in at.metric if m.label == "next-word accuracy"]
    at.button(key="model_accuracy").click().run()
    assert_clean(at)
    assert len(measured) == 1 and 0 <= float(metric(at, "next-word accuracy").rstrip("%")) <= 100
    assert "next-word accuracy" in " ".join(c.value for c in at.caption)
    assert [b for b in at.button if b.key == "model_accuracy"] == []


def test_model_page_reopened_shows_the_baseline_from_the_cache(monkeypatch):
    """A new session (another tab, a restarted server) reads both baseline numbers from the disk."""
    first = open_app()
    first.button(key="model_accuracy").click().run()
    ppl, acc = metric(first, "perplexity"), metric(first, "next-word accuracy")
    measured = counting(monkeypatch, "next_word_accuracy")
    again = open_app()
    assert measured == []  # neither number measured again: no accuracy pass, no evaluator built
    assert (metric(again, "perplexity"), metric(again, "next-word accuracy")) == (ppl, acc)
    assert workspace(again)._evaluator is None
    assert [b for b in again.button if b.key == "model_accuracy"] == []


def counting(monkeypatch, name: str) -> list:
    """Every later call of ``shedder.api.<name>`` (what the studio calls) appended to the list returned."""
    from shedder import api

    calls, real = [], getattr(api, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, name, counted)
    return calls
