"""Families outside the main matrix: video (AnimateDiff, Stable Video Diffusion, LTX-Video, Wan 2.1),
newer image models (Sana, HunyuanDiT) and Kandinsky 2.2.

Each is exact against the eager T-GATE oracle (``oracle.py``) and, where the
published package has a loader (SVD: ``tgate.TgateSVDLoader``), against it
bit for bit; with settings that cache nothing, also equal to the unoptimized
pipeline. What T-GATE cannot serve is refused by ``optimize`` with the reason.
"""

import pytest
import torch

import tgate_fx
import tgate_fx.accounting.report
import tgate_fx.core.hook
from oracle import run_oracle
from tgate_fx.methods import TGate, TGateConfig
from tgate_fx.tiny_extra import (tiny_animatediff, tiny_hunyuandit, tiny_kandinsky22, tiny_ltx, tiny_sana, tiny_svd,
                                 tiny_wan)

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

SVD_SETTINGS = [dict(gate_step=6, sp_interval=1, fi_interval=1, warm_up=6),  # nothing cached
                dict(gate_step=3, sp_interval=2, fi_interval=1, warm_up=1)]


def _frames(pipe, kw, **extra):
    return pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **kw, **extra).frames


def test_stable_video_diffusion_matches_the_published_tgate_svd_loader():
    # The published SVD T-GATE runs the *conditional* half after the gate (its "negative" image
    # latents and embeddings are computed with CFG off); tgate_fx keeps that half for SVD.
    from tgate import TgateSVDLoader

    pipe, kw = tiny_svd()
    kw["num_inference_steps"] = 6
    reference, _ = tiny_svd()
    TgateSVDLoader(reference)
    baseline = _frames(pipe, kw)
    for settings in SVD_SETTINGS:
        expected = reference.tgate(generator=torch.Generator().manual_seed(0), output_type="latent", **settings,
                                   **kw).frames
        tgate_fx.optimize(pipe, **settings)
        got = _frames(pipe, kw)
        assert torch.equal(got, expected), settings
        if settings["gate_step"] < 6:
            assert not torch.equal(got, baseline)  # the settings did cache something
            assert tgate_fx.get_runtime(pipe).last_plan.steps[-1].drops_uncond
    assert torch.equal(_frames(tgate_fx.restore(pipe), kw), baseline)


@pytest.mark.parametrize("settings", [dict(gate_step=5, sp_interval=1, fi_interval=1, warm_up=5),
                                      dict(gate_step=3, sp_interval=2, fi_interval=1, warm_up=1)],
                         ids=["nothing-cached", "cached"])
def test_animatediff_matches_the_oracle(settings):
    # per-frame text embeddings (batch * frames rows) are halved with the latents after the gate
    pipe, kw = tiny_animatediff()
    kw["num_inference_steps"] = 5
    expected = run_oracle(pipe, "unet", cfg=True, generator=torch.Generator().manual_seed(0), output_type="latent",
                          **settings, **kw).frames
    baseline = _frames(pipe, kw)
    tgate_fx.optimize(pipe, **settings)
    got = _frames(pipe, kw)
    assert torch.equal(got, expected)
    assert torch.equal(got, baseline) == (settings["gate_step"] == 5)


NOTHING_CACHED_4 = dict(gate_step=4, sp_interval=1, fi_interval=1, warm_up=4)
CACHED_4 = dict(gate_step=2, sp_interval=2, fi_interval=1, warm_up=1)
SETTINGS_4 = pytest.mark.parametrize("settings", [NOTHING_CACHED_4, CACHED_4], ids=["nothing-cached", "cached"])
def _latents(pipe, kw):
    out = pipe(generator=torch.Generator().manual_seed(0), output_type="latent", num_inference_steps=4, **kw)
    return out.frames if hasattr(out, "frames") else out.images


def _check_against_oracle(pipe, kw, settings, *, cfg=True):
    schedule = {k: v for k, v in settings.items() if k != "lcm"}
    out = run_oracle(pipe, "transformer", cfg=cfg, generator=torch.Generator().manual_seed(0), output_type="latent",
                     num_inference_steps=4, **schedule, **kw)
    expected = out.frames if hasattr(out, "frames") else out.images
    baseline = _latents(pipe, kw)
    tgate_fx.optimize(pipe, **settings)
    got = _latents(pipe, kw)
    assert torch.equal(got, expected)
    assert torch.equal(got, baseline) == (settings["gate_step"] == 4)  # nothing cached == unoptimized
    if cfg and settings["gate_step"] < 4:
        assert tgate_fx.get_runtime(pipe).last_plan.steps[-1].drops_uncond
    assert torch.equal(_latents(tgate_fx.restore(pipe), kw), baseline)


@SETTINGS_4
def test_sana_matches_the_oracle(settings):
    # linear self-attention (SanaLinearAttnProcessor2_0) is cached like any attention output
    pipe, kw = tiny_sana()
    _check_against_oracle(pipe, kw, settings)


@SETTINGS_4
def test_hunyuandit_matches_the_oracle(settings):
    # cross-attention over the CLIP tokens and the projected mT5 tokens, concatenated; rotary self-attention.
    # After the gate the unconditional half runs, its pooled mT5 embedding still feeding the timestep embedding.
    pipe, kw = tiny_hunyuandit()
    _check_against_oracle(pipe, kw, settings)


@SETTINGS_4
def test_ltx_video_matches_the_oracle(settings):
    pipe, kw = tiny_ltx()
    _check_against_oracle(pipe, kw, settings)


@pytest.mark.parametrize("settings", [{**NOTHING_CACHED_4, "lcm": True}, {**CACHED_4, "lcm": True}],
                         ids=["nothing-cached", "cached"])
def test_wan_without_guidance_matches_the_oracle(settings):
    # guidance_scale 1: one denoiser call per step, which T-GATE serves (lcm=True says so)
    pipe, kw = tiny_wan(guidance_scale=1.0)
    _check_against_oracle(pipe, kw, settings, cfg=False)


def test_kandinsky22_is_refused_by_optimize():
    # its image embeddings enter attention as added keys/values: no cross-attention, and dropping the
    # unconditional half after the gate would lose the conditioning
    pipe, _ = tiny_kandinsky22()
    with pytest.raises(TypeError, match="added keys/values.*DeepCache applies"):
        tgate_fx.optimize(pipe)
    with pytest.raises(TypeError, match="added keys/values"):
        tgate_fx.optimize(pipe, gate_step=4, sp_interval=1, fi_interval=1, warm_up=4)
    assert pipe.unet.__class__.__name__ == "UNet2DConditionModel"  # nothing installed


def test_kandinsky22_deepcache_caching_nothing_equals_the_unoptimized_pipeline():
    pipe, kw = tiny_kandinsky22()
    baseline = _latents(pipe, kw)
    tgate_fx.optimize(pipe, tgate=None, deepcache=tgate_fx.DeepCacheConfig(cache_interval=1))
    assert torch.equal(_latents(pipe, kw), baseline)
    tgate_fx.optimize(pipe, tgate=None, deepcache=tgate_fx.DeepCacheConfig(cache_interval=2))
    cached = _latents(pipe, kw)
    assert torch.isfinite(cached).all() and not torch.equal(cached, baseline)
    assert [s.variant.name for s in tgate_fx.get_runtime(pipe).last_plan.steps] == ["dc_full", "dc_partial"] * 2


@pytest.mark.parametrize("build", [tiny_kandinsky22, tiny_ltx, tiny_animatediff], ids=["kandinsky22", "ltx", "animatediff"])
def test_todo_is_refused_by_optimize_where_it_has_no_rule(build):
    # added keys/values (Kandinsky 2.2) and video denoisers: refused at optimize, not at the first call
    pipe, _ = build()
    with pytest.raises(TypeError, match="ToDo cannot apply"):
        tgate_fx.optimize(pipe, tgate=None, todo=tgate_fx.ToDoConfig(factor=2))
    assert tgate_fx.core.hook.installed_runtime(getattr(pipe, "unet", getattr(pipe, "transformer", None))) is None
    applicable = tgate_fx.accounting.report._applicable(getattr(pipe, "unet", getattr(pipe, "transformer", None)))
    reason = ("its attention adds the conditioning's keys/values" if build is tiny_kandinsky22 else
              "it downsamples the 2-D token grid of an image's self-attention, and")
    assert f"ToDo no ({reason}" in applicable
