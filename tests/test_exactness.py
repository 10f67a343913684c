"""Final latents of optimized pipelines equal the eager oracle of the reference semantics.

Tolerance: max abs difference <= 1e-5 in fp32 (in practice the graphs are
bit-exact: they run the same aten kernels in the same order).
"""

import pytest
import torch

import tgate_fx
from conftest import eager_denoiser, latents
from oracle import run_oracle
from tgate_fx.tiny import FAMILIES, tiny_pipeline

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

TOL = 1e-5

# (family, settings, call overrides). Published defaults first, then variations
# of intervals, warm-up, batch and CFG.
SD_DEFAULT = dict(gate_step=10, sp_interval=5, fi_interval=1, warm_up=2)
PIXART_DEFAULT = dict(gate_step=15, sp_interval=3, fi_interval=1, warm_up=2)
LCM_DEFAULT = dict(gate_step=1, sp_interval=1, fi_interval=1, warm_up=0)
CASES = [
    ("sd15", SD_DEFAULT, {}),
    ("sd15", dict(gate_step=6, sp_interval=3, fi_interval=2, warm_up=1), {"num_images_per_prompt": 2}),
    ("sd15", dict(gate_step=6, sp_interval=3, fi_interval=2, warm_up=0), {"guidance_scale": 1.0}),
    ("sd21", SD_DEFAULT, {}),
    ("sd21", dict(gate_step=5, sp_interval=2, fi_interval=3, warm_up=0), {"num_images_per_prompt": 2}),
    ("sdxl", SD_DEFAULT, {}),
    ("sdxl", dict(gate_step=7, sp_interval=3, fi_interval=2, warm_up=1), {"num_images_per_prompt": 2}),
    ("sdxl", dict(gate_step=7, sp_interval=3, fi_interval=2, warm_up=2), {"guidance_scale": 1.0,
                                                                           "num_images_per_prompt": 2}),
    ("lcm_sdxl", LCM_DEFAULT, {"num_inference_steps": 4}),
    ("lcm_sdxl", dict(gate_step=2, sp_interval=1, fi_interval=2, warm_up=0), {"num_inference_steps": 4,
                                                                              "num_images_per_prompt": 2}),
    ("pixart_alpha", PIXART_DEFAULT, {}),
    ("pixart_alpha", dict(gate_step=6, sp_interval=3, fi_interval=2, warm_up=1), {"num_images_per_prompt": 2}),
    ("pixart_alpha", dict(gate_step=6, sp_interval=2, fi_interval=1, warm_up=0), {"guidance_scale": 1.0,
                                                                                   "num_images_per_prompt": 2}),
    ("pixart_sigma", PIXART_DEFAULT, {}),
    ("pixart_sigma", dict(gate_step=6, sp_interval=3, fi_interval=2, warm_up=1), {"num_images_per_prompt": 2}),
    ("lcm_pixart", dict(gate_step=2, sp_interval=1, fi_interval=1, warm_up=0), {"num_inference_steps": 4}),
    ("lcm_pixart", dict(gate_step=1, sp_interval=1, fi_interval=2, warm_up=0), {"num_inference_steps": 4,
                                                                                "num_images_per_prompt": 2}),
    ("sd15_img2img", SD_DEFAULT, {}),
    ("sd15_img2img", dict(gate_step=4, sp_interval=3, fi_interval=2, warm_up=1), {"strength": 0.5}),
    ("sd15_controlnet", SD_DEFAULT, {}),
    ("sd15_controlnet", dict(gate_step=6, sp_interval=3, fi_interval=2, warm_up=0), {"num_images_per_prompt": 2}),
]


def _steps(overrides):
    return overrides.get("num_inference_steps", 25 if "num_images_per_prompt" not in overrides else 12)


@pytest.mark.parametrize("family,settings,overrides", CASES,
                         ids=[f"{f}-{'-'.join(str(v) for v in s.values())}-{len(o)}" for f, s, o in CASES])
def test_optimized_equals_oracle(family, settings, overrides):
    fam = FAMILIES[family]
    overrides = {"num_inference_steps": _steps(overrides), **overrides}
    pipe = tgate_fx.optimize(tiny_pipeline(family))
    call = {**pipe.tiny_call_kwargs, **overrides}
    cfg = fam.cfg and call.get("guidance_scale", 1.0) > 1.0

    def oracle(**schedule):
        return run_oracle(pipe, fam.denoiser, cfg=cfg, **schedule, prompt="a red circle on a blue background",
                          generator=torch.Generator().manual_seed(0), output_type="latent", **call).images

    expected = oracle(**settings)
    tgate_fx.optimize(pipe, **settings)
    got = latents(pipe, **overrides)
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"{family} {settings}: max abs diff {diff}"
    # and the schedule changed the result: this case is not a disguised no-op
    steps = call["num_inference_steps"]
    assert not torch.equal(got, oracle(gate_step=steps, sp_interval=1, fi_interval=1, warm_up=0))


@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart_alpha", "lcm_sdxl", "sd15_controlnet"])
def test_nothing_cached_equals_original(family):
    """gate_step = num_steps, sp_interval = fi_interval = 1: no reuse, so bit-exact with the original."""
    pipe = tgate_fx.optimize(tiny_pipeline(family))
    steps = 4 if family.startswith("lcm") else 8
    tgate_fx.optimize(pipe, gate_step=steps, sp_interval=1, fi_interval=1, warm_up=0)
    optimized = latents(pipe, num_inference_steps=steps)
    with eager_denoiser(pipe):
        original = latents(pipe, num_inference_steps=steps)
    assert torch.equal(optimized, original)


@pytest.mark.parametrize("family", ["sd15", "pixart_alpha"])
def test_bf16_matches_oracle(family):
    fam = FAMILIES[family]
    pipe = tiny_pipeline(family, dtype=torch.bfloat16)
    settings = dict(gate_step=5, sp_interval=2, fi_interval=2, warm_up=1)
    expected = run_oracle(pipe, fam.denoiser, cfg=True, **settings, prompt="a red circle on a blue background",
                          generator=torch.Generator().manual_seed(0), output_type="latent",
                          num_inference_steps=10, **pipe.tiny_call_kwargs).images
    tgate_fx.optimize(pipe, **settings)
    got = latents(pipe, num_inference_steps=10)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
