"""``bench`` from names and files: load the original, extract the plan (or load a saved pruned
model), and hand both to ``shedder.measure.bench``, which measures the models it is given.

The CPU peak memory is measured in a fresh process per model, loading it from a temporary
directory it was saved to (``FreshProcess``): saving and loading a model are this layer's.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from shedder.arch import adapter_for
from shedder.core.errors import ShedderError
from shedder.core.plan import PruningPlan
from shedder.core.progress import Progress
from shedder.formats.extract import extract, save, saved_plan
from shedder.formats.loading import REPO_ROOT, load_model, parse_dtype
from shedder.measure.bench import bench_models, check_options, peak_rss
from shedder.measure.timing import Protocol


def bench_speed(model_name: str, plan: PruningPlan | str | Path | None = None, pruned_dir: str | Path | None = None,
                *, batch_size: int = 1, seq_len: int = 256, new_tokens: int = 32, protocol: Protocol = Protocol(),
                device: str = "cpu", dtype: str = "float32", memory: bool = True,
                seed: int = 0, progress: Progress | None = None) -> dict:
    """Measure the original model and its extracted version side by side; returns a JSON-able dict.

    Give either ``plan`` (a ``PruningPlan`` or a plan file; the model is extracted here) or
    ``pruned_dir`` (a saved pruned model; its recorded plan, if any, is checked against the model).
    """
    if (plan is None) == (pruned_dir is None):
        raise ShedderError("bench needs exactly one of a plan (--plan) or a pruned model directory (--pruned)")
    check_options(batch_size, seq_len, new_tokens, protocol, device)
    dtype_name = str(parse_dtype(dtype)).replace("torch.", "")
    original, pruned, tokenizer, plan = load_pair(model_name, plan, pruned_dir, dtype, device)
    with fresh_processes(tokenizer, plan) as fresh_process:
        return bench_models(original, pruned, tokenizer, plan, model_name=model_name, batch_size=batch_size,
                            seq_len=seq_len, new_tokens=new_tokens, protocol=protocol, device=device,
                            dtype=dtype_name, memory=memory, seed=seed, progress=progress,
                            fresh_process=fresh_process)


def load_pair(model_name: str, plan, pruned_dir, dtype: str, device: str):
    """(original, extracted model, tokenizer, validated plan or None when a pruned directory has none)."""
    original, tokenizer = load_model(model_name, dtype=dtype, device=device)
    adapter = adapter_for(original)
    if pruned_dir is not None:
        pruned, _ = load_model(str(pruned_dir), dtype=dtype, device=device)
        if pruned.config.vocab_size != original.config.vocab_size or type(pruned) is not type(original):
            raise ShedderError(f"{pruned_dir} ({type(pruned).__name__}, vocabulary {pruned.config.vocab_size}) is not "
                               f"a pruned version of {model_name} ({type(original).__name__}, "
                               f"vocabulary {original.config.vocab_size})")
        plan = saved_plan(pruned_dir)
        return original, pruned, tokenizer, adapter.resolve(plan) if plan is not None else None
    if not isinstance(plan, PruningPlan):
        plan = PruningPlan.load(plan, adapter.identity(model_name))
    plan = adapter.resolve(plan)
    return original, extract(original, plan, adapter), tokenizer, plan


@contextlib.contextmanager
def fresh_processes(tokenizer, plan: PruningPlan | None):
    """A ``measure.bench.FreshProcess`` saving each model (the pruned one with ``plan``) into one
    temporary directory, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="shedder-bench-") as tmp:
        def fresh_process(name: str, model, spec: dict) -> tuple[int, dict]:
            out = save(model, tokenizer, Path(tmp) / name, plan if name == "pruned" else None)
            disk_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            return disk_bytes, _cpu_peak_subprocess(out, spec)

        yield fresh_process


def _cpu_peak_subprocess(model_dir: Path, spec: dict) -> dict:
    """Run ``memory_probe`` in a fresh interpreter so no other model or allocator cache is counted."""
    spec = {"model_dir": str(model_dir), **spec}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    code = "import sys, json; from shedder.formats.bench import memory_probe; print(json.dumps(memory_probe(json.loads(sys.argv[1]))))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed for {model_dir}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_probe(spec: dict) -> dict:
    """In a fresh process: load the model saved in ``spec["model_dir"]`` and measure its peak memory."""
    model, tokenizer = load_model(spec["model_dir"], dtype=spec["dtype"], device="cpu")
    return peak_rss(model, tokenizer, spec)
