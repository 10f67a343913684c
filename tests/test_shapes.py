"""The shapes data generator, the shipped shapes pipeline and its evaluator."""

from itertools import combinations as pairs

import pytest
import torch

from tgate_fx.shapes import data


def test_generator_is_deterministic():
    a = data.generate(40, seed=3)
    b = data.generate(40, seed=3)
    assert torch.equal(a.images, b.images)
    assert a.captions == b.captions
    assert torch.equal(a.labels, b.labels)
    c = data.generate(40, seed=4)
    assert not torch.equal(a.images, c.images)


def test_generated_labels_match_captions_and_split():
    batch = data.generate(50, seed=0, split="held_out")
    assert batch.images.shape == (50, 3, 32, 32) and batch.images.dtype == torch.uint8
    held_out = set(data.combinations("held_out"))
    for caption, labels, combo in zip(batch.captions, batch.labels.tolist(), batch.combos):
        assert data.parse_caption(caption) == combo
        assert tuple(labels) == combo.labels
        assert combo in held_out
    # 50 > 45 held-out combinations: each is used once before any repeats.
    assert len(set(batch.combos)) == len(held_out)


def test_held_out_split_is_disjoint_and_made_of_seen_pairs():
    train, held_out = data.combinations("train"), data.combinations("held_out")
    assert not set(train) & set(held_out)
    assert len(train) + len(held_out) == len(data.combinations("all")) == 360
    assert len(held_out) == 45
    names = list(data.ATTRIBUTES)
    seen_pairs = {(i, getattr(c, a), j, getattr(c, b)) for c in train
                  for (i, a), (j, b) in pairs(enumerate(names), 2)}
    for combo in held_out:
        for (i, a), (j, b) in pairs(enumerate(names), 2):
            assert (i, getattr(combo, a), j, getattr(combo, b)) in seen_pairs, (combo, a, b)
    # Every value of every attribute occurs among the held-out combinations.
    for name, values in data.ATTRIBUTES.items():
        assert {getattr(c, name) for c in held_out} == set(values)


def test_caption_errors_name_the_value():
    with pytest.raises(ValueError, match="purple"):
        data.Combo("purple", "circle", "centre", "black")
    with pytest.raises(ValueError, match="not a caption"):
        data.parse_caption("a cat on a mat")
    with pytest.raises(ValueError, match="split must be one of"):
        data.combinations("test")
