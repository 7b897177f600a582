"""The use cases, written once for both faces: the CLI (``shedder.cli``) and the studio (``app/``,
``pages/``) parse or draw, call these, and show what they return.

    load a model with its text  models.load, models.plan_for, Calibration.resolve
    announce a cost              scoring.cost, scoring.announce, scoring.compare_cost
    score / compare metrics      scoring.score, scoring.compare
    search / one-shot            search.search, search.cached_search, one_shot
    evaluate                     evaluate.evaluate, evaluate.lm_eval
    baseline numbers on disk     baseline.known_baseline, baseline.remember_baseline
    measure speed                speed.bench_speed, speed.measure_point
    export                       export.export, export.export_zip, export.export_recovered
    recover                      recover.recover, recover.recover_plan, recover.curve (loss by step)
    the frontier table           Series, search_series, one_shot, pareto
    stock-shaped width pruning   stock.stock, stock.stock_shaped, stock.offered_kinds
    the studio's runs list       runs.record_run, runs.recorded_runs

The studio imports only this package and ``shedder.core``; the names below are what it needs.
"""
from __future__ import annotations

from shedder.api.baseline import known_baseline, remember_baseline
from shedder.api.calibration import (DEFAULT_BATCH, DEFAULT_CALIBRATION, DEFAULT_EVAL, DEFAULT_SAMPLES,
                                     DEFAULT_SEQ_LEN, OFFICIAL, PROTOCOLS, Calibration)
from shedder.api.evaluate import Evaluation, LmEval, check_tasks, eval_windows, evaluate, lm_eval, lm_eval_scores
from shedder.api.export import Exported, export, load_line, export_recovered, export_zip, measured_card, public_plan
from shedder.api.models import baseline, load, plan_for, pruned_with, sources, text_tokenizer
from shedder.api.recover import METHODS, RecoverConfig, Recovered, curve, plan_run_dir, recover, recover_plan
from shedder.api.runs import record_run, recorded_runs
from shedder.api.scoring import announce, cached, compare, compare_cost, cost, score, worker_pool
from shedder.api.search import Race, StopWhen, cached_search, search
from shedder.api.stock import (KINDS as STOCK_KINDS, STRATEGIES as STOCK_STRATEGIES, offered_kinds as stock_kinds, stock,
                               stock_shaped)
from shedder.api.speed import BENCH_DEFAULTS, bench_speed, measure_point, measured_point
from shedder.arch import adapter_for, count_parameters
from shedder.formats.loading import DEFAULT_MODEL, bundled_models, load_model, resolve
from shedder.formats.official import OfficialConfig, read_plan, to_official
from shedder.measure.continuation import continue_text
from shedder.measure.budget import human_seconds
from shedder.measure.cost import estimate
from shedder.measure.downstream import LOCAL_TASKS, PAPER_TASKS, require_lm_eval
from shedder.measure.evaluator import PlanEvaluator
from shedder.measure.masking import WAITING, holder, holding, masked
from shedder.measure.metrics import describe_protocol, next_word_accuracy, next_word_protocol, perplexity
from shedder.prune.agreement import matrix
from shedder.prune.distributed import WorkerPool
from shedder.prune.frontier import (MEASURED, PARETO_SPEED, SPEED_COLUMNS, X_AXES, Y_AXES, Point, Series, one_shot,
                                    pareto, search_series)
from shedder.core.cache import default_cache_dir
from shedder.prune.importance_metrics import REGISTRY, applicable, metric_names
from shedder.prune.search import SearchResult, SearchStep

__all__ = [name for name in dir() if not name.startswith("_") and name != "annotations"]
