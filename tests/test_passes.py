"""Each pass, on a tiny captured model: the graph it leaves and the numbers against the eager model."""

import operator

import pytest
import torch
import torch.fx as fx
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from conftest import record_calls
from tgate_fx.analysis import TAG, find_attention_sites
from tgate_fx.capture import capture_denoiser, normalize_call, parameter_paths
from tgate_fx.passes import (
    EliminateDeadCode,
    ExposeAttentionOutputs,
    RemoveUnusedInputs,
    ReplaceAttentionWithCache,
    cache_input_name,
)
from tgate_fx.tiny import FAMILIES, tiny_pipeline
from tgate_fx.variants import copy_graph_module

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


@pytest.fixture(scope="module", params=["sd15", "pixart_alpha"])
def captured(request):
    family = request.param
    pipe = tiny_pipeline(family)
    denoiser, calls = record_calls(pipe, FAMILIES[family].denoiser, num_inference_steps=2)
    call, _ = normalize_call(denoiser, *calls[0])
    capture = capture_denoiser(denoiser, call)
    sites = find_attention_sites(capture.graph_module)
    return denoiser, call, capture, sites


def _run(gm, capture, call, extra=None):
    inputs = {**capture.flat_inputs(call), **(extra or {})}
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        return gm(*(inputs[n] for n in names))


def _eager_values(denoiser, call, processor=None):
    """Eager forward; returns its output and every attention module's to_out output."""
    values, hooks = {}, []
    for name, module in denoiser.named_modules():
        if isinstance(module, Attention):
            hooks.append(module.to_out[1].register_forward_hook(
                lambda m, a, out, name=name: values.__setitem__(name, out)))
    try:
        with torch.no_grad():
            out = denoiser(**call, return_dict=False)[0]
    finally:
        for h in hooks:
            h.remove()
    return out, values


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _apply(gm, *passes):
    for p in passes:
        gm = p(gm).graph_module
    gm.recompile()
    return gm


def test_expose_attention_outputs_returns_the_eager_values(captured):
    denoiser, call, capture, sites = captured
    self_sites = [s.path for s in sites if s.role == "self"]
    before = len(capture.graph_module.graph.nodes)
    gm = _apply(copy_graph_module(capture.graph_module), ExposeAttentionOutputs(self_sites))
    assert len(gm.graph.nodes) == before  # outputs only: nothing added, nothing recomputed
    assert len(capture.graph_module.graph.nodes) == before  # the capture itself is untouched
    out = _run(gm, capture, call)
    expected, values = _eager_values(denoiser, call)
    assert len(out) == 1 + len(self_sites)
    assert torch.equal(out[0], expected)
    for path, got in zip(self_sites, out[1:]):
        assert torch.equal(got, values[path]), path


def test_expose_with_cfg_mean_averages_the_two_halves(captured):
    denoiser, call, capture, sites = captured
    paths = [s.path for s in sites]
    gm = _apply(copy_graph_module(capture.graph_module), ExposeAttentionOutputs(paths, cfg_mean=True))
    # chunk, two getitems, add, div per site; each new node knows its value and provenance
    new = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in
           (aten.chunk.default, operator.getitem, aten.add.Tensor, aten.div.Tensor)
           and n.name not in {m.name for m in capture.graph_module.graph.nodes}]
    assert len(new) == 5 * len(paths)
    assert all("val" in n.meta and "nn_module_stack" in n.meta for n in new)
    out = _run(gm, capture, call)
    _, values = _eager_values(denoiser, call)
    for path, got in zip(paths, out[1:]):
        uncond, cond = values[path].chunk(2)
        assert torch.equal(got, (uncond + cond) / 2), path


def test_replace_with_cache_removes_attention_work(captured):
    denoiser, call, capture, sites = captured
    cross = [s.path for s in sites if s.role == "cross"]
    base = capture.graph_module
    gm = _apply(copy_graph_module(base), ReplaceAttentionWithCache(cross), EliminateDeadCode(), RemoveUnusedInputs())
    assert _count(gm, SDPA) == _count(base, SDPA) - len(cross)
    linears_per_site = 4  # q, k, v, out
    assert _count(gm, aten.linear.default) <= _count(base, aten.linear.default) - linears_per_site * len(cross)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders[-len(cross):] == [cache_input_name(p) for p in cross]
    # what is left of a cross-attention site reads the cache: the reference's
    # `/ rescale_output_factor` after the cached value; and the text input is gone
    leftover = [n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get(TAG, {}).get("role") == "cross"]
    assert len(leftover) == len(cross)
    assert all(n.target is aten.div.Tensor and n.args[0].op == "placeholder" for n in leftover)
    assert "encoder_hidden_states" not in placeholders
    # parameters of the removed projections are dropped from the module
    params = [parameter_paths(gm)[name] for name, _ in gm.named_parameters()]
    assert not any(name.startswith(path) for name in params for path in cross)
    assert all(any(name.startswith(s.path) for name in params) for s in sites if s.role == "self")

    # numbers: the eager cross-attention values as caches give the eager output, bit for bit
    expected, values = _eager_values(denoiser, call)
    out = _run(gm, capture, call, {cache_input_name(p): values[p] for p in cross})
    assert torch.equal(out[0], expected)


class _FixedOutput(AttnProcessor2_0):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def __call__(self, attn, *args, **kwargs):
        return self.value / attn.rescale_output_factor


def test_replaced_site_uses_the_cache_it_is_given(captured):
    denoiser, call, capture, sites = captured
    site = next(s for s in sites if s.role == "self")
    gm = _apply(copy_graph_module(capture.graph_module), ReplaceAttentionWithCache([site.path]), EliminateDeadCode())
    cache = torch.randn(site.value_shape, generator=torch.Generator().manual_seed(1))
    out = _run(gm, capture, call, {cache_input_name(site.path): cache})
    module = denoiser.get_submodule(site.path)
    original = module.processor
    module.set_processor(_FixedOutput(cache))
    try:
        expected, _ = _eager_values(denoiser, call)
    finally:
        module.set_processor(original)
    assert torch.equal(out[0], expected)


def test_eliminate_dead_code_keeps_side_effects_and_drops_random_ops():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.unused = torch.nn.Linear(4, 4)

        def forward(self, x):
            dead = torch.nn.functional.dropout(self.unused(x), 0.0, False)  # noqa: F841
            y = x * 2
            y.add_(1)  # in place: must stay
            return self.lin(y)

    gm = torch.export.export(Toy(), (torch.randn(2, 4),), strict=False).module()
    gm = fx.GraphModule(gm, gm.graph)
    assert _count(gm, aten.dropout.default) == 1
    gm = _apply(gm, EliminateDeadCode())
    assert _count(gm, aten.dropout.default) == 0
    assert _count(gm, aten.add_.Tensor) == 1
    assert [n for n, _ in gm.named_parameters()] == ["lin.weight", "lin.bias"]


def test_passes_reject_untagged_sites(captured):
    _, _, capture, _ = captured
    with pytest.raises(ValueError, match="no tagged attention value for sites"):
        ExposeAttentionOutputs(["not.a.site"])(copy_graph_module(capture.graph_module))


@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart_alpha", "pixart_sigma", "sd15_controlnet"])
def test_fidelity_graphs_do_no_cross_attention_work(family):
    """After the gate no variant reads the text for attention: no K/V projection, no cross SDPA, no text input."""
    import tgate_fx
    from conftest import latents, shared_optimized

    pipe = tgate_fx.optimize(shared_optimized(family), gate_step=3, sp_interval=2, fi_interval=2, warm_up=1)
    latents(pipe, num_inference_steps=6)
    runtime = tgate_fx.get_runtime(pipe)
    fidelity = [(c, v) for c in runtime.captures for v in c.variants.values() if v.name in ("fi_record", "fi_reuse")]
    assert {v.name for _, v in fidelity} == {"fi_record", "fi_reuse"}
    for capture, v in fidelity:
        assert "encoder_hidden_states" not in v.input_names
        assert "encoder_attention_mask" not in v.input_names
        computed = {n.meta[TAG]["site"] for n in v.graph_module.graph.nodes
                    if n.op == "call_function" and n.target is SDPA}
        cross_sites = {s.path for s in capture.sites if s.role == "cross"}
        assert cross_sites and cross_sites <= set(v.reads) and not computed & cross_sites
        paths = parameter_paths(v.graph_module)
        for name, _ in v.graph_module.named_parameters():
            assert not any(paths[name].startswith(s + ".") for s in cross_sites), name
