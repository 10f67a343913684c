"""Millisecond tests of the token passes (``tgate_fx.passes``): ComputeAttentionMap (scales, masks, logits scaled
after the product) and RestrictToTokens (queries of an attention, an MLP next to a gathered value, shape
arguments, refusals), on one hand-written block captured per setting.

The block: ``proj_out(cat([side, gelu(mlp_in(norm(h)))]))`` with ``h = sample + to_out(attention)``, queries from
the sample, keys and values from a context; ``side`` stands for a cached attention output that an MLP branch is
concatenated with (ToCa's single-stream FLUX blocks). Numbers are checked against the eager modules; the attention
map bit for bit, the restricted regions within 1e-6 (the copies multiply k-row matrices, whose BLAS blocking may
round differently from the N-row ones).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._guards import detect_fake_mode

from tgate_fx.core.capture import capture_denoiser
from tgate_fx.core.graph_passes import EliminateDeadCode, ExposeValues
from tgate_fx.core.meta import TAG
from tgate_fx.core.variants import copy_graph_module
from tgate_fx.passes import ComputeAttentionMap, RestrictToTokens, TokenRegion

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
LINEAR = aten.linear.default
TOL = 1e-6
INDEX = torch.tensor([[4, 0, 5], [1, 3, 2]])  # (B, k) = (2, 3) of N = 6 tokens


class TokenBlock(torch.nn.Module):
    def __init__(self, scale=None, causal=False):
        super().__init__()
        torch.manual_seed(0)
        self.to_q, self.to_k, self.to_v, self.to_out, self.mlp_in = (torch.nn.Linear(8, 8) for _ in range(5))
        self.norm = torch.nn.LayerNorm(8)
        self.proj_out = torch.nn.Linear(16, 8)
        self.scale, self.causal = scale, causal

    def forward(self, sample, context, side, attn_mask=None, return_dict=True):
        b, n, _ = sample.shape
        q = self.to_q(sample).view(b, n, 2, 4).transpose(1, 2)
        k = self.to_k(context).view(b, -1, 2, 4).transpose(1, 2)
        v = self.to_v(context).view(b, -1, 2, 4).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale, is_causal=self.causal)
        h = sample + self.to_out(attn.transpose(1, 2).reshape(b, n, 8))
        mlp = F.gelu(self.mlp_in(self.norm(h)))
        return (self.proj_out(torch.cat([side, mlp], -1)),)


def _call(mask=None):
    g = torch.Generator().manual_seed(1)
    call = {"sample": torch.randn(2, 6, 8, generator=g), "context": torch.randn(2, 3, 8, generator=g),
            "side": torch.randn(2, 6, 8, generator=g)}
    if mask == "float":
        call["attn_mask"] = torch.randn(2, 1, 1, 3, generator=g)
    elif mask == "bool":
        call["attn_mask"] = torch.tensor([True, False, True]).expand(2, 1, 1, 3).clone()
    return call


def _captured(mask=None, **settings):
    block, call = TokenBlock(**settings).eval(), _call(mask)
    return block, call, capture_denoiser(block, call, store=None)


def _in(gm, module, target=LINEAR):
    (node,) = [n for n in gm.graph.nodes if n.target is target
               and [p for p, _ in n.meta["nn_module_stack"].values()][-1] == module]
    return node


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _run(gm, call, **extra):
    inputs = {**call, **extra}
    with torch.no_grad():
        return gm(*(inputs[n.name] for n in gm.graph.nodes if n.op == "placeholder"))


def _eager(block, call):
    """The block's output and the outputs of its submodules (forward hooks)."""
    seen = {}
    handles = [getattr(block, name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
               for name in ("to_q", "to_k", "to_out", "proj_out")]
    try:
        with torch.no_grad():
            out = block(**call)[0]
    finally:
        for h in handles:
            h.remove()
    return out, seen


def _index_input(gm, like):
    """A new ``index`` placeholder of :data:`INDEX`'s shape, in the graph's fake mode."""
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        index = gm.graph.placeholder("index")
    index.meta["val"] = detect_fake_mode([like.meta["val"]]).from_tensor(INDEX, static_shapes=True)
    return index


def _rows(x, index=INDEX):
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# --- ComputeAttentionMap -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask,scale,scale_logits", [(None, None, False), ("float", 0.3, False), ("bool", None, True),
                                                     ("float", None, True)])
def test_compute_attention_map_is_the_official_formula_next_to_the_unchanged_core(mask, scale, scale_logits):
    block, call, capture = _captured(mask, scale=scale)
    gm = copy_graph_module(capture.graph_module)
    core = _in(gm, "", SDPA)
    core_args, first = core.args, next(iter(core.users))
    before = [n.name for n in gm.graph.nodes]
    maps = ComputeAttentionMap([core], scale_logits=scale_logits)
    assert maps(gm).modified
    (amap,) = maps.maps
    new = [n for n in gm.graph.nodes if n.name not in before]
    targets = [n.target for n in new]
    expected_ops = {None: [], "float": [aten.add.Tensor], "bool": [aten.logical_not.default, aten.masked_fill.Scalar]}
    assert sorted(map(str, targets)) == sorted(map(str, [aten.transpose.int, aten.mul.Tensor, aten.matmul.default,
                                                          aten._softmax.default, aten.mean.dim, *expected_ops[mask]]))
    nodes = list(gm.graph.nodes)
    assert nodes.index(core) < min(map(nodes.index, new)) and max(map(nodes.index, new)) < nodes.index(first)
    assert _count(gm, SDPA) == 1 and core.args == core_args  # the fused core itself is unchanged
    assert all(n.meta["nn_module_stack"] == core.meta["nn_module_stack"] for n in new)
    assert tuple(amap.meta["val"].shape) == (2, 6, 3)
    ExposeValues([amap])(gm)
    gm.recompile()
    out, got = _run(gm, call)
    expected, seen = _eager(block, call)
    q = seen["to_q"].view(2, 6, 2, 4).transpose(1, 2)
    k = seen["to_k"].view(2, 3, 2, 4).transpose(1, 2)
    s = scale if scale is not None else 1.0 / 4 ** 0.5
    logits = (q @ k.transpose(-2, -1)) * s if scale_logits else (q * s) @ k.transpose(-2, -1)
    if mask == "bool":
        logits = logits.masked_fill(~call["attn_mask"], float("-inf"))
    elif mask == "float":
        logits = logits + call["attn_mask"]
    assert torch.equal(got, logits.softmax(-1).mean(1))
    assert torch.equal(out, expected)
    if mask == "bool":
        assert not got[..., 1].any()  # the masked key gets no attention


def test_compute_attention_map_nothing_reads_is_dead_code():
    _, _, capture = _captured()
    gm = copy_graph_module(capture.graph_module)
    before = [n.name for n in gm.graph.nodes]
    ComputeAttentionMap([_in(gm, "", SDPA)])(gm)
    assert len(gm.graph.nodes) == len(before) + 5
    EliminateDeadCode()(gm)
    assert [n.name for n in gm.graph.nodes] == before


def test_compute_attention_map_refuses_causal_and_other_nodes():
    _, _, capture = _captured(causal=True)
    gm = copy_graph_module(capture.graph_module)
    with pytest.raises(ValueError, match="scaled_dot_product_attention is causal"):
        ComputeAttentionMap([_in(gm, "", SDPA)])(gm)
    with pytest.raises(ValueError, match="linear is not a scaled_dot_product_attention node of this graph"):
        ComputeAttentionMap([_in(gm, "to_q")])(gm)
    with pytest.raises(ValueError, match="not a scaled_dot_product_attention node of this graph"):
        ComputeAttentionMap([_in(capture.graph_module, "", SDPA)])(gm)  # another graph's core


# --- RestrictToTokens --------------------------------------------------------------------------------------------

def test_restrict_to_tokens_runs_an_attention_on_the_chosen_queries_only():
    block, call, capture = _captured()
    gm = copy_graph_module(capture.graph_module)
    source = next(n for n in gm.graph.nodes if n.name == "sample")
    output, core, reshape = _in(gm, "to_out"), _in(gm, "", SDPA), _in(gm, "", aten.reshape.default)
    output.meta[TAG] = {"site": "attn", "role": "cross", "value": True}
    index = _index_input(gm, source)
    original = {n: (n.args, n.kwargs) for n in gm.graph.nodes}
    restrict = RestrictToTokens([TokenRegion(source, output, index)])
    assert restrict(gm).modified
    copies = restrict.copies[0]
    # the region is the query path, from the source to the output; the keys and values are shared, not copied
    region = {n.name for n in copies if n not in (source,)}
    assert region == {"linear", "view", "transpose", "scaled_dot_product_attention", "transpose_3", "reshape",
                      "linear_3"}
    assert _count(gm, LINEAR) == 6 + 2 and _count(gm, SDPA) == 1 + 1  # to_q and to_out copied
    assert copies[core].args[1] is core.args[1] and copies[core].args[2] is core.args[2]  # text keys/values shared
    view = next(n for n in copies if n.name == "view")
    assert copies[view].args[1] == [2, 3, 2, 4]  # the view's token count rewritten for k = 3
    assert copies[reshape].args[1] == [2, 3, 8]
    assert {n.name: tuple(c.meta["val"].shape) for n, c in copies.items()} == {
        "sample": (2, 3, 8), "linear": (2, 3, 8), "view": (2, 3, 2, 4), "transpose": (2, 2, 3, 4),
        "scaled_dot_product_attention": (2, 2, 3, 4), "transpose_3": (2, 3, 2, 4), "reshape": (2, 3, 8),
        "linear_3": (2, 3, 8)}
    assert copies[source].target is aten.gather.default
    assert all(c.meta["nn_module_stack"] == n.meta["nn_module_stack"] for n, c in copies.items() if n is not source)
    assert copies[output].meta[TAG] == {"site": "attn", "role": "cross"}  # the tag, without "value"
    assert all((n.args, n.kwargs) == a for n, a in original.items())  # the original region is untouched
    ExposeValues([copies[output]])(gm)
    EliminateDeadCode()(gm)
    gm.recompile()
    gm.graph.lint()
    out, fresh = _run(gm, call, index=INDEX)
    expected, seen = _eager(block, call)
    assert torch.equal(out, expected)
    assert fresh.shape == (2, 3, 8)
    assert (fresh - _rows(seen["to_out"])).abs().max().item() <= TOL


def test_restrict_to_tokens_reads_the_rows_of_gathered_values():
    block, call, capture = _captured()
    gm = copy_graph_module(capture.graph_module)
    source = next(n for n in gm.graph.nodes if n.target is aten.add.Tensor)  # h = sample + to_out(...)
    side = next(n for n in gm.graph.nodes if n.name == "side")
    output, gelu, cat = _in(gm, "proj_out"), _in(gm, "", aten.gelu.default), _in(gm, "", aten.cat.default)
    index = _index_input(gm, source)
    restrict = RestrictToTokens([TokenRegion(source, output, index, gathered=(side,))])
    restrict(gm)
    copies = restrict.copies[0]
    assert copies[side].target is aten.gather.default and copies[side].args[0] is side
    assert copies[cat].args[0] == [copies[side], copies[gelu]]
    assert _in(gm, "to_q") not in copies and _count(gm, SDPA) == 1  # only the MLP branch is copied
    ExposeValues([copies[output]])(gm)
    gm.recompile()
    _, fresh = _run(gm, call, index=INDEX)
    _, seen = _eager(block, call)
    h = _rows(call["sample"] + seen["to_out"])
    with torch.no_grad():
        expected = block.proj_out(torch.cat([_rows(call["side"]), F.gelu(block.mlp_in(block.norm(h)))], -1))
    assert fresh.shape == (2, 3, 8)
    assert (fresh - expected).abs().max().item() <= TOL
    assert (fresh - _rows(seen["proj_out"])).abs().max().item() <= TOL
    # a value with a token dimension the region reads but that is not named: its N rows meet the k rows, and the
    # fake-tensor computation of the copy's shapes fails (it is not restricted silently)
    gm = copy_graph_module(capture.graph_module)
    source = next(n for n in gm.graph.nodes if n.target is aten.add.Tensor)
    with pytest.raises(RuntimeError, match="Expected 6 in dimension 1 but got 3"):
        RestrictToTokens([TokenRegion(source, _in(gm, "proj_out"), _index_input(gm, source))])(gm)


def test_restrict_to_tokens_refuses_what_it_cannot_restrict():
    _, _, capture = _captured()
    gm = copy_graph_module(capture.graph_module)
    sample, context, side = (next(n for n in gm.graph.nodes if n.name == name) for name in ("sample", "context", "side"))
    index = _index_input(gm, sample)
    with pytest.raises(ValueError, match="linear_3 is not computed from side: no region to restrict"):
        RestrictToTokens([TokenRegion(side, _in(gm, "to_out"), index)])(gm)
    with pytest.raises(ValueError, match=r"gathered value context \(2, 3, 8\) is not \(B, N, C\) with the source's "
                                         r"B = 2 and N = 6"):
        RestrictToTokens([TokenRegion(sample, _in(gm, "to_out"), index, gathered=(context,))])(gm)
    with pytest.raises(ValueError, match="is not in the graph this pass runs on"):
        RestrictToTokens([TokenRegion(sample, _in(capture.graph_module, "to_out"), index)])(gm)

    class Flat(torch.nn.Module):  # the token dimension folded into the batch: no view names N
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, sample, return_dict=True):
            b, n, c = sample.shape
            return (self.lin(sample.reshape(b * n, c)).reshape(b, n, c),)

    flat = copy_graph_module(capture_denoiser(Flat().eval(), {"sample": torch.randn(2, 6, 8)}, store=None).graph_module)
    source = next(n for n in flat.graph.nodes if n.op == "placeholder")
    output = [n for n in flat.graph.nodes if n.op == "call_function"][-1]
    with pytest.raises(ValueError, match=r"cannot tell the token dimension of .*'s shape \[12, 8\]"):
        RestrictToTokens([TokenRegion(source, output, _index_input(flat, source))])(flat)
