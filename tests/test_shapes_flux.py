"""The shapes FLUX testbed (tgate_fx/shapes/flux.py; shipped in tgate_fx/assets/shapes_flux/)."""

import math

import pytest
import torch

from tgate_fx.shapes import FLUX_PIPELINE_PATH, data, evaluate, flux, load_flux_pipeline, train

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

_CAPTIONS = ["a red circle in the top left on a blue background",
             "a yellow triangle in the centre on a black background"]
_SHIPPED = (FLUX_PIPELINE_PATH / "model_index.json").is_file()
needs_shipped = pytest.mark.skipif(not _SHIPPED, reason=f"no shipped FLUX pipeline at {FLUX_PIPELINE_PATH}")


def _tiny_pipeline(seed=0):
    from tgate_fx.shapes import model

    tok, tok_2 = flux.make_tokenizers()
    te, te_2 = flux.make_text_encoders(tok, tok_2, seed=seed)
    net = flux.make_transformer(seed=seed + 1, width=32, heads=2, double_layers=1, single_layers=1)
    pipe = flux.make_pipeline(model.make_vae(seed=seed + 2), te, tok, te_2, tok_2, net)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, steps=6, **kwargs):
    return pipe(_CAPTIONS, **{**evaluate.call_kwargs(pipe), "num_inference_steps": steps, **kwargs},
                output_type="pt", generator=[torch.Generator().manual_seed(i) for i in range(len(_CAPTIONS))]).images


def test_components_build_as_flux_expects():
    from diffusers import FluxPipeline

    net = flux.make_transformer()
    assert net.config.in_channels == 32 and not net.config.guidance_embeds
    assert sum(net.config.axes_dims_rope) == net.config.attention_head_dim == 32
    assert (net.config.num_layers, net.config.num_single_layers) == (3, 3)
    pipe = _tiny_pipeline()
    assert isinstance(pipe, FluxPipeline)
    assert pipe.vae.config.shift_factor == 0.0 and pipe.tokenizer_max_length == 16
    assert not pipe.scheduler.config.use_dynamic_shifting
    with pytest.raises(ValueError, match="axes_dims_rope"):
        flux.make_transformer(width=32, heads=2, axes_dims_rope=(4, 4, 4))
    with pytest.raises(ValueError, match="multiple of heads"):
        flux.make_transformer(width=30, heads=4)


def test_training_objective_is_what_flux_pipeline_integrates():
    """A transformer that returns the trainer's target for one fixed x0 makes FluxPipeline land on x0.

    The oracle uses the trainer's own functions (``flux.noisy_latents``, solved
    for the noise, and ``flux.velocity``) with the pipeline's timestep as the
    trainer's ``t``, on packed latents: a mismatch in the timestep scale, the
    noising, the packing or the sign of the velocity lands elsewhere.
    """
    pipe = _tiny_pipeline()
    x0 = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    packed_x0 = flux.pack_latents(x0)

    def oracle(module, args, kwargs, output):
        x_t, t = kwargs["hidden_states"], kwargs["timestep"]
        # noisy_latents is affine in the noise: x_t = a + b * noise.
        a = flux.noisy_latents(packed_x0, torch.zeros_like(x_t), t)
        b = flux.noisy_latents(torch.zeros_like(x_t), torch.ones_like(x_t), t)
        return (flux.velocity(packed_x0, (x_t - a) / b),)

    handle = pipe.transformer.register_forward_hook(oracle, with_kwargs=True)
    try:
        out = pipe(_CAPTIONS[0], **{**evaluate.call_kwargs(pipe), "num_inference_steps": 7}, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    finally:
        handle.remove()
    assert out.shape == packed_x0.shape == (1, 16, 32)
    torch.testing.assert_close(out, packed_x0, atol=1e-4, rtol=1e-4)


def test_a_few_training_steps_run_and_move_the_weights():
    from tgate_fx.shapes import model

    tok_pair = flux.make_tokenizers()
    batch = data.generate(16, seed=0)
    latents = torch.randn(16, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    log = {}
    kwargs = dict(width=32, heads=2, double_layers=1, single_layers=1)
    text, net = train._train_denoiser(latents, batch.captions, tok_pair, steps=4, batch_size=8, lr=1e-3, seed=0,
                                      log=log, kind="flux", denoiser_kwargs=kwargs)
    assert math.isfinite(log["denoiser_mse_last200"]) and 0 < log["denoiser_mse_last200"] < 10
    fresh = flux.make_transformer(seed=2, **kwargs)  # the trainer's initial weights (seed + 2)
    assert any(not torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values()))
    pipe = train._build_pipeline("flux", model.make_vae(), text, tok_pair, net)
    pipe.set_progress_bar_config(disable=True)
    image = _generate(pipe, steps=2)
    assert image.shape == (2, 3, 32, 32) and torch.isfinite(image).all()
    with pytest.raises(ValueError, match="uniform"):
        train._train_denoiser(latents, batch.captions, tok_pair, steps=1, batch_size=8, lr=1e-3, seed=0, log={},
                              kind="flux", loss_weight="min_snr", denoiser_kwargs=kwargs)


def test_flux_call_kwargs_use_true_cfg():
    pipe = _tiny_pipeline()
    kw = evaluate.call_kwargs(pipe, guidance=3.0)
    assert kw["true_cfg_scale"] == 3.0 and kw["negative_prompt"] == "" and "guidance_scale" not in kw
    assert (kw["height"], kw["width"], kw["max_sequence_length"]) == (32, 32, 16)
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        _generate(pipe, steps=3)
    finally:
        handle.remove()
    assert len(calls) == 6  # conditional and unconditional call per step
    with pytest.raises(ValueError, match="attn1/attn2"):
        evaluate.attention_change(pipe, data.combinations("held_out")[:1], num_inference_steps=2)


@pytest.fixture(scope="module")
def pipe():
    return load_flux_pipeline()


@needs_shipped
def test_shipped_flux_pipeline_loads_offline(monkeypatch):
    from diffusers import DiffusionPipeline, FluxPipeline, FluxTransformer2DModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = DiffusionPipeline.from_pretrained(FLUX_PIPELINE_PATH)
    assert isinstance(loaded, FluxPipeline)
    assert isinstance(loaded.transformer, FluxTransformer2DModel)
    files = [p for p in FLUX_PIPELINE_PATH.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 15 * 2**20
    assert {p.parent.name for p in FLUX_PIPELINE_PATH.rglob("*.safetensors")} == {
        "transformer", "vae", "text_encoder", "text_encoder_2"}
    assert loaded.vae.config.shift_factor == 0.0 and not loaded.transformer.config.guidance_embeds


@needs_shipped
def test_shipped_flux_pipeline_generates_seeded_pictures(pipe):
    base = _generate(pipe)
    assert base.shape == (2, 3, 32, 32) and torch.isfinite(base).all()
    assert torch.equal(base, _generate(pipe))


@needs_shipped
def test_shipped_flux_pipeline_draws_the_caption(pipe):
    combos = data.combinations("train")[::15]  # 21 training combinations, every attribute value
    accuracy = evaluate.baseline_accuracy(pipe, split="train", every=15, num_inference_steps=10)
    assert accuracy["n"] == len(combos)
    assert accuracy["colour"] >= 0.9 and accuracy["background"] >= 0.9, accuracy
    assert min(accuracy[a] for a in data.ATTRIBUTES) >= 0.6, accuracy


@needs_shipped
def test_flux_tokenizers_round_trip_captions(pipe):
    captions = [c.caption for c in data.combinations()]
    for shipped, generated in zip((pipe.tokenizer, pipe.tokenizer_2), flux.make_tokenizers()):
        ids = shipped(captions, padding="max_length", max_length=16, return_tensors="pt").input_ids
        assert torch.equal(ids, generated(captions, padding="max_length", max_length=16,
                                          return_tensors="pt").input_ids)
        assert shipped.unk_token_id not in ids
        assert shipped.batch_decode(ids, skip_special_tokens=True) == captions


def test_load_flux_pipeline_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_flux_pipeline(path=tmp_path)
