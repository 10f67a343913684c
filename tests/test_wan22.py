"""Wan 2.2: two experts, ``transformer`` for the steps at or above the boundary timestep and ``transformer_2``
below it. Each is served as its own denoiser whose generations are the steps it runs (its methods' step
settings count within them). Final latents against eager oracles on each expert (each counting its own calls)
and against diffusers' FirstBlockCache hook on both, CFG as two calls a step. Tiny pipelines, fp32."""

import contextlib

import pytest
import torch

import tgate_fx
from oracle import SplitCfgOracleDenoiser, bypassed
from oracle_toca_wan import WanToCaOracle
from tgate_fx import BlockCacheConfig, TGateConfig, ToCaConfig
from tgate_fx.tiny_extra import tiny_wan22

pytestmark = pytest.mark.e2e
STEPS = 12  # the tiny pipeline's boundary 0.9: 5 steps on transformer, 7 on transformer_2


def _latents(pipe, call, **extra):
    return pipe(**call, num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(0), **extra).frames


def test_each_expert_plans_the_steps_it_runs():
    pipe, call = tiny_wan22()
    plain = _latents(pipe, call)
    tgate_fx.optimize(pipe, toca=ToCaConfig(interval=1))  # computes everything
    torch.testing.assert_close(_latents(pipe, call), plain, rtol=0, atol=0)
    high, low = (tgate_fx.core.hook.installed_runtime(getattr(pipe, n)) for n in ("transformer", "transformer_2"))
    boundary = 0.9 * 1000
    assert high.generations.last_plan.num_steps == 5 and low.generations.last_plan.num_steps == 7
    assert all(t >= boundary for t in high.generations.last_plan.timesteps)
    assert all(t < boundary for t in low.generations.last_plan.timesteps)
    tgate_fx.restore(pipe)
    assert tgate_fx.core.hook.installed_runtime(pipe.transformer_2) is None
    torch.testing.assert_close(_latents(pipe, call), plain, rtol=0, atol=0)


@pytest.mark.parametrize("guidance_scale", [6.0, 1.0])
def test_toca_equals_the_opensora_rules_on_each_expert(guidance_scale):
    pipe, call = tiny_wan22(guidance_scale=guidance_scale)
    plain = _latents(pipe, call)
    oracles = [WanToCaOracle(getattr(pipe, n), split=guidance_scale > 1, fresh_ratio=0.3)
               for n in ("transformer", "transformer_2")]
    try:
        expected = _latents(pipe, call)
    finally:
        for oracle in oracles:
            oracle.close()
    assert all(any(isinstance(e["mlp"], int) and e["mlp"] > 0 for _, _, e in o.log) for o in oracles)
    tgate_fx.optimize(pipe, toca=ToCaConfig(ratio=0.3))
    got = _latents(pipe, call)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, plain)


def test_tgate_equals_the_oracle_on_each_expert():
    settings = dict(gate_step=2, sp_interval=2, fi_interval=1, warm_up=1)
    pipe, call = tiny_wan22()
    plain = _latents(pipe, call)
    experts = {n: getattr(pipe, n) for n in ("transformer", "transformer_2")}
    oracles = {n: SplitCfgOracleDenoiser(m, **settings) for n, m in experts.items()}
    for n, oracle in oracles.items():
        object.__setattr__(pipe, n, oracle)
    try:
        with bypassed(experts["transformer"]), bypassed(experts["transformer_2"]):
            expected = _latents(pipe, call)
    finally:
        for n, oracle in oracles.items():
            oracle.close()
            object.__setattr__(pipe, n, experts[n])
    tgate_fx.optimize(pipe, tgate=TGateConfig(**settings))
    got = _latents(pipe, call)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, plain)


def test_block_cache_equals_diffusers_hook_on_both_experts():
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
    from diffusers.hooks import first_block_cache

    threshold = 0.2
    pipe, call = tiny_wan22()
    plain = _latents(pipe, call)
    experts = [pipe.transformer, pipe.transformer_2]
    for m in experts:
        apply_first_block_cache(m, FirstBlockCacheConfig(threshold=threshold))
        HookRegistry.check_if_exists_or_initialize(m).invalidate_child_registries_cache()
    try:
        reference = _latents(pipe, call)
    finally:
        for m in experts:
            registry = HookRegistry.check_if_exists_or_initialize(m)
            registry.remove_hook(first_block_cache._FBC_LEADER_BLOCK_HOOK, recurse=True)
            registry.remove_hook(first_block_cache._FBC_BLOCK_HOOK, recurse=True)
    assert not torch.equal(reference, plain), "the hook skipped nothing: the test could not fail"
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=threshold))
    torch.testing.assert_close(_latents(pipe, call), reference, rtol=0, atol=0)


def test_a_setting_beyond_an_experts_steps_is_refused():
    pipe, call = tiny_wan22()
    tgate_fx.optimize(pipe, gate_step=6)  # transformer runs 5 steps
    with pytest.raises(ValueError, match="gate_step"):
        _latents(pipe, call)


def test_a_switch_at_other_steps_than_counted_raises():
    pipe, call = tiny_wan22()
    tgate_fx.optimize(pipe, toca=ToCaConfig())
    pipe.register_to_config(boundary_ratio=0.95)  # the pipeline now switches earlier than optimize read
    with pytest.raises(RuntimeError, match="switches denoisers at other steps"):
        _latents(pipe, call)


def test_a_second_transformer_without_a_boundary_is_refused():
    import copy

    from tgate_fx.tiny_extra import tiny_wan

    pipe, _ = tiny_wan()
    pipe.register_modules(transformer_2=copy.deepcopy(pipe.transformer))
    with pytest.raises(TypeError, match="no boundary_ratio"):
        tgate_fx.optimize(pipe, gate_step=2)
