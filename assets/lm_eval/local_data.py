"""Loads the bundled tasks' JSONL files from this directory, wherever lm-eval runs from (a YAML
``dataset_kwargs.data_files`` path would be read relative to the working directory). In memory:
nothing is written to the `datasets` cache. ``shedder/local_tasks.py`` says how the files were cut."""
import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    lines = (HERE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})


def lastword(**_metadata) -> datasets.DatasetDict:
    return _load("lastword")


def choice(**_metadata) -> datasets.DatasetDict:
    return _load("choice")
