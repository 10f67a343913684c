"""DownsampleKeyValues on a small captured block (one Transformer2DModel, UNet and DiT style): the graph it
leaves and the numbers against the eager block with the ToDo oracle processor (``oracle_todo.py``)."""

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from oracle_todo import install_todo
from tgate_fx import ToDoConfig
from tgate_fx.core.analysis import analyze
from tgate_fx.core.capture import capture_denoiser
from tgate_fx.core.method import tag_key
from tgate_fx.core.variants import copy_graph_module
from tgate_fx.methods.todo import ToDo
from tgate_fx.core.graph_passes import EliminateDeadCode
from tgate_fx.passes import DownsampleKeyValues
from tgate_fx.passes.downsample_key_values import KeyValueSite

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


@pytest.fixture(scope="module", params=["unet_4x6", "dit_8x8"])
def block(request):
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if request.param == "unet_4x6":  # a (B, C, 4, 6) feature map: a non-square 4x6 grid at depth 1
        model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=2,
                                   cross_attention_dim=12, norm_num_groups=4).eval()
        call = {"hidden_states": torch.randn(2, 16, 4, 6, generator=g)}
        grid = (4, 6)
    else:  # DiT style, patch 2: an 8x8 latent, a 4x4 token grid at depth 2
        model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                   cross_attention_dim=12, sample_size=8, patch_size=2, norm_type="ada_norm_single",
                                   num_embeds_ada_norm=10, out_channels=4).eval()
        call = {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 3]),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        grid = (4, 4)
    call["encoder_hidden_states"] = torch.randn(2, 5, 12, generator=g)
    capture = capture_denoiser(model, call)
    return model, call, capture, grid


def _run(gm, capture, call):
    inputs = capture.flat_inputs(call)
    with torch.no_grad():
        return gm(*(inputs[n.name] for n in gm.graph.nodes if n.op == "placeholder"))


def _transformed(capture, config):
    gm = copy_graph_module(capture.graph_module)
    method = ToDo(config)
    method.annotate(gm, analyze(gm))
    nodes = [n for n in gm.graph.nodes if tag_key("todo") in n.meta]
    for p in (method.transform_pass(nodes, (config.factor, config.mode), None), EliminateDeadCode()):
        gm = p(gm).graph_module
    gm.recompile()
    return gm, nodes


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact", "avg_pool", "max_pool"])
def test_graph_equals_eager_block_with_the_oracle_processor(block, mode):
    model, call, capture, grid = block
    config = ToDoConfig(2, 2, 2, mode=mode)
    gm, tagged = _transformed(capture, config)
    assert len(tagged) == 4  # to_k and to_v of two self-attention sites
    assert {n.meta[tag_key("todo")]["grid"] for n in tagged} == {grid}
    state, undo = install_todo(model, (2, 2, 2), mode)
    try:
        with torch.no_grad():
            expected = model(**call, return_dict=False)[0]
    finally:
        undo()
    got = _run(gm, capture, call)[0]
    assert (got - expected).abs().max().item() <= 1e-6
    tokens = grid[0] * grid[1]
    lengths = sorted((n.args[0].meta["val"].shape[-2], n.args[1].meta["val"].shape[-2])
                     for n in gm.graph.nodes if n.target is SDPA)
    assert lengths == sorted([(tokens, tokens // 4)] * 2 + [(tokens, 5)] * 2)  # cross-attention keeps its 5


def test_meta_val_matches_the_values_the_graph_computes(block):
    _, call, capture, _ = block
    gm, _ = _transformed(capture, ToDoConfig(2, 2, 2, mode="avg_pool"))
    seen = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            seen[n] = out
            return out

    inputs = capture.flat_inputs(call)
    with torch.no_grad():
        Record(gm).run(*(inputs[n.name] for n in gm.graph.nodes if n.op == "placeholder"))
    for node, value in seen.items():
        if isinstance(value, torch.Tensor) and isinstance(node.meta.get("val"), torch.Tensor):
            assert tuple(node.meta["val"].shape) == tuple(value.shape), node.name


def test_factor_1_and_bad_grids(block):
    _, _, capture, grid = block
    gm = copy_graph_module(capture.graph_module)
    method = ToDo(ToDoConfig(2, 2, 2))
    method.annotate(gm, analyze(gm))
    tagged = [n for n in gm.graph.nodes if tag_key("todo") in n.meta]
    sites = [KeyValueSite(tuple(tagged[:2]), grid, 1)]
    before = len(gm.graph.nodes)
    assert not DownsampleKeyValues(sites)(gm).modified and len(gm.graph.nodes) == before
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 3"):
        DownsampleKeyValues([KeyValueSite(tuple(tagged[:2]), grid, 3)])(gm)
    with pytest.raises(ValueError, match="read different inputs"):
        DownsampleKeyValues([KeyValueSite((tagged[0], tagged[2]), grid, 2)])(gm)
    with pytest.raises(ValueError, match="is not"):
        DownsampleKeyValues([KeyValueSite(tuple(tagged[:2]), (grid[0], grid[1] + 1), 2)])(gm)


@pytest.mark.parametrize("f", [2, 3, 4])
def test_nearest_modes_are_strided_slices(f):
    """Pins what the reference notes derived: for an integer factor, nearest == x[::f, ::f] and
    nearest-exact == x[f//2::f, f//2::f]."""
    x = torch.randn(2, 3, 4 * f, 2 * f)
    size = (4, 2)
    assert torch.equal(F.interpolate(x, size=size, mode="nearest"), x[..., ::f, ::f])
    assert torch.equal(F.interpolate(x, size=size, mode="nearest-exact"), x[..., f // 2::f, f // 2::f])
