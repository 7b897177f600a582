"""The official Mamba-Shedder calibration sampling (``--protocol official``), on local files.

The reference below follows the official ``utils.get_dataset`` + ``prune.py`` recipe step by step
with numpy and ``random`` directly (``datasets.train_test_split`` draws its permutation from
``numpy.random.default_rng(seed)``, puts the first ``ceil(test_size * n)`` indices in "test" and the
next ``floor(train_size * n)`` in "train"), so a change in how we call ``datasets`` shows up here.
"""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from shedder.measure import data, metrics
from shedder.cli import main
from shedder.core.errors import DataError

N_ROWS = 300


def reference_rows(texts: list[str], rows: int, seed: int = 42) -> list[str]:
    def split(indices, test_size):
        perm = np.random.default_rng(seed).permutation(len(indices))
        n_test = math.ceil(test_size * len(indices))
        n_train = math.floor((1 - test_size) * len(indices))
        return [indices[i] for i in perm[n_test:n_test + n_train]], [indices[i] for i in perm[:n_test]]

    _, held_out = split(list(range(len(texts))), 0.2)
    part, _ = split(held_out, 0.5)  # the official "test" set is the first half of the 20 %
    return [texts[part[i]] for i in random.Random(seed).sample(range(len(part)), rows)]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    paragraphs = [p for p in data.load_text("test").split("\n\n") if len(p.split()) > 5][:N_ROWS]
    assert len(paragraphs) == N_ROWS
    path = tmp_path_factory.mktemp("official") / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(paragraphs)))
    return path, paragraphs


def test_rows_follow_the_official_split_and_sampling(rows_file, tmp_path):
    path, texts = rows_file
    got = data.official_rows(str(path), rows=8)
    assert got == reference_rows(texts, 8)
    as_json = tmp_path / "rows.json"
    as_json.write_text(json.dumps([{"text": t} for t in texts]))
    assert data.official_rows(str(as_json), rows=8) == got
    with pytest.raises(DataError, match="has 30 rows; asked for 31"):
        data.official_rows(str(path), rows=31)


def test_windows_are_the_joined_rows_cut_without_tail(rows_file, bundled_tokenizer):
    path, _ = rows_file
    windows = data.calibration_windows(bundled_tokenizer, str(path), samples=8, seq_len=64, protocol="official")
    ids = bundled_tokenizer("\n\n".join(data.official_rows(str(path), rows=8)))["input_ids"]
    assert windows.shape == (len(ids) // 64, 64)
    assert windows.flatten().tolist() == ids[: windows.numel()]


def test_sources_without_text_are_refused(tmp_path):
    txt = tmp_path / "plain.txt"
    txt.write_text("some text")
    with pytest.raises(DataError, match="datasets id .* or a local .json/.jsonl"):
        data.official_rows(str(txt))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "no text field"}]))
    with pytest.raises(DataError, match="string field 'text'"):
        data.official_rows(str(bad))
    with pytest.raises(DataError, match="unknown calibration protocol"):
        data.calibration_windows(None, "calibration", protocol="paper")


def test_cli_score_states_the_protocol_that_ran(capsys, tiny_model_dir, rows_file, tmp_path, bundled_tokenizer):
    path, _ = rows_file
    argv = ["score", "--model", str(tiny_model_dir), "--kinds", "block", "--cache-dir", str(tmp_path / "c"),
            "--seq-len", "32", "--json", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "o.csv"), "--protocol", "official", "--data", str(path),
                 "--samples", "2"]) == 0
    official = json.loads(capsys.readouterr().out)["protocol"]
    assert "official Mamba-Shedder protocol (2 rows" in official and str(path) in official
    windows = data.calibration_windows(bundled_tokenizer, "calibration", samples=2, seq_len=32)
    assert metrics.calibration_protocol(windows, "calibration").startswith(
        "calibration, shedder protocol: token-level perplexity over 2 non-overlapping windows of 32 tokens of 'calibration'")
