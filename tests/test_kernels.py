"""Fused kernels stay where they can: a live mask patches only the layers it changes.

``transformers`` 5.24 chooses the ``mamba-ssm`` / ``causal-conv1d`` kernels per function (scan, conv,
state update), falling back to the PyTorch reference when they are not installed. Unmasked layers keep
their stock ``forward`` and so whatever transformers chose; masked layers run our forward, which calls
the very same resolved functions, so on a GPU with the kernels installed they use them too.
"""
from transformers.models.mamba import modeling_mamba
from transformers.models.mamba2 import modeling_mamba2

from shedder.arch import adapter_for, mamba1_mixer, mamba2_mixer, ssd_scan
from shedder.measure.masking import masked
from shedder.core.plan import Component, PruningPlan


def test_masked_layers_call_the_functions_transformers_resolved():
    for name in ("causal_conv1d_fn", "causal_conv1d_update", "mamba2_selective_state_update"):
        assert getattr(mamba2_mixer, name) is getattr(modeling_mamba2, name)
    # the chunked scan: masked and stock layers both go through the engine's scan, which hands a call to
    # transformers' own function (the mamba-ssm kernel when it serves the tensors, or ``reference()``)
    assert mamba2_mixer.chunk_scan is ssd_scan.chunk_scan
    assert modeling_mamba2.mamba2_chunk_scan.engine_dispatch
    assert mamba1_mixer.hf_mamba is modeling_mamba  # looked up at call time


def test_only_masked_layers_leave_the_stock_forward(tiny_model_factory):
    model = tiny_model_factory("mamba2", layers=4)
    adapter = adapter_for(model)
    plan = PruningPlan(frozenset([Component("ssm", 1), Component("block", 3)]))
    with masked(model, plan):
        patched = {i for i, layer in enumerate(adapter.layers())
                   if "forward" in vars(layer) or any("forward" in vars(m) for m in layer.modules())}
    assert patched == {1, 3}
    assert not any("forward" in vars(m) for m in model.modules())  # and nothing is left afterwards
