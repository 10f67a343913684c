"""A deterministic generator of captioned pictures of coloured shapes.

Each picture shows one shape on a plain background, and its caption names all
four attributes::

    "a red circle in the top left on a blue background"

========== =====================================================
attribute  values
========== =====================================================
colour     red, green, blue, yellow, white
shape      circle, square, triangle, cross
position   top left, top right, bottom left, bottom right, centre
background black, grey, blue, white
========== =====================================================

A shape never has the colour of its background, which leaves 360 of the
400 combinations. Within a combination, pictures vary: the shape's centre
moves by up to 2 px (at 32 px), its size by +-1 px, and each colour by up to
12 levels per channel. Shapes are drawn at four times the size and reduced
with a box filter, so edges are anti-aliased.

Held-out split: a combination (colour ``c``, shape ``s``, position ``p``,
background ``b``, as indices into the tables above) is held out when
``(c + 2*s + 3*p + 5*b) % 8 == 0``. That keeps 45 combinations (12.5%) for
evaluation. The rule is linear, so every value of every attribute occurs in
both splits, and every pair of attribute values in a held-out combination
also occurs in some training combination: held-out captions are new
compositions of things the model has seen, never new words.

Example::

    from tgate_fx.shapes import data
    batch = data.generate(8, seed=0, split="held_out")
    batch.images.shape        # torch.Size([8, 3, 32, 32]), uint8
    batch.captions[0]         # 'a ... on a ... background'
    data.parse_caption(batch.captions[0]) == batch.combos[0]  # True
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SPLITS",
    "WORDS",
    "Combo",
    "ShapesData",
    "combinations",
    "generate",
    "parse_caption",
    "render",
]

COLOURS = ("red", "green", "blue", "yellow", "white")
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
BACKGROUNDS = ("black", "grey", "blue", "white")
# Label order of every attribute tensor in this package.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "shape": SHAPES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}
SPLITS = ("all", "train", "held_out")

_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
}
# Centre of each position, as a fraction of the picture's side.
_CENTRES = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "centre": (0.5, 0.5),
}
_SUPERSAMPLE = 4
_COLOUR_JITTER = 12


@dataclass(frozen=True)
class Combo:
    """One attribute combination; ``caption`` is its text, ``labels`` its indices in :data:`ATTRIBUTES`."""

    colour: str
    shape: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name, values in ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name} must be one of {values}, got {getattr(self, name)!r}")
        if self.colour == self.background:
            raise ValueError(f"colour and background must differ, both are {self.colour!r}")

    @property
    def caption(self) -> str:
        where = "the centre" if self.position == "centre" else f"the {self.position}"
        return f"a {self.colour} {self.shape} in {where} on a {self.background} background"

    @property
    def labels(self) -> tuple[int, int, int, int]:
        return tuple(values.index(getattr(self, name)) for name, values in ATTRIBUTES.items())


def _held_out(combo: Combo) -> bool:
    c, s, p, b = combo.labels
    return (c + 2 * s + 3 * p + 5 * b) % 8 == 0


def combinations(split: str = "all") -> list[Combo]:
    """Every valid combination of ``split`` (``"all"``, ``"train"`` or ``"held_out"``), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    combos = [Combo(*values) for values in product(*ATTRIBUTES.values()) if values[0] != values[3]]
    if split == "all":
        return combos
    return [c for c in combos if _held_out(c) == (split == "held_out")]


# The caption vocabulary, for a word-level tokenizer.
WORDS = sorted({word for combo in combinations() for word in combo.caption.split()})


def parse_caption(caption: str) -> Combo:
    """The :class:`Combo` a caption of this generator describes."""
    words = caption.split()
    try:
        if words[:1] != ["a"] or "in" not in words or words[-1] != "background":
            raise ValueError
        i = words.index("in")
        colour, shape = words[1:i]
        on = words.index("on", i)
        if words[i + 1] != "the" or words[on + 1] != "a":
            raise ValueError
        position = " ".join(words[i + 2:on])
        (background,) = words[on + 2:-1]
        return Combo(colour, shape, position, background)
    except ValueError:
        raise ValueError(
            f"not a caption of this generator: {caption!r}; expected e.g. "
            f"{Combo('red', 'circle', 'top left', 'blue').caption!r}"
        ) from None


def _jitter_rgb(name: str, rng: np.random.Generator) -> tuple[int, ...]:
    base = np.array(_RGB[name])
    return tuple(int(v) for v in np.clip(base + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255))


def render(combo: Combo, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Draw one picture of ``combo`` as a ``(size, size, 3)`` uint8 array; ``rng`` draws its variation."""
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    unit = size / 32 * _SUPERSAMPLE  # one pixel of the 32 px design, in supersampled pixels
    big = size * _SUPERSAMPLE
    fx, fy = _CENTRES[combo.position]
    cx = fx * big + rng.uniform(-2, 2) * unit
    cy = fy * big + rng.uniform(-2, 2) * unit
    r = rng.uniform(5, 7) * unit
    background, colour = _jitter_rgb(combo.background, rng), _jitter_rgb(combo.colour, rng)
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    if combo.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif combo.shape == "square":
        h = 0.85 * r  # about the circle's area
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=colour)
    elif combo.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=colour)
    else:  # cross
        t = 0.35 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)
    return np.asarray(image.resize((size, size), Image.BOX))


@dataclass
class ShapesData:
    """Pictures with their captions and labels.

    Attributes:
        images: ``(N, 3, size, size)`` uint8 tensor.
        captions: ``N`` captions.
        labels: ``(N, 4)`` int64 tensor: colour, shape, position, background
            indices (the order of :data:`ATTRIBUTES`).
        combos: ``N`` :class:`Combo` objects.
    """

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor
    combos: list[Combo]

    def __len__(self) -> int:
        return len(self.captions)

    def float_images(self) -> torch.Tensor:
        """The images as float32 in ``[-1, 1]``, the range diffusers VAEs take."""
        return self.images.float() / 127.5 - 1.0


def generate(n: int, *, seed: int = 0, split: str = "train", size: int = 32,
             combos: list[Combo] | None = None) -> ShapesData:
    """``n`` pictures of ``split``'s combinations (or of ``combos``), the same for the same arguments.

    Combinations are taken in seeded random order, each once before any is
    repeated, so a dataset is balanced over them.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    pool = combinations(split) if combos is None else list(combos)
    if not pool:
        raise ValueError("combos must not be empty")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-n // len(pool)))])[:n]
    chosen = [pool[i] for i in order]
    images = np.stack([render(c, rng, size) for c in chosen]) if n else np.zeros((0, size, size, 3), np.uint8)
    return ShapesData(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        captions=[c.caption for c in chosen],
        labels=torch.tensor([c.labels for c in chosen], dtype=torch.long).reshape(n, len(ATTRIBUTES)),
        combos=chosen,
    )
