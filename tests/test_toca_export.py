"""ToCa in an ONNX bundle: the full, partial and mixed variants (top-k, gather, scatter) export and run in
``OnnxDenoiser`` inside the unmodified tiny PixArt-alpha pipeline, alone and with T-GATE, and inside the unmodified
tiny DiTPipeline (class labels, no prompt), within 1e-4 of torch."""

import os

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import tgate_fx  # noqa: E402
from conftest import eager_denoiser, latents  # noqa: E402
from test_toca import dit_latents  # noqa: E402
from tgate_fx import TGateConfig, ToCaConfig  # noqa: E402
from tgate_fx.export import OnnxDenoiser, export_onnx  # noqa: E402
from tgate_fx.tiny import tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

STEPS = 8  # PixArt N=3 at 8 steps: full, partial x3, mixed, partial, full, partial
TOCA = ToCaConfig()  # export_onnx fills the family defaults from the denoiser, as optimize does
CASES = {
    "toca": [TOCA],
    "tgate+toca": [TGateConfig(gate_step=4, sp_interval=1, fi_interval=1, warm_up=0), TOCA],
}


@pytest.mark.parametrize("case", list(CASES))
def test_toca_onnx_bundle_matches_torch(case, tmp_path):
    methods = CASES[case]
    pipe = tgate_fx.optimize(tiny_pipeline("pixart_alpha"), methods=methods)
    ref = latents(pipe, num_inference_steps=STEPS)
    torch_plan = tgate_fx.get_runtime(pipe).last_plan
    call = dict(pipe.tiny_call_kwargs)
    export_onnx(pipe, str(tmp_path), call.pop("height"), call.pop("width"), num_inference_steps=STEPS,
                methods=methods, **call)
    saved = pipe.transformer
    denoiser = OnnxDenoiser.from_dir(str(tmp_path))
    denoiser.install(pipe)
    try:
        got = latents(pipe, num_inference_steps=STEPS)
    finally:
        object.__setattr__(pipe, "transformer", saved)
    assert [s.variant for s in denoiser.last_plan.steps] == [s.variant.name for s in torch_plan.steps]
    kinds = {s.methods["toca"].columns[0][1] for s in torch_plan.steps}
    assert kinds == {"full", "partial", "mixed"} if case == "toca" else {"full", "partial"}
    diff = (got - ref).abs().max().item()
    print(f"{case}: max |onnx - torch| = {diff:.3g}")
    assert diff <= 1e-4
    with eager_denoiser(pipe):
        plain = latents(pipe, num_inference_steps=STEPS)
    assert (plain - ref).abs().max().item() > 100 * max(diff, 1e-7)  # the bound sees ToCa
    # each partial graph selects (TopK), gathers and scatters inside the model: no host round trip
    partials = [f for f in os.listdir(tmp_path) if "toca_partial" in f and f.endswith(".onnx")]
    assert partials
    for file in partials:
        ops = {n.op_type for n in onnx.load(str(tmp_path / file), load_external_data=False).graph.node}
        assert {"TopK", "GatherElements", "ScatterElements"} <= ops, (file, sorted(ops))


DIT_STEPS = 7  # DiT DDIM-50 schedule, N=3, at 7 steps: full, partial, mixed, full, partial, partial, full


def test_toca_dit_onnx_bundle_matches_torch(tmp_path):
    """DiT (self-attention map scores, MLP refreshed, steps counted down): the bundle runs in DiTPipeline."""
    pipe = tgate_fx.optimize(tiny_pipeline("dit"), toca=TOCA)
    ref = dit_latents(pipe, DIT_STEPS)
    torch_plan = tgate_fx.get_runtime(pipe).last_plan
    export_onnx(pipe, str(tmp_path), num_inference_steps=DIT_STEPS, methods=[TOCA], class_labels=[1, 7],
                guidance_scale=4.0)
    saved = pipe.transformer
    denoiser = OnnxDenoiser.from_dir(str(tmp_path))
    denoiser.install(pipe)
    try:
        got = dit_latents(pipe, DIT_STEPS)
    finally:
        object.__setattr__(pipe, "transformer", saved)
    assert [s.variant for s in denoiser.last_plan.steps] == [s.variant.name for s in torch_plan.steps]
    assert [s.methods["toca"].columns[0][1] for s in torch_plan.steps] == \
        ["full", "partial", "mixed", "full", "partial", "partial", "full"]
    diff = (got - ref).abs().max().item()
    print(f"dit: max |onnx - torch| = {diff:.3g}")
    assert diff <= 1e-4
    with eager_denoiser(pipe):
        plain = dit_latents(pipe, DIT_STEPS)
    assert (plain - ref).abs().max().item() > 100 * max(diff, 1e-7)  # the bound sees ToCa
    partials = [f for f in os.listdir(tmp_path) if "toca_partial" in f and f.endswith(".onnx")]
    assert len(partials) == 3
    for file in partials:
        ops = {n.op_type for n in onnx.load(str(tmp_path / file), load_external_data=False).graph.node}
        assert {"TopK", "GatherElements", "ScatterElements"} <= ops, (file, sorted(ops))
