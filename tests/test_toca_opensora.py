"""ToCa on LTX-Video with the official Open-Sora rules (``Shenyi-Z/ToCa``, ``Open-Sora/``): the schedule and the
ratios, and final latents against the eager oracle of the rules (``oracle_toca_opensora.py``) bit for bit, with
CFG as one ``[uncond, cond]`` batch and without guidance. Tiny pipelines (2 blocks, 192 video tokens), fp32."""

import pytest
import torch

import tgate_fx
from oracle_toca_opensora import OpenSoraToCaOracle
from tgate_fx import ToCaConfig
from tgate_fx.methods.toca.config import fresh_count, fresh_ratio, step_kinds
from tgate_fx.tiny_extra import tiny_ltx

pytestmark = pytest.mark.e2e


def test_default_schedule_is_the_official_per_module_cycles():
    kinds = step_kinds(ToCaConfig(family="opensora").resolved(), 30)
    full_attn = [i for i in range(30) if i <= 2 or i % 3 == 0]   # self-attention and MLP
    full_cross = [i for i in range(30) if i <= 2 or i % 6 == 0]  # cross-attention
    assert [i for i, k in enumerate(kinds) if k == "full"] == full_cross
    assert [i for i, k in enumerate(kinds) if k != "partial"] == full_attn
    assert step_kinds(ToCaConfig(family="opensora", interval=1).resolved(), 10) == ["full"] * 10


def test_fresh_ratio_and_k_are_the_official_float32_arithmetic():
    c = ToCaConfig(family="opensora").resolved()
    assert fresh_ratio(c, None, 30, 0, "cross") == 0.0  # 0.1 * (1 - 0.67 * 1.5) < 0: clamped
    mlp = fresh_ratio(c, None, 30, 5, "mlp")
    assert mlp == float(torch.tensor(0.1 * 1.495))
    assert [fresh_count(c, mlp, n) for n in (192, 1000, 10530)] == [int(torch.tensor(0.1 * 1.495) * n)
                                                                   for n in (192, 1000, 10530)]


def _latents(pipe, call, steps, **extra):
    return pipe(**call, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
                **extra).frames


@pytest.mark.parametrize("guidance_scale", [3.0, 1.0])
@pytest.mark.parametrize("settings", [{}, {"ratio": 0.3}])
def test_ltx_equals_the_official_opensora_rules(settings, guidance_scale):
    steps = 13
    pipe, call = tiny_ltx(num_layers=2)
    call = {**call, "guidance_scale": guidance_scale}
    plain = _latents(pipe, call, steps)
    c = ToCaConfig(**settings).resolved("opensora")
    oracle = OpenSoraToCaOracle(pipe.transformer, cfg=guidance_scale > 1, fresh_ratio=c.ratio)
    try:
        expected = _latents(pipe, call, steps)
    finally:
        oracle.close()
    assert any(isinstance(e["mlp"], int) and e["mlp"] > 0 for _, _, e in oracle.log)  # tokens were refreshed
    tgate_fx.optimize(pipe, toca=ToCaConfig(**settings))
    got = _latents(pipe, call, steps)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, plain)


def test_interval_1_equals_the_unoptimized_pipeline():
    pipe, call = tiny_ltx(num_layers=2)
    plain = _latents(pipe, call, 6)
    tgate_fx.optimize(pipe, toca=ToCaConfig(interval=1))
    torch.testing.assert_close(_latents(pipe, call, 6), plain, rtol=0, atol=0)


def test_composed_with_tgate_is_refused_at_optimize():
    pipe, _ = tiny_ltx(num_layers=2)
    with pytest.raises(ValueError, match="Open-Sora rules and T-GATE"):
        tgate_fx.optimize(pipe, toca=ToCaConfig(), tgate=tgate_fx.TGateConfig(gate_step=4))
