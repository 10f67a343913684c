"""Everyday diffusers habits around an optimized pipeline: never a silently wrong result.

With settings that cache nothing (the gate at the last step: every step
computes everything), an optimized pipeline must equal the unoptimized one
bit for bit, whatever the user changed in the denoiser between calls.
"""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import tgate_fx
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
