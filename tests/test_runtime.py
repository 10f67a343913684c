"""The runtime inside unmodified pipelines: step accounting, CFG detection, forwarding."""

import pytest
import torch

import tgate_fx
from conftest import PROMPT, latents
from oracle import run_oracle
from tgate_fx.core.hook import bypassed
from tgate_fx.core.runtime import DenoiserRuntime
from tgate_fx.tiny import tiny_pipeline

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

SETTINGS = dict(gate_step=4, sp_interval=2, fi_interval=2, warm_up=1)


def _oracle(pipe, steps, denoiser="unet", cfg=True, settings=SETTINGS, **kwargs):
    call = {**pipe.tiny_call_kwargs, "num_inference_steps": steps, **kwargs}
    return run_oracle(pipe, denoiser, cfg=cfg, **settings, prompt=PROMPT, generator=torch.Generator().manual_seed(0),
                      output_type="latent", **call).images


@pytest.fixture
def sd():
    return tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS)


def test_repeated_calls_and_changing_step_counts(sd):
    for steps in (8, 8, 12, 6, 8):
        assert torch.equal(latents(sd, num_inference_steps=steps), _oracle(sd, steps)), steps
        assert tgate_fx.get_runtime(sd).last_plan.num_steps == steps


def test_caches_are_cleared_at_the_end_of_each_call(sd):
    latents(sd, num_inference_steps=8)
    assert tgate_fx.get_runtime(sd).generations._generation is None  # diffusers' end-of-call reset reached the runtime


def test_img2img_counts_only_the_steps_it_runs():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15_img2img"), **SETTINGS)
    got = latents(pipe, num_inference_steps=20, strength=0.5)
    assert tgate_fx.get_runtime(pipe).last_plan.num_steps == 10
    assert torch.equal(got, _oracle(pipe, 20, strength=0.5))


def test_interrupted_generation_does_not_leak_into_the_next(sd):
    def interrupt(pipe, step, t, kwargs):
        if step == 4:
            pipe._interrupt = True
        return kwargs

    latents(sd, num_inference_steps=10, callback_on_step_end=interrupt)
    assert torch.equal(latents(sd, num_inference_steps=10), _oracle(sd, 10))


def test_exception_mid_generation_does_not_leak_into_the_next(sd):
    def explode(pipe, step, t, kwargs):
        if step == 5:
            raise RuntimeError("boom")
        return kwargs

    with pytest.raises(RuntimeError, match="boom"):
        latents(sd, num_inference_steps=10, callback_on_step_end=explode)
    assert tgate_fx.get_runtime(sd).generations._generation is not None  # the pipeline never reached its reset
    assert torch.equal(latents(sd, num_inference_steps=10), _oracle(sd, 10))


def test_no_cfg_batch_is_never_averaged():
    """Two images without guidance whose latents happen to be equal are still not a CFG batch."""
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS)
    same = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5)).repeat(2, 1, 1, 1)
    got = latents(pipe, num_inference_steps=8, guidance_scale=1.0, latents=same,
                  prompt=["a red circle", "a blue square"])
    assert not tgate_fx.get_runtime(pipe).last_plan.cfg
    expected = run_oracle(pipe, "unet", cfg=False, **SETTINGS, prompt=["a red circle", "a blue square"],
                          output_type="latent", num_inference_steps=8, guidance_scale=1.0, latents=same,
                          height=32, width=32).images
    assert torch.equal(got, expected)
    assert not torch.equal(got[0], got[1])


def test_cfg_is_recognised_without_a_pipeline_property():
    pipe = tgate_fx.optimize(tiny_pipeline("pixart_alpha"), **SETTINGS)
    latents(pipe, num_inference_steps=8)
    assert tgate_fx.get_runtime(pipe).last_plan.cfg
    latents(pipe, num_inference_steps=8, guidance_scale=1.0, num_images_per_prompt=2)
    assert not tgate_fx.get_runtime(pipe).last_plan.cfg


def test_lcm_flag_is_checked_against_the_call():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS, lcm=True)
    with pytest.raises(ValueError, match="lcm=True, but this call runs classifier-free guidance"):
        latents(pipe, num_inference_steps=8)
    tgate_fx.optimize(pipe, **SETTINGS, lcm=False)
    with pytest.raises(ValueError, match="lcm=False, but this call runs without classifier-free guidance"):
        latents(pipe, num_inference_steps=8, guidance_scale=1.0)


def test_the_denoiser_stays_the_users_module():
    import inspect

    from diffusers import UNet2DConditionModel

    pipe = tiny_pipeline("sdxl")
    unet, signature = pipe.unet, inspect.signature(pipe.unet.forward)
    tgate_fx.optimize(pipe, **SETTINGS)
    assert pipe.unet is unet and type(unet) is UNet2DConditionModel
    assert isinstance(tgate_fx.get_runtime(pipe), DenoiserRuntime) and not isinstance(
        tgate_fx.get_runtime(pipe), torch.nn.Module)
    assert inspect.signature(pipe.unet.forward) == signature  # pipelines inspect it for the arguments it takes
    assert pipe.config.unet == ("diffusers", "UNet2DConditionModel")


def test_called_outside_a_pipeline_call_the_steps_are_the_schedulers():
    """Outside ``__call__`` the pipeline's ``_num_timesteps`` is the last call's (2, tiny_pipeline's calibration
    run): the generation has the scheduler's 8 steps, not 2 (it used to restart after 2 calls)."""
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), gate_step=6, sp_interval=1, fi_interval=1, warm_up=0)
    assert pipe._num_timesteps == 2
    pipe.scheduler.set_timesteps(8)
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 16, 32)
    for t in pipe.scheduler.timesteps[:3]:
        pipe.unet(sample, t, text)
    plan = tgate_fx.get_runtime(pipe).last_plan
    assert plan.num_steps == 8 and tgate_fx.get_runtime(pipe).generations._generation.step == 3


def test_return_dict_and_positional_calls():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)
    unet = pipe.unet
    sample = torch.randn(2, 4, 16, 16)
    text = torch.randn(2, 16, 32)
    pipe.scheduler.set_timesteps(8)
    out = unet(sample, pipe.scheduler.timesteps[0], text)
    with torch.no_grad(), bypassed(unet):
        expected = unet(sample, pipe.scheduler.timesteps[0], text)
    assert type(out) is type(expected) and torch.equal(out.sample, expected.sample)


def test_moving_the_model_retires_its_graphs():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS)
    runtime = tgate_fx.get_runtime(pipe)
    latents(pipe, num_inference_steps=8)
    assert len(runtime.captures) == 2
    pipe.to(torch.float64)
    assert latents(pipe, num_inference_steps=8).dtype == torch.float64
    assert runtime.recaptures == 1 and len(runtime.captures) == 2
    assert all(c.capture.graph_module.graph.find_nodes(op="placeholder")[0].meta["val"].dtype == torch.float64
               for c in runtime.captures)
