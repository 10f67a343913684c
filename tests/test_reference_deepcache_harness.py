"""The DeepCache reference harness (`reference_deepcache.py`) itself: it runs the published code and nothing else.

These check the harness, not tgate_fx: with a cache interval of 1 the
published DeepCache helper computes every block at every step, so the latents
must equal the plain pipeline's bit for bit; with interval 3 it must actually
skip something; T-GATE + DeepCache at interval 1 must equal the published
plain T-GATE.
"""

import pytest
import torch

from conftest import PROMPT, latents

pytest.importorskip("DeepCache")
tgate = pytest.importorskip("tgate")

from reference_deepcache import deepcache_latents, tgate_deepcache_latents  # noqa: E402

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

STEPS = 6
FAMILIES = ["sd15", "sdxl"]


@pytest.fixture(scope="module", params=FAMILIES)
def pipe_and_plain(request):
    from tgate_fx.tiny import tiny_pipeline

    pipe = tiny_pipeline(request.param)
    return request.param, pipe, latents(pipe, num_inference_steps=STEPS)


def test_interval_1_is_the_plain_pipeline(pipe_and_plain):
    family, pipe, plain = pipe_and_plain
    got = deepcache_latents(family, cache_interval=1, cache_branch_id=0, num_inference_steps=STEPS, pipe=pipe)
    assert torch.equal(got, plain)


def test_interval_3_skips_work_and_leaves_the_pipeline_as_it_was(pipe_and_plain):
    family, pipe, plain = pipe_and_plain
    got = deepcache_latents(family, cache_interval=3, cache_branch_id=0, num_inference_steps=STEPS, pipe=pipe)
    assert torch.isfinite(got).all()
    assert not torch.equal(got, plain)
    assert torch.equal(latents(pipe, num_inference_steps=STEPS), plain)  # helper disabled: forwards restored


@pytest.mark.parametrize("family,loader", [("sd15", "TgateSDLoader"), ("sdxl", "TgateSDXLLoader")])
def test_tgate_deepcache_interval_1_is_published_tgate(family, loader):
    from tgate_fx.tiny import tiny_pipeline

    settings = dict(gate_step=3, sp_interval=2, fi_interval=1, warm_up=1)
    plain = getattr(tgate, loader)(tiny_pipeline(family))
    expected = plain.tgate(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS,
                           output_type="latent", **settings, **plain.tiny_call_kwargs).images
    got = tgate_deepcache_latents(family, **settings, cache_interval=1, cache_branch_id=0, num_inference_steps=STEPS)
    assert torch.equal(got, expected)
    cached = tgate_deepcache_latents(family, **settings, cache_interval=3, cache_branch_id=0,
                                     num_inference_steps=STEPS)
    assert not torch.equal(cached, expected)
