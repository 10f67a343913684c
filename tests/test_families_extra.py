"""Families outside the main matrix: video (AnimateDiff, Stable Video Diffusion) and newer image models.

Each is exact against the eager T-GATE oracle (``oracle.py``) and, where the
published package has a loader (SVD: ``tgate.TgateSVDLoader``), against it
bit for bit.
"""

import pytest
import torch

import tgate_fx
from oracle import run_oracle
from tgate_fx.tiny_extra import tiny_animatediff, tiny_svd

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
