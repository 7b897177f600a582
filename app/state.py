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
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import streamlit as st

from shedder import api
from shedder.api import DEFAULT_MODEL, Calibration, PlanEvaluator, RecoverConfig, Recovered, WorkerPool
from shedder.core.errors import ShedderError, printable
from shedder.core.fileio import safe_name
from shedder.core.plan import Component, PruningPlan

from . import baseline, sessions

#: Session-state key of the workspace.
WORKSPACE_KEY = "shedder_workspace"


@dataclass(frozen=True)
class Settings:
    """Everything that decides which model and which windows the numbers come from."""

    #: Bundled name, local directory or hub id; ``SHEDDER_MODEL`` sets what a new session opens with.
    model: str = field(default_factory=lambda: os.environ.get("SHEDDER_MODEL", DEFAULT_MODEL))
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    calibration: str = "calibration"    # shedder.measure.data.load_text source for importance and search
    protocol: str = "shedder"           # calibration sampling (shedder.measure.data.PROTOCOLS); "official" fixes rows and window
    evaluation: str = "test"            # source for the live perplexity and next-word accuracy
    samples: int = 8                    # windows per text source
    seq_len: int = 128                  # tokens per window
    accuracy_passages: int = 100        # passages for next-word accuracy

    @property
    def model_key(self) -> tuple:
        return (self.model, self.dtype, self.device, self.trust_remote_code)

    @property
    def model_name(self) -> str:
        """The model as a visitor names it: a bundled name or hub id as given, a server directory by its
        last part only (what plans, cards and exports carry, never the server path)."""
        return Path(self.model).name if Path(self.model).is_dir() else self.model

    @property
    def calibration_spec(self) -> Calibration:
        """The calibration of importance and search (``api.Calibration``): the official protocol
        samples its fixed rows into its own windows, whatever the evaluation windows are."""
        if self.protocol == "official":
            return Calibration.resolve("official", self.calibration)
        return Calibration.resolve("shedder", self.calibration, self.samples, self.seq_len)

    @property
    def calibration_key(self) -> tuple:
        """(source, samples, seq_len, protocol) of the calibration windows."""
        return self.calibration_spec.key

    @property
    def calibration_batch_size(self) -> int:
        return self.calibration_spec.batch_size


@dataclass(frozen=True)
class Loaded:
    """A model shared by every session that asked for the same source, dtype and device."""

    model: object
    tokenizer: object
    adapter: object


@st.cache_resource(show_spinner="Loading model weights…", max_entries=4)
def load(model: str, dtype: str, device: str, trust_remote_code: bool) -> Loaded:
    net, tokenizer = api.load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return Loaded(net, tokenizer, api.adapter_for(net))


@st.cache_resource(show_spinner="Tokenizing text…", max_entries=16)
def windows(model_key: tuple, source: str, samples: int, seq_len: int, protocol: str = "shedder"):
    """Token windows ``LongTensor[n, seq_len]`` of one text source for one model's tokenizer."""
    tokenizer = load(*model_key).tokenizer
    return Calibration.resolve(protocol, source, samples, seq_len).windows(tokenizer)


def waiting_notice(model=None):
    """A progress callback for work drawn without a bar: it shows a notice only while the shared
    model is held elsewhere, saying whose: another live session, or a run this visitor left (the
    previous run of a reloaded page, a closed tab) that ends at its next step (each update lets
    Streamlit stop this run, so leaving the page or pressing Cancel stops the wait)."""
    slot = None

    def callback(done: int, total: int, message: str = "") -> None:
        nonlocal slot
        if message == api.WAITING:
            slot = slot or st.empty()
            slot.info(sessions.holder_note(api.holder(model) if model is not None else None))
        elif slot is not None:  # the model is ours now
            slot.empty()
            slot = None

    return callback


@st.cache_resource(show_spinner="Starting Ray workers…", max_entries=2)
def worker_pool(model_key: tuple, source: str, samples: int, seq_len: int, protocol: str, workers: int | None,
                address: str | None):
    """Ray workers holding the model and one text source's windows, shared by every session (the
    model is shipped to them once; ``shedder.prune.distributed``)."""
    return WorkerPool(load(*model_key).model, windows(model_key, source, samples, seq_len, protocol), workers, address)


def ray_options() -> tuple[int | None, str | None]:
    """``SHEDDER_WORKERS=N`` and/or ``SHEDDER_RAY_ADDRESS=ADDR``: scores and searches run on Ray workers."""
    workers = os.environ.get("SHEDDER_WORKERS")
    return (int(workers) if workers else None), (os.environ.get("SHEDDER_RAY_ADDRESS") or None)


@dataclass
class Workspace:
    """One browser session's state. Plans are immutable values; ``history`` is the undo stack."""

    settings: Settings = field(default_factory=Settings)
    plan: PruningPlan = field(default_factory=PruningPlan)
    history: list = field(default_factory=list)
    importance: object = None            # DataFrame from shedder.prune.importance.score
    search: object = None                # SearchResult from shedder.prune.search.greedy_search
    search_kinds: tuple = ()
    saved: dict = field(default_factory=dict)   # name -> PruningPlan
    recovered: list = field(default_factory=list)  # Recovered models of this session (frontier points)
    series: dict = field(default_factory=dict)  # name -> shedder.prune.frontier.Series (strategies on the frontier)
    metric_tables: dict = field(default_factory=dict)  # (metric, kinds) -> metric_scores table
    agreement: object = None             # (tables, rows) from shedder.prune.agreement.compare
    texts: dict = field(default_factory=dict)  # (plan, prompt, tokens) -> greedy continuation
    _metrics: dict = field(default_factory=dict)  # PruningPlan -> {"ppl", "params", "flops", ...}
    _downstream: dict = field(default_factory=dict)  # (PruningPlan, tasks, limit) -> shedder.measure.downstream.TaskScores
    _evaluator: object = None
    uploads: dict = field(default_factory=dict)  # stashed path -> the uploaded file's name
    _upload_dir: Path | None = None
    #: What another model (or calibration text) of this session had: restored on switching back.
    _shelf: dict = field(default_factory=dict)

    # -- uploads (this session's own, deleted once the session has ended: ``app.sessions``) --------
    def stash_upload(self, name: str, data: bytes) -> str:
        """Write an uploaded text file where ``shedder.measure.data.load_text`` can read it, in a folder of
        this session's own (``app.sessions``: deleted once the session has ended). The content hash
        names its subfolder, so the same upload reuses the cached windows; the file gets a safe,
        length-capped version of the uploaded name, and messages still show the name as uploaded."""
        if self._upload_dir is None or not self._upload_dir.is_dir():
            self._upload_dir = sessions.open_folder(sessions.session_id(), self._upload_dir)
        path = self._upload_dir / hashlib.sha256(data).hexdigest()[:16] / safe_name(name, "upload.txt")
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.uploads[str(path)] = printable(re.split(r"[/\\]", name)[-1])
        return str(path)

    def heartbeat(self) -> None:
        """Mark this session alive (a rerun) and delete the uploads of ended sessions (at most once a
        minute per process)."""
        if self._upload_dir is not None:
            sessions.touch(self._upload_dir)
        sessions.maybe_sweep()

    def label(self, source: str) -> str:
        """A text source as the visitor knows it: an upload by its file name, not its server path."""
        return f"upload {self.uploads[source]}" if source in self.uploads else source

    def public(self, message: str) -> str:
        """``message`` with every server path of an upload replaced by the uploaded file's name."""
        for path, name in self.uploads.items():
            message = message.replace(path, name)
        if self._upload_dir is not None:
            message = message.replace(str(self._upload_dir), "<upload>")
        return message

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
        return self.settings.calibration_spec.describe(self.calibration())

    def configure(self, settings: Settings) -> None:
        """Switch model or data. Loads first, so a failure leaves the previous setup intact. What was
        done for the previous model (plans, saved plans, recoveries) and on its calibration text
        (scores, searches, series) is shelved, and what was done before for the new ones comes back:
        switching to another model and back restores everything. Remote code runs only where the
        server allows it (``app.hosting``)."""
        from .hosting import hosting

        if settings.trust_remote_code and not hosting().allow_remote_code:
            raise ShedderError("this server does not allow remote code (trust_remote_code); whoever runs it "
                               "can enable it with SHEDDER_ALLOW_REMOTE_CODE=1")
        load(*settings.model_key)
        windows(settings.model_key, *settings.calibration_key)
        windows(settings.model_key, settings.evaluation, settings.samples, settings.seq_len)
        old = self.settings
        same_model = settings.model_key == old.model_key
        same_calibration = same_model and settings.calibration_key == old.calibration_key
        self.settings = settings
        self._metrics.clear()
        self._evaluator = None
        self.texts.clear()
        if not same_calibration:  # this model's results on that text wait on the shelf
            self._shelf[("calibration", old.model_key, old.calibration_key)] = (
                self.importance, self.search, self.search_kinds, self.metric_tables, self.agreement, self.series)
            (self.importance, self.search, self.search_kinds, self.metric_tables, self.agreement,
             self.series) = self._shelf.pop(("calibration", settings.model_key, settings.calibration_key),
                                            (None, None, (), {}, None, {}))
        if not same_model:
            self._shelf[("model", old.model_key)] = (self.plan, self.history, self.saved, self.recovered,
                                                     self._downstream)
            self.plan, self.history, self.saved, self.recovered, self._downstream = self._shelf.pop(
                ("model", settings.model_key), (PruningPlan(), [], {}, [], {}))

    def pool(self):
        """The Ray workers for scores and searches on the calibration windows, or None (in-process)."""
        workers, address = ray_options()
        if workers is None and address is None:
            return None
        s = self.settings
        return worker_pool(s.model_key, *s.calibration_key, workers, address)

    # -- plans -----------------------------------------------------------------------------------
    def set_plan(self, plan: PruningPlan) -> None:
        """Resolve against the loaded model (raises PlanError) and make it current, undoably: the pages
        then use the resolved plan without checking it again."""
        plan = self.loaded.adapter.resolve(plan)
        if plan != self.plan:
            self.history.append(self.plan)
            self.plan = plan

    def toggle(self, comp: Component) -> None:
        """Remove or restore one component. Removing a block subsumes its finer components."""
        plan = self.plan.toggle(comp)
        self.set_plan(plan.blocks_subsuming() if comp.kind == "block" else plan)

    def replace_kind(self, kind: str, comps) -> None:
        """Make ``comps`` exactly the removed components of ``kind`` (the per-kind pickers)."""
        plan = self.plan.restoring(self.plan.of_kind(kind)).with_components(comps)
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
            # No budget of its own: the sessions' evaluators share the process's (shedder.measure.budget).
            self._evaluator = PlanEvaluator(loaded.model, self.windows(self.settings.evaluation), adapter=loaded.adapter)
        return self._evaluator

    def metrics(self, plan: PruningPlan, progress=None) -> dict:
        """Perplexity on the evaluation windows, parameters and analytic FLOPs of ``plan`` (unpruned: kept on disk)."""
        plan = self.loaded.adapter.resolve(plan)
        m = self._metrics.setdefault(plan, {})
        if "ppl" not in m:
            loaded = self.loaded
            cost = api.estimate(loaded.model, plan, seq_len=self.settings.seq_len, adapter=loaded.adapter)
            m.update({} if plan.components else baseline.known(self))  # what an earlier session measured
            m.update(ppl=m.get("ppl") or baseline.keep(self, plan, "ppl", float(self.evaluator().perplexity(
                         plan, progress=progress or waiting_notice(loaded.model)))),
                     params=int(loaded.adapter.param_count(plan)),
                     flops=float(cost.flops_per_token_prefill),
                     state_bytes=float(cost.state_bytes_per_sequence))
        return m

    def accuracy(self, plan: PruningPlan, progress=None) -> float:
        plan = self.loaded.adapter.resolve(plan)
        m = self._metrics.setdefault(plan, {})
        if "accuracy" not in m:
            loaded = self.loaded
            with api.masked(loaded.model, plan, adapter=loaded.adapter, progress=progress):
                m["accuracy"] = baseline.keep(self, plan, "accuracy", float(api.next_word_accuracy(
                    loaded.model, loaded.tokenizer, source=self.settings.evaluation, n=self.settings.accuracy_passages,
                    progress=progress)))
        return m["accuracy"]

    def latency(self, plan: PruningPlan, progress=None, **bench) -> dict:
        """Measured speed of the *extracted* model (never a masked one) next to the original, from
        the engine's on-disk cache when this point was measured before (in any session)."""
        plan = self.loaded.adapter.resolve(plan)
        m = self._metrics.setdefault(plan, {})
        if "prefill_speedup" not in m:
            s = self.settings
            m.update(api.measure_point(s.model, self.loaded.model, plan, device=s.device, dtype=s.dtype,
                                      progress=progress, seq_len=s.seq_len, **bench))
            self._timings(m)
        return m

    @staticmethod
    def _timings(m: dict) -> None:
        """The time-to-first-token figures the Prune and Export pages show, from the bench result."""
        r = m.get("bench")
        if r:
            m.update(latency_ms=r["pruned"]["ttft_ms"]["median"], original_latency_ms=r["original"]["ttft_ms"]["median"])

    def measured(self, plan: PruningPlan, **bench) -> dict:
        """What is known of ``plan``'s measured speed without measuring (possibly nothing)."""
        plan = self.loaded.adapter.resolve(plan)
        m = self._metrics.setdefault(plan, {})
        if "prefill_speedup" not in m:
            s = self.settings
            m.update(api.measured_point(self.loaded.model, plan, s.device, s.dtype, seq_len=s.seq_len, **bench) or {})
            self._timings(m)
        return m

    def metric_table(self, metric: str, kinds, progress=None):
        """``metric``'s scores of ``kinds`` on the calibration windows (kept for the session)."""
        key = (metric, tuple(kinds))
        if key not in self.metric_tables:
            self.metric_tables[key] = api.score(self.loaded.model, self.calibration(), list(kinds), metric,
                                                 progress=progress)
        return self.metric_tables[key]

    def compare(self, kinds, metrics, progress=None):
        """Rank agreement of ``metrics`` on ``kinds`` (and across two halves of the calibration)."""
        self.agreement = api.compare(self.loaded.model, self.calibration(), list(kinds), list(metrics),
                                     progress=progress, batch_size=self.settings.calibration_batch_size)
        return self.agreement

    def record(self, plan: PruningPlan, **values) -> None:
        """Attach numbers measured elsewhere to a point (e.g. ``lm_eval_average`` and
        ``relative_accuracy`` from lm-eval): the frontier offers every y axis some point has."""
        self._metrics.setdefault(self.loaded.adapter.resolve(plan), {}).update(values)

    def add_series(self, series) -> None:
        """Put a strategy's plans on the frontier (replacing a series of the same name)."""
        self.series[series.name] = series

    def continuation(self, plan: PruningPlan, prompt: str, tokens: int) -> str:
        """Greedy continuation of ``prompt`` by the model under ``plan`` (memoised)."""
        plan = self.loaded.adapter.resolve(plan)
        key = (plan, prompt, tokens)
        if key not in self.texts:
            loaded = self.loaded
            self.texts[key] = api.continue_text(loaded.model, loaded.tokenizer, prompt, plan, tokens, loaded.adapter)
        return self.texts[key]

    def has_continuation(self, plan: PruningPlan, prompt: str, tokens: int) -> bool:
        return (self.loaded.adapter.resolve(plan), prompt, tokens) in self.texts

    def greedy(self, kinds: list[str], steps: int | None, progress=None, target_params: float | None = None,
               max_ppl: float | None = None, race: bool = False):
        """The greedy search over ``kinds``, stopped as the CLI's ``search`` stops (``steps``,
        ``target_params``, ``max_ppl``); ``race``: raced with the CLI's default race settings (its own
        run, series and label). The run is logged under the cache, so a cancelled or shorter
        search is continued, not redone, and one with fewer steps is read back from the log; it goes
        on the session's runs list."""
        kinds = tuple(kinds)
        limits = dict(steps=steps, target_params=target_params, max_ppl=max_ppl)
        self.search = api.cached_search(self.loaded.model, self.calibration(), kinds, progress=progress,
                                        batch_size=self.settings.calibration_batch_size, pool=self.pool(),
                                        race=api.Race() if race else None, **limits)
        self.search_kinds = kinds
        self.add_series(api.search_series(self.search, kinds))
        raced = " (raced)" if race else ""
        self.remember({"type": "search", "id": f"search:{','.join(kinds)}{raced}", "kinds": list(kinds), **limits,
                       "race": race, "label": f"greedy search{raced} of {', '.join(kinds)}: {len(self.search.steps)} steps"})
        return self.search

    def one_shot(self, metric: str, kinds, k: int, progress=None):
        """The one-shot series of ``metric`` on ``kinds`` up to ``k`` components (on the runs list)."""
        table = self.metric_table(metric, kinds, progress=progress)
        series = api.one_shot(self.loaded.model, table, int(k), list(kinds))
        self.add_series(series)
        self.remember({"type": "one-shot", "id": f"one-shot:{series.name}", "metric": metric, "kinds": list(kinds),
                       "k": int(k), "label": series.name})
        return series

    def stock(self, strategy: str, kinds, k: int, metric: str = "ppl", progress=None):
        """The stock-shaped series (``api.stock``: ``k`` components gone from every unit of each kind)
        on the frontier and the runs list; the entry holds its plans, so restoring recomputes nothing."""
        series = api.stock(self.loaded.model, self.calibration(), strategy, int(k), metric, progress=progress,
                           batch_size=self.settings.calibration_batch_size, kinds=tuple(kinds))
        self.add_series(series)
        points = [{"label": p.label, "plan": api.public_plan(p.plan, self.settings.model_name).to_dict()}
                  for p in series.points]
        self.remember({"type": "stock", "id": f"stock:{series.name}", "name": series.name, "origin": series.origin,
                       "points": points, "label": f"{series.name}: {len(points)} plans"})
        return series

    def save_plan(self, name: str, plan: PruningPlan | None = None) -> None:
        """Keep ``plan`` (the current one by default) under ``name`` for the frontier and the runs list."""
        plan = self.loaded.adapter.resolve(plan if plan is not None else self.plan)
        self.saved[name] = plan
        self.remember({"type": "saved", "id": f"saved:{name}", "name": name,
                       "plan": api.public_plan(plan, self.settings.model_name).to_dict(),
                       "label": f"saved plan “{name}”: {plan.describe()}"})

    # -- the runs list: what was done for this model and calibration text, restorable ------------
    def remember(self, entry: dict) -> None:
        """Put ``entry`` on this model and text's runs list (``api.record_run``; shared by every session)."""
        try:
            api.record_run(self.loaded.model, self.calibration(), entry)
        except OSError:  # a read-only or full cache: the result itself is still here
            pass

    def runs(self) -> list[dict]:
        """The runs list of this model and calibration text, oldest first."""
        return api.recorded_runs(self.loaded.model, self.calibration())

    def restore(self, entry: dict, progress=None) -> None:
        """Bring a run back from what the engine keeps on disk: a search from its log, a one-shot series
        from its scores, a stock-shaped series from its entry, a saved plan, a finished recovery. The current plan is left as it is."""
        kind = entry["type"]
        if kind == "search":
            current = (self.search, self.search_kinds)
            self.greedy(entry["kinds"], entry.get("steps"), progress, entry.get("target_params"), entry.get("max_ppl"),
                        entry.get("race", False))
            if current[0] is not None and current[1] != tuple(entry["kinds"]):  # a search shown now stays shown
                self.search, self.search_kinds = current
        elif kind == "one-shot":
            self.one_shot(entry["metric"], entry["kinds"], entry["k"], progress)
        elif kind == "stock":
            resolve = self.loaded.adapter.resolve
            self.add_series(api.Series(entry["name"], entry["origin"],
                                       [api.Point(p["label"], resolve(_ours(p["plan"]))) for p in entry["points"]]))
        elif kind == "saved":
            self.save_plan(entry["name"], _ours(entry["plan"]))
        elif kind == "recovery":
            recipe = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["recipe"].items()}  # JSON lists
            self.recover(RecoverConfig(**recipe), progress, _ours(entry["plan"]))

    def downstream(self, plan: PruningPlan, tasks: tuple, limit: int | None, progress=None, run: bool = False):
        """lm-eval scores of ``plan`` (``shedder.measure.downstream``): from this session or the disk cache, and
        computed only when ``run`` is set, so a rerun of the page never starts an evaluation."""
        loaded = self.loaded
        plan = loaded.adapter.resolve(plan)
        key = (plan, tuple(tasks), limit)
        if key not in self._downstream:
            found = api.lm_eval_scores(loaded.model, loaded.tokenizer, tasks, plan, limit=limit, progress=progress,
                                       adapter=loaded.adapter, run=run)
            if found is None:
                return None
            self._downstream[key] = found
        return self._downstream[key]

    def recover(self, config: RecoverConfig, progress=None, plan: PruningPlan | None = None) -> Recovered:
        """Recover ``plan``'s (by default the current plan's) extracted model with ``config`` (a run under
        the cache: a cancelled one resumes, a finished one is reopened), measure it on the evaluation
        windows, and put it on the runs list."""
        loaded, s = self.loaded, self.settings
        plan = loaded.adapter.resolve(plan if plan is not None else self.plan)
        result = api.recover_plan(loaded.model, loaded.tokenizer, loaded.adapter, plan, config, s.model,
                                  self.windows(s.evaluation), s.dtype, s.device, progress, name=s.model_name)
        plan = result.plan
        result.metrics["flops"] = self.metrics(plan)["flops"]
        self.recovered = [r for r in self.recovered if (r.plan, r.config) != (plan, config)] + [result]
        self.remember({"type": "recovery", "id": f"recovery:{result.run_dir}", "recipe": asdict(config),
                       "plan": api.public_plan(plan, s.model_name).to_dict(),
                       "label": f"{result.name} of {plan.describe()}"})
        return result

    def known(self, plan: PruningPlan) -> dict:
        """Whatever has been measured for ``plan`` so far (possibly nothing)."""
        return dict(self._metrics.get(self.loaded.adapter.resolve(plan), {}))


def _ours(plan: dict) -> PruningPlan:
    """A plan from the runs list, given this model's own identity when resolved: the list is kept per
    model weights, and the plan it holds names the model publicly, not by its path here."""
    return replace(PruningPlan.from_dict(plan), model=None)


def workspace() -> Workspace:
    """This browser session's workspace, created with default settings on first use; every call
    (each page, each rerun) is a heartbeat of the session (``Workspace.heartbeat``)."""
    if WORKSPACE_KEY not in st.session_state:
        st.session_state[WORKSPACE_KEY] = Workspace()
    ws = st.session_state[WORKSPACE_KEY]
    ws.heartbeat()
    return ws
