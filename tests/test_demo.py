"""The main job (`tgate-fx generate`, `examples/generate.py`): runs end to end and reports what it measured."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

import tgate_fx
from tgate_fx import DeepCacheConfig, TGateConfig
from tgate_fx.cli import main
from tgate_fx.cli.generate import DEFAULT_PROMPT

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

FAST = ["--steps", "4", "--gate-step", "2", "--sp-interval", "1", "--warm-up", "1", "--repeats", "1"]
FAST_TGATE = TGateConfig(gate_step=2, sp_interval=1, fi_interval=1, warm_up=1)  # what FAST sets


def _numbers(out: str) -> dict[str, float]:
    found = {}
    for key, pattern in (("baseline", r"baseline\s+([\d.]+) s"), ("tgate", r"\(tgate_fx\)\s+([\d.]+) s"),
                         ("speed-up", r"speed-up\s+([\d.]+) x"), ("diff", r"max pixel diff\s+([\d.]+)")):
        match = re.search(pattern, out)
        assert match, f"{key} missing from the output:\n{out}"
        found[key] = float(match.group(1))
    return found


def _picture(path) -> np.ndarray:
    """A written PNG back at the generated size (it was enlarged 8x with nearest neighbours), in [0, 1]."""
    return np.asarray(Image.open(path), dtype=np.float64)[::8, ::8] / 255


def test_generate_shipped_shapes_model(tmp_path, capsys):
    from tgate_fx.shapes import data, evaluator

    assert main(["generate", "--out", str(tmp_path)] + FAST) == 0
    out = capsys.readouterr().out
    n = _numbers(out)
    assert n["baseline"] > 0 and n["tgate"] > 0
    # the step plan printed is the one Plan makes for these settings, with CFG (the shapes pipeline guides at 7.5)
    assert str(tgate_fx.Plan(4, FAST_TGATE, cfg=True)) in out
    pictures = {}
    for name in ("baseline", "optimized"):
        picture = Image.open(tmp_path / f"{name}.png")
        assert picture.size == (256, 256)  # 32x32, enlarged 8x with nearest neighbours
        pictures[name] = _picture(tmp_path / f"{name}.png")
    # the difference printed is that of the two pictures written (up to their 8-bit rounding), and T-GATE changed it
    written = np.abs(pictures["baseline"] - pictures["optimized"]).max()
    assert abs(n["diff"] - written) <= 1 / 255 + 1e-4, (n["diff"], written)
    assert 0 < n["diff"] <= 1
    # the evaluator's readings: what it sees in the written pictures, and the count of attributes as prompted
    wanted = [data.ATTRIBUTES[a][i] for a, i in zip(data.ATTRIBUTES, data.parse_caption(DEFAULT_PROMPT).labels)]
    written_pictures = torch.from_numpy(np.stack([pictures["baseline"], pictures["optimized"]])).permute(0, 3, 1, 2)
    labels, _ = evaluator.predict(evaluator.load_evaluator(), written_pictures.float())
    for name, predicted in zip(("baseline", "T-GATE"), labels.tolist()):
        match = re.search(rf"evaluator reads {re.escape(name)}: +(\w+) (\w+), (\w+), (\w+) background +"
                          r"\(([0-4])/4 as prompted\)", out)
        assert match, f"no evaluator line for {name}:\n{out}"
        seen = list(match.groups()[:4])
        assert seen == [data.ATTRIBUTES[a][i] for a, i in zip(data.ATTRIBUTES, predicted)], name
        assert int(match.group(5)) == sum(x == y for x, y in zip(seen, wanted)), name


def test_generate_tiny_random_model(tmp_path, capsys):
    assert main(["generate", "--model", "tiny-sd", "--out", str(tmp_path)] + FAST) == 0
    out = capsys.readouterr().out
    _numbers(out)
    assert "evaluator" not in out
    assert str(tgate_fx.Plan(4, FAST_TGATE, cfg=True)) in out


def test_generate_rejects_an_unknown_model(tmp_path, capsys):
    assert main(["generate", "--model", "no-such-model", "--out", str(tmp_path)]) == 2
    assert "is not 'shapes', tiny-sd / tiny-<family>, or a pipeline directory" in capsys.readouterr().out


def test_generate_with_deepcache_composed(tmp_path, capsys):
    assert main(["generate", "--model", "tiny-sd", "--out", str(tmp_path), "--deepcache", "--cache-interval", "2"]
                + FAST) == 0
    out = capsys.readouterr().out
    assert "T-GATE + DeepCache (tgate_fx)" in out
    assert str(tgate_fx.Plan(4, [FAST_TGATE, DeepCacheConfig(cache_interval=2, cache_branch_id=0)], cfg=True)) in out


def test_generate_rejects_settings_of_a_method_switched_off(tmp_path, capsys):
    assert main(["generate", "--no-tgate", "--gate-step", "3", "--out", str(tmp_path)]) == 2
    assert "--no-tgate with --gate-step" in capsys.readouterr().out
