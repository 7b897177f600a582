"""The defaults and choices that a command line shows before any work: written once, in pure Python.

``python -m shedder --help``, every command's ``--help`` and an argument error (a bad flag, a missing
argument, a bad choice) are answered from these values alone, without importing torch or transformers
(a fraction of a second instead of seconds). The engine modules that use a value import it from here,
so each is written in one place; where the engine derives a list from its own tables (the metric
registry, the real-shape builders, the scale sizes) ``tests/test_startup.py`` checks it against this one.
"""
from __future__ import annotations

#: The model every command and the studio start with (``shedder.formats.loading``).
DEFAULT_MODEL = "mamba2-tiny"

#: Text sources and window counts of score / search (``calibration``) and eval (``test``)
#: (``shedder.api.calibration``; the official protocol's defaults live with it).
DEFAULT_CALIBRATION = "calibration"
DEFAULT_EVAL = "test"
DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, DEFAULT_BATCH = 16, 256, 8

#: Importance metrics, in the order registered, with the line ``--metric`` help and the studio show
#: (``shedder.prune.importance_metrics.REGISTRY`` registers each under this name and description).
METRICS = {
    "ppl": "perplexity increase when removed alone (one calibration pass per component)",
    "block_influence": "ShortGPT block influence, 1 − cos(layer input, layer output) (one forward)",
    "activation": "Minitron-style mean L2 norm of the component's output activations (one forward)",
    "taylor": "first-order Taylor, Σ|gradient · weight| over the component's parameters (one forward + backward)",
}

#: Recovery (``shedder.prune.recover``): what may be trained, the lr schedules after the warm-up, and
#: the learning rates that recovered the most per token on the bundled models (``bench recover``).
RECOVER_METHODS = ("lora", "full", "distill")
RECOVER_SCHEDULES = ("cosine", "linear", "constant")
RECOVER_DEFAULT_LR = {"lora": 2e-3, "full": 5e-4, "distill": 5e-4}
#: Where ``--report-to`` may send the curves (``none``: the run's log only), and the TensorBoard
#: folder inside a run directory.
REPORT_TO = ("none", "tensorboard")
TENSORBOARD_DIR = "tensorboard"

#: Stock-shaped width pruning (``shedder.prune.stock``): the kinds, with how a point's label counts
#: each, and the strategies (``shedder.api.stock``).
STOCK_KINDS = {"head": "heads per group", "mlp_channel_group": "MLP channel groups per MLP"}
STOCK_STRATEGIES = ("one-shot", "greedy")

#: Families with a real checkpoint shape (``shedder.dev.realshape.REAL_SHAPES``; ``bench gpu-check --family``).
REAL_SHAPE_FAMILIES = ("mamba", "falcon_mamba", "mamba2", "nemotron_h", "bamba", "zamba2", "zamba2_2.7b", "zamba",
                       "falcon_h1", "jamba", "granite", "granite_dense", "hymba")
#: Time limits of ``bench gpu-check --paper`` (``shedder.dev.paper_speed.PaperRun``): seconds of paired
#: rounds per measurement, and for the whole run.
PAPER_BUDGET_S, PAPER_TOTAL_S = 30.0, 420.0
#: Model sizes of ``bench scale`` (``shedder.dev.scale.SIZES``).
SCALE_SIZES = ("S", "M", "130m")
