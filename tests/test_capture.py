"""Capture: torch.export per input signature, sharing the model's parameters."""

import pytest
import torch

import tgate_fx
from conftest import latents, record_calls
from tgate_fx.core.capture import capture_denoiser
from tgate_fx.core.captured import normalize_call, parameter_paths, signature_of
from tgate_fx.tiny import FAMILIES, tiny_pipeline

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end


@pytest.mark.parametrize("family", ["sd15", "sdxl", "lcm_sdxl", "pixart_alpha", "sd15_controlnet"])
def test_captured_graph_equals_eager_denoiser(family):
    pipe = tiny_pipeline(family)
    denoiser, calls = record_calls(pipe, FAMILIES[family].denoiser, num_inference_steps=2)
    args, kwargs = calls[0]
    call, return_dict = normalize_call(denoiser, args, kwargs)
    assert return_dict is False
    capture = capture_denoiser(denoiser, call)
    with torch.no_grad():
        expected = denoiser(*args, **kwargs)[0]
        got = capture.graph_module(**capture.flat_inputs(call))
    assert isinstance(got, tuple) and len(got) == 1
    assert torch.equal(got[0], expected)
    # parameters are the model's own tensors, not copies
    own = dict(denoiser.named_parameters())
    params, paths = dict(capture.graph_module.named_parameters()), parameter_paths(capture.graph_module)
    assert params and all(p is own[paths[name]] for name, p in params.items())
    # read with one attribute lookup each: the generated code does not walk the module tree
    assert "getattr(self." not in capture.graph_module.code


def test_python_number_timestep_becomes_a_graph_input():
    pipe = tiny_pipeline("sd15")
    denoiser, calls = record_calls(pipe, "unet", num_inference_steps=2)
    args, kwargs = calls[0]
    call, _ = normalize_call(denoiser, (args[0], 999.0), kwargs)
    assert call["timestep"].dtype == torch.float64 and call["timestep"].shape == (1,)
    capture = capture_denoiser(denoiser, call)
    assert "timestep" in capture.input_names
    with torch.no_grad():
        for t in (999.0, 500.0):
            call["timestep"] = torch.tensor([t], dtype=torch.float64)
            got = capture.graph_module(**capture.flat_inputs(call))[0]
            assert torch.equal(got, denoiser(args[0], t, **kwargs)[0])


def test_signature_covers_shapes_dtypes_and_constants():
    x = torch.zeros(2, 4, 8, 8)
    base = signature_of({"sample": x, "timestep": torch.tensor(1), "cross_attention_kwargs": None})
    assert base == signature_of({"sample": x.clone(), "timestep": torch.tensor(7), "cross_attention_kwargs": None})
    assert base != signature_of({"sample": torch.zeros(1, 4, 8, 8), "timestep": torch.tensor(1),
                                 "cross_attention_kwargs": None})
    assert base != signature_of({"sample": x.half(), "timestep": torch.tensor(1), "cross_attention_kwargs": None})
    assert base != signature_of({"sample": x, "timestep": torch.tensor(1), "cross_attention_kwargs": {"scale": 0.5}})
    assert base != signature_of({"sample": x, "timestep": torch.tensor(1)})


def test_one_capture_per_signature():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), gate_step=3, sp_interval=2, fi_interval=2, warm_up=1)
    runtime = tgate_fx.get_runtime(pipe)
    latents(pipe, num_inference_steps=6)
    assert len(runtime.captures) == 2  # CFG batch before the gate, half batch after it
    latents(pipe, prompt="a green star", seed=3, num_inference_steps=6)
    assert len(runtime.captures) == 2
    latents(pipe, num_inference_steps=6, height=48, width=48)  # new resolution
    assert len(runtime.captures) == 4
    # two images per prompt: the CFG batch of 4 is new; its post-gate half (2)
    # has the signature of the first CFG batch and reuses that capture
    latents(pipe, num_inference_steps=6, num_images_per_prompt=2)
    assert len(runtime.captures) == 5
    latents(pipe, num_inference_steps=6)  # back to the first: nothing new
    assert len(runtime.captures) == 5
    shapes = [c.capture.signature.tensors[0][1] for c in runtime.captures]
    assert shapes == [(2, 4, 16, 16), (1, 4, 16, 16), (2, 4, 24, 24), (1, 4, 24, 24), (4, 4, 16, 16)]


def test_every_variant_shares_the_denoiser_parameters():
    pipe = tgate_fx.optimize(tiny_pipeline("sdxl"), gate_step=5, sp_interval=2, fi_interval=2, warm_up=1)
    latents(pipe, num_inference_steps=8)
    runtime = tgate_fx.get_runtime(pipe)
    own = {n: p.data_ptr() for n, p in runtime.denoiser.named_parameters()}
    variants = [v for c in runtime.captures for v in c.variants.values()]
    assert len(variants) == 6
    for v in variants:
        paths = parameter_paths(v.graph_module)
        for name, p in v.graph_module.named_parameters():
            assert p.data_ptr() == own[paths[name]], (v.name, name)
