"""torch.compile of optimized pipelines: one compile per graph variant, no recompiles, no graph breaks inside."""

import pytest
import torch
from torch._dynamo.utils import counters

import tgate_fx
from conftest import latents
from tgate_fx.tiny import tiny_pipeline

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

SETTINGS = dict(gate_step=4, sp_interval=2, fi_interval=2, warm_up=1)
STEPS = 8  # variants: sp_compute, sp_record, sp_reuse(none here), gate, fi_reuse, fi_record


def _snapshot():
    return {k: dict(v) for k, v in counters.items() if v}


def _compiled(how):
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS)
    if how == "torch.compile(pipe.unet)":
        pipe.unet = torch.compile(pipe.unet, backend="eager")
    elif how == "pipe.unet.compile()":
        pipe.unet.compile(backend="eager")
    else:
        tgate_fx.optimize(pipe, **SETTINGS, compile={"backend": "eager"})
    return pipe


@pytest.mark.parametrize("how", ["torch.compile(pipe.unet)", "pipe.unet.compile()", "optimize(compile=...)"])
def test_compiles_once_per_variant_and_never_again(how):
    pipe = _compiled(how)
    torch._dynamo.reset()
    counters.clear()
    first = latents(pipe, num_inference_steps=STEPS)
    c1 = _snapshot()
    plan = tgate_fx.get_runtime(pipe).last_plan
    assert len(plan.variants) == 5
    assert c1["stats"]["unique_graphs"] == len(plan.variants)  # one graph per variant, each compiled once
    # The denoiser's own frame is never traced (its hook hands the call to the runtime, eagerly): no graph
    # break anywhere, and fullgraph=True would have raised on any break inside a variant.
    assert not c1.get("graph_break", {})

    counters.clear()
    second = latents(pipe, prompt="a green star at night", seed=7, num_inference_steps=STEPS)
    assert _snapshot() == {}, "the second generation must not compile or recompile anything"
    assert not torch.equal(first, second)

    # the eager backend runs the same aten graphs: bit-exact with the uncompiled runtime
    reference = tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS)
    assert torch.equal(first, latents(reference, num_inference_steps=STEPS))


@pytest.mark.parametrize("methods", [
    [tgate_fx.DeepCacheConfig(cache_interval=3, cache_branch_id=0)],
    [tgate_fx.TGateConfig(**SETTINGS), tgate_fx.DeepCacheConfig(cache_interval=2, cache_branch_id=1)]],
    ids=["deepcache", "tgate+deepcache"])
def test_composed_methods_compile_once_per_variant(methods):
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), methods=methods, compile={"backend": "eager"})
    torch._dynamo.reset()
    counters.clear()
    with tgate_fx.get_runtime(pipe).tracing() as trace:
        first = latents(pipe, num_inference_steps=STEPS)
    variants = {id(v) for _, _, v in trace}
    assert counters["stats"]["unique_graphs"] == len(variants) >= 2
    assert not counters.get("graph_break")
    counters.clear()
    latents(pipe, prompt="a green star at night", seed=7, num_inference_steps=STEPS)
    assert _snapshot() == {}, "the second generation must not compile or recompile anything"
    reference = tgate_fx.optimize(tiny_pipeline("sd15"), methods=methods)
    assert torch.equal(first, latents(reference, num_inference_steps=STEPS))


def test_new_resolution_compiles_its_variants_once():
    pipe = _compiled("pipe.unet.compile()")
    torch._dynamo.reset()
    counters.clear()
    latents(pipe, num_inference_steps=STEPS)
    assert counters["stats"]["unique_graphs"] == 5
    counters.clear()
    latents(pipe, num_inference_steps=STEPS, height=48, width=48)
    assert counters["stats"]["unique_graphs"] == 5
    counters.clear()
    latents(pipe, num_inference_steps=STEPS)
    latents(pipe, num_inference_steps=STEPS, height=48, width=48)
    assert _snapshot() == {}


def test_restore_removes_the_hook_under_a_compiled_denoiser():
    plain = latents(tiny_pipeline("sd15"), num_inference_steps=STEPS)
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS)
    original = pipe.unet
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    assert tgate_fx.get_runtime(pipe).denoiser is original
    tgate_fx.restore(pipe)
    assert pipe.unet._orig_mod is original and "forward" not in vars(original)  # the user's compiled module, unhooked
    with pytest.raises(ValueError, match="is not optimized"):
        tgate_fx.get_runtime(pipe)
    assert pipe.config.unet == ("diffusers", "UNet2DConditionModel")
    assert torch.equal(latents(pipe, num_inference_steps=STEPS), plain)


def test_compile_option_is_validated():
    with pytest.raises(TypeError, match="compile must be a bool or a dict of torch.compile options, got str"):
        tgate_fx.optimize(tiny_pipeline("sd15"), compile="inductor")


@pytest.mark.slow
def test_inductor_matches_eager_within_1e_4():
    """Inductor reorders float sums, so equality is to a tolerance: latents and images within 1e-4."""
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS, compile=True)
    eager = tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS)
    call = dict(pipe.tiny_call_kwargs, num_inference_steps=STEPS)

    def image(p):
        return p("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **call).images

    assert abs(image(pipe) - image(eager)).max() <= 1e-4
    got, expected = latents(pipe, num_inference_steps=STEPS), latents(eager, num_inference_steps=STEPS)
    assert (got - expected).abs().max().item() <= 1e-4


def _generate(pipe, call: dict, seed: int = 0) -> torch.Tensor:
    return pipe(generator=torch.Generator().manual_seed(seed), output_type="latent", num_inference_steps=6,
                **call).images


@pytest.mark.parametrize("family", ["zimage", "flux2_klein"])
def test_transformers_compile_once_per_variant(family):
    """Z-Image (per-sample lists in and out, CFG as one batch) and FLUX.2 [klein] (CFG as two calls a step)
    with ToCa under ``torch.compile(pipe.transformer)``: one compile per variant, none in a second generation,
    and the eager backend's latents equal the uncompiled runtime's."""
    from tgate_fx.tiny_extra import tiny_flux2, tiny_zimage

    def build():
        return tiny_zimage() if family == "zimage" else tiny_flux2(klein=True)

    pipe, call = build()
    tgate_fx.optimize(pipe, toca=tgate_fx.ToCaConfig())
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    with tgate_fx.get_runtime(pipe).tracing() as trace:
        first = _generate(pipe, call)
    variants = {id(v) for _, _, v in trace}
    assert counters["stats"]["unique_graphs"] == len(variants) >= 2
    assert not counters.get("graph_break")
    counters.clear()
    second = _generate(pipe, call, seed=1)
    assert _snapshot() == {}, "the second generation must not compile or recompile anything"
    assert not torch.equal(first, second)
    reference, call = build()
    tgate_fx.optimize(reference, toca=tgate_fx.ToCaConfig())
    assert torch.equal(first, _generate(reference, call))
