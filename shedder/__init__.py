"""Shedder Studio engine: training-free structured pruning of Mamba-family language models.

The engine never imports Streamlit; the app in ``app/`` and ``pages/`` is a thin layer over it.
"""
from shedder.core.errors import Cancelled, DataError, DownstreamError, ModelLoadError, PlanError, ShedderError, UnsupportedModelError
from shedder.core.plan import KINDS, Component, ModelIdentity, PruningPlan

__all__ = ["KINDS", "Cancelled", "Component", "DataError", "DownstreamError", "ModelIdentity", "ModelLoadError", "PlanError", "PruningPlan",
           "ShedderError", "UnsupportedModelError"]
