"""Generation with the recurrent cache is exact for extracted models of every family and kind.

For every architecture in ``tiny_models.GENERATION`` whose adapter is registered, a tiny random
fp32 model is extracted under plans of each kind the adapter offers (plus one mixing every kind,
and the empty plan). Greedy ``generate`` with the cache must agree with full-sequence forwards of the same
extracted model at every step: each step's logits match the full forward's logits at that position,
and each generated token is that position's argmax. This catches caches sized from the stock
config (a narrowed layer, a layer without SSM that keeps only its conv state, a removed block that
keeps nothing) and layer-index mix-ups after blocks are renumbered.
"""
from __future__ import annotations

import functools

import pytest
import torch
import transformers

from tiny_models import GENERATION

from shedder.arch import adapter_class, adapter_for, supported_architectures
from shedder.core.errors import UnsupportedModelError
from shedder.core.plan import PruningPlan

#: Cached (recurrent) and full (chunked / parallel) paths round differently: ~1e-6 for most families,
#: up to ~1.5e-4 for Zamba2 even unpruned. A wrong or mis-sized cache shows up as 1e-2 or more.
TOL = 5e-4
PROMPT = 11   # prompt length: not a multiple of the chunk sizes in GENERATION (8)
NEW = 5       # greedy tokens generated
VOCAB = 96


def available() -> list[str]:
    """Architectures of ``GENERATION`` whose adapter module exists (family files may land one by one)."""
    out = []
    for arch in GENERATION:
        try:
            adapter_class(arch)
        except UnsupportedModelError:
            continue
        out.append(arch)
    return out


def make_model(arch: str, seed: int = 0):
    config_cls, kwargs = GENERATION[arch]
    config = config_cls(vocab_size=VOCAB, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                        tie_word_embeddings=False, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # larger weights than the default init, so the logits are far from uniform
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0.0, 0.15)
    return model


def plan_of(adapter, kinds: list[str], per_kind: int) -> PruningPlan:
    """Up to ``per_kind`` components of each kind, spread over the layers, each still valid on top of
    the ones chosen before (so group and head rules hold)."""
    plan = PruningPlan()
    for kind in kinds:
        for _ in range(per_kind):
            options = adapter.candidates(plan, [kind])
            if not options:
                break
            plan = plan.with_components([options[len(options) // 2]])
    return adapter.resolve(plan)


def cases() -> list[tuple[str, str]]:
    """(architecture, plan) pairs: the unpruned model, each kind the family offers, and a mix."""
    out = []
    for arch in GENERATION:
        kinds = adapter_class(arch).kinds if arch in available() else ()
        out += [(arch, name) for name in ("unpruned", *kinds, "mixed")]
    return out


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str):
    """One model per architecture for all its cases (extraction never modifies it)."""
    return make_model(arch)


def plan_named(adapter, name: str) -> PruningPlan:
    if name == "unpruned":
        return PruningPlan()
    if name == "mixed":
        return plan_of(adapter, list(adapter.kind_counts()), per_kind=1)
    return plan_of(adapter, [name], per_kind=2)


def assert_cached_generation_exact(model, label: str, replay=None) -> None:
    """Greedy cached generation of ``model`` against full forwards of ``replay`` (default: itself)."""
    ids = torch.randint(1, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
        sequences = out.sequences  # [2, PROMPT + NEW]
        assert sequences.shape[1] == PROMPT + NEW, f"{label}: generation stopped early"
        full = (replay or model)(input_ids=sequences, use_cache=False).logits  # [2, PROMPT + NEW, VOCAB]
    for step, step_logits in enumerate(out.logits):  # step_logits: [2, VOCAB], from the cached path
        pos = PROMPT + step - 1
        diff = (step_logits.float() - full[:, pos].float()).abs().max().item()
        assert diff <= TOL, f"{label}: step {step} cached logits differ from the full forward by {diff:.2e}"
        token = sequences[:, pos + 1]
        best = full[:, pos].max(-1).values
        chosen = full[:, pos].gather(-1, token[:, None])[:, 0]
        assert torch.all(chosen >= best - TOL), f"{label}: step {step} token is not the full forward's argmax"


#: Families whose cached generation is tested in their own file instead (built there from their own
#: tiny configs): Granite 4.0-H on a left-padded batch; Hymba unpadded, since it refuses padded batches.
GENERATION_TESTED_IN = {"GraniteMoeHybridForCausalLM": "test_arch_granite.py", "HymbaForCausalLM": "test_arch_hymba.py"}


def test_every_registered_architecture_has_a_tiny_config():
    missing = [a for a in supported_architectures() if a not in GENERATION and a not in GENERATION_TESTED_IN]
    assert not missing, f"add a tiny config for {missing} to tiny_models.GENERATION so its generation is tested"


@pytest.mark.parametrize("arch", list(GENERATION))
def test_family_available(arch):
    """Reports which families are not yet covered (their adapter module does not exist)."""
    if arch not in available():
        pytest.skip(f"no adapter for {arch} yet")


@pytest.mark.parametrize("arch,plan_name", cases())
def test_cached_generation_matches_full_forward(arch, plan_name):
    model = tiny_model(arch)
    adapter = adapter_for(model)
    plan = plan_named(adapter, plan_name)
    if plan_name != "unpruned" and not plan.components:
        pytest.skip(f"the tiny {arch} has no removable {plan_name}")
    extracted = adapter.extract(plan) if plan.components else model
    assert_cached_generation_exact(extracted, f"{arch} without {plan.describe()}")


def test_the_check_fails_when_the_cached_path_computes_something_else():
    """Guards the check itself: generating with one model and replaying with another (a block removed)
    must be caught, so agreement above is evidence, not an artefact of a lenient comparison."""
    archs = available()
    if not archs:
        pytest.skip("no adapters registered yet")
    model = tiny_model(archs[0])
    adapter = adapter_for(model)
    pruned = adapter.extract(plan_of(adapter, ["block"], per_kind=1))
    with pytest.raises(AssertionError):
        assert_cached_generation_exact(pruned, "mismatch", replay=model)
