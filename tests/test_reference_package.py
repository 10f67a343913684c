"""Final latents equal those of the published T-GATE code (PyPI `tgate==1.0.0`), bit for bit.

The reference package copies each pipeline's `__call__` (SD, SD-XL, PixArt
alpha/sigma) and patches `Attention.forward`; tgate_fx rewrites graphs and
leaves the pipeline alone. Same seeds, same tiny models, same settings.
"""

import pytest
import torch

import tgate_fx
from conftest import PROMPT, latents
from tgate_fx.tiny import tiny_pipeline

tgate = pytest.importorskip("tgate")

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

CASES = [
    # family, loader, settings, lcm, steps
    ("sd15", "TgateSDLoader", dict(gate_step=10, sp_interval=5, fi_interval=1, warm_up=2), False, 25),
    ("sd21", "TgateSDLoader", dict(gate_step=6, sp_interval=3, fi_interval=2, warm_up=1), False, 12),
    ("sdxl", "TgateSDXLLoader", dict(gate_step=10, sp_interval=5, fi_interval=1, warm_up=2), False, 25),
    ("lcm_sdxl", "TgateSDXLLoader", dict(gate_step=1, sp_interval=1, fi_interval=1, warm_up=0), True, 4),
    ("pixart_alpha", "TgatePixArtAlphaLoader", dict(gate_step=15, sp_interval=3, fi_interval=1, warm_up=2), False, 25),
    ("pixart_sigma", "TgatePixArtSigmaLoader", dict(gate_step=15, sp_interval=3, fi_interval=1, warm_up=2), False, 25),
    ("lcm_pixart", "TgatePixArtAlphaLoader", dict(gate_step=2, sp_interval=1, fi_interval=1, warm_up=0), True, 4),
]


@pytest.mark.parametrize("family,loader,settings,lcm,steps", CASES, ids=[c[0] for c in CASES])
def test_matches_published_tgate(family, loader, settings, lcm, steps):
    reference = getattr(tgate, loader)(tiny_pipeline(family))
    call = dict(reference.tiny_call_kwargs)
    call.pop("max_sequence_length", None)  # the reference's copied __call__ predates it (its default is 120)
    expected = reference.tgate(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                               output_type="latent", lcm=lcm, **settings, **call).images
    pipe = tgate_fx.optimize(tiny_pipeline(family), **settings)
    got = latents(pipe, num_inference_steps=steps,
                  **({"max_sequence_length": 120} if "max_sequence_length" in pipe.tiny_call_kwargs else {}))
    assert torch.equal(got, expected)
