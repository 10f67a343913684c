"""An evaluator for the shapes pipeline: does a picture show what its caption says?

:class:`ShapesClassifier` is a small CNN trained on the generator of
:mod:`tgate_fx.shapes.data`. It reads the four attributes (colour, shape,
position, background) from a 32x32 picture. Two measurements come from it:

* **text alignment**: :func:`attribute_accuracy`, the fraction of generated
  pictures whose predicted attribute equals the one in the caption, for each
  attribute;
* **a stand-in for FID**: :func:`frechet_distance` between the Gaussian
  statistics of the classifier's 64-d penultimate features
  (:meth:`ShapesClassifier.features`) of generated and of real pictures.

It is trained on every combination (the held-out ones too: it is the
measuring instrument, not the model under test), with blur and noise
augmentations so that the slight softness of decoded pictures does not read
as a different attribute. The shipped weights are
``tgate_fx/assets/shapes/evaluator.safetensors`` with ``evaluator.json``.

Train it again (1500 steps of 128 pictures; the shipped weights took 19
minutes on 2 CPU cores that other jobs were using too)::

    python -m tgate_fx.shapes.evaluator --train

Example::

    from tgate_fx.shapes import data, evaluator
    clf = evaluator.load_evaluator()
    real = data.generate(500, seed=1, split="held_out")
    evaluator.attribute_accuracy(clf, real.images, real.labels)  # {'colour': 1.0, ...}
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import data

__all__ = [
    "DEFAULT_PATH",
    "ShapesClassifier",
    "attribute_accuracy",
    "frechet_distance",
    "load_evaluator",
    "predict",
    "train_evaluator",
]

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "shapes" / "evaluator.safetensors"


class ShapesClassifier(nn.Module):
    """Reads colour, shape, position and background from 32x32 pictures.

    Args:
        width: Channels of the first convolution (then 2x, 4x).
        features: Size of the penultimate feature vector.

    Input: ``(N, 3, 32, 32)`` float pictures in ``[0, 1]`` (what a diffusers
    pipeline returns with ``output_type="pt"``). Output of ``forward``: a dict
    of logits, one ``(N, len(values))`` tensor per attribute of
    :data:`tgate_fx.shapes.data.ATTRIBUTES`.
    """

    def __init__(self, width: int = 16, features: int = 64):
        super().__init__()
        self.config = {"width": width, "features": features}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4 * w * 16, features), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(features, len(v)) for name, v in data.ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, features)`` penultimate activations, the space of :func:`frechet_distance`."""
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {name: head(f) for name, head in self.heads.items()}


def _as_unit_float(images) -> torch.Tensor:
    """Pictures as an ``(N, 3, 32, 32)`` float tensor in ``[0, 1]``."""
    if isinstance(images, list):  # PIL images, as pipelines return them by default
        images = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1:] != (3, 32, 32):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be (N, 3, 32, 32) tensors or a list of 32x32 PIL images, got {shape}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float().clamp(0, 1)


@torch.no_grad()
def predict(model: ShapesClassifier, images, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels ``(N, 4)`` and features ``(N, features)`` of pictures.

    ``images``: uint8 ``(N, 3, 32, 32)``, float in ``[0, 1]``, or a list of PIL images.
    """
    x = _as_unit_float(images)
    labels, feats = [], []
    for chunk in x.split(batch_size):
        f = model.features(chunk)
        feats.append(f)
        labels.append(torch.stack([head(f).argmax(1) for head in model.heads.values()], 1))
    return torch.cat(labels), torch.cat(feats)


def attribute_accuracy(model: ShapesClassifier, images, labels: torch.Tensor) -> dict[str, float]:
    """Fraction of pictures whose predicted attribute equals ``labels`` (``(N, 4)``), per attribute."""
    predicted, _ = predict(model, images)
    labels = torch.as_tensor(labels)
    if labels.shape != predicted.shape:
        raise ValueError(f"labels must have shape {tuple(predicted.shape)}, got {tuple(labels.shape)}")
    hits = (predicted == labels).float().mean(0)
    return {name: float(hits[i]) for i, name in enumerate(data.ATTRIBUTES)}


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` and ``(M, D)``.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, as FID computes it,
    with the matrix square root taken through the symmetric form
    ``S_a^(1/2) S_b S_a^(1/2)`` so that it needs no scipy. Small samples bias
    it upwards: compare values computed with the same numbers of pictures.
    """
    a, b = a.double(), b.double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"expected two (N, D) feature sets with N >= 2 and equal D, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(s_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * cross)


def load_evaluator(path: str | os.PathLike | None = None) -> ShapesClassifier:
    """The trained classifier (default: the shipped one), in eval mode.

    ``path`` is the ``.safetensors`` file; its config is the ``.json`` file
    next to it.
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_PATH
    config_path = path.with_suffix(".json")
    if not path.is_file() or not config_path.is_file():
        raise FileNotFoundError(
            f"no evaluator at {path} (with {config_path.name}); train one with "
            "`python -m tgate_fx.shapes.evaluator --train`"
        )
    config = json.loads(config_path.read_text())
    model = ShapesClassifier(**config["model"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur and noise, so that soft decoded pictures read like sharp ones."""
    n = len(x)
    blurred = nn.functional.avg_pool2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = torch.rand(n, 1, 1, 1, generator=g)
    x = x + amount * (blurred - x)
    x = x + torch.randn(x.shape, generator=g) * 0.05 * torch.rand(n, 1, 1, 1, generator=g)
    return x.clamp(0, 1)


def train_evaluator(path: str | os.PathLike | None = None, *, steps: int = 1500, batch_size: int = 128,
                    n_images: int = 30000, seed: int = 0, log_every: int = 100) -> dict:
    """Train the classifier on generated pictures of every combination; write it to ``path``.

    Returns the training record (also written into the ``.json`` config),
    including per-attribute accuracy on 3000 fresh, unaugmented pictures.
    """
    from safetensors.torch import save_file

    path = Path(path) if path is not None else DEFAULT_PATH
    start = time.time()
    torch.manual_seed(seed)
    print(f"[evaluator] rendering {n_images} training pictures", flush=True)
    train = data.generate(n_images, seed=seed, split="all")
    x_all, y_all = train.images.float() / 255.0, train.labels
    model = ShapesClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        logits = model(_augment(x_all[idx], g))
        loss = sum(loss_fn(logits[name], y_all[idx, i]) for i, name in enumerate(data.ATTRIBUTES))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            elapsed = time.time() - start
            print(f"[evaluator] step {step}/{steps} loss {loss.item():.4f} "
                  f"{elapsed:.0f}s (eta {elapsed / step * (steps - step):.0f}s)", flush=True)
    model.eval()
    check = data.generate(3000, seed=seed + 1000, split="all")
    accuracy = attribute_accuracy(model, check.images, check.labels)
    record = {
        "model": model.config,
        "attributes": {k: list(v) for k, v in data.ATTRIBUTES.items()},
        "training": {"steps": steps, "batch_size": batch_size, "n_images": n_images, "seed": seed,
                     "seconds": round(time.time() - start, 1)},
        "accuracy_on_fresh_real_pictures": accuracy,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"[evaluator] wrote {path}; accuracy on fresh real pictures: "
          + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()), flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true", help="train the classifier and write its weights")
    parser.add_argument("--out", default=None, help=f"weights file (default: {DEFAULT_PATH})")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.train:
        train_evaluator(args.out, steps=args.steps, seed=args.seed)
        return
    model = load_evaluator(args.out)
    real = data.generate(2000, seed=args.seed + 7, split="held_out")
    print(attribute_accuracy(model, real.images, real.labels))


if __name__ == "__main__":
    main()
