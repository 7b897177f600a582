"""What the app remembers: weights once per process, everything else once per browser session.

Weights and token windows are immutable once built, so ``st.cache_resource`` shares them between
sessions. Plans, undo history, importance scores, search results and the evaluator (which caches
hidden states of the last plan it saw) live in a per-session ``Workspace`` in ``st.session_state``:
two people toggling different components never see each other's numbers. Masked forwards on the
shared weights are serialised by the engine's per-model lock.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from shedder.arch import adapter_for
from shedder.bench import bench_speed
from shedder.cost import estimate
from shedder import downstream
from shedder.data import OFFICIAL, calibration_windows
from shedder.evaluator import PlanEvaluator
from shedder.loading import DEFAULT_MODEL, load_model
from shedder.masking import masked
from shedder.metrics import calibration_protocol, next_word_accuracy
from shedder.plan import Component, PruningPlan
from shedder.search import default_run_dir, greedy_search

#: Session-state key of the workspace.
WORKSPACE_KEY = "shedder_workspace"
UPLOAD_DIR = Path(tempfile.gettempdir()) / "shedder-uploads"


@dataclass(frozen=True)
class Settings:
    """Everything that decides which model and which windows the numbers come from."""

    #: Bundled name, local directory or hub id; ``SHEDDER_MODEL`` sets what a new session opens with.
    model: str = field(default_factory=lambda: os.environ.get("SHEDDER_MODEL", DEFAULT_MODEL))
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    calibration: str = "calibration"    # shedder.data.load_text source for importance and search
    protocol: str = "shedder"           # calibration sampling (shedder.data.PROTOCOLS); "official" fixes rows and window
    evaluation: str = "test"            # source for the live perplexity and next-word accuracy
    samples: int = 8                    # windows per text source
    seq_len: int = 128                  # tokens per window
    accuracy_passages: int = 100        # passages for next-word accuracy

    @property
    def model_key(self) -> tuple:
        return (self.model, self.dtype, self.device, self.trust_remote_code)

    @property
    def calibration_key(self) -> tuple:
        """(source, samples, seq_len, protocol) of the calibration windows: the official protocol
        samples its fixed 256 rows into 2048-token windows, whatever the evaluation windows are."""
        if self.protocol == "official":
            return (self.calibration, OFFICIAL.rows, OFFICIAL.seq_len, "official")
        return (self.calibration, self.samples, self.seq_len, "shedder")

    @property
    def calibration_batch_size(self) -> int:
        return OFFICIAL.batch_size if self.protocol == "official" else 8


@dataclass(frozen=True)
class Loaded:
    """A model shared by every session that asked for the same source, dtype and device."""

    model: object
    tokenizer: object
    adapter: object


@st.cache_resource(show_spinner="Loading model weights…", max_entries=4)
def load(model: str, dtype: str, device: str, trust_remote_code: bool) -> Loaded:
    net, tokenizer = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return Loaded(net, tokenizer, adapter_for(net))


@st.cache_resource(show_spinner="Tokenizing text…", max_entries=16)
def windows(model_key: tuple, source: str, samples: int, seq_len: int, protocol: str = "shedder"):
    """Token windows ``LongTensor[n, seq_len]`` of one text source for one model's tokenizer."""
    return calibration_windows(load(*model_key).tokenizer, source=source, samples=samples, seq_len=seq_len,
                               protocol=protocol)


@st.cache_resource(show_spinner="Starting Ray workers…", max_entries=2)
def worker_pool(model_key: tuple, source: str, samples: int, seq_len: int, protocol: str, workers: int | None,
                address: str | None):
    """Ray workers holding the model and one text source's windows, shared by every session (the
    model is shipped to them once; ``shedder.distributed``)."""
    from shedder.distributed import WorkerPool

    return WorkerPool(load(*model_key).model, windows(model_key, source, samples, seq_len, protocol), workers, address)


def ray_options() -> tuple[int | None, str | None]:
    """``SHEDDER_WORKERS=N`` and/or ``SHEDDER_RAY_ADDRESS=ADDR``: scores and searches run on Ray workers."""
    workers = os.environ.get("SHEDDER_WORKERS")
    return (int(workers) if workers else None), (os.environ.get("SHEDDER_RAY_ADDRESS") or None)


def stash_upload(name: str, data: bytes) -> str:
    """Write an uploaded text file where ``shedder.data.load_text`` can read it. The file name is
    the content hash, so the same upload reuses the cached windows."""
    suffix = Path(name).suffix.lower() or ".txt"
    UPLOAD_DIR.mkdir(parents=True, exist_ok=True)
    path = UPLOAD_DIR / f"{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    if not path.exists():
        path.write_bytes(data)
    return str(path)


@dataclass
class Workspace:
    """One browser session's state. Plans are immutable values; ``history`` is the undo stack."""

    settings: Settings = field(default_factory=Settings)
    plan: PruningPlan = field(default_factory=PruningPlan)
    history: list = field(default_factory=list)
    importance: object = None            # DataFrame from shedder.importance.score
    search: object = None                # SearchResult from shedder.search.greedy_search
    search_kinds: tuple = ()
    saved: dict = field(default_factory=dict)   # name -> PruningPlan
    _metrics: dict = field(default_factory=dict)  # PruningPlan -> {"ppl", "params", "flops", ...}
    _downstream: dict = field(default_factory=dict)  # (PruningPlan, tasks, limit) -> shedder.downstream.TaskScores
    _evaluator: object = None

    # -- model and data ----------------------------------------------------------------------
    @property
    def loaded(self) -> Loaded:
        return load(*self.settings.model_key)

    def windows(self, source: str):
        s = self.settings
        return windows(s.model_key, source, s.samples, s.seq_len)

    def calibration(self):
        """The calibration windows of importance and search, drawn by the chosen protocol."""
        return windows(self.settings.model_key, *self.settings.calibration_key)

    def calibration_protocol(self) -> str:
        s = self.settings
        return calibration_protocol(self.calibration(), s.calibration, s.protocol, rows=s.calibration_key[1])

    def configure(self, settings: Settings) -> None:
        """Switch model or data. Loads first, so a failure leaves the previous setup intact;
        results computed for another model or other windows are dropped."""
        load(*settings.model_key)
        windows(settings.model_key, *settings.calibration_key)
        windows(settings.model_key, settings.evaluation, settings.samples, settings.seq_len)
        same_model = settings.model_key == self.settings.model_key
        same_calibration = same_model and settings.calibration_key == self.settings.calibration_key
        self.settings = settings
        self._metrics.clear()
        self._evaluator = None
        if not same_model:
            self._downstream.clear()
        if not same_calibration:
            self.importance, self.search, self.search_kinds = None, None, ()
        if not same_model:
            self.plan, self.history, self.saved = PruningPlan(), [], {}

    def pool(self):
        """The Ray workers for scores and searches on the calibration windows, or None (in-process)."""
        workers, address = ray_options()
        if workers is None and address is None:
            return None
        s = self.settings
        return worker_pool(s.model_key, *s.calibration_key, workers, address)

    # -- plans -----------------------------------------------------------------------------------
    def set_plan(self, plan: PruningPlan) -> None:
        """Validate against the loaded model (raises PlanError) and make it current, undoably."""
        plan = self.loaded.adapter.validate(plan)
        if plan != self.plan:
            self.history.append(self.plan)
            self.plan = plan

    def toggle(self, comp: Component) -> None:
        """Remove or restore one component. Removing a block subsumes its finer components."""
        plan = self.plan.toggle(comp)
        self.set_plan(plan.blocks_subsuming() if comp.kind == "block" else plan)

    def replace_kind(self, kind: str, comps) -> None:
        """Make ``comps`` exactly the removed components of ``kind`` (the per-kind pickers)."""
        plan = self.plan.without_components(self.plan.of_kind(kind)).with_components(comps)
        self.set_plan(plan.blocks_subsuming() if kind == "block" else plan)

    def undo(self) -> None:
        if self.history:
            self.plan = self.history.pop()

    def reset(self) -> None:
        self.set_plan(PruningPlan())

    # -- numbers (all from the engine, memoised per plan) ---------------------------------------
    def evaluator(self):
        if self._evaluator is None:
            loaded = self.loaded
            # No budget of its own: the sessions' evaluators share the process's (shedder.budget).
            self._evaluator = PlanEvaluator(loaded.model, self.windows(self.settings.evaluation), adapter=loaded.adapter)
        return self._evaluator

    def metrics(self, plan: PruningPlan, progress=None) -> dict:
        """Perplexity on the evaluation windows, parameters and analytic FLOPs of ``plan``."""
        plan = self.loaded.adapter.validate(plan)
        m = self._metrics.setdefault(plan, {})
        if "ppl" not in m:
            loaded = self.loaded
            cost = estimate(loaded.model, plan, seq_len=self.settings.seq_len, adapter=loaded.adapter)
            m.update(ppl=float(self.evaluator().perplexity(plan, progress=progress)),
                     params=int(loaded.adapter.param_count(plan)),
                     flops=float(cost.flops_per_token_prefill))
        return m

    def accuracy(self, plan: PruningPlan, progress=None) -> float:
        plan = self.loaded.adapter.validate(plan)
        m = self._metrics.setdefault(plan, {})
        if "accuracy" not in m:
            loaded = self.loaded
            with masked(loaded.model, plan, adapter=loaded.adapter):
                m["accuracy"] = float(next_word_accuracy(loaded.model, loaded.tokenizer, source=self.settings.evaluation,
                                                         n=self.settings.accuracy_passages, progress=progress))
        return m["accuracy"]

    def latency(self, plan: PruningPlan, progress=None) -> dict:
        """Measured latency of the *extracted* model (never a masked one), next to the original."""
        plan = self.loaded.adapter.validate(plan)
        m = self._metrics.setdefault(plan, {})
        if "latency_ms" not in m:
            s = self.settings
            r = bench_speed(s.model, plan=plan, seq_len=s.seq_len, new_tokens=8, repeats=3, warmup=1,
                            device=s.device, dtype=s.dtype, memory=False, progress=progress)
            m.update(latency_ms=r["pruned"]["ttft_ms"]["median"], original_latency_ms=r["original"]["ttft_ms"]["median"],
                     measured_speedup=r["measured_prefill_speedup"], expected_speedup=r["expected_prefill_speedup"],
                     bench=r)
        return m

    def greedy(self, kinds: list[str], steps: int, progress=None):
        """The greedy search over ``kinds`` for at least ``steps`` steps; a finished search with as
        many steps over the same kinds is reused (its first steps do not depend on later ones), and
        the run is logged under the cache, so a cancelled or shorter search is continued, not redone."""
        kinds = tuple(kinds)
        if self.search is None or self.search_kinds != kinds or len(self.search.steps) < steps:
            loaded = self.loaded
            windows = self.calibration()
            run_dir = default_run_dir(loaded.model, windows, list(kinds))  # a cancelled search resumes
            self.search = greedy_search(loaded.model, windows, list(kinds), steps=steps, progress=progress,
                                        run_dir=run_dir, resume=True, batch_size=self.settings.calibration_batch_size,
                                        pool=self.pool())
            self.search_kinds = kinds
        return self.search

    def downstream(self, plan: PruningPlan, tasks: tuple, limit: int | None, progress=None, run: bool = False):
        """lm-eval scores of ``plan`` (``shedder.downstream``): from this session or the disk cache, and
        computed only when ``run`` is set, so a rerun of the page never starts an evaluation."""
        loaded = self.loaded
        plan = loaded.adapter.validate(plan)
        key = (plan, tuple(tasks), limit)
        if key not in self._downstream:
            mask = plan if plan.components else None
            found = (downstream.scores(loaded.model, loaded.tokenizer, tasks, mask, limit=limit, progress=progress,
                                       adapter=loaded.adapter) if run else
                     downstream.cached(loaded.model, loaded.tokenizer, tasks, mask, limit=limit))
            if found is None:
                return None
            self._downstream[key] = found
        return self._downstream[key]

    def known(self, plan: PruningPlan) -> dict:
        """Whatever has been measured for ``plan`` so far (possibly nothing)."""
        return dict(self._metrics.get(self.loaded.adapter.validate(plan), {}))


def workspace() -> Workspace:
    """This browser session's workspace, created with default settings on first use."""
    if WORKSPACE_KEY not in st.session_state:
        st.session_state[WORKSPACE_KEY] = Workspace()
    return st.session_state[WORKSPACE_KEY]
