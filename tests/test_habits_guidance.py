"""Guidance habits and torch.compile habits around an optimized pipeline.

Dynamic CFG (guidance switched off part-way, as the diffusers docs show),
perturbed-attention guidance (a batch of 3), and ``torch.compile`` with
``fullgraph=True`` before and after ``optimize``.
"""

import pytest
import torch

import tgate_fx
import tgate_fx.core.runtime
from conftest import eager_denoiser, latents
from tgate_fx.core.rebatch import RebatchWarning
from tgate_fx.tiny import tiny_pipeline

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

STEPS = 5
NOTHING_CACHED = dict(gate_step=STEPS, sp_interval=1, fi_interval=1, warm_up=STEPS)


def _dynamic_cfg(at: int):
    """The diffusers-documented callback: guidance off from step ``at`` on (prompt embeddings halved)."""

    def callback(pipe, step_index, timestep, callback_kwargs):
        if step_index == at - 1:
            callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return callback_kwargs

    return dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])


@pytest.mark.parametrize("settings", [NOTHING_CACHED, dict(gate_step=3, sp_interval=1, fi_interval=1, warm_up=0)],
                         ids=["nothing-cached", "gate-after-switch"])
def test_dynamic_cfg_callback_turns_guidance_off(settings):
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **settings)
    got = latents(pipe, num_inference_steps=STEPS, **_dynamic_cfg(at=2))
    runtime = tgate_fx.get_runtime(pipe)
    assert runtime.last_plan.cfg is False  # the rest of the generation followed the no-CFG plan
    with eager_denoiser(pipe):
        expected = latents(pipe, num_inference_steps=STEPS, **_dynamic_cfg(at=2))
    if settings is NOTHING_CACHED:
        assert torch.equal(got, expected)
    else:
        # the gate (step 3) comes after the switch: cross-attention is cached from the conditional
        # batch alone, as T-GATE does without guidance; each step runs what the no-CFG plan says
        with tgate_fx.get_runtime(pipe).tracing() as trace:
            again = latents(pipe, num_inference_steps=STEPS, **_dynamic_cfg(at=2))
        assert torch.equal(again, got) and torch.isfinite(got).all()
        assert [s.cfg for s, _, _ in trace] == [True, True, False, False, False]
        assert [s.variant.name for s, _, _ in trace][2:] == [s.variant.name for s in runtime.last_plan.steps][2:]
        assert (got - expected).abs().max() < 0.5 * expected.abs().max()


def test_dynamic_cfg_switch_after_the_gate_recomputes_before_reusing():
    # The gate (step 1) recorded the CFG-averaged cross-attention; guidance goes off at step 3. Nothing
    # recorded for the CFG batch may be read after the switch: the step at the switch computes
    # cross-attention again (no cache written since), so the output stays finite and deterministic.
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), gate_step=1, sp_interval=1, fi_interval=1, warm_up=0)
    runtime = tgate_fx.get_runtime(pipe)
    with runtime.tracing() as trace:
        got = latents(pipe, num_inference_steps=STEPS, **_dynamic_cfg(at=3))
    variants = [v for _, _, v in trace]
    assert all(not v.cache_inputs for v in variants[3:])  # nothing read across the switch
    assert torch.isfinite(got).all()
    assert torch.equal(got, latents(pipe, num_inference_steps=STEPS, **_dynamic_cfg(at=3)))


def _pag_pipeline():
    from diffusers import StableDiffusionPAGPipeline

    base = tiny_pipeline("sd15")
    pipe = StableDiffusionPAGPipeline(**base.components, pag_applied_layers=["mid"])
    pipe.set_progress_bar_config(disable=True)
    pipe.tiny_call_kwargs = {**base.tiny_call_kwargs, "pag_scale": 3.0}
    return pipe


def test_perturbed_attention_guidance_batch_of_three_is_refused_naming_pag():
    pipe = tgate_fx.optimize(_pag_pipeline(), gate_step=2)
    with pytest.raises(ValueError, match="perturbed-attention guidance"):
        latents(pipe, num_inference_steps=STEPS)


def test_perturbed_attention_guidance_with_deepcache_alone_is_exact():
    # DeepCache never splits the CFG batch: a PAG batch of 3 is served, exactly when nothing is cached
    pipe = tgate_fx.optimize(_pag_pipeline(), tgate=None, deepcache=tgate_fx.DeepCacheConfig(cache_interval=1))
    # PAG's processors split the batch in three inside the UNet: the trace at the probe batch does not
    # specialise, and the batch is exported on its own, saying so
    with pytest.warns(RebatchWarning, match="batch 3 is exported on its own"):
        got = latents(pipe, num_inference_steps=3)
    with eager_denoiser(pipe):
        assert torch.equal(got, latents(pipe, num_inference_steps=3))


@pytest.mark.parametrize("when", ["before optimize", "after optimize", "module.compile after optimize"])
def test_torch_compile_fullgraph_compiles_every_variant(when):
    from torch._dynamo.utils import counters

    pipe = tiny_pipeline("sd15")
    if when == "before optimize":
        pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="eager")
    tgate_fx.optimize(pipe, gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)
    if when == "after optimize":
        pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="eager")
    elif when == "module.compile after optimize":
        pipe.unet.compile(fullgraph=True, backend="eager")
    assert type(tgate_fx.core.runtime.unwrap_compiled(pipe.unet)).__name__ == "UNet2DConditionModel"
    torch._dynamo.reset()
    counters.clear()
    got = latents(pipe, num_inference_steps=4)
    plan = tgate_fx.get_runtime(pipe).last_plan
    assert counters["stats"]["unique_graphs"] == len(plan.variants)  # compiled, not silently left eager
    assert not counters.get("graph_break")
    reference = tgate_fx.optimize(tiny_pipeline("sd15"), gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)
    assert torch.equal(got, latents(reference, num_inference_steps=4))
