"""T-GATE on joint attention (FLUX, SD3 / SD3.5, Qwen-Image, FLUX.2): after the gate each double-stream block reuses the
text tokens' keys, values and text-stream output recorded at the gate, and attends with the image queries only.

Final latents against the eager oracle of exactly that rule (``oracle_tgate_joint.py``: forward hooks on the
models' own modules), bit for bit, without CFG (FLUX), with CFG as one batch (SD3, SD3.5 with its image-only
``attn2`` self-attention on T-GATE's schedule) and as two calls a step (FLUX and Qwen-Image true CFG, FLUX.2
[klein]); the graphs
after the gate (no text-stream projection or MLP, image-row queries); the pass on its own; refusals.
"""

import pytest
import torch

import tgate_fx
from oracle_tgate_joint import run_joint_oracle
from tgate_fx import BlockCacheConfig, TGateConfig, ToCaConfig
from tgate_fx.tiny_extra import tiny_chroma, tiny_flux, tiny_flux2, tiny_hunyuanvideo, tiny_qwenimage, tiny_sd3

pytestmark = pytest.mark.e2e
SDPA = torch.ops.aten.scaled_dot_product_attention.default
STEPS = 6
SETTINGS = dict(gate_step=3, sp_interval=2, fi_interval=1, warm_up=1)

FAMILIES = {
    "flux": (tiny_flux, None),
    "flux_true_cfg": (lambda: tiny_flux(true_cfg_scale=4.0), "split"),
    "flux_kontext": (lambda: tiny_flux(kontext=True), None),
    "chroma": (tiny_chroma, "split"),
    "sd3": (tiny_sd3, "batch"),
    "sd35": (lambda: tiny_sd3(dual_attention=True, num_layers=2), "batch"),
    "qwenimage_true_cfg": (tiny_qwenimage, "split"),
    "flux2": (tiny_flux2, None),
    "flux2_klein_cfg": (lambda: tiny_flux2(klein=True), "split"),
}


def _latents(pipe, call, **extra):
    out = pipe(**call, num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(0),
               **extra)
    return out.images


# Chroma's guidance embedding holds a tensor of the batch's size: each batch is exported on its own (warned).
_CASES = [pytest.param(f, marks=pytest.mark.filterwarnings("ignore::tgate_fx.core.rebatch.RebatchWarning"))
          if f == "chroma" else f for f in sorted(FAMILIES)]


@pytest.mark.parametrize("family", _CASES)
def test_equals_the_eager_oracle_of_the_rule(family):
    build, cfg = FAMILIES[family]
    pipe, call = build()
    plain = _latents(pipe, call)
    expected = run_joint_oracle(pipe, cfg=cfg, **SETTINGS, **call, num_inference_steps=STEPS, output_type="latent",
                                generator=torch.Generator().manual_seed(0)).images
    tgate_fx.optimize(pipe, tgate=TGateConfig(**SETTINGS))
    got = _latents(pipe, call)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, plain)  # the rule changed the result: the test can fail


def test_a_gate_at_the_last_step_equals_the_unoptimized_pipeline():
    pipe, call = tiny_sd3(dual_attention=True, num_layers=2)
    plain = _latents(pipe, call)
    tgate_fx.optimize(pipe, tgate=TGateConfig(gate_step=STEPS, sp_interval=1, fi_interval=1, warm_up=0))
    torch.testing.assert_close(_latents(pipe, call), plain, rtol=0, atol=0)


def _variants(pipe, call):
    runtime = tgate_fx.get_runtime(pipe)
    with runtime.tracing() as trace:
        _latents(pipe, call)
    return {plan.variant.name: variant for plan, _, variant in trace}


def _linears(variant, module: str) -> int:
    return sum(n.target is torch.ops.aten.linear.default
               and any(p.split(".")[-1] == module or f".{module}." in p + "."
                       for p, _ in (n.meta.get("nn_module_stack") or {}).values())
               for n in variant.graph_module.graph.nodes)


def test_after_the_gate_the_text_stream_is_not_computed():
    pipe, call = tiny_flux()  # 2 double-stream blocks (9 text + 256 image tokens), 2 single-stream blocks
    tgate_fx.optimize(pipe, tgate=TGateConfig(**SETTINGS))
    variants = _variants(pipe, call)
    before, after = variants["sp_compute"], variants["fi_record"]
    for module in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context"):
        assert _linears(before, module) > 0 and _linears(after, module) == 0, module
    assert _linears(after, "to_q") == 4 and _linears(after, "ff") > 0  # the image stream and single blocks run
    queries = sorted(n.args[0].meta["val"].shape[2] for n in after.graph_module.graph.nodes if n.target is SDPA)
    assert queries == [256, 256, 265, 265]  # double-stream: image queries; single-stream: every token
    keys = sorted(n.args[1].meta["val"].shape[2] for n in after.graph_module.graph.nodes if n.target is SDPA)
    assert keys == [265] * 4  # the image queries still attend over the cached text keys
    reads = {str(k).split(":", 2)[2] for k in after.cache_inputs}
    assert reads == {"text_k", "text_v", "text_out"}


def test_plan_shows_the_text_stream():
    pipe, call = tiny_flux()
    tgate_fx.optimize(pipe, tgate=TGateConfig(**SETTINGS))
    _latents(pipe, call)
    header = str(tgate_fx.get_runtime(pipe).last_plan).splitlines()[1]
    assert "text stream" in header and "cross-attn" not in header


def test_composed_with_the_block_cache_at_threshold_zero_equals_tgate_alone():
    pipe, call = tiny_flux(true_cfg_scale=4.0)
    tgate_fx.optimize(pipe, tgate=TGateConfig(**SETTINGS))
    alone = _latents(pipe, call)
    tgate_fx.restore(pipe)
    tgate_fx.optimize(pipe, tgate=TGateConfig(**SETTINGS), blockcache=BlockCacheConfig(threshold=0.0))
    torch.testing.assert_close(_latents(pipe, call), alone, rtol=0, atol=0)


def test_composed_with_toca_is_refused_at_optimize():
    pipe, _ = tiny_flux()
    with pytest.raises(ValueError, match="T-GATE's joint-attention rule and ToCa"):
        tgate_fx.optimize(pipe, tgate=TGateConfig(gate_step=2), toca=ToCaConfig())


def test_hunyuanvideo_is_refused_with_the_reason():
    pipe, _ = tiny_hunyuanvideo()
    with pytest.raises(TypeError, match="HunyuanVideoTransformerBlock|blocks its joint-attention rule does not know"):
        tgate_fx.optimize(pipe, tgate=TGateConfig(gate_step=2))
