"""The model zoo as users meet it (issue 20): each case named after what a user does.

Every case either works exactly (with nothing cached, it equals the unoptimized
pipeline) or is refused at ``optimize`` with the reason.
"""

import pytest
import torch

import tgate_fx
from tgate_fx.core.rebatch import BatchCaptures
from tgate_fx.core.capture import capture_denoiser
from tgate_fx.core.captured import normalize_call
from tgate_fx.methods import DeepCacheConfig, TGateConfig, ToDoConfig
from tgate_fx.tiny_extra import tiny_t2i_adapter

pytestmark = pytest.mark.e2e


def _latents(pipe, kw, steps=4):
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent",
                num_inference_steps=steps, **kw).images


NOTHING_CACHED = {
    "tgate": TGateConfig(gate_step=4, sp_interval=1, fi_interval=1, warm_up=4),
    "deepcache": DeepCacheConfig(cache_interval=1),
    "todo": ToDoConfig(factor=1),
}


@pytest.mark.parametrize("method", sorted(NOTHING_CACHED))
def test_t2i_adapter_first_generation_with_nothing_cached_equals_the_unoptimized_pipeline(method):
    # The UNet pops the adapter's residuals off the list the pipeline passes. The first call runs the
    # export and the eager check of the rebatched graph on that call: the real call must still get
    # the whole list (it once ran step 0 without the adapter, 0.085 away from the unoptimized pipeline).
    pipe, kw = tiny_t2i_adapter()
    baseline = _latents(pipe, kw)
    tgate_fx.optimize(pipe, methods=[NOTHING_CACHED[method]])
    assert torch.equal(_latents(pipe, kw), baseline)
    assert torch.equal(_latents(pipe, kw), baseline)


class _Consuming(torch.nn.Module):
    """A denoiser that consumes its inputs as diffusers' UNet does with adapter residuals."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, sample, residuals: list, extra: dict, return_dict: bool = True):
        x = self.proj(sample)
        while residuals:
            x = x + residuals.pop(0)
        x = x * extra.pop("scale")
        return (x,)


def test_the_first_call_check_and_the_export_never_mutate_the_call_arguments():
    module = _Consuming().eval()
    residuals = [torch.randn(2, 3, 4), torch.randn(2, 3, 4)]
    extra = {"scale": torch.tensor(2.0)}
    call, _ = normalize_call(module, (torch.randn(2, 3, 4), residuals, extra), {})
    BatchCaptures(module, "sample", store=None)(call)  # export at the probe batch + check on the call
    assert len(residuals) == 2 and list(extra) == ["scale"]
    direct = capture_denoiser(module, call, store=None)  # a plain export of the live call
    assert len(residuals) == 2 and list(extra) == ["scale"]
    expected = module(torch.clone(call["sample"]), list(residuals), dict(extra))[0]
    got = direct.graph_module(*(direct.flat_inputs(call)[n] for n in direct.input_names))[0]
    assert torch.equal(got, expected)


def _family(name):
    from tgate_fx import tiny_extra
    from tgate_fx.tiny import FAMILIES, tiny_pipeline

    if name in FAMILIES:
        return tiny_pipeline(name), dict(FAMILIES[name].call_kwargs)
    return getattr(tiny_extra, f"tiny_{name}")()


def test_hunyuandit_with_todo_is_refused_naming_its_rotary_keys():
    # It used to crash with a broadcast error in DownsampleKeyValues (keys downsampled before to_k, rotary after)
    pipe, _ = _family("hunyuandit")
    with pytest.raises(TypeError, match="ToDo cannot apply to HunyuanDiT2DModel: .*rotary position embeddings"):
        tgate_fx.optimize(pipe, todo=ToDoConfig(factor=2, factor_depth2=2))
    assert type(pipe.transformer).__name__ == "HunyuanDiT2DModel"  # nothing installed


def test_a_method_that_rewrites_nothing_says_so_at_optimize_and_in_the_report():
    from tgate_fx.core.method import InertMethodWarning

    pipe, kw = _family("pixart_alpha")  # every block at depth 2; the default ToDo downsamples depth 1 only
    with pytest.warns(InertMethodWarning, match="ToDo rewrites nothing here: every self-attention of "
                                                "PixArtTransformer2DModel sits at depth 2"):
        tgate_fx.optimize(pipe, todo=ToDoConfig())
    assert "ToDo: factor=2" in tgate_fx.report(pipe) and "(rewrites nothing: every self-attention" in tgate_fx.report(pipe)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", InertMethodWarning)
        tgate_fx.optimize(pipe, todo=ToDoConfig(factor_depth2=2))  # rewrites PixArt's depth-2 sites: no warning
    assert "rewrites nothing" not in tgate_fx.report(pipe)


# The joint-attention and video transformers, built from diffusers' model-test configs: each method refuses
# them at optimize, for the reason that holds (they were refused as "not a text-conditioned denoiser with
# diffusers Attention modules", or accepted and crashed at the first call).
REFUSALS = {
    ("flux", "todo"): "ToDo cannot apply to FluxTransformer2DModel: its attention adds the conditioning's keys",
    ("hunyuanvideo", "tgate"): "T-GATE cannot apply to HunyuanVideoTransformer3DModel: its conditioning enters "
                               "attention as added keys/values .* in blocks its joint-attention rule does not know",
    ("hidream", "tgate"): "T-GATE cannot apply to HiDreamImageTransformer2DModel: it caches cross-attention .* none "
                          "of its attention modules is one .HiDreamAttention",
    ("hidream", "todo"): "ToDo cannot apply to HiDreamImageTransformer2DModel: none of its attention modules is a cross",
    ("cogvideox", "tgate"): "T-GATE cannot apply to CogVideoXTransformer3DModel: it caches cross-attention .*"
                            "CogVideoXAttnProcessor2_0.*joint attention",
    ("lumina2", "tgate"): "T-GATE cannot apply to Lumina2Transformer2DModel: it caches cross-attention .*joint",
    ("lumina2", "todo"): "ToDo cannot apply to Lumina2Transformer2DModel: none of its attention modules is a cross",
    ("dit", "tgate"): "T-GATE cannot apply to DiTTransformer2DModel: .*not text-conditioned.*ToCa",
}


def _transformer(name):
    from families import transformer

    return _family("dit")[0].transformer if name == "dit" else transformer(name)


@pytest.mark.parametrize("family,method", sorted(REFUSALS))
def test_joint_attention_and_video_transformers_are_refused_at_optimize_for_the_reason_that_holds(family, method):
    from families import holding
    from tgate_fx.methods import ToCaConfig

    pipe = holding(_transformer(family))
    config = {"tgate": TGateConfig(), "todo": ToDoConfig(), "toca": ToCaConfig()}[method]
    with pytest.raises(TypeError, match=REFUSALS[family, method]):
        tgate_fx.optimize(pipe, methods=[config])


SPLIT_SETTINGS = {
    "nothing-cached": dict(gate_step=4, sp_interval=1, fi_interval=1, warm_up=4),
    "gate": dict(gate_step=2, sp_interval=1, fi_interval=1, warm_up=0),
    "gate+self": dict(gate_step=3, sp_interval=2, fi_interval=2, warm_up=1),
}


def _frames(pipe, kw, steps=4):
    return pipe(generator=torch.Generator().manual_seed(0), output_type="latent", num_inference_steps=steps, **kw).frames


@pytest.mark.parametrize("settings", sorted(SPLIT_SETTINGS))
def test_wan_with_guidance_runs_t_gate_on_its_two_calls_a_step(settings):
    # WanPipeline runs CFG as a conditional and an unconditional call per step. At the gate the caches are
    # the mean of the two calls; after it the unconditional call is not computed and returns the step's
    # prediction, so the pipeline's guidance is an identity (as T-GATE drops guidance on a CFG batch).
    from oracle import run_split_cfg_oracle
    from tgate_fx.tiny_extra import tiny_wan

    pipe, kw = tiny_wan()
    denoiser = pipe.transformer
    baseline = _frames(pipe, kw)
    config = SPLIT_SETTINGS[settings]
    expected = run_split_cfg_oracle(pipe, "transformer", denoiser, generator=torch.Generator().manual_seed(0),
                                    output_type="latent", num_inference_steps=4, **config, **kw).frames
    tgate_fx.optimize(pipe, **config)
    with tgate_fx.get_runtime(pipe).tracing() as computed:
        got = _frames(pipe, kw)
    assert torch.equal(got, expected)
    gate = config["gate_step"]
    assert [s.step for s, _, _ in computed] == [i // 2 for i in range(2 * gate)] + list(range(gate, 4))
    assert torch.equal(got, baseline) == (settings == "nothing-cached")
    plan = tgate_fx.get_runtime(pipe).last_plan
    assert plan.cfg and [s.drops_uncond for s in plan.steps] == [i >= config["gate_step"] for i in range(4)]
    assert torch.equal(_frames(pipe, kw), got)  # a second generation, from the captured graphs


class _CopiesText(torch.nn.Module):
    """Between a pipeline and its denoiser: passes a copy of the text embeddings (so the two CFG calls of a
    step can no longer be told apart by which of the pipeline's tensors they carry)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["inner"], name)

    def forward(self, *args, **kwargs):
        kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"].clone()
        return self.inner(*args, **kwargs)


def test_a_pipeline_running_cfg_as_two_calls_it_cannot_tell_apart_is_refused_at_its_first_call():
    from tgate_fx.tiny_extra import tiny_wan

    pipe, kw = tiny_wan()
    tgate_fx.optimize(pipe, gate_step=2)
    object.__setattr__(pipe, "transformer", _CopiesText(pipe.transformer))
    with pytest.raises(ValueError, match="two denoiser calls per step, and tgate_fx cannot tell which call is the "
                                         "conditional one"):
        _frames(pipe, kw)


