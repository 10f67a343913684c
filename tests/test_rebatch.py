"""One capture per resolution: a trace at a probe batch, specialised to each batch size (tgate_fx.core.rebatch)."""

import inspect

import pytest
import torch

import tgate_fx
from conftest import latents, record_calls
from tgate_fx.core import rebatch
from tgate_fx.core.capture import capture_denoiser
from tgate_fx.core.captured import normalize_call
from tgate_fx.core.generation import take_half
from tgate_fx.core.rebatch import BatchCaptures, RebatchWarning, probe_batch
from tgate_fx.tiny import FAMILIES, tiny_pipeline

SETTINGS = dict(gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)


def _counting_exports(monkeypatch) -> list:
    calls = []
    export = torch.export.export

    def counted(*args, **kwargs):
        calls.append(args[0])
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counted)
    return calls


def _first_call(family: str):
    pipe = tiny_pipeline(family)
    extra = {"prompt": [3]} if family == "dit" else {}  # DiT: class labels
    denoiser, calls = record_calls(pipe, FAMILIES[family].denoiser, num_inference_steps=2, **extra)
    call, _ = normalize_call(denoiser, *calls[0])
    return denoiser, call


def _sample_arg(denoiser) -> str:
    return next(iter(inspect.signature(denoiser.forward).parameters))


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart_alpha", "dit", "sd15_controlnet"])
def test_specialised_graphs_are_the_static_exports(family):
    """The graph of each batch size, specialised from one trace, is the graph a static export of that batch gives."""
    denoiser, call = _first_call(family)
    captures = BatchCaptures(denoiser, _sample_arg(denoiser), store=None)
    half = take_half(call, _sample_arg(denoiser), type(denoiser).__name__)
    for c in (call, half):
        got = captures(c)
        static = capture_denoiser(denoiser, c, store=None)
        assert got.graph_module.code == static.graph_module.code
        with torch.no_grad():
            out = got.graph_module(**got.flat_inputs(c))
            assert torch.equal(out[0], denoiser(**c, return_dict=False)[0])
    assert not captures.fallbacks


@pytest.mark.e2e
def test_one_export_serves_the_cfg_and_the_post_gate_batch(monkeypatch):
    expected = latents(tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS), num_inference_steps=4)
    exports = _counting_exports(monkeypatch)
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS)
    assert torch.equal(latents(pipe, num_inference_steps=4), expected)
    runtime = tgate_fx.get_runtime(pipe)
    assert [g.capture.signature.tensors[0][1][0] for g in runtime.captures] == [2, 1]
    assert len(exports) == 1
    # another batch size of the same resolution: no export at all
    latents(pipe, num_inference_steps=4, num_images_per_prompt=3)
    assert len(runtime.captures) == 4 and len(exports) == 1


@pytest.mark.e2e
def test_a_new_process_serves_a_new_batch_size_from_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("TGATE_FX_CAPTURE_CACHE", "1")
    monkeypatch.setenv("TGATE_FX_CACHE_DIR", str(tmp_path))
    latents(tgate_fx.optimize(tiny_pipeline("pixart_alpha"), **SETTINGS), num_inference_steps=3)
    with monkeypatch.context() as m:
        m.setenv("TGATE_FX_CAPTURE_CACHE", "0")
        expected = latents(tgate_fx.optimize(tiny_pipeline("pixart_alpha"), **SETTINGS), num_inference_steps=3,
                           num_images_per_prompt=2)
    exports = _counting_exports(monkeypatch)
    pipe = tgate_fx.optimize(tiny_pipeline("pixart_alpha"), **SETTINGS)  # a fresh model, as in a new process
    assert torch.equal(latents(pipe, num_inference_steps=3, num_images_per_prompt=2), expected)
    assert not exports
    assert all(g.capture.from_store for g in tgate_fx.get_runtime(pipe).captures)


class _SplitsTheBatch(torch.nn.Module):
    """A denoiser whose trace depends on the batch otherwise than through its size: it splits it in two
    (halves of the probe batch are no multiples of it)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, sample, timestep=None, return_dict=False):
        first, second = sample.chunk(2)  # runs right at any batch, but its records say (6, 5) for the probe's 11
        return (torch.cat([self.proj(first), self.proj(second) * 2]),)


def test_a_graph_that_does_not_specialise_is_exported_on_its_own_and_never_run_wrong():
    module = _SplitsTheBatch()
    call = {"sample": torch.randn(4, 3, 8), "timestep": torch.tensor(1.0)}
    captures = BatchCaptures(module, "sample", store=None)
    with pytest.warns(RebatchWarning, match="batch 4 is exported on its own"):
        capture = captures(call)
    with torch.no_grad():
        assert torch.equal(capture.graph_module(**capture.flat_inputs(call))[0], module(**call)[0])
    assert [b for b, _ in captures.fallbacks] == [4]


class _ConstantOfTheProbe(torch.nn.Module):
    """A denoiser whose code holds a multiple of the first probe batch 11 that is not the batch's: it splits its
    48 channels 44 + 4 (as Wan's rotary splits head dim 128 as 44 + 42 + 42)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(48, 48)

    def forward(self, sample, timestep=None, return_dict=False):
        wide, narrow = sample.split([44, 4], dim=-1)
        return (self.proj(torch.cat([wide * 2, narrow], dim=-1)),)


def test_a_constant_that_is_a_multiple_of_the_probe_batch_is_served_by_a_second_probe(monkeypatch):
    module = _ConstantOfTheProbe()
    captures = BatchCaptures(module, "sample", store=None)
    exports = _counting_exports(monkeypatch)
    for batch in (2, 1, 4):
        call = {"sample": torch.randn(batch, 3, 48), "timestep": torch.tensor(1.0)}
        capture = captures(call)  # no RebatchWarning (the suite turns warnings into errors)
        with torch.no_grad():
            assert torch.equal(capture.graph_module(**capture.flat_inputs(call))[0], module(**call)[0])
    assert len(exports) == 2 and not captures.fallbacks  # the probe at 11, then one at 13 serving every batch
    assert [node.args[1] for node in capture.graph_module.graph.nodes
            if node.target is torch.ops.aten.split_with_sizes.default] == [[44, 4]]


@pytest.mark.e2e
def test_check_refuses_a_graph_that_differs_from_the_denoiser():
    denoiser, call = _first_call("sd15")
    capture = BatchCaptures(denoiser, "sample", store=None)(call)
    rebatch.check_capture(capture, denoiser, call)
    other = {**call, "sample": call["sample"] + 0.1}  # the denoiser run on other inputs than the graph
    with pytest.raises(rebatch.RebatchError, match="differs from the denoiser's"):
        rebatch.check_capture(capture, _Swapped(denoiser, other), call)


class _Swapped(torch.nn.Module):
    def __init__(self, inner, call):
        super().__init__()
        self.inner, self.call = inner, call

    def forward(self, **kwargs):
        return self.inner(**self.call, return_dict=False)


def test_the_probe_batch_divides_no_dimension():
    assert probe_batch({2, 4, 64, 77, 320}) == 13  # 77 = 7 * 11
    assert probe_batch({1, 104, 768}) == 11
    assert probe_batch({11 * 13, 17 * 2}) == 19
    assert probe_batch({0, 1}) == 11


@pytest.mark.e2e
def test_a_check_passed_in_one_process_is_not_repeated_by_the_next(tmp_path, monkeypatch):
    monkeypatch.setenv("TGATE_FX_CAPTURE_CACHE", "1")
    monkeypatch.setenv("TGATE_FX_CACHE_DIR", str(tmp_path))
    expected = latents(tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS), num_inference_steps=3)
    facts = sorted(p.name.split(".", 2)[-1] for p in tmp_path.rglob("*.checked"))
    assert facts == ["batch1.checked", "batch2.checked"]

    def refuse(*args, **kwargs):
        raise AssertionError("checked again")

    with monkeypatch.context() as m:
        m.setattr(rebatch, "check_capture", refuse)
        pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **SETTINGS)  # a fresh model, as in a new process
        assert torch.equal(latents(pipe, num_inference_steps=3), expected)
    # an entry written again (here: by hand, as another version would) invalidates what was recorded about it
    entry = next(tmp_path.rglob("*.capture"))
    entry.write_bytes(entry.read_bytes())
    from tgate_fx.core.capture_store import CaptureStore

    store, key = CaptureStore(str(tmp_path)), entry.name.removesuffix(".capture")
    assert store.has_fact(key, "batch2.checked")  # same bytes, same digest
    entry.write_bytes(entry.read_bytes() + b" ")
    assert not store.has_fact(key, "batch2.checked")


def test_a_meta_call_whose_derived_size_is_a_multiple_of_the_probe_gets_its_own_shapes(tmp_path, monkeypatch):
    """On the meta device there are no values to compare, but the specialised graph must still compute the
    shapes it records: FLUX's joint sequence of 1024 image + 32 text tokens is 1056 = 96 x 11, a multiple of
    the first probe batch that no input dimension is. Specialised to batch 1 without a check, the graph said
    every attention attends over 96 tokens, and every count made from it was wrong."""
    from dataclasses import replace

    from tgate_fx.archs import ArchGraphs, get_arch

    monkeypatch.setenv("TGATE_FX_CACHE_DIR", str(tmp_path))
    base = get_arch("flux_dev")
    arch = replace(base, name="flux_two_blocks", config={**base.config, "num_layers": 1, "num_single_layers": 1},
                   height=512, width=512, text_tokens=32, num_steps=2)
    assert arch.image_tokens + arch.text_tokens == 96 * 11
    graphs = ArchGraphs(arch, progress=lambda line: None)(1)
    cores = [n.meta["val"].shape[2] for n in graphs.capture.graph_module.graph.nodes
             if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert cores == [1056, 1056]
