"""The disk capture cache: a second process binds the stored graph to its own model, exactly, or exports again."""

import os

import pytest
import torch

import tgate_fx
from conftest import latents
from tgate_fx.core import capture_store
from tgate_fx.core.capture_store import CaptureStore, default_store
from tgate_fx.tiny import tiny_pipeline

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

SETTINGS = dict(gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TGATE_FX_CAPTURE_CACHE", "1")
    monkeypatch.setenv("TGATE_FX_CACHE_DIR", str(tmp_path))
    return tmp_path


def _no_export(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.export ran although the capture is stored")

    monkeypatch.setattr(torch.export, "export", refuse)


def _entries(directory) -> list:
    return sorted(os.path.join(r, f) for r, _, files in os.walk(directory) for f in files if f.endswith(".capture"))


@pytest.mark.parametrize("family,methods", [
    ("sd15", dict(**SETTINGS)),
    ("sd15", dict(tgate=tgate_fx.TGateConfig(**SETTINGS), deepcache=tgate_fx.DeepCacheConfig(2, 0),
                  todo=tgate_fx.ToDoConfig(factor=2))),
    ("pixart_alpha", dict(**SETTINGS)),
], ids=["sd15-tgate", "sd15-all-three", "pixart-tgate"])
def test_a_new_process_loads_the_stored_capture_instead_of_exporting(family, methods, store_dir, monkeypatch):
    first = tgate_fx.optimize(tiny_pipeline(family), **methods)
    expected = latents(first, num_inference_steps=4)
    assert len(tgate_fx.get_runtime(first).captures) == 2  # CFG batch, post-gate batch
    assert len(_entries(store_dir)) == 1  # both served by one capture of the resolution
    _no_export(monkeypatch)
    second = tgate_fx.optimize(tiny_pipeline(family), **methods)  # a fresh model, as in a new process
    assert torch.equal(latents(second, num_inference_steps=4), expected)
    assert all(g.capture.from_store for g in tgate_fx.get_runtime(second).captures)


def test_stored_graphs_read_the_models_own_weights(store_dir, monkeypatch):
    latents(tgate_fx.optimize(tiny_pipeline("sd15", seed=0), **SETTINGS), num_inference_steps=4)
    other = tiny_pipeline("sd15", seed=5)  # same architecture, other weights
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TGATE_FX_CAPTURE_CACHE", "0")
        expected = latents(tgate_fx.optimize(tiny_pipeline("sd15", seed=5), **SETTINGS), num_inference_steps=4)
    _no_export(monkeypatch)
    assert torch.equal(latents(tgate_fx.optimize(other, **SETTINGS), num_inference_steps=4), expected)


def test_changed_module_state_is_another_entry(store_dir):
    from diffusers.models.attention_processor import AttnProcessor

    latents(tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS), num_inference_steps=4)
    pipe = tiny_pipeline("sd15")
    pipe.unet.set_attn_processor(AttnProcessor())  # another processor: another traced graph
    tgate_fx.optimize(pipe, **SETTINGS)
    latents(pipe, num_inference_steps=4)
    assert not any(g.capture.from_store for g in tgate_fx.get_runtime(pipe).captures)
    assert len(_entries(store_dir)) == 2


def test_a_corrupt_entry_is_detected_deleted_and_captured_again(store_dir):
    expected = latents(tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS), num_inference_steps=4)
    for path in _entries(store_dir):
        with open(path, "r+b") as f:  # same size, other bytes
            f.seek(os.path.getsize(path) - 100)
            f.write(b"\x00" * 50)
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS)
    assert torch.equal(latents(pipe, num_inference_steps=4), expected)
    assert not any(g.capture.from_store for g in tgate_fx.get_runtime(pipe).captures)
    assert len(_entries(store_dir)) == 1  # rewritten
    again = tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS)
    assert torch.equal(latents(again, num_inference_steps=4), expected)
    assert all(g.capture.from_store for g in tgate_fx.get_runtime(again).captures)


def test_an_entry_that_does_not_bind_is_refused(tmp_path):
    pipe = tiny_pipeline("sd15")
    store = CaptureStore(str(tmp_path))
    tgate_fx.optimize(pipe, **SETTINGS)
    runtime = tgate_fx.get_runtime(pipe)
    latents(pipe, num_inference_steps=2)
    graphs = runtime.captures[0]
    key = store.key(runtime.denoiser, graphs.capture.signature)
    assert store.save(key, graphs.capture)
    wide = tiny_pipeline("sd15_wide").unet  # same module tree, other parameter shapes
    call = {name: torch.zeros(shape, dtype=dtype) for name, shape, dtype, _ in graphs.capture.signature.tensors}
    assert store.load(key, wide, call) is None and store.rejected == 1
    assert not os.path.exists(store.path(key))


def test_entries_hold_plain_data_only(tmp_path):
    import pickle

    with pytest.raises(pickle.UnpicklingError, match="plain data only"):
        capture_store._PlainUnpickler(__import__("io").BytesIO(pickle.dumps(torch.nn.Linear))).load()


def test_where_the_store_lives(monkeypatch, tmp_path):
    monkeypatch.delenv("TGATE_FX_CACHE_DIR", raising=False)
    monkeypatch.setenv("TGATE_FX_CAPTURE_CACHE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_store().directory == os.path.join(str(tmp_path), "tgate_fx", "captures")
    monkeypatch.setenv("TGATE_FX_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_store().directory == str(tmp_path / "elsewhere")
    monkeypatch.setenv("TGATE_FX_CAPTURE_CACHE", "0")
    assert default_store() is None


def test_keys_are_the_same_in_every_process():
    # diffusers' config holds a list in set order (`_use_default_values`): hash seeds must not change keys
    import subprocess
    import sys

    code = ("from tgate_fx.archs import get_arch; from tgate_fx.core.captured import signature_of; "
            "from tgate_fx.core.capture_store import CaptureStore; a = get_arch('sd15'); "
            "print(CaptureStore.key(a.build_denoiser(), signature_of(a.make_call(2))))")
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.split()[-1] for seed in (1, 2)}
    assert len(keys) == 1


def test_a_runtime_uses_the_store_it_is_given(tmp_path, monkeypatch):
    """``runtime.capture_store``: a store of the caller's (a replica's shared volume), not the environment's."""
    monkeypatch.setenv("TGATE_FX_CAPTURE_CACHE", "0")  # the environment's store is off
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS)
    runtime = tgate_fx.get_runtime(pipe)
    assert runtime.capture_store == capture_store.DEFAULT
    runtime.capture_store = CaptureStore(str(tmp_path))
    expected = latents(pipe, num_inference_steps=4)
    assert len(_entries(tmp_path)) == 1
    _no_export(monkeypatch)
    again = tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS)
    tgate_fx.get_runtime(again).capture_store = CaptureStore(str(tmp_path))
    assert torch.equal(latents(again, num_inference_steps=4), expected)
