"""ToCa on FLUX (double- and single-stream blocks) as the official flux-ToCa code does it: the schedule and
the fresh ratios against an independent transcription of the official scheduler (``oracle_toca_flux.py``),
final latents against the eager oracle of the official rules (bit for bit), with true CFG off and on, on
FLUX.1, FLUX.1 Kontext, Chroma and FLUX.2, the graphs, and the errors. Tiny pipelines (256 image tokens, 9 text
tokens, 2 + 2 blocks), fp32."""

import pytest
import torch

import tgate_fx
from oracle_toca_flux import FluxToCaOracle, fresh_ratio_scheduler
from tgate_fx import TGateConfig, ToCaConfig
from tgate_fx.methods.toca.config import fresh_count, fresh_ratio, step_kinds
from tgate_fx.tiny_extra import tiny_chroma, tiny_cogvideox, tiny_flux, tiny_flux2, tiny_hunyuanvideo, tiny_qwenimage
from tgate_fx.tiny_extra import tiny_sd3

pytestmark = pytest.mark.e2e
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def final_latents(pipe, call, steps):
    return pipe(**call, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def oracle_latents(build, steps, calls_per_step, **settings):
    pipe, call = build()
    oracle = FluxToCaOracle(pipe.transformer, num_steps=steps, calls_per_step=calls_per_step, **settings)
    try:
        return final_latents(pipe, call, steps), oracle.steps
    finally:
        oracle.close()


def _oracle_settings(c: ToCaConfig) -> dict:
    return dict(fresh_threshold=c.interval, fresh_ratio=c.ratio, soft_fresh_weight=c.cache_weight,
                ratio_scheduler="ToCa" if c.schedule == "ToCa-flux" else c.schedule)


# --- the schedule and the ratios -------------------------------------------------------------------------------


@pytest.mark.parametrize("settings,steps", [({}, 28), ({}, 50), ({"interval": 3}, 20), ({"interval": 1}, 10),
                                            ({"ratio": 0.0}, 28), ({"interval": 6, "ratio": 0.3}, 30)])
def test_step_kinds_are_the_official_cal_type(settings, steps):
    c = ToCaConfig(family="flux", **settings).resolved()
    oracle = FluxToCaOracle.__new__(FluxToCaOracle)  # only its scheduler
    oracle.fresh_ratio, oracle.fresh_threshold, oracle.cache_counter = c.ratio, c.interval, 0
    oracle.current = {"num_steps": steps}
    official = []
    for step in range(steps):
        oracle.current["step"] = step
        oracle._cal_type()
        official.append("full" if oracle.current["type"] == "full" else "partial")
    assert step_kinds(c, steps) == official


def test_default_schedule_is_full_at_the_first_three_steps_then_every_fourth():
    kinds = step_kinds(ToCaConfig(family="flux").resolved(), 28)
    assert [i for i, k in enumerate(kinds) if k == "full"] == [0, 1, 2, 6, 10, 14, 18, 22, 26]


def test_barriers_are_full_steps_and_restart_the_interval():
    kinds = step_kinds(ToCaConfig(family="flux").resolved(), 12, frozenset({4}))
    assert [i for i, k in enumerate(kinds) if k == "full"] == [0, 1, 2, 4, 8]


@pytest.mark.parametrize("compat", ["official", "clean"])
def test_fresh_ratio_and_k_per_stream_and_layer(compat):
    c = ToCaConfig(family="flux", compat=compat).resolved()
    for stream, tokens, depth in (("double", 4096, 19), ("double", 512, 19), ("single", 4608, 38)):
        for layer in range(depth):
            ratio = fresh_ratio(c, None, 28, layer, stream, depth)
            if compat == "official":
                current = {"step": 5, "num_steps": 28, "layer": layer, "stream": stream + "_stream"}
                dic = {"fresh_ratio": 0.1, "fresh_ratio_schedule": "ToCa"}
                expected = torch.clamp(torch.tensor(fresh_ratio_scheduler(dic, current)), min=0, max=1)
                assert ratio == float(expected)
                assert fresh_count(c, ratio, tokens) == int(expected * tokens)
            else:
                factor = (0.4 if stream == "double" else 1.6) * (1.5 - layer / (depth - 1))
                assert ratio == pytest.approx(min(0.1 * factor, 1.0))


def test_flux_schedules_do_not_mix_with_the_other_families():
    with pytest.raises(ValueError, match="does not fit family 'flux'"):
        ToCaConfig(family="flux", schedule="ToCa").resolved()
    with pytest.raises(ValueError, match="does not fit family 'pixart'"):
        ToCaConfig(family="pixart", schedule="ToCa-flux").resolved()
    assert ToCaConfig(family="flux", schedule="constant").resolved().schedule == "constant"


# --- final latents against the oracle --------------------------------------------------------------------------


CASES = [
    ("defaults", dict(), 10),
    ("high ratio, interval 3", dict(ratio=0.5, interval=3), 9),
    ("FORA (ratio 0)", dict(ratio=0.0), 8),
    ("constant schedule", dict(schedule="constant", ratio=0.3), 8),
]


@pytest.mark.parametrize("true_cfg", [1.0, 4.0], ids=["no-cfg", "true-cfg"])
@pytest.mark.parametrize("name,settings,steps", CASES, ids=[c[0] for c in CASES])
def test_flux_equals_the_official_rules(name, settings, steps, true_cfg):
    build = lambda: tiny_flux(true_cfg_scale=true_cfg)
    config = ToCaConfig(**settings)
    expected, kinds = oracle_latents(build, steps, 2 if true_cfg > 1 else 1,
                                     **_oracle_settings(config.resolved("flux")))
    assert "ToCa" in kinds and kinds[0] == "full"
    pipe, call = build()
    tgate_fx.optimize(pipe, toca=config)
    got = final_latents(pipe, call, steps)
    assert tgate_fx.get_runtime(pipe).last_plan.cfg == (true_cfg > 1)
    assert torch.equal(got, expected)
    plain, _ = build()
    assert not torch.equal(got, final_latents(plain, call, steps))  # the cache changed something


def test_interval_1_equals_the_unoptimized_pipeline():
    pipe, call = tiny_flux(true_cfg_scale=4.0)
    expected = final_latents(pipe, call, 6)
    tgate_fx.optimize(pipe, toca=ToCaConfig(interval=1))
    assert torch.equal(final_latents(pipe, call, 6), expected)


def test_kontext_equals_the_official_rules():
    build = lambda: tiny_flux(kontext=True)
    expected, _ = oracle_latents(build, 8, 1)
    pipe, call = build()
    tgate_fx.optimize(pipe, toca=ToCaConfig())
    assert torch.equal(final_latents(pipe, call, 8), expected)


@pytest.mark.filterwarnings("ignore::tgate_fx.core.rebatch.RebatchWarning")  # Chroma's guidance tensor follows the batch
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_chroma_equals_the_official_rules(guidance_scale):
    build = lambda: tiny_chroma(guidance_scale=guidance_scale)
    expected, _ = oracle_latents(build, 8, 2 if guidance_scale > 1 else 1)
    pipe, call = build()
    tgate_fx.optimize(pipe, toca=ToCaConfig())
    assert torch.equal(final_latents(pipe, call, 8), expected)


SD3_CASES = [("sd3", dict(), 1), ("sd3, 2 blocks", dict(), 2), ("sd3.5 dual attention", dict(dual_attention=True), 2),
             ("sd3, ratio 0.5", dict(ratio=0.5), 2)]


@pytest.mark.parametrize("name,settings,layers", SD3_CASES, ids=[c[0] for c in SD3_CASES])
def test_sd3_equals_the_flux_rules_on_its_joint_blocks(name, settings, layers):
    """SD3 / SD3.5 (CFG as one batch of 2): FLUX's double-stream rules on JointTransformerBlock, image tokens
    first, SD3.5's attn2 cached with the joint attention, no text stream out of the last block."""
    config = ToCaConfig(**{k: v for k, v in settings.items() if k != "dual_attention"})
    build = lambda: tiny_sd3(dual_attention=settings.get("dual_attention", False), num_layers=layers)
    expected, kinds = oracle_latents(build, 10, 1, **_oracle_settings(config.resolved("flux")))
    assert "ToCa" in kinds
    pipe, call = build()
    tgate_fx.optimize(pipe, toca=config)
    got = final_latents(pipe, call, 10)
    assert tgate_fx.get_runtime(pipe).last_plan.cfg
    assert torch.equal(got, expected)
    plain, _ = build()
    assert not torch.equal(got, final_latents(plain, call, 10))


@pytest.mark.parametrize("true_cfg", [1.0, 4.0], ids=["no-cfg", "true-cfg"])
@pytest.mark.parametrize("settings", [{}, {"ratio": 0.5, "interval": 3}], ids=["defaults", "ratio 0.5"])
def test_qwenimage_equals_the_flux_rules_on_its_blocks(settings, true_cfg):
    """Qwen-Image (text mask, true CFG as two calls a step): FLUX's double-stream rules on its blocks."""
    config = ToCaConfig(**settings)
    build = lambda: tiny_qwenimage(true_cfg_scale=true_cfg)
    expected, kinds = oracle_latents(build, 10, 2 if true_cfg > 1 else 1, **_oracle_settings(config.resolved("flux")))
    assert "ToCa" in kinds
    pipe, call = build()
    tgate_fx.optimize(pipe, toca=config)
    got = final_latents(pipe, call, 10)
    assert tgate_fx.get_runtime(pipe).last_plan.cfg == (true_cfg > 1)
    assert torch.equal(got, expected)
    plain, _ = build()
    assert not torch.equal(got, final_latents(plain, call, 10))


@pytest.mark.parametrize("settings,layers", [({}, 1), ({"ratio": 0.5}, 2)], ids=["defaults, 1 block", "ratio 0.5, 2 blocks"])
def test_cogvideox_equals_the_chosen_rules_on_its_blocks(settings, layers):
    """CogVideoX (CFG as one batch of 2): the joint attention cached, its one MLP over the joined text and video
    tokens refreshed on the top-k of them (tgate_fx's choice, documented in docs/toca.md)."""
    config = ToCaConfig(**settings)
    build = lambda: tiny_cogvideox(num_layers=layers)
    steps = 10
    pipe, call = build()
    oracle = FluxToCaOracle(pipe.transformer, num_steps=steps, **_oracle_settings(config.resolved("flux")))
    try:
        expected = pipe(**call, num_inference_steps=steps, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).frames
    finally:
        oracle.close()
    assert "ToCa" in oracle.steps
    pipe, call = build()
    tgate_fx.optimize(pipe, toca=config)
    got = pipe(**call, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    assert tgate_fx.get_runtime(pipe).last_plan.cfg
    assert torch.equal(got, expected)
    plain, _ = build()
    assert not torch.equal(got, plain(**call, num_inference_steps=steps, output_type="latent",
                                      generator=torch.Generator().manual_seed(0)).frames)


@pytest.mark.parametrize("settings", [{}, {"ratio": 0.5, "interval": 3}], ids=["defaults", "ratio 0.5"])
def test_hunyuanvideo_equals_the_flux_rules_on_its_blocks(settings):
    """HunyuanVideo (a double- and a single-stream block, image tokens first, a text mask, embedded guidance)."""
    config = ToCaConfig(**settings)
    steps = 10
    pipe, call = tiny_hunyuanvideo()
    oracle = FluxToCaOracle(pipe.transformer, num_steps=steps, **_oracle_settings(config.resolved("flux")))
    try:
        expected = pipe(**call, num_inference_steps=steps, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).frames
    finally:
        oracle.close()
    assert "ToCa" in oracle.steps
    pipe, call = tiny_hunyuanvideo()
    tgate_fx.optimize(pipe, toca=config)
    got = pipe(**call, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    assert torch.equal(got, expected)
    plain, _ = tiny_hunyuanvideo()
    assert not torch.equal(got, plain(**call, num_inference_steps=steps, output_type="latent",
                                      generator=torch.Generator().manual_seed(0)).frames)


@pytest.mark.parametrize("settings", [{}, {"ratio": 0.5, "interval": 3}], ids=["defaults", "ratio 0.5"])
@pytest.mark.parametrize("klein", [False, True], ids=["flux2", "klein-cfg"])
def test_flux2_equals_the_flux_rules_on_its_blocks(klein, settings):
    """FLUX.2 (double-stream blocks, then parallel single-stream blocks over the joined sequence); [klein]
    runs CFG as two calls a step, each on its own caches, as FLUX.1's true CFG."""
    build = lambda: tiny_flux2(klein=klein)
    config = ToCaConfig(**settings)
    steps = 10
    expected, kinds = oracle_latents(build, steps, 2 if klein else 1, **_oracle_settings(config.resolved("flux")))
    assert "ToCa" in kinds
    pipe, call = build()
    tgate_fx.optimize(pipe, toca=config)
    got = final_latents(pipe, call, steps)
    assert torch.equal(got, expected)
    plain, _ = build()
    assert not torch.equal(got, final_latents(plain, call, steps))  # the cache changed something


# --- graphs ----------------------------------------------------------------------------------------------------


def test_partial_steps_share_one_graph_without_attention():
    pipe, call = tiny_flux()
    tgate_fx.optimize(pipe, toca=ToCaConfig())
    runtime = tgate_fx.get_runtime(pipe)
    with runtime.tracing() as trace:
        final_latents(pipe, call, 10)
    variants = {plan.variant.name: variant for plan, _, variant in trace}
    # full steps 0, 1 (a full step follows: their scores are unread), 2, 6; one graph for every partial step
    assert set(variants) == {"toca_full_unread", "toca_full", next(n for n in variants if "partial" in n)}
    assert [p.variant.name for p in runtime.last_plan.steps][:3] == ["toca_full_unread"] * 2 + ["toca_full"]
    full, unread = variants["toca_full"], variants["toca_full_unread"]
    partial = next(v for name, v in variants.items() if "partial" in name)
    count = lambda v, target: sum(n.target is target for n in v.graph_module.graph.nodes)
    assert count(full, SDPA) == 4 and count(partial, SDPA) == 0  # every attention is read from the cache
    # the full graph computes each block's map (softmax of the scaled logits), the unread and partial graphs none
    assert count(full, torch.ops.aten.softmax.int) == 4 and count(partial, torch.ops.aten.softmax.int) == 0
    assert count(unread, SDPA) == 4 and count(unread, torch.ops.aten.softmax.int) == 0
    assert not any("score" in str(k) for k in unread.records)
    # the text MLP refreshes no token (below): its score column is not recorded either
    assert {str(k).split(":", 2)[2] for k in full.records if "score" in str(k)} == {"score_img_mlp", "score"}
    reads = {str(k).split(":", 2)[2] for k in partial.cache_inputs}
    # k of the 9 text tokens is int(0.1 * 1.5 * 0.4 * 9) = 0: the text MLP is its cache, its score unread
    assert {"attn_img", "attn_txt", "img_mlp", "txt_mlp", "attn", "total", "score_img_mlp", "score",
            "count_img_mlp", "count_txt_mlp", "count_mlp"} == reads


# --- errors ----------------------------------------------------------------------------------------------------


def test_a_pixart_config_is_refused_on_flux():
    pipe, _ = tiny_flux()
    with pytest.raises(ValueError, match="does not fit FluxTransformer2DModel"):
        tgate_fx.optimize(pipe, toca=ToCaConfig(family="pixart"))


def test_tgate_with_toca_on_flux_is_refused_at_optimize():
    pipe, _ = tiny_flux()
    with pytest.raises(ValueError, match="T-GATE's joint-attention rule and ToCa"):
        tgate_fx.optimize(pipe, tgate=TGateConfig(gate_step=2), toca=ToCaConfig())
