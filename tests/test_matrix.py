"""The families x methods matrix (issue 20): every cell is exact, follows its plan, or is refused for its reason.

One case per (family, method, setting), on tiny seeded pipelines (:mod:`families`):

* ``nothing_cached``: settings under which the method caches and rewrites
  nothing; the optimized pipeline must equal the unoptimized one bit for bit;
* ``defaults``: the method's default config; the generation must run, and
  differ from the unoptimized one exactly when its plan reuses, transforms
  or drops something that the method does rewrite here (a method that
  rewrites nothing warns, :class:`~tgate_fx.core.method.InertMethodWarning`,
  and must then be exact). Their numbers against the eager oracles of the
  published code are the subject of the method tests (test_exactness,
  test_deepcache, test_todo, test_toca).

A cell the product does not serve is in :data:`REFUSED`, with the words of
its reason; ``optimize`` must raise them and install nothing. A cell that is
neither is a failure: there is no ``xfail`` here.
"""

import warnings

import pytest
import torch

import tgate_fx
from families import PIPELINES, TRANSFORMERS, generate, holding, pipeline, transformer
from tgate_fx.core.hook import installed_runtime
from tgate_fx.core.method import REUSE, TRANSFORM, InertMethodWarning
from tgate_fx.core.rebatch import RebatchWarning
from tgate_fx.methods import BlockCacheConfig, DeepCacheConfig, TGateConfig, ToCaConfig, ToDoConfig

pytestmark = pytest.mark.e2e

STEPS = {"nothing_cached": 4, "defaults": 12}  # T-GATE's default gate is step 10
SETTINGS = {
    ("tgate", "nothing_cached"): lambda: TGateConfig(gate_step=4, sp_interval=1, fi_interval=1, warm_up=4),
    ("tgate", "defaults"): TGateConfig,
    ("deepcache", "nothing_cached"): lambda: DeepCacheConfig(cache_interval=1),
    ("deepcache", "defaults"): DeepCacheConfig,
    ("todo", "nothing_cached"): lambda: ToDoConfig(factor=1),
    ("todo", "defaults"): ToDoConfig,
    ("toca", "nothing_cached"): lambda: ToCaConfig(interval=1),
    ("toca", "defaults"): ToCaConfig,
    ("blockcache", "nothing_cached"): lambda: BlockCacheConfig(threshold=0.0),
    ("blockcache", "defaults"): BlockCacheConfig,
}
METHODS = ("tgate", "deepcache", "todo", "toca", "blockcache")

# The reasons, by method, for the families each method does not serve (the same for both settings).
_NOT_A_UNET = "DeepCache needs a UNet with down_blocks, mid_block and up_blocks"
_TOCA_RULES = "ToCa cannot apply to {cls}: it follows the official rules for PixArt"
_JOINT = "{name} cannot apply to {cls}: its conditioning enters attention as added keys/values"
_TODO_JOINT = "ToDo cannot apply to {cls}: its attention adds the conditioning's keys/values"
_NO_CROSS_TGATE = "T-GATE cannot apply to {cls}: it caches cross-attention .* none of its attention modules is"
_NO_CROSS_TODO = "ToDo cannot apply to {cls}: none of its attention modules is a cross-attention"
_VIDEO_TODO = "ToDo cannot apply to {cls}: it downsamples the 2-D token grid of an image's self-attention"
_NO_BLOCKS = "the block cache needs a transformer with blocks in"
_CLASS = {
    "sd15": "UNet2DConditionModel", "sd21": "UNet2DConditionModel", "sdxl": "UNet2DConditionModel",
    "lcm_sdxl": "UNet2DConditionModel", "sd15_img2img": "UNet2DConditionModel",
    "sd15_controlnet": "UNet2DConditionModel", "t2i_adapter": "UNet2DConditionModel",
    "kandinsky22": "UNet2DConditionModel", "pixart_alpha": "PixArtTransformer2DModel",
    "pixart_sigma": "PixArtTransformer2DModel", "lcm_pixart": "PixArtTransformer2DModel",
    "dit": "DiTTransformer2DModel", "sana": "SanaTransformer2DModel", "hunyuandit": "HunyuanDiT2DModel",
    "animatediff": "UNetMotionModel", "svd": "UNetSpatioTemporalConditionModel",
    "ltx": "LTXVideoTransformer3DModel", "wan": "WanTransformer3DModel", "flux": "FluxTransformer2DModel",
    "flux_true_cfg": "FluxTransformer2DModel", "flux_kontext": "FluxTransformer2DModel",
    "chroma": "ChromaTransformer2DModel", "sd3": "SD3Transformer2DModel", "sd35": "SD3Transformer2DModel",
    "qwenimage": "QwenImageTransformer2DModel", "hunyuanvideo": "HunyuanVideoTransformer3DModel",
    "cogvideox": "CogVideoXTransformer3DModel", "lumina2": "Lumina2Transformer2DModel",
    "auraflow": "AuraFlowTransformer2DModel", "hidream": "HiDreamImageTransformer2DModel",
    "flux2": "Flux2Transformer2DModel", "flux2_klein": "Flux2Transformer2DModel",
    "zimage": "ZImageTransformer2DModel",
}
_UNETS = {"sd15", "sd21", "sdxl", "lcm_sdxl", "sd15_img2img", "sd15_controlnet", "t2i_adapter", "kandinsky22",
          "animatediff", "svd"}
_TOCA_SERVES = {"pixart_alpha", "pixart_sigma", "lcm_pixart", "dit", "flux", "flux_true_cfg", "flux_kontext", "chroma",
                "sd3", "sd35", "qwenimage", "cogvideox", "hunyuanvideo", "ltx", "wan", "flux2", "flux2_klein",
                "zimage"}
_JOINT_FAMILIES = {"flux", "flux_true_cfg", "flux_kontext", "chroma", "sd3", "sd35", "qwenimage", "hunyuanvideo",
                   "auraflow", "kandinsky22", "flux2", "flux2_klein"}
_NO_CROSS = {"cogvideox", "lumina2", "hidream", "zimage"}
# T-GATE's joint-attention rule: the double-stream blocks of these (HunyuanVideo's, AuraFlow's and Kandinsky's
# added K/V are refused).
_TGATE_JOINT_SERVES = {"flux", "flux_true_cfg", "flux_kontext", "chroma", "sd3", "sd35", "qwenimage", "flux2",
                       "flux2_klein"}


def _refusals() -> dict:
    out = {}
    for family, cls in _CLASS.items():
        if family not in _UNETS:
            out[family, "deepcache"] = _NOT_A_UNET
        if family not in _TOCA_SERVES:
            out[family, "toca"] = _TOCA_RULES.format(cls=cls)
        if family in _JOINT_FAMILIES:
            if family not in _TGATE_JOINT_SERVES:
                out[family, "tgate"] = _JOINT.format(name="T-GATE", cls=cls)
            if family == "hunyuanvideo":
                out[family, "todo"] = _VIDEO_TODO.format(cls=cls)
            else:
                out[family, "todo"] = _TODO_JOINT.format(cls=cls)
        if family in _NO_CROSS:
            out[family, "tgate"] = _NO_CROSS_TGATE.format(cls=cls)
            out[family, "todo"] = (_VIDEO_TODO if family == "cogvideox" else _NO_CROSS_TODO).format(cls=cls)
    out["dit", "tgate"] = _NO_CROSS_TGATE.format(cls=_CLASS["dit"])
    out["dit", "todo"] = "ToDo cannot apply to DiTTransformer2DModel: it is defined for text-conditioned denoisers"
    out["hunyuandit", "todo"] = "ToDo cannot apply to HunyuanDiT2DModel: its self-attention applies rotary position"
    for family in ("animatediff", "svd", "ltx", "wan"):
        out[family, "todo"] = _VIDEO_TODO.format(cls=_CLASS[family])
    for family in _UNETS:
        out[family, "blockcache"] = _NO_BLOCKS
    out["hidream", "blockcache"] = _NO_BLOCKS  # its block lists have other names than diffusers' hooks look for
    return out


REFUSED = _refusals()
# The block cache accepts these two denoisers (AuraFlow with a warning: it has one block in the lists the
# hooks read), but no tiny pipeline of theirs can be built here (their text encoders need the hub): their
# cells are not run, and the README says so.
UNVERIFIED = {("lumina2", "blockcache"), ("auraflow", "blockcache")}
CELLS = [(f, m, s) for f in [*PIPELINES, *TRANSFORMERS] for m in METHODS for s in STEPS if (f, m) not in UNVERIFIED]
_BASELINES: dict = {}


def _baseline(family: str, steps: int) -> torch.Tensor:
    """The unoptimized pipeline's output (a tensor, kept; the pipeline is not)."""
    if (family, steps) not in _BASELINES:
        pipe, call = pipeline(family)
        _BASELINES[family, steps] = generate(pipe, family, call, steps)
    return _BASELINES[family, steps]


def test_every_family_of_the_table_is_built():
    assert set(_CLASS) == set(PIPELINES) | set(TRANSFORMERS)


@pytest.mark.parametrize("family,method,setting", CELLS, ids=["-".join(c) for c in CELLS])
def test_cell(family, method, setting):
    config = SETTINGS[method, setting]()
    if family in TRANSFORMERS:
        pipe, call = holding(transformer(family)), None
    else:
        pipe, call = pipeline(family)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    if (family, method) in REFUSED:
        with pytest.raises(TypeError, match=REFUSED[family, method]):
            tgate_fx.optimize(pipe, methods=[config])
        assert installed_runtime(denoiser) is None
        return
    assert call is not None, f"{family} x {method} is served: the matrix needs a runnable pipeline for it"
    steps = STEPS[setting]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tgate_fx.optimize(pipe, methods=[config])
    inert = any(issubclass(w.category, InertMethodWarning) for w in caught)
    with warnings.catch_warnings(), tgate_fx.get_runtime(pipe).tracing() as trace:
        if family == "chroma":  # its guidance embedding holds a tensor of the batch's size: exported per batch
            warnings.simplefilter("ignore", RebatchWarning)
        got = generate(pipe, family, call, steps)
    expected = _baseline(family, steps)
    assert got.shape == expected.shape and torch.isfinite(got).all()
    plan = tgate_fx.get_runtime(pipe).last_plan
    assert plan.num_steps == steps
    if setting == "nothing_cached":
        assert torch.equal(got, expected)
        return
    if plan.chooses:  # the graph is chosen from data: something is reused where a step did not compute all
        computing = {spec.name for s in plan.steps if s.choice for spec in (s.choice.head, s.choice.alternatives[0][1])}
        rewrites = any(v.spec.name not in computing for _, _, v in trace)
    else:
        rewrites = any(s.drops_uncond or any(r.action in (REUSE, TRANSFORM) for r in s.variant.rewrites)
                       for s in plan.steps)
    assert torch.equal(got, expected) == (inert or not rewrites), (
        f"{family} x {method} defaults: the plan {'rewrites' if rewrites else 'rewrites nothing'}"
        f"{' (inert)' if inert else ''}, the output {'equals' if torch.equal(got, expected) else 'differs from'} "
        "the unoptimized pipeline")
