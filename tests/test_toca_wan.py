"""ToCa on Wan 2.1 with the Open-Sora rules, CFG as Wan's pipelines run it (two denoiser calls a step) and without
guidance: final latents against the eager oracle of the rules (``oracle_toca_wan.py``) bit for bit. The pair's
score is each half's entropy summed across the two calls (the chosen split-CFG form of the official side-by-side
score). Tiny pipelines (2 blocks, 12 video tokens), fp32."""

import pytest
import torch

import tgate_fx
from oracle_toca_wan import WanToCaOracle
from tgate_fx import ToCaConfig
from tgate_fx.core.plan import Plan
from tgate_fx.tiny_extra import tiny_wan

pytestmark = pytest.mark.e2e


def _latents(pipe, call, steps):
    return pipe(**call, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0)).frames


@pytest.mark.parametrize("guidance_scale", [6.0, 1.0])
@pytest.mark.parametrize("settings", [{}, {"ratio": 0.3}])
def test_wan_equals_the_opensora_rules(settings, guidance_scale):
    steps = 13
    pipe, call = tiny_wan(guidance_scale=guidance_scale)
    plain = _latents(pipe, call, steps)
    c = ToCaConfig(**settings).resolved("opensora")
    oracle = WanToCaOracle(pipe.transformer, split=guidance_scale > 1, fresh_ratio=c.ratio)
    try:
        expected = _latents(pipe, call, steps)
    finally:
        oracle.close()
    refreshed = [e for _, _, e in oracle.log if isinstance(e["mlp"], int) and e["mlp"] > 0]
    assert refreshed and len(oracle.log) == steps * 2 * (2 if guidance_scale > 1 else 1)
    tgate_fx.optimize(pipe, toca=ToCaConfig(**settings))
    got = _latents(pipe, call, steps)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, plain)
    assert ("split=True" in repr(tgate_fx.get_runtime(pipe).generations.last_plan)) == (guidance_scale > 1)


def test_the_score_is_shared_by_the_two_calls():
    """Each call writes its half's part of the score and the runtime stores their mean for both: the two calls'
    selections (and so their counters) are the same; the module outputs stay each call's own."""
    pipe, call = tiny_wan(guidance_scale=6.0)
    tgate_fx.optimize(pipe, toca=ToCaConfig(ratio=0.3))
    seen = {}

    def at_step_end(pipe_, i, t, kwargs):
        gen = tgate_fx.get_runtime(pipe).generations._generation
        seen[i] = {role: dict(caches) for role, caches in gen.role_caches.items()}
        return kwargs

    pipe(**call, num_inference_steps=7, output_type="latent", generator=torch.Generator().manual_seed(0),
         callback_on_step_end=at_step_end)
    cond, uncond = seen[5]["cond"], seen[5]["uncond"]  # after a partial step
    scores = [k for k in cond if k.slot == "score"]
    counts = [k for k in cond if k.slot == "count_mlp"]
    assert len(scores) == len(counts) == 2  # one per block
    for key in scores + counts:
        torch.testing.assert_close(cond[key], uncond[key], rtol=0, atol=0)
    assert any(int(cond[k].max()) > 0 for k in counts)  # stale tokens: partial steps ran
    assert all(not torch.equal(cond[k], uncond[k]) for k in cond if k.slot == "mlp")


def test_interval_1_equals_the_unoptimized_pipeline():
    pipe, call = tiny_wan()
    plain = _latents(pipe, call, 6)
    tgate_fx.optimize(pipe, toca=ToCaConfig(interval=1))
    torch.testing.assert_close(_latents(pipe, call, 6), plain, rtol=0, atol=0)


def test_a_score_that_cannot_be_shared_across_the_calls_is_refused():
    pipe, call = tiny_wan()
    tgate_fx.optimize(pipe, toca=ToCaConfig(score="random"))
    with pytest.raises(ValueError, match="two denoiser calls a step"):
        _latents(pipe, call, 4)
    method = tgate_fx.methods.toca.ToCa(ToCaConfig(family="pixart"))
    with pytest.raises(ValueError, match="two denoiser calls a step"):
        Plan(6, [method], cfg=True, split=True)
    with pytest.raises(ValueError, match="needs cfg=True"):
        Plan(6, [method], cfg=False, split=True)
