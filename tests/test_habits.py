"""Everyday diffusers habits around an optimized pipeline: never a silently wrong result.

With settings that cache nothing (the gate at the last step: every step
computes everything), an optimized pipeline must equal the unoptimized one
bit for bit, whatever the user changed in the denoiser between calls.
"""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import tgate_fx
import tgate_fx.core.hook
from conftest import eager_denoiser, latents
from tgate_fx.tiny import tiny_pipeline

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

STEPS = 3
NOTHING_CACHED = dict(gate_step=STEPS, sp_interval=1, fi_interval=1, warm_up=STEPS)


def _both(pipe):
    """(optimized, eager) latents of one generation each."""
    got = latents(pipe, num_inference_steps=STEPS)
    with eager_denoiser(pipe):
        expected = latents(pipe, num_inference_steps=STEPS)
    return got, expected


class _Scaled(AttnProcessor2_0):
    """Attention as usual, output scaled: a processor a user (or PAG, or IP-Adapter) might install."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs) * self.scale


def test_attention_processor_changed_after_first_call():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **NOTHING_CACHED)
    first, expected = _both(pipe)
    assert torch.equal(first, expected)
    pipe.unet.set_attn_processor(_Scaled(0.5))
    got, expected = _both(pipe)
    assert torch.equal(got, expected) and not torch.equal(got, first)
    runtime = tgate_fx.get_runtime(pipe)
    assert runtime.recaptures == 1
    # a processor attribute (an IP-Adapter-style scale) changed in place is seen too
    for processor in pipe.unet.attn_processors.values():
        processor.scale = 0.25
    got, expected = _both(pipe)
    assert torch.equal(got, expected) and runtime.recaptures == 2
    # nothing changed: nothing captured again
    latents(pipe, num_inference_steps=STEPS)
    assert runtime.recaptures == 2


def test_parameter_replaced_after_first_call():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **NOTHING_CACHED)
    latents(pipe, num_inference_steps=STEPS)
    conv = pipe.unet.conv_in
    conv.weight = torch.nn.Parameter(conv.weight.detach() * 1.5)  # a new object the old graphs do not hold
    got, expected = _both(pipe)
    assert torch.equal(got, expected)


def test_weights_changed_in_place_are_used_without_capturing_again():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **NOTHING_CACHED)
    latents(pipe, num_inference_steps=STEPS)
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(1.5)  # e.g. fuse_lora, load_state_dict: same objects
    got, expected = _both(pipe)
    assert torch.equal(got, expected) and tgate_fx.get_runtime(pipe).recaptures == 0


def test_lora_adapters_switched_after_first_call():
    pytest.importorskip("peft")
    from peft import LoraConfig

    pipe = tiny_pipeline("sd15")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False), "a")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), "b")
    pipe.unet.set_adapters(["a"])
    tgate_fx.optimize(pipe, **NOTHING_CACHED)
    seen = []
    for change in (lambda u: None, lambda u: u.set_adapters(["b"]), lambda u: u.set_adapters(["a", "b"], [0.5, 1.0]),
                   lambda u: u.disable_adapters(), lambda u: u.enable_adapters()):
        change(pipe.unet)
        got, expected = _both(pipe)
        assert torch.equal(got, expected)
        seen.append(got)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert not torch.equal(seen[2], seen[3]) and torch.equal(seen[4], seen[2])


def _sd3_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                        pooled_projection_dim=8, out_channels=4)
    none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                          "tokenizer_3"])
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), **none)


def test_joint_attention_models_get_tgates_joint_rule_at_optimize():
    # SD3's joint attention has no cross-attention: optimize(pipe) installs T-GATE's joint-attention rule
    # (exactness: tests/test_tgate_joint.py; joint blocks the rule does not know are refused there)
    pipe = _sd3_pipeline()
    tgate_fx.optimize(pipe)
    runtime = tgate_fx.core.hook.installed_runtime(pipe.transformer)
    assert [(m.name, m.joint) for m in runtime.methods] == [("tgate", True)]


def test_a_denoiser_without_cross_attention_is_refused_at_its_first_call():
    # A UNet whose attention blocks were built without text (e.g. conditioning by other means): T-GATE
    # would drop the unconditional half after the gate with nothing cached that carries the prompt.
    from tgate_fx.core.analysis import Regions
    from tgate_fx.core.method import tag_key
    from tgate_fx.methods import TGate, TGateConfig

    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **NOTHING_CACHED)
    latents(pipe, num_inference_steps=STEPS)
    graphs = tgate_fx.get_runtime(pipe).captures[0]
    self_only = Regions(graphs.regions.graph_module, [s for s in graphs.sites if s.role == "self"],
                        graphs.regions.modules)
    with pytest.raises(ValueError, match="no cross-attention"):
        TGate(TGateConfig()).annotate(graphs.capture.graph_module, self_only)
    assert any(tag_key("tgate") in n.meta for n in graphs.capture.graph_module.graph.nodes)


def _move_each_step(pipe, step, timestep, callback_kwargs):
    pipe.unet.to("cpu")  # what model CPU offload does around every denoiser call
    return callback_kwargs


@pytest.mark.parametrize("how", ["enable_model_cpu_offload", "moved every step"])
def test_cpu_offload_after_optimize(how):
    settings = dict(gate_step=3, sp_interval=2, fi_interval=1, warm_up=1)
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **settings)
    expected = latents(pipe, num_inference_steps=6)
    call = {}
    if how == "enable_model_cpu_offload":
        pipe.enable_model_cpu_offload(device="cpu")  # the accelerator is the CPU here; the hooks are the same
    else:
        call = {"callback_on_step_end": _move_each_step}
    runtime = tgate_fx.get_runtime(pipe)
    got = latents(pipe, num_inference_steps=6, **call)
    assert torch.equal(got, expected)
    # T-GATE stayed on (the gate happened, the post-gate steps ran at half batch) and nothing was captured again
    assert [s.variant.name for s in runtime.last_plan.steps][2:] == ["gate", "fi_record", "fi_record", "fi_record"]
    assert len(runtime.captures) == 2


def test_dtype_change_after_optimize_captures_again():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **NOTHING_CACHED)
    latents(pipe, num_inference_steps=STEPS)
    pipe.to(torch.bfloat16)
    got, expected = _both(pipe)
    assert tgate_fx.get_runtime(pipe).recaptures == 1
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_cpu_offload_before_optimize():
    settings = dict(gate_step=3, sp_interval=2, fi_interval=1, warm_up=1)
    expected = latents(tgate_fx.optimize(tiny_pipeline("sd15"), **settings), num_inference_steps=6)
    pipe = tiny_pipeline("sd15")
    plain = latents(pipe, num_inference_steps=6)
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate hooks on the UNet, then optimize
    tgate_fx.optimize(pipe, **NOTHING_CACHED)
    assert torch.equal(latents(pipe, num_inference_steps=STEPS), latents(tiny_pipeline("sd15"),
                                                                           num_inference_steps=STEPS))
    tgate_fx.optimize(pipe, **settings)
    for _ in range(2):  # the pipeline re-installs its hooks after each call
        assert torch.equal(latents(pipe, num_inference_steps=6), expected)
    assert [s.variant.name for s in tgate_fx.get_runtime(pipe).last_plan.steps][2] == "gate"
    assert not torch.equal(expected, plain)


def test_save_pretrained_after_optimize(tmp_path):
    from diffusers import DiffusionPipeline

    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **NOTHING_CACHED)
    expected = latents(pipe, num_inference_steps=STEPS)
    pipe.save_pretrained(tmp_path / "saved")
    assert pipe.config.unet == ("diffusers", "UNet2DConditionModel")  # the pipeline's own config is untouched
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(loaded.unet).__name__ == "UNet2DConditionModel"
    loaded.set_progress_bar_config(disable=True)
    loaded.tiny_call_kwargs = pipe.tiny_call_kwargs
    assert torch.equal(latents(loaded, num_inference_steps=STEPS), expected)


def test_two_prompts_without_guidance_are_not_taken_for_cfg():
    # PixArt, guidance 1.0, two prompts, the same seed for both: the latent halves are equal, but the
    # pipeline runs no CFG. Taking it for CFG would average the prompts' cross-attention at the gate.
    pipe = tgate_fx.optimize(tiny_pipeline("pixart_alpha"), gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)
    call = {**pipe.tiny_call_kwargs, "guidance_scale": 1.0, "num_inference_steps": 4, "output_type": "latent"}
    prompts = ["a red circle", "a blue square"]
    got = pipe(prompts, generator=[torch.Generator().manual_seed(0) for _ in prompts], **call).images
    plan = tgate_fx.get_runtime(pipe).last_plan
    assert not plan.cfg and not any(s.drops_uncond for s in plan.steps)
    # each prompt is its own sample: the same as generating it alone
    alone = pipe(prompts[1], generator=torch.Generator().manual_seed(0), **call).images
    assert torch.allclose(got[1], alone[0], atol=1e-5)


def test_from_pipe_copy_counts_with_its_own_guidance():
    from diffusers import StableDiffusionPipeline

    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)
    latents(pipe, num_inference_steps=4)  # guidance 7.5: CFG
    # plain from_pipe: the copy shares the very UNet (diffusers checks its class), and so its hook
    other = StableDiffusionPipeline.from_pipe(pipe)
    assert other.unet is pipe.unet
    assert tgate_fx.get_runtime(other) is tgate_fx.get_runtime(pipe)  # one runtime, its captures shared
    other.set_progress_bar_config(disable=True)
    other.tiny_call_kwargs = {**pipe.tiny_call_kwargs, "guidance_scale": 1.0}
    got = latents(other, num_inference_steps=4)
    assert tgate_fx.get_runtime(other).last_plan.cfg is False  # read from the pipeline that called
    with eager_denoiser(pipe):
        reference = tgate_fx.optimize(tiny_pipeline("sd15"), gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)
        reference.tiny_call_kwargs = other.tiny_call_kwargs
        assert torch.equal(got, latents(reference, num_inference_steps=4))


def test_deepcopy_serves_the_copied_pipeline():
    import copy

    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)
    expected = latents(pipe, num_inference_steps=4)
    twin = copy.deepcopy(pipe)
    runtime = tgate_fx.get_runtime(twin)
    assert runtime is not tgate_fx.get_runtime(pipe) and runtime._pipeline() is twin
    assert runtime.denoiser is not tgate_fx.get_runtime(pipe).denoiser
    assert torch.equal(latents(twin, num_inference_steps=4), expected)


def test_concurrent_requests_from_two_threads():
    # The diffusers server pattern: one pipeline per request (from_pipe, its own scheduler: schedulers are
    # stateful), sharing the components, the optimized denoiser included; requests on two threads.
    from concurrent.futures import ThreadPoolExecutor

    from diffusers import StableDiffusionPipeline

    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), gate_step=3, sp_interval=2, fi_interval=1, warm_up=1)
    prompts = ["a red circle", "a green star", "a blue square", "a white cross"]
    alone = [latents(pipe, prompt=p, seed=i, num_inference_steps=6) for i, p in enumerate(prompts)]

    def request(item):
        seed, prompt = item
        per_request = StableDiffusionPipeline.from_pipe(pipe, scheduler=pipe.scheduler.from_config(pipe.scheduler.config))
        per_request.set_progress_bar_config(disable=True)
        per_request.tiny_call_kwargs = pipe.tiny_call_kwargs
        return latents(per_request, prompt=prompt, seed=seed, num_inference_steps=6)

    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(request, enumerate(prompts)))
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_report_states_which_methods_apply():
    text = tgate_fx.report(tgate_fx.optimize(tiny_pipeline("pixart_alpha")), num_inference_steps=25)
    assert "methods that apply to PixArtTransformer2DModel: T-GATE yes, DeepCache no (DeepCache needs a UNet" in text
    text = tgate_fx.report(tgate_fx.optimize(tiny_pipeline("sd15")), num_inference_steps=25)
    assert "T-GATE yes, DeepCache yes" in text


def test_fuse_qkv_projections_before_optimize():
    pipe = tiny_pipeline("sd15")
    unfused = tgate_fx.optimize(tiny_pipeline("sd15"), gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)
    pipe.fuse_qkv_projections()
    tgate_fx.optimize(pipe, **NOTHING_CACHED)
    got, expected = _both(pipe)
    assert torch.equal(got, expected)
    tgate_fx.optimize(pipe, gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)
    # fused projections compute the same values as separate ones (to float rounding)
    assert torch.allclose(latents(pipe, num_inference_steps=STEPS), latents(unfused, num_inference_steps=STEPS),
                          atol=1e-5)


def test_fuse_qkv_projections_after_first_call():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **NOTHING_CACHED)
    latents(pipe, num_inference_steps=STEPS)
    pipe.fuse_qkv_projections()
    got, expected = _both(pipe)
    assert tgate_fx.get_runtime(pipe).recaptures == 1
    assert torch.equal(got, expected)


def test_todo_refuses_fused_self_attention_projections():
    # ToDo downsamples the key/value input only; a fused to_qkv reads one input for all three
    pipe = tiny_pipeline("sd15")
    pipe.fuse_qkv_projections()
    tgate_fx.optimize(pipe, tgate=None, todo=tgate_fx.ToDoConfig(factor=2))
    with pytest.raises(ValueError, match="to_k"):
        latents(pipe, num_inference_steps=2)
