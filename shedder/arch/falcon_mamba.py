"""Falcon-Mamba (``FalconMambaForCausalLM``): the Mamba-1 layout, with RMS norms on dt, B and C inside
the mixer. Those norms are weightless and act on the rank / state dimensions, so they go with the SSM
and are untouched by channel groups; ``mamba1_mixer`` applies them whenever a mixer has them."""
from __future__ import annotations

import transformers

from shedder.arch.mamba import MambaAdapter


class FalconMambaAdapter(MambaAdapter):
    architectures = ("FalconMambaForCausalLM",)
    model_types = ("falcon_mamba",)
    model_class = transformers.FalconMambaForCausalLM
