"""Everyday diffusers habits around an optimized pipeline: never a silently wrong result.

With settings that cache nothing (the gate at the last step: every step
computes everything), an optimized pipeline must equal the unoptimized one
bit for bit, whatever the user changed in the denoiser between calls.
"""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import tgate_fx
import tgate_fx.core.runtime
from conftest import eager_denoiser, latents
from tgate_fx.tiny import tiny_pipeline

STEPS = 3
NOTHING_CACHED = dict(gate_step=STEPS, sp_interval=1, fi_interval=1, warm_up=STEPS)


def _both(pipe):
    """(optimized, eager) latents of one generation each."""
    got = latents(pipe, num_inference_steps=STEPS)
    with eager_denoiser(pipe):
        expected = latents(pipe, num_inference_steps=STEPS)
    return got, expected


class _Scaled(AttnProcessor2_0):
    """Attention as usual, output scaled: a processor a user (or PAG, or IP-Adapter) might install."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs) * self.scale


def test_attention_processor_changed_after_first_call():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **NOTHING_CACHED)
    first, expected = _both(pipe)
    assert torch.equal(first, expected)
    pipe.unet.set_attn_processor(_Scaled(0.5))
    got, expected = _both(pipe)
    assert torch.equal(got, expected) and not torch.equal(got, first)
    runtime = tgate_fx.get_runtime(pipe)
    assert runtime.recaptures == 1
    # a processor attribute (an IP-Adapter-style scale) changed in place is seen too
    for processor in pipe.unet.attn_processors.values():
        processor.scale = 0.25
    got, expected = _both(pipe)
    assert torch.equal(got, expected) and runtime.recaptures == 2
    # nothing changed: nothing captured again
    latents(pipe, num_inference_steps=STEPS)
    assert runtime.recaptures == 2


def test_parameter_replaced_after_first_call():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **NOTHING_CACHED)
    latents(pipe, num_inference_steps=STEPS)
    conv = pipe.unet.denoiser.conv_in
    conv.weight = torch.nn.Parameter(conv.weight.detach() * 1.5)  # a new object the old graphs do not hold
    got, expected = _both(pipe)
    assert torch.equal(got, expected)


def test_weights_changed_in_place_are_used_without_capturing_again():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **NOTHING_CACHED)
    latents(pipe, num_inference_steps=STEPS)
    with torch.no_grad():
        pipe.unet.denoiser.conv_in.weight.mul_(1.5)  # e.g. fuse_lora, load_state_dict: same objects
    got, expected = _both(pipe)
    assert torch.equal(got, expected) and tgate_fx.get_runtime(pipe).recaptures == 0


def test_lora_adapters_switched_after_first_call():
    pytest.importorskip("peft")
    from peft import LoraConfig

    pipe = tiny_pipeline("sd15")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False), "a")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), "b")
    pipe.unet.set_adapters(["a"])
    tgate_fx.optimize(pipe, **NOTHING_CACHED)
    seen = []
    for change in (lambda u: None, lambda u: u.set_adapters(["b"]), lambda u: u.set_adapters(["a", "b"], [0.5, 1.0]),
                   lambda u: u.disable_adapters(), lambda u: u.enable_adapters()):
        change(pipe.unet)
        got, expected = _both(pipe)
        assert torch.equal(got, expected)
        seen.append(got)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert not torch.equal(seen[2], seen[3]) and torch.equal(seen[4], seen[2])


def _sd3_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                        pooled_projection_dim=8, out_channels=4)
    none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                          "tokenizer_3"])
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), **none)


def test_joint_attention_models_are_refused_by_optimize():
    pipe = _sd3_pipeline()
    with pytest.raises(TypeError, match="no separate cross-attention to cache.*No method of tgate_fx applies"):
        tgate_fx.optimize(pipe)
    assert not isinstance(pipe.transformer, tgate_fx.core.runtime.OptimizedDenoiser)  # nothing installed


def test_a_denoiser_without_cross_attention_is_refused_at_its_first_call():
    # A UNet whose attention blocks were built without text (e.g. conditioning by other means): T-GATE
    # would drop the unconditional half after the gate with nothing cached that carries the prompt.
    from tgate_fx.core.analysis import Regions
    from tgate_fx.core.method import tag_key
    from tgate_fx.methods import TGate, TGateConfig

    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **NOTHING_CACHED)
    latents(pipe, num_inference_steps=STEPS)
    graphs = tgate_fx.get_runtime(pipe).captures[0]
    self_only = Regions(graphs.regions.graph_module, [s for s in graphs.sites if s.role == "self"],
                        graphs.regions.modules)
    with pytest.raises(ValueError, match="no cross-attention"):
        TGate(TGateConfig()).annotate(graphs.capture.graph_module, self_only)
    assert any(tag_key("tgate") in n.meta for n in graphs.capture.graph_module.graph.nodes)


def _move_each_step(pipe, step, timestep, callback_kwargs):
    pipe.unet.to("cpu")  # what model CPU offload does around every denoiser call
    return callback_kwargs


@pytest.mark.parametrize("how", ["enable_model_cpu_offload", "moved every step"])
def test_cpu_offload_after_optimize(how):
    settings = dict(gate_step=3, sp_interval=2, fi_interval=1, warm_up=1)
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **settings)
    expected = latents(pipe, num_inference_steps=6)
    call = {}
    if how == "enable_model_cpu_offload":
        pipe.enable_model_cpu_offload(device="cpu")  # the accelerator is the CPU here; the hooks are the same
    else:
        call = {"callback_on_step_end": _move_each_step}
    runtime = tgate_fx.get_runtime(pipe)
    got = latents(pipe, num_inference_steps=6, **call)
    assert torch.equal(got, expected)
    # T-GATE stayed on (the gate happened, the post-gate steps ran at half batch) and nothing was captured again
    assert [s.variant.name for s in runtime.last_plan.steps][2:] == ["gate", "fi_record", "fi_record", "fi_record"]
    assert len(runtime.captures) == 2


def test_dtype_change_after_optimize_captures_again():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **NOTHING_CACHED)
    latents(pipe, num_inference_steps=STEPS)
    pipe.to(torch.bfloat16)
    assert tgate_fx.get_runtime(pipe).captures == []
    got, expected = _both(pipe)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_cpu_offload_before_optimize():
    settings = dict(gate_step=3, sp_interval=2, fi_interval=1, warm_up=1)
    expected = latents(tgate_fx.optimize(tiny_pipeline("sd15"), **settings), num_inference_steps=6)
    pipe = tiny_pipeline("sd15")
    plain = latents(pipe, num_inference_steps=6)
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate hooks on the UNet, then optimize
    tgate_fx.optimize(pipe, **NOTHING_CACHED)
    assert torch.equal(latents(pipe, num_inference_steps=STEPS), latents(tiny_pipeline("sd15"),
                                                                           num_inference_steps=STEPS))
    tgate_fx.optimize(pipe, **settings)
    for _ in range(2):  # the pipeline re-installs its hooks after each call
        assert torch.equal(latents(pipe, num_inference_steps=6), expected)
    assert [s.variant.name for s in tgate_fx.get_runtime(pipe).last_plan.steps][2] == "gate"
    assert not torch.equal(expected, plain)


def test_save_pretrained_after_optimize(tmp_path):
    from diffusers import DiffusionPipeline

    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **NOTHING_CACHED)
    expected = latents(pipe, num_inference_steps=STEPS)
    pipe.save_pretrained(tmp_path / "saved")
    assert pipe.config.unet == ("diffusers", "UNet2DConditionModel")  # the pipeline's own config is untouched
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(loaded.unet).__name__ == "UNet2DConditionModel"
    loaded.set_progress_bar_config(disable=True)
    loaded.tiny_call_kwargs = pipe.tiny_call_kwargs
    assert torch.equal(latents(loaded, num_inference_steps=STEPS), expected)
