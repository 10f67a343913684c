"""ONNX export of the phase graphs and the onnxruntime denoiser, on onnxruntime's CPU provider.

The oracle is the torch pipeline: the ``tgate_fx.optimize``d one for T-GATE
bundles, the eager one for plain bundles. Tolerance: 1e-4 max abs difference
of the final latents (float32 kernels of onnxruntime and torch round
differently, about 1e-6 relative per denoiser call; the tiny pipelines keep
their latents within a few units, as trained models do).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import tgate_fx  # noqa: E402
from conftest import eager_denoiser, latents  # noqa: E402
from tgate_fx.tiny import tiny_pipeline  # noqa: E402
from tgate_fx import DeepCacheConfig, Plan, TGateConfig  # noqa: E402
from tgate_fx.export import OnnxDenoiser, export_onnx  # noqa: E402
from tgate_fx.export.bundle import PLAN_FILE, WEIGHTS_FILE  # noqa: E402

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

# "default": the default settings (sp reuse before the gate) at 11 steps, one
# step after the gate. "reuse": self-attention reuse on both sides of the
# gate at 6 steps; its plan uses every kind of variant but sp_reuse.
SETTINGS = {
    "default": (TGateConfig(), 11),
    "reuse": (TGateConfig(gate_step=3, sp_interval=2, fi_interval=2, warm_up=1), 6),
}
# Composed methods (UNets only): DeepCache alone, and with T-GATE.
COMPOSED = {
    "deepcache": ([DeepCacheConfig(cache_interval=3, cache_branch_id=1)], 7),
    "tgate+deepcache": ([TGateConfig(gate_step=4, sp_interval=2, fi_interval=1, warm_up=1), DeepCacheConfig(2, 0)], 8),
}
FAMILIES = ("sd15", "sdxl", "pixart_alpha")

_BUNDLES: dict = {}


def _denoiser_attribute(pipe) -> str:
    return "unet" if hasattr(pipe, "unet") else "transformer"


def bundle(family: str, setting: str, tmp_path_factory) -> str:
    """Export (once per session) the bundle of ``family`` for ``setting`` ("plain" = no T-GATE)."""
    key = (family, setting)
    if key not in _BUNDLES:
        pipe = tgate_fx.optimize(tiny_pipeline(family))
        call = dict(pipe.tiny_call_kwargs)
        height, width = call.pop("height"), call.pop("width")
        out = str(tmp_path_factory.mktemp(f"{family}_{setting}"))
        if setting == "plain":
            export_onnx(pipe, out, height, width, num_inference_steps=4, tgate=False, **call)
        elif setting in COMPOSED:
            methods, steps = COMPOSED[setting]
            export_onnx(pipe, out, height, width, num_inference_steps=steps, methods=methods, **call)
        else:
            config, steps = SETTINGS[setting]
            export_onnx(pipe, out, height, width, num_inference_steps=steps, config=config, **call)
        _BUNDLES[key] = out
    return _BUNDLES[key]


@contextlib.contextmanager
def onnx_denoiser(pipe, directory: str, **kwargs):
    """Run ``pipe`` with the bundle's OnnxDenoiser, then put its denoiser back."""
    name = _denoiser_attribute(pipe)
    saved = getattr(pipe, name)
    denoiser = OnnxDenoiser.from_dir(directory, **kwargs)
    denoiser.install(pipe)
    try:
        yield denoiser
    finally:
        object.__setattr__(pipe, name, saved)


TOL = 1e-4


def _diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got - ref).abs().max().item()


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_tgate_matches_torch_tgate(family, setting, tmp_path_factory):
    config, steps = SETTINGS[setting]
    pipe = tgate_fx.optimize(tiny_pipeline(family))
    tgate_fx.optimize(pipe, config=config)
    ref = latents(pipe, num_inference_steps=steps)
    torch_plan = tgate_fx.get_runtime(pipe).last_plan
    directory = bundle(family, setting, tmp_path_factory)
    with onnx_denoiser(pipe, directory) as denoiser:
        got = latents(pipe, num_inference_steps=steps)
        assert [s.variant for s in denoiser.last_plan.steps] == [s.variant.name for s in torch_plan.steps]
        assert [s.drops_uncond for s in denoiser.last_plan.steps] == [s.drops_uncond for s in torch_plan.steps]
    diff = _diff(got, ref)
    print(f"{family} {setting}: max |onnx - torch| = {diff:.3g}, max |latent| = {ref.abs().max().item():.3g}")
    assert diff <= TOL, (diff, ref.abs().max().item())
    if family == "sd15":
        # The bound is tight enough to see T-GATE: without it the latents differ by far more.
        with eager_denoiser(pipe):
            plain = latents(pipe, num_inference_steps=steps)
        assert (plain - ref).abs().max().item() > 100 * diff


@pytest.mark.parametrize("setting", list(COMPOSED))
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_onnx_composed_methods_match_torch(family, setting, tmp_path_factory):
    methods, steps = COMPOSED[setting]
    pipe = tgate_fx.optimize(tiny_pipeline(family), methods=methods)
    with tgate_fx.get_runtime(pipe).tracing() as trace:
        ref = latents(pipe, num_inference_steps=steps)
    directory = bundle(family, setting, tmp_path_factory)
    with onnx_denoiser(pipe, directory) as denoiser:
        got = latents(pipe, num_inference_steps=steps)
        # the runner followed the stored steps, which are the torch runtime's, variant for variant
        assert [s.variant for s in denoiser.last_plan.steps] == [v.name for _, _, v in trace]
    diff = _diff(got, ref)
    print(f"{family} {setting}: max |onnx - torch| = {diff:.3g}, max |latent| = {ref.abs().max().item():.3g}")
    assert diff <= TOL, (diff, ref.abs().max().item())
    with open(os.path.join(directory, PLAN_FILE)) as f:
        plan = json.load(f)
    assert plan["version"] == 2 and list(plan["methods"]) == [m.name for m in tgate_fx.get_runtime(pipe).methods]
    assert all(set(s["methods"]) == set(plan["methods"]) for s in plan["plan"]["steps"])
    partial = [s for s in plan["plan"]["steps"] if s["methods"]["deepcache"] == "dc_partial"]
    assert partial and all(any(k.startswith("deepcache:") for k in s["reads"]) for s in partial)


def test_plain_export_matches_plain_pipeline(tmp_path_factory):
    directory = bundle("sd15", "plain", tmp_path_factory)
    with open(os.path.join(directory, PLAN_FILE)) as f:
        plan = json.load(f)
    assert plan["methods"] == {}
    assert [v for c in plan["captures"].values() for v in c["variants"]] == ["full"]
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"))
    with eager_denoiser(pipe):
        ref = latents(pipe, num_inference_steps=4)
        with onnx_denoiser(pipe, directory):
            got = latents(pipe, num_inference_steps=4)
    diff = _diff(got, ref)
    print(f"sd15 plain: max |onnx - torch| = {diff:.3g}, max |latent| = {ref.abs().max().item():.3g}")
    assert diff <= TOL


def test_deployment_without_torch_denoiser_weights(tmp_path_factory, tmp_path):
    # The deployment path: a pipeline loaded without its UNet, the bundle in its place.
    from diffusers import DiffusionPipeline

    config, steps = SETTINGS["reuse"]
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"))
    tgate_fx.optimize(pipe, config=config)
    ref = latents(pipe, num_inference_steps=steps)
    directory = bundle("sd15", "reuse", tmp_path_factory)
    with eager_denoiser(pipe):
        pipe.save_pretrained(tmp_path / "pipe")
    deployed = DiffusionPipeline.from_pretrained(tmp_path / "pipe", unet=None)
    deployed.set_progress_bar_config(disable=True)
    deployed.tiny_call_kwargs = pipe.tiny_call_kwargs
    assert deployed.unet is None
    OnnxDenoiser.from_dir(directory).install(deployed)
    got = latents(deployed, num_inference_steps=steps)
    assert _diff(got, ref) <= TOL
    assert "unet" in deployed.config and deployed.config["unet"] == (None, None)  # not recorded in the config


def test_bundle_stores_the_weights_once(tmp_path_factory):
    """All variants together take at most 1.1x one model's weights. (On the 4 MB sd15 toy the five
    graphs' structure alone, ~150 KB each, is 17% of the weights; this model has 4x the weights.)"""
    directory = bundle("sd15_wide", "default", tmp_path_factory)
    unet = tiny_pipeline("sd15_wide").unet
    weight_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    assert len([f for f in os.listdir(directory) if f.endswith(".onnx")]) == 5
    assert total <= 1.1 * weight_bytes, (total, weight_bytes)


def test_bundle_layout(tmp_path_factory):
    directory = bundle("sd15", "reuse", tmp_path_factory)
    config, steps = SETTINGS["reuse"]
    with open(os.path.join(directory, PLAN_FILE)) as f:
        plan = json.load(f)
    expected = Plan(steps, config, cfg=True)
    assert [(s["variant"], s["cfg"], s["drops_uncond"]) for s in plan["plan"]["steps"]] == [
        (s.variant.name, s.cfg, s.drops_uncond) for s in expected.steps]
    assert plan["plan"]["methods"] == plan["methods"] == {"tgate": config.to_dict()}
    # Pre-gate variants at the CFG batch, post-gate ones at the prompt batch.
    assert {c: sorted(v["variants"]) for c, v in plan["captures"].items()} == {
        "b2": ["gate", "sp_compute", "sp_record"], "b1": ["fi_record", "fi_reuse"]}
    files = sorted(v["file"] for c in plan["captures"].values() for v in c["variants"].values())
    assert sorted(os.listdir(directory)) == sorted(files + [PLAN_FILE, WEIGHTS_FILE])
    for file in files:
        onnx.checker.check_model(os.path.join(directory, file))  # by path: external data checked too

    unet = tiny_pipeline("sd15").unet
    weight_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    assert plan["denoiser"]["weight_bytes"] == weight_bytes
    assert os.path.getsize(os.path.join(directory, WEIGHTS_FILE)) <= 1.02 * weight_bytes
    models = {f: onnx.load(os.path.join(directory, f), load_external_data=False) for f in files}
    for f, model in models.items():
        # Only small constants are left inside the graphs.
        assert all(t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) < 1024
                   for t in model.graph.initializer), f

    gate = plan["captures"]["b2"]["variants"]["gate"]
    cross = [s for s, c in plan["caches"].items() if c["role"] == "cross"]
    assert cross and set(cross) <= set(gate["writes"])
    for vname in ("fi_record", "fi_reuse"):
        variant = plan["captures"]["b1"]["variants"][vname]
        names = [i["name"] for i in variant["inputs"]]
        assert "encoder_hidden_states" not in names
        assert set(variant["reads"]) >= set(cross)
        for site, name in variant["reads"].items():
            shape = next(i["shape"] for i in variant["inputs"] if i["name"] == name)
            assert shape[0] == 1, (site, shape)  # the gate's CFG-mean cache is at the prompt batch
    assert "encoder_hidden_states" in [i["name"] for i in gate["inputs"]]
    for site, cache in plan["caches"].items():
        batches = {model: shape[0] for model, shape in cache["shapes"].items()}
        if cache["role"] == "self":
            assert batches == {"b2_sp_record": 2, "b2_gate": 1, "b1_fi_record": 1, "b1_fi_reuse": 1}, site
        else:
            assert batches == {"b2_gate": 1, "b1_fi_record": 1, "b1_fi_reuse": 1}, site
    config = plan["denoiser"]["config"]
    assert config["in_channels"] == unet.config.in_channels and config["sample_size"] == unet.config.sample_size


def test_sdxl_bundle_records_what_the_pipeline_reads(tmp_path_factory):
    directory = bundle("sdxl", "reuse", tmp_path_factory)
    denoiser = OnnxDenoiser.from_dir(directory)
    unet = tiny_pipeline("sdxl").unet
    assert denoiser.add_embedding.linear_1.in_features == unet.add_embedding.linear_1.in_features
    assert denoiser.config.addition_time_embed_dim == unet.config.addition_time_embed_dim
    assert denoiser.dtype == unet.dtype and denoiser.device == torch.device("cpu")


def test_wrong_shapes_name_expected_and_actual(tmp_path_factory):
    directory = bundle("pixart_alpha", "reuse", tmp_path_factory)
    pipe = tgate_fx.optimize(tiny_pipeline("pixart_alpha"))
    with onnx_denoiser(pipe, directory):
        with pytest.raises(ValueError, match=r"hidden_states: expected \[2, 4, 16, 16\] float32, got \[2, 4, 32, 32\]"):
            latents(pipe, num_inference_steps=6, height=64, width=64)


def test_missing_file_is_named(tmp_path_factory, tmp_path):
    source = bundle("pixart_alpha", "reuse", tmp_path_factory)
    directory = shutil.copytree(source, tmp_path / "bundle")
    os.remove(directory / "b1_fi_reuse.onnx")
    with pytest.raises(FileNotFoundError, match="b1_fi_reuse.onnx"):
        OnnxDenoiser.from_dir(str(directory))
    with pytest.raises(FileNotFoundError, match="plan.json"):
        OnnxDenoiser.from_dir(str(tmp_path))


def test_plan_and_files_that_disagree_are_refused(tmp_path_factory, tmp_path):
    source = bundle("pixart_alpha", "reuse", tmp_path_factory)
    directory = shutil.copytree(source, tmp_path / "bundle")
    with open(directory / PLAN_FILE) as f:
        plan = json.load(f)
    variant = plan["captures"]["b1"]["variants"]["fi_record"]
    variant["inputs"][0]["shape"] = [3, 4, 16, 16]
    with open(directory / PLAN_FILE, "w") as f:
        json.dump(plan, f)
    with pytest.raises(ValueError, match=r"b1_fi_record.onnx does not match plan.json.*\[3, 4, 16, 16\]"):
        OnnxDenoiser.from_dir(str(directory))

    # A bundle from another export next to this plan: the weights file size gives it away.
    with open(directory / WEIGHTS_FILE, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(ValueError, match="weights.bin has"):
        OnnxDenoiser.from_dir(str(directory))


def test_bundle_runs_only_its_stored_schedule(tmp_path_factory, tmp_path):
    directory = bundle("pixart_alpha", "reuse", tmp_path_factory)
    pipe = tgate_fx.optimize(tiny_pipeline("pixart_alpha"))
    # The runner follows the stored steps; another step count is refused, saying what to do.
    with onnx_denoiser(pipe, directory):
        with pytest.raises(ValueError, match=r"8 steps.*stores \(6 steps.*num_inference_steps=8"):
            latents(pipe, num_inference_steps=8)
    # A plan.json whose methods were edited no longer matches its steps.
    edited = shutil.copytree(directory, tmp_path / "edited")
    with open(edited / PLAN_FILE) as f:
        plan = json.load(f)
    plan["methods"]["tgate"]["gate_step"] = 6
    with open(edited / PLAN_FILE, "w") as f:
        json.dump(plan, f)
    with pytest.raises(ValueError, match="differ from those its plan was made with"):
        OnnxDenoiser.from_dir(str(edited))
    # A step that reads a cache no earlier step writes is refused.
    plan["methods"]["tgate"]["gate_step"] = 3
    plan["plan"]["steps"] = plan["plan"]["steps"][3:]
    with open(edited / PLAN_FILE, "w") as f:
        json.dump(plan, f)
    with pytest.raises(ValueError, match="reads caches .* that no earlier step writes"):
        OnnxDenoiser.from_dir(str(edited))
    # A version-1 bundle (T-GATE only, schedule recomputed at run time) says to export again.
    plan["version"] = 1
    with open(edited / PLAN_FILE, "w") as f:
        json.dump(plan, f)
    with pytest.raises(ValueError, match="version-1 bundle.*export it again"):
        OnnxDenoiser.from_dir(str(edited))


def test_unattached_denoiser_says_how_to_attach(tmp_path_factory):
    directory = bundle("pixart_alpha", "reuse", tmp_path_factory)
    denoiser = OnnxDenoiser.from_dir(directory)
    sample = torch.zeros(2, 4, 16, 16)
    with pytest.raises(RuntimeError, match=r"install\(pipe\)"):
        denoiser(sample, encoder_hidden_states=torch.zeros(2, 16, 32), timestep=torch.tensor([1, 1]))


def test_cli_exports_tiny_sd(tmp_path):
    from tgate_fx.cli import export as cli

    out = tmp_path / "bundle"
    assert cli.main(["--model", "tiny-sd", "--out", str(out), "--steps", "1", "--no-tgate"]) == 0
    plan = OnnxDenoiser.from_dir(str(out)).bundle
    assert plan["call"]["num_inference_steps"] == 1 and plan["methods"] == {}
    assert cli.main(["--model", "tiny-nothing", "--out", str(tmp_path / "x")]) == 2


def test_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript")
    pipe = tgate_fx.optimize(tiny_pipeline("pixart_alpha"))
    call = dict(pipe.tiny_call_kwargs)
    height, width = call.pop("height"), call.pop("width")
    config, steps = SETTINGS["reuse"]
    export_onnx(pipe, str(tmp_path), height, width, num_inference_steps=steps, config=config, exporter="dynamo",
                **call)
    tgate_fx.optimize(pipe, config=config)
    ref = latents(pipe, num_inference_steps=steps)
    with onnx_denoiser(pipe, str(tmp_path)):
        got = latents(pipe, num_inference_steps=steps)
    assert _diff(got, ref) <= TOL


def test_weights_changed_in_place_are_refused(tmp_path_factory, tmp_path):
    source = bundle("pixart_alpha", "reuse", tmp_path_factory)
    directory = shutil.copytree(source, tmp_path / "bundle")
    with open(directory / WEIGHTS_FILE, "r+b") as f:  # same size, other bytes: NaNs at run time otherwise
        f.seek(os.path.getsize(directory / WEIGHTS_FILE) // 2)
        f.write(b"\xff" * 64)
    with pytest.raises(ValueError, match="weights.bin does not hold the bytes it was exported with"):
        OnnxDenoiser.from_dir(str(directory))
    OnnxDenoiser.from_dir(str(directory), verify=False)  # the check can be skipped, knowingly


def test_export_from_prompt_embeddings(tmp_path):
    # Pipelines driven by embeddings (no tokenizer; prompt-weighting tools): no prompt at all
    pipe = tgate_fx.optimize(tgate_fx.tiny.tiny_pipeline("sd15"), gate_step=2, sp_interval=1, fi_interval=1,
                             warm_up=0)
    embeds, negative = pipe.encode_prompt("a red circle", "cpu", 1, True)
    call = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=7.5, num_inference_steps=4)
    settings = dict(gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)
    out = export_onnx(pipe, str(tmp_path / "b"), 32, 32, **settings, **call)
    with open(os.path.join(out, PLAN_FILE)) as f:
        assert json.load(f)["call"]["prompt_embeds"] == {"tensor": list(embeds.shape), "dtype": "torch.float32"}

    def run(p):
        return p(height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="latent",
                 **call).images

    expected = run(pipe)
    with onnx_denoiser(pipe, out):
        assert _diff(run(pipe), expected) < TOL
    with pytest.raises(ValueError, match="prompt_embeds must be a tensor with batch_size"):
        export_onnx(pipe, str(tmp_path / "c"), 32, 32, batch_size=2, **settings, **call)


def _four_steps(pipe, call: dict) -> torch.Tensor:
    """The latents of a seeded 4-step generation of a tiny transformer pipeline with its ``call``."""
    return pipe(**call, num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0)).images


def test_flux2_exports_and_matches_torch(tmp_path):
    """FLUX.2's query/key norms are torch.nn.RMSNorm (aten::rms_norm, which opset 18 lacks): written out
    before the export. [klein]'s CFG as two calls a step is refused with the reason."""
    from tgate_fx import TGateConfig, ToCaConfig
    from tgate_fx.tiny_extra import tiny_flux2

    settings = TGateConfig(gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)
    pipe, call = tiny_flux2()
    tgate_fx.optimize(pipe, tgate=settings)
    out = export_onnx(pipe, str(tmp_path / "flux2"), methods=[settings], num_inference_steps=4, **call)
    expected = _four_steps(pipe, call)
    with onnx_denoiser(pipe, out):
        assert _diff(_four_steps(pipe, call), expected) < TOL
    pipe, call = tiny_flux2(klein=True)
    with pytest.raises(ValueError, match="CFG as two denoiser calls a step"):
        export_onnx(pipe, str(tmp_path / "klein"), methods=[ToCaConfig()], num_inference_steps=4, **call)


@pytest.mark.parametrize("guidance_scale", [0.0, 3.0])
def test_zimage_exports_and_matches_torch(tmp_path, guidance_scale):
    """Z-Image takes lists of per-sample tensors (in and out), and its rotary embedding multiplies in complex64,
    which ONNX has no type for: the bundle's graphs carry complex values as real pairs. The plain bundle and
    ToCa's match the torch runtime, and the pipeline gets the transformer's list output back."""
    from tgate_fx import ToCaConfig
    from tgate_fx.tiny_extra import tiny_zimage

    for methods in (None, [ToCaConfig()]):
        pipe, call = tiny_zimage(guidance_scale=guidance_scale)
        if methods:
            tgate_fx.optimize(pipe, methods=methods)
        expected = _four_steps(pipe, call)
        out = export_onnx(pipe, str(tmp_path / str(bool(methods))), tgate=False, methods=methods,
                          num_inference_steps=4, **call)
        with onnx_denoiser(pipe, out) as denoiser:
            got = _four_steps(pipe, call)
            if not methods:  # the plain bundle, called as the transformer is
                captions = call["prompt_embeds"] + call.get("negative_prompt_embeds", [])
                prediction = denoiser([torch.randn(16, 1, 16, 16) for _ in captions], torch.tensor([0.5] * len(captions)),
                                      captions, joint_attention_kwargs=None, return_dict=False)[0]
                assert isinstance(prediction, list) and [p.shape for p in prediction] == [(16, 1, 16, 16)] * len(captions)
        assert _diff(got, expected) < 5e-6
    with pytest.raises(ValueError, match="or a list of batch_size per-prompt tensors"):
        export_onnx(pipe, str(tmp_path / "b2"), tgate=False, batch_size=2, num_inference_steps=4, **call)


def test_zimage_captions_that_pad_to_two_lengths_export(tmp_path):
    """A CFG batch whose captions differ in token count and pad to two multiples of 32 (40 and 9 tokens: 64 and
    32): the transformer builds its attention masks by writes through views (``mask[i, :n] = 1``), which the
    legacy exporter loses; written out of place before the export, the bundle matches the torch runtime."""
    from tgate_fx.tiny_extra import tiny_zimage

    pipe, call = tiny_zimage()
    g = torch.Generator().manual_seed(7)
    call["prompt_embeds"], call["negative_prompt_embeds"] = [torch.randn(40, 16, generator=g)], \
        [torch.randn(9, 16, generator=g)]
    expected = _four_steps(pipe, call)
    out = export_onnx(pipe, str(tmp_path / "ragged"), tgate=False, num_inference_steps=4, **call)
    with onnx_denoiser(pipe, out):
        got = _four_steps(pipe, call)
    assert _diff(got, expected) < 5e-6


def test_zimage_bundle_refuses_a_caption_length_it_was_not_exported_for(tmp_path):
    """A bundle serves the caption lengths it was exported with: captions of 40 tokens (padded to 64) against
    a bundle exported with 9 (padded to 32) are refused with the shapes, not run on the wrong graph."""
    from tgate_fx.tiny_extra import tiny_zimage

    pipe, call = tiny_zimage()
    out = export_onnx(pipe, str(tmp_path / "b"), tgate=False, num_inference_steps=4, **call)
    g = torch.Generator().manual_seed(7)
    longer = {**call, "prompt_embeds": [torch.randn(40, 16, generator=g)],
              "negative_prompt_embeds": [torch.randn(40, 16, generator=g)]}  # CFG on: the bundle's batch is 2
    with onnx_denoiser(pipe, out), pytest.raises(ValueError, match=r"does not match the shapes the bundle was "
                                                 r"exported for .*encoder_hidden_states: expected \[2, 9, 16\]"):
        _four_steps(pipe, longer)
