"""The main job (`tgate-fx generate`, `examples/generate.py`): runs end to end and reports what it measured."""

import re

import pytest
from PIL import Image

from tgate_fx.cli import main

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

FAST = ["--steps", "4", "--gate-step", "2", "--sp-interval", "1", "--warm-up", "1", "--repeats", "1"]


def _numbers(out: str) -> dict[str, float]:
    found = {}
    for key, pattern in (("baseline", r"baseline\s+([\d.]+) s"), ("tgate", r"\(tgate_fx\)\s+([\d.]+) s"),
                         ("speed-up", r"speed-up\s+([\d.]+) x"), ("diff", r"max pixel diff\s+([\d.]+)")):
        match = re.search(pattern, out)
        assert match, f"{key} missing from the output:\n{out}"
        found[key] = float(match.group(1))
    return found


def test_generate_shipped_shapes_model(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path)] + FAST) == 0
    out = capsys.readouterr().out
    n = _numbers(out)
    assert n["speed-up"] == pytest.approx(n["baseline"] / n["tgate"], rel=0.02, abs=0.011)
    assert 0 < n["diff"] <= 1  # T-GATE approximates: the pictures differ, within the pixel range
    for name in ("baseline", "optimized"):
        picture = Image.open(tmp_path / f"{name}.png")
        assert picture.size == (256, 256)  # 32x32, enlarged 8x with nearest neighbours
    # the evaluator reads both pictures back against the default prompt
    assert re.search(r"evaluator reads baseline: .* background +\([0-4]/4 as prompted\)", out)
    assert re.search(r"evaluator reads T-GATE: .* background +\([0-4]/4 as prompted\)", out)


def test_generate_tiny_random_model(tmp_path, capsys):
    assert main(["generate", "--model", "tiny-sd", "--out", str(tmp_path)] + FAST) == 0
    out = capsys.readouterr().out
    _numbers(out)
    assert "evaluator" not in out
    assert "Plan(num_steps=4, gate_step=2" in out


def test_generate_rejects_an_unknown_model(tmp_path, capsys):
    assert main(["generate", "--model", "no-such-model", "--out", str(tmp_path)]) == 2
    assert "is not 'shapes', tiny-sd / tiny-<family>, or a pipeline directory" in capsys.readouterr().out


def test_generate_with_deepcache_composed(tmp_path, capsys):
    assert main(["generate", "--model", "tiny-sd", "--out", str(tmp_path), "--deepcache", "--cache-interval", "2"]
                + FAST) == 0
    out = capsys.readouterr().out
    assert "T-GATE + DeepCache (tgate_fx)" in out and "cache_interval=2, cache_branch_id=0" in out
    assert "gate+dc_full" in out


def test_generate_rejects_settings_of_a_method_switched_off(tmp_path, capsys):
    assert main(["generate", "--no-tgate", "--gate-step", "3", "--out", str(tmp_path)]) == 2
    assert "--no-tgate with --gate-step" in capsys.readouterr().out
