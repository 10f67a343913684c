"""optimize / restore / report: the public API and its errors."""

import pytest
import torch

import tgate_fx
from conftest import latents
from tgate_fx import TGateConfig
from tgate_fx.core.hook import installed_runtime
from tgate_fx.tiny import tiny_pipeline

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end


@pytest.mark.parametrize("kwargs,error,match", [
    ({"gate_step": 0}, ValueError, "gate_step must be an int >= 1, got 0"),
    ({"sp_interval": 0}, ValueError, "sp_interval must be an int >= 1, got 0"),
    ({"fi_interval": -1}, ValueError, "fi_interval must be an int >= 1, got -1"),
    ({"warm_up": -1}, ValueError, "warm_up must be an int >= 0, got -1"),
    ({"gate_step": 2.5}, TypeError, "gate_step must be an int >= 1, got 2.5"),
    ({"lcm": "yes"}, TypeError, "lcm must be None, True or False"),
])
def test_bad_settings_are_rejected(kwargs, error, match):
    pipe = tiny_pipeline("sd15")
    with pytest.raises(error, match=match):
        tgate_fx.optimize(pipe, **kwargs)
    assert installed_runtime(pipe.unet) is None


def test_unsupported_pipelines_are_rejected():
    from diffusers import DDPMPipeline, UNet2DModel

    with pytest.raises(TypeError, match="takes a diffusers DiffusionPipeline, got Linear"):
        tgate_fx.optimize(torch.nn.Linear(2, 2))
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    from diffusers import DDPMScheduler

    with pytest.raises(TypeError, match="T-GATE cannot apply to UNet2DModel: it caches cross-attention"):
        tgate_fx.optimize(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))


def test_gate_beyond_the_steps_of_the_call_is_rejected():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), gate_step=10)
    with pytest.raises(ValueError, match="gate_step=10 is beyond the 6 denoising steps"):
        latents(pipe, num_inference_steps=6)
    # the pipeline still works for a valid call afterwards
    assert latents(pipe, num_inference_steps=10).shape == (1, 4, 16, 16)


def test_optimize_returns_the_pipeline_and_restore_is_exact():
    pipe = tiny_pipeline("sd15")
    unet = pipe.unet
    before = latents(pipe, num_inference_steps=12)
    assert tgate_fx.optimize(pipe, gate_step=4) is pipe
    assert pipe.unet is unet and tgate_fx.get_runtime(pipe).denoiser is unet  # the user's module, hooked
    assert not torch.equal(latents(pipe, num_inference_steps=12), before)
    assert tgate_fx.restore(pipe) is pipe
    assert pipe.unet is unet
    assert torch.equal(latents(pipe, num_inference_steps=12), before)
    assert tgate_fx.restore(pipe).unet is unet  # restoring twice is harmless


def test_optimizing_twice_rewraps_nothing_and_keeps_captures():
    pipe = tiny_pipeline("sd15")
    tgate_fx.optimize(pipe, gate_step=4)
    unet, runtime = pipe.unet, tgate_fx.get_runtime(pipe)
    latents(pipe, num_inference_steps=8)
    captures = runtime.captures
    tgate_fx.optimize(pipe, config=TGateConfig(gate_step=6, sp_interval=2))
    assert pipe.unet is unet and tgate_fx.get_runtime(pipe) is runtime and runtime.denoiser is unet
    assert unet.forward.__wrapped__.__func__ is type(unet).forward  # one hook, not a hook around a hook
    assert runtime.method_config("tgate").gate_step == 6
    latents(pipe, num_inference_steps=8)
    assert [c.capture for c in runtime.captures] == [c.capture for c in captures]
    assert runtime.last_plan.config.gate_step == 6


def test_pipeline_config_still_names_the_original_denoiser():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"))
    assert pipe.config.unet == ("diffusers", "UNet2DConditionModel")


def test_report_lists_sites_plan_and_variants():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), gate_step=5, sp_interval=2, fi_interval=2, warm_up=1)
    assert "no capture yet" in tgate_fx.report(pipe)
    assert "step" in tgate_fx.report(pipe, num_inference_steps=8)
    latents(pipe, num_inference_steps=8)
    text = tgate_fx.report(pipe)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2  cross" in text
    assert "up_blocks.1.attentions.1.transformer_blocks.0.attn1    self" in text
    for name in ("sp_compute", "sp_record", "sp_reuse", "gate", "fi_record", "fi_reuse"):
        assert f"\n  {name} " in text, name
    assert "Plan(num_steps=8, gate_step=5" in text
    runtime = tgate_fx.get_runtime(pipe)
    variants = {v.name: v for c in runtime.captures for v in c.variants.values()}
    code = variants["fi_reuse"].graph_module.code
    assert "def forward(self, sample, timestep, cache_" in code
    assert "encoder_hidden_states" not in code


def test_get_runtime_requires_an_optimized_pipeline():
    with pytest.raises(ValueError, match="is not optimized"):
        tgate_fx.get_runtime(tiny_pipeline("sd15"))
