"""Each pass, on a small captured block (one diffusers Transformer2DModel with self- and cross-attention):
the graph it leaves and the numbers against the eager block."""

import operator

import pytest
import torch
import torch.fx as fx
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from tgate_fx.core.analysis import TAG, find_attention_sites
from tgate_fx.core.capture import capture_denoiser
from tgate_fx.core.captured import parameter_paths
from tgate_fx.core.variants import copy_graph_module
from tgate_fx.core.graph_passes import EliminateDeadCode, ExposeValues, RemoveUnusedInputs, ReplaceValuesWithCache

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


@pytest.fixture(scope="module", params=["attention_2d", "attention_1d"])
def captured(request):
    """A tiny Transformer2DModel (two transformer blocks), captured: the block every UNet and DiT is made of."""
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if request.param == "attention_2d":  # UNet style: a (B, C, H, W) feature map
        block = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=2,
                                   cross_attention_dim=12, norm_num_groups=4).eval()
        sample = torch.randn(2, 16, 4, 4, generator=g)
    else:  # DiT style: patch tokens
        block = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                   cross_attention_dim=12, sample_size=8, patch_size=2, norm_type="ada_norm_single",
                                   num_embeds_ada_norm=10, out_channels=4).eval()
        sample = torch.randn(2, 4, 8, 8, generator=g)
    call = {"hidden_states": sample, "encoder_hidden_states": torch.randn(2, 5, 12, generator=g)}
    if request.param == "attention_1d":
        call["timestep"] = torch.tensor([3, 3])
        call["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    capture = capture_denoiser(block, call)
    sites = find_attention_sites(capture.graph_module)
    assert {s.role for s in sites} == {"self", "cross"}
    return block, call, capture, sites


def _values(gm, paths):
    """The tagged value node of each attention site in ``paths``, in ``gm``'s graph."""
    found = {n.meta[TAG]["site"]: n for n in gm.graph.nodes if n.meta.get(TAG, {}).get("value")}
    return [found[p] for p in paths]


def cache_input_name(path):
    return "cache_" + path.replace(".", "_")


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


def test_expose_values_returns_the_eager_values(captured):
    denoiser, call, capture, sites = captured
    self_sites = [s.path for s in sites if s.role == "self"]
    before = len(capture.graph_module.graph.nodes)
    gm = copy_graph_module(capture.graph_module)
    gm = _apply(gm, ExposeValues(_values(gm, self_sites)))
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
    gm = copy_graph_module(capture.graph_module)
    values = _values(gm, paths)
    gm = _apply(gm, ExposeValues(values, cfg_mean=values))
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
    gm = copy_graph_module(base)
    replacements = [(v, cache_input_name(p)) for v, p in zip(_values(gm, cross), cross)]
    gm = _apply(gm, ReplaceValuesWithCache(replacements), EliminateDeadCode(), RemoveUnusedInputs())
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
    gm = copy_graph_module(capture.graph_module)
    gm = _apply(gm, ReplaceValuesWithCache([(_values(gm, [site.path])[0], cache_input_name(site.path))]),
                EliminateDeadCode())
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


def test_passes_reject_nodes_of_another_graph(captured):
    _, _, capture, sites = captured
    node = _values(capture.graph_module, [sites[0].path])[0]
    with pytest.raises(ValueError, match="not in the graph"):
        ExposeValues([node])(copy_graph_module(capture.graph_module))
    with pytest.raises(ValueError, match="not in the graph"):
        ReplaceValuesWithCache([(node, "cache_x")])(copy_graph_module(capture.graph_module))


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart_alpha", "pixart_sigma", "sd15_controlnet"])
def test_fidelity_graphs_do_no_cross_attention_work(family):
    """After the gate no variant reads the text for attention: no K/V projection, no cross SDPA, no text input."""
    import tgate_fx
    from conftest import latents
    from tgate_fx.tiny import tiny_pipeline

    pipe = tgate_fx.optimize(tiny_pipeline(family), gate_step=3, sp_interval=2, fi_interval=2, warm_up=1)
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
        assert cross_sites and cross_sites <= {k.site for k in v.reads} and not computed & cross_sites
        paths = parameter_paths(v.graph_module)
        for name, _ in v.graph_module.named_parameters():
            assert not any(paths[name].startswith(s + ".") for s in cross_sites), name
