"""The shipped shapes DiT pipeline (a tiny PixArt-alpha, tgate_fx/assets/shapes_dit/)."""

import pytest
import torch

from tgate_fx.shapes import DIT_PIPELINE_PATH, data, dit, evaluate, evaluator, load_dit_pipeline

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

_CAPTIONS = ["a red circle in the top left on a blue background",
             "a yellow triangle in the centre on a black background"]


@pytest.fixture(scope="module")
def pipe():
    return load_dit_pipeline()


def _generate(pipe, steps=6):
    return pipe(_CAPTIONS, **{**evaluate.call_kwargs(pipe), "num_inference_steps": steps}, output_type="pt",
                generator=[torch.Generator().manual_seed(i) for i in range(len(_CAPTIONS))]).images


def test_shipped_dit_pipeline_loads_offline(monkeypatch):
    from diffusers import DiffusionPipeline, PixArtAlphaPipeline, PixArtTransformer2DModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = DiffusionPipeline.from_pretrained(DIT_PIPELINE_PATH)
    assert isinstance(loaded, PixArtAlphaPipeline)
    assert isinstance(loaded.transformer, PixArtTransformer2DModel)
    files = [p for p in DIT_PIPELINE_PATH.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 15 * 2**20
    assert {p.parent.name for p in DIT_PIPELINE_PATH.rglob("*.safetensors")} == {"transformer", "vae", "text_encoder"}
    names = [name for name, _ in loaded.transformer.named_modules()]
    layers = loaded.transformer.config.num_layers
    assert sum(n.endswith("attn1") for n in names) == sum(n.endswith("attn2") for n in names) == layers


def test_shipped_dit_pipeline_generates_seeded_pictures(pipe):
    base = _generate(pipe)
    assert base.shape == (2, 3, 32, 32) and torch.isfinite(base).all()
    assert torch.equal(base, _generate(pipe))


def test_shipped_dit_pipeline_draws_the_caption(pipe):
    combos = data.combinations("train")[::15]  # 21 training combinations, every attribute value
    accuracy = evaluate.baseline_accuracy(pipe, split="train", every=15, num_inference_steps=10)
    assert accuracy["n"] == len(combos)
    assert accuracy["colour"] >= 0.9 and accuracy["background"] >= 0.9, accuracy
    assert min(accuracy[a] for a in data.ATTRIBUTES) >= 0.6, accuracy


def test_dit_tokenizer_round_trips_captions(pipe):
    shipped, generated = pipe.tokenizer, dit.make_tokenizer()
    captions = [c.caption for c in data.combinations()]
    ids = shipped(captions, padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert torch.equal(ids, generated(captions, padding="max_length", max_length=16, return_tensors="pt").input_ids)
    assert shipped.unk_token_id not in ids
    assert shipped.batch_decode(ids, skip_special_tokens=True) == captions


def test_attention_change_curve_of_both_pipelines(pipe):
    from tgate_fx.shapes import load_pipeline

    combos = data.combinations("held_out")[:2]
    for p in (pipe, load_pipeline()):
        curves = evaluate.attention_change(p, combos, num_inference_steps=5)
        assert curves["sites"] > 0
        for kind in ("cross", "self"):
            assert [s for s, _ in curves[kind]] == [1, 2, 3, 4]
            assert all(v > 0 and v == v for _, v in curves[kind])


def test_load_dit_pipeline_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_dit_pipeline(path=tmp_path)
