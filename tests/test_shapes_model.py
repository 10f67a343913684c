"""The shipped shapes pipeline and its evaluator (tgate_fx/assets/shapes/)."""

import pytest
import torch

import tgate_fx
from tgate_fx.shapes import PIPELINE_PATH, data, evaluator, load_pipeline, model

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

_CAPTIONS = ["a red circle in the top left on a blue background",
             "a yellow triangle in the centre on a black background"]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


@pytest.fixture(scope="module")
def clf():
    return evaluator.load_evaluator()


def _generate(pipe, steps=6):
    return pipe(_CAPTIONS, num_inference_steps=steps, guidance_scale=7.5, output_type="pt",
                generator=[torch.Generator().manual_seed(i) for i in range(len(_CAPTIONS))]).images


def test_shipped_pipeline_loads_offline(monkeypatch):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = DiffusionPipeline.from_pretrained(PIPELINE_PATH)
    assert isinstance(loaded, StableDiffusionPipeline)
    files = [p for p in PIPELINE_PATH.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert {p.parent.name for p in PIPELINE_PATH.rglob("*.safetensors")} == {"unet", "vae", "text_encoder"}


def test_shipped_pipeline_generates_with_and_without_tgate(pipe):
    base = _generate(pipe)
    assert base.shape == (2, 3, 32, 32) and torch.isfinite(base).all()
    assert torch.equal(base, _generate(pipe))  # seeded
    tgate_fx.optimize(pipe, gate_step=3, sp_interval=2, fi_interval=1, warm_up=1)
    try:
        fast = _generate(pipe)
    finally:
        tgate_fx.restore(pipe)
    assert fast.shape == base.shape and torch.isfinite(fast).all()
    # Same seeds, cross-attention frozen after half the steps: close to, not equal to, the baseline.
    difference = (fast - base).abs().mean().item()
    assert 0 < difference < 0.1, difference


def test_shipped_pipeline_draws_the_caption(pipe, clf):
    combos = data.combinations("train")[::15]  # 21 training combinations, every attribute value
    images = pipe([c.caption for c in combos], num_inference_steps=10, guidance_scale=7.5, output_type="pt",
                  generator=[torch.Generator().manual_seed(i) for i in range(len(combos))]).images
    labels = torch.tensor([c.labels for c in combos])
    accuracy = evaluator.attribute_accuracy(clf, images, labels)
    # 10 steps and 21 pictures keep this fast; the baseline at 25 steps on
    # hundreds of pictures is measured in benchmarks/results/shapes_unet_baseline.md.
    assert accuracy["colour"] >= 0.9 and accuracy["background"] >= 0.9, accuracy
    assert accuracy["position"] >= 0.9 and accuracy["shape"] >= 0.6, accuracy


def test_shipped_unet_has_self_and_cross_attention(pipe):
    names = [name for name, _ in pipe.unet.named_modules()]
    cross = [n for n in names if n.endswith("attn2")]
    assert len(cross) == len([n for n in names if n.endswith("attn1")]) == 10, cross
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_evaluator_reads_real_pictures(clf):
    real = data.generate(200, seed=123, split="held_out")
    seen = data.generate(200, seed=124, split="train")
    for batch in (real, seen):
        accuracy = evaluator.attribute_accuracy(clf, batch.images, batch.labels)
        assert min(accuracy.values()) >= 0.99, accuracy


def test_frechet_distance_separates_real_from_shuffled(clf):
    a = data.generate(300, seed=1, split="held_out")
    b = data.generate(300, seed=2, split="held_out")
    _, fa = evaluator.predict(clf, a.images)
    _, fb = evaluator.predict(clf, b.images)
    # Colours swapped between channels: same layout, wrong colours.
    _, fc = evaluator.predict(clf, b.images[:, [2, 0, 1]])
    assert evaluator.frechet_distance(fa, fa) == pytest.approx(0, abs=1e-3)
    assert evaluator.frechet_distance(fa, fb) < evaluator.frechet_distance(fa, fc) / 5
    with pytest.raises(ValueError, match="feature sets"):
        evaluator.frechet_distance(fa, fb[:, :3])


def test_tokenizer_round_trips_captions(pipe):
    shipped, generated = pipe.tokenizer, model.make_tokenizer()
    captions = [c.caption for c in data.combinations()]
    ids = shipped(captions, padding="max_length", max_length=model.MAX_LENGTH, return_tensors="pt").input_ids
    assert ids.shape == (len(captions), model.MAX_LENGTH)
    assert torch.equal(ids, generated(captions, padding="max_length", max_length=model.MAX_LENGTH,
                                      return_tensors="pt").input_ids)
    assert shipped.unk_token_id not in ids
    assert shipped.batch_decode(ids, skip_special_tokens=True) == captions


def test_load_pipeline_errors_name_the_value(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(path=tmp_path)
    with pytest.raises(ValueError, match="torch.int8"):
        load_pipeline(dtype=torch.int8)
