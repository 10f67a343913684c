"""Millisecond tests of the core's graph passes (``tgate_fx.core.graph_passes``): ExposeValues (with the CFG-halves
mean), ReplaceValuesWithCache, EliminateDeadCode, RemoveUnusedInputs, DropPrediction, and the helpers every pass is
built on (new_node, call_traced, first_user).

Each runs on one hand-written attention block (queries from the sample, keys and values from a context, an output
projection, a feed-forward with dropout, a head), captured once for the module: the graph each pass leaves (which
nodes, placeholders and outputs changed, which parameters are held) and its numbers against the eager block, bit
for bit (the graph runs the eager block's aten kernels in the same order).
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._guards import detect_fake_mode

from tgate_fx.core.capture import capture_denoiser
from tgate_fx.core.captured import parameter_paths
from tgate_fx.core.graph_passes import (DropPrediction, EliminateDeadCode, ExposeValues, RemoveUnusedInputs,
                                        ReplaceValuesWithCache, call_traced, first_user, new_node)
from tgate_fx.core.meta import TAG
from tgate_fx.core.variants import copy_graph_module

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
LINEAR = aten.linear.default


class Block(torch.nn.Module):
    """One attention block with two heads: ``head(h + dropout(ff(h)))``, ``h = sample + to_out(attention)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.to_q, self.to_k, self.to_v, self.to_out, self.ff = (torch.nn.Linear(8, 8) for _ in range(5))
        self.head = torch.nn.Linear(8, 4)

    def forward(self, sample, context, return_dict=True):
        b, n, _ = sample.shape
        q = self.to_q(sample).view(b, n, 2, 4).transpose(1, 2)
        k = self.to_k(context).view(b, -1, 2, 4).transpose(1, 2)
        v = self.to_v(context).view(b, -1, 2, 4).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 8)
        h = sample + self.to_out(attn)
        h = h + F.dropout(self.ff(h), 0.0, False)
        return (self.head(h),)


MODULES = ("to_q", "to_k", "to_v", "to_out", "ff", "head")


@pytest.fixture(scope="module")
def captured():
    g = torch.Generator().manual_seed(1)
    block = Block().eval()
    call = {"sample": torch.randn(2, 6, 8, generator=g), "context": torch.randn(2, 3, 8, generator=g)}
    return block, call, capture_denoiser(block, call, store=None)


def _linear(gm, module):
    """The ``aten.linear`` node of submodule ``module`` in ``gm``."""
    (node,) = [n for n in gm.graph.nodes if n.target is LINEAR
               and [p for p, _ in n.meta["nn_module_stack"].values()][-1] == module]
    return node


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _placeholders(gm):
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def _run(gm, call, **extra):
    inputs = {**call, **extra}
    with torch.no_grad():
        return gm(*(inputs[name] for name in _placeholders(gm)))


def _eager(block, call, replace=None):
    """The block's eager output and each submodule's output; ``replace``: submodule -> the output it returns."""
    seen, handles = {}, []
    for name in MODULES:
        module = getattr(block, name)

        def hook(m, args, out, name=name):
            out = (replace or {}).get(name, out)
            seen[name] = out
            return out

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = block(**call)[0]
    finally:
        for h in handles:
            h.remove()
    return out, seen


def _held(gm):
    """The block's parameter paths the graph module still holds."""
    paths = parameter_paths(gm)
    return {paths.get(name, name) for name, _ in gm.named_parameters()}


# --- ExposeValues ------------------------------------------------------------------------------------------------

def test_expose_values_appends_the_values_in_the_order_given(captured):
    block, call, capture = captured
    gm = copy_graph_module(capture.graph_module)
    before = [n.name for n in gm.graph.nodes]
    ff, to_out = _linear(gm, "ff"), _linear(gm, "to_out")
    assert ExposeValues([ff, to_out])(gm).modified
    gm.recompile()
    assert [n.name for n in gm.graph.nodes] == before  # outputs only: nothing added, nothing recomputed
    assert gm.graph.output_node().args[0][1:] == (ff, to_out)
    assert len(capture.graph_module.graph.output_node().args[0]) == 1  # the capture itself is untouched
    out = _run(gm, call)
    expected, values = _eager(block, call)
    assert len(out) == 3
    assert torch.equal(out[0], expected) and torch.equal(out[1], values["ff"]) and torch.equal(out[2], values["to_out"])
    untouched = copy_graph_module(capture.graph_module)
    assert not ExposeValues([])(untouched).modified
    assert len(untouched.graph.output_node().args[0]) == 1


def test_expose_values_cfg_mean_is_the_mean_of_the_two_halves(captured):
    block, call, capture = captured
    gm = copy_graph_module(capture.graph_module)
    original = {n.name for n in gm.graph.nodes}
    value, ff = _linear(gm, "to_out"), _linear(gm, "ff")
    value.meta[TAG] = {"site": "to_out", "role": "self", "value": True}
    ExposeValues([value, ff], cfg_mean=[value])(gm)
    gm.recompile()
    new = [n for n in gm.graph.nodes if n.name not in original]
    assert [n.target for n in new] == [aten.chunk.default, operator.getitem, operator.getitem, aten.add.Tensor,
                                       aten.div.Tensor]
    assert new[0].args[0] is value and new[-1].args[1] == 2
    assert gm.graph.output_node().args[0][1:] == (new[-1], ff)
    assert all(n.meta["nn_module_stack"] == value.meta["nn_module_stack"] for n in new)
    assert all(n.meta[TAG] == {"site": "to_out", "role": "self"} for n in new)  # the tag, without "value"
    assert tuple(new[-1].meta["val"].shape) == (1, 6, 8)
    out = _run(gm, call)
    expected, values = _eager(block, call)
    uncond, cond = values["to_out"].chunk(2)
    assert torch.equal(out[0], expected)
    assert torch.equal(out[1], (uncond + cond) / 2)  # unconditional half first, (u + c) / 2 in that order
    assert not torch.equal(out[1], cond)
    assert torch.equal(out[2], values["ff"])  # not in cfg_mean: the whole batch


def test_expose_values_cfg_mean_refuses_an_odd_batch():
    g = torch.Generator().manual_seed(1)
    call = {"sample": torch.randn(3, 6, 8, generator=g), "context": torch.randn(3, 3, 8, generator=g)}
    gm = capture_denoiser(Block().eval(), call, store=None).graph_module
    value = _linear(gm, "to_out")
    with pytest.raises(ValueError, match=r"cfg_mean needs an even batch, linear_3 has \(3, 6, 8\)"):
        ExposeValues([value], cfg_mean=[value])(gm)


def test_passes_refuse_nodes_of_another_graph(captured):
    _, _, capture = captured
    node = _linear(capture.graph_module, "to_out")
    with pytest.raises(ValueError, match="node linear_3 is not in the graph"):
        ExposeValues([node])(copy_graph_module(capture.graph_module))
    with pytest.raises(ValueError, match="node linear_3 is not in the graph"):
        ReplaceValuesWithCache([(node, "cache_x")])(copy_graph_module(capture.graph_module))


# --- ReplaceValuesWithCache ----------------------------------------------------------------------------------------

def test_replace_values_with_cache_reads_new_inputs(captured):
    block, call, capture = captured
    gm = copy_graph_module(capture.graph_module)
    k, v = _linear(gm, "to_k"), _linear(gm, "to_v")
    k.meta[TAG] = {"site": "attn", "slot": "k", "value": True}
    users = set(k.users)
    assert ReplaceValuesWithCache([(k, "cache_k"), (v, "cache_v")])(gm).modified
    gm.recompile()
    assert _placeholders(gm) == ["sample", "context", "cache_k", "cache_v"]  # after the inputs, in order
    cache_k = next(n for n in gm.graph.nodes if n.name == "cache_k")
    assert cache_k.meta["val"] is k.meta["val"]
    assert cache_k.meta[TAG] == {"site": "attn", "slot": "k", "read": True}
    assert not k.users and not v.users and set(cache_k.users) == users  # every use reads the input now
    assert k in gm.graph.nodes  # left for EliminateDeadCode
    # numbers: the eager keys and values as caches give the eager output; other caches, the eager block with
    # to_k and to_v returning them
    expected, values = _eager(block, call)
    assert torch.equal(_run(gm, call, cache_k=values["to_k"], cache_v=values["to_v"])[0], expected)
    g = torch.Generator().manual_seed(2)
    other = {"to_k": torch.randn(2, 3, 8, generator=g), "to_v": torch.randn(2, 3, 8, generator=g)}
    got = _run(gm, call, cache_k=other["to_k"], cache_v=other["to_v"])[0]
    assert torch.equal(got, _eager(block, call, replace=other)[0])
    assert not torch.equal(got, expected)
    assert not ReplaceValuesWithCache([])(gm).modified


def test_replace_values_with_cache_refuses_names_that_clash(captured):
    _, _, capture = captured
    gm = copy_graph_module(capture.graph_module)
    with pytest.raises(ValueError, match="already has an input named 'context'"):
        ReplaceValuesWithCache([(_linear(gm, "to_k"), "context")])(gm)
    gm = copy_graph_module(capture.graph_module)
    with pytest.raises(ValueError, match="input name 'linear' clashes with a node of the graph"):
        ReplaceValuesWithCache([(_linear(gm, "to_k"), "linear")])(gm)
    gm = copy_graph_module(capture.graph_module)
    with pytest.raises(ValueError, match="already has an input named 'cache'"):
        ReplaceValuesWithCache([(_linear(gm, "to_k"), "cache"), (_linear(gm, "to_v"), "cache")])(gm)


# --- EliminateDeadCode, RemoveUnusedInputs ---------------------------------------------------------------------------

def test_eliminate_dead_code_drops_dead_attention_dropout_and_their_parameters(captured):
    block, call, capture = captured
    gm = copy_graph_module(capture.graph_module)
    ReplaceValuesWithCache([(_linear(gm, "to_out"), "cache_attn"),
                            (next(n for n in gm.graph.nodes if n.target is aten.dropout.default), "cache_ff")])(gm)
    # torch.fx's own DCE keeps the export IR's SDPA and dropout alive (it takes them for random ops)
    plain = copy_graph_module(gm)
    plain.graph.eliminate_dead_code()
    assert _count(plain, SDPA) == 1 and _count(plain, aten.dropout.default) == 1
    assert EliminateDeadCode()(gm).modified
    gm.recompile()
    assert _count(gm, SDPA) == 0 and _count(gm, aten.dropout.default) == 0
    assert [n for n in gm.graph.nodes if n.target is LINEAR] == [_linear(gm, "head")]
    assert _held(gm) == {"head.weight", "head.bias"}  # the variant holds only the weights it reads
    assert _placeholders(gm) == ["sample", "context", "cache_attn", "cache_ff"]  # placeholders stay
    assert set(dict(capture.graph_module.named_parameters())) == {f"{m}_{p}" for m in MODULES
                                                                  for p in ("weight", "bias")}  # capture untouched
    expected, values = _eager(block, call)
    assert torch.equal(_run(gm, call, cache_attn=values["to_out"], cache_ff=values["ff"])[0], expected)


def test_eliminate_dead_code_keeps_live_nodes_and_side_effects(captured):
    _, _, capture = captured
    gm = copy_graph_module(capture.graph_module)
    before = [n.name for n in gm.graph.nodes]
    assert not EliminateDeadCode()(gm).modified  # nothing dead: SDPA and dropout feed the output
    assert [n.name for n in gm.graph.nodes] == before and len(_held(gm)) == 2 * len(MODULES)
    # an in-place op nothing reads stays, a pure one goes
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(aten.add_.Tensor, (x, 1))
    graph.call_function(aten.mul.Tensor, (x, 2))
    graph.output((x,))
    toy = fx.GraphModule(torch.nn.Module(), graph)
    EliminateDeadCode()(toy)
    assert [n.target for n in toy.graph.nodes if n.op == "call_function"] == [aten.add_.Tensor]
    toy.recompile()
    assert toy(torch.zeros(2))[0].tolist() == [1.0, 1.0]


def test_eliminate_dead_code_drops_writes_into_a_dead_allocated_tensor():
    # Wan's rotary embedding: out = empty_like(x); out[..., 0::2] = a; out[..., 1::2] = b. The writes live as long
    # as out has a live reader; unread, out, its writes and what they read go (they kept whole blocks alive).
    def toy(read_out: bool, write_input: bool = False):
        graph = fx.Graph()
        x = graph.placeholder("x")
        half = graph.call_function(aten.slice.Tensor, (x, 0, 0, 2))
        a = graph.call_function(aten.mul.Tensor, (half, 2))
        out = graph.call_function(aten.empty_like.default, (x,))
        graph.call_function(aten.copy_.default, (graph.call_function(aten.slice.Tensor, (out, 0, 0, None, 2)), a))
        graph.call_function(aten.copy_.default, (graph.call_function(aten.slice.Tensor, (out, 0, 1, None, 2)), half))
        if write_input:  # a write into the graph's input is a side effect: it stays
            first = graph.call_function(aten.slice.Tensor, (a, 0, 0, 1))
            graph.call_function(aten.copy_.default, (graph.call_function(aten.slice.Tensor, (x, 0, 0, 1)), first))
        graph.output((graph.call_function(aten.add.Tensor, (out, 1)) if read_out else x,))
        return fx.GraphModule(torch.nn.Module(), graph)

    x = torch.arange(1.0, 5.0)
    live = toy(read_out=True)
    assert not EliminateDeadCode()(live).modified
    live.recompile()
    assert live(x.clone())[0].tolist() == [3.0, 2.0, 5.0, 3.0]
    dead = toy(read_out=False)
    assert EliminateDeadCode()(dead).modified
    assert [n.op for n in dead.graph.nodes] == ["placeholder", "output"]
    side = toy(read_out=False, write_input=True)
    EliminateDeadCode()(side)
    assert [n.target for n in side.graph.nodes if n.op == "call_function"] == [
        aten.slice.Tensor, aten.mul.Tensor, aten.slice.Tensor, aten.slice.Tensor, aten.copy_.default]
    side.recompile()
    assert side(x.clone())[0].tolist() == [2.0, 2.0, 3.0, 4.0]  # x[0] = 2 * x[0]


def test_remove_unused_inputs_drops_only_placeholders_nothing_reads(captured):
    block, call, capture = captured
    gm = copy_graph_module(capture.graph_module)
    ReplaceValuesWithCache([(_linear(gm, "to_k"), "cache_k"), (_linear(gm, "to_v"), "cache_v")])(gm)
    assert not RemoveUnusedInputs()(copy_graph_module(gm)).modified  # context still feeds the dead projections
    EliminateDeadCode()(gm)
    assert _placeholders(gm) == ["sample", "context", "cache_k", "cache_v"]
    assert RemoveUnusedInputs()(gm).modified
    gm.recompile()
    assert _placeholders(gm) == ["sample", "cache_k", "cache_v"]  # names and order kept
    assert not RemoveUnusedInputs()(gm).modified
    assert _held(gm) == {f"{m}.{p}" for m in MODULES if m not in ("to_k", "to_v") for p in ("weight", "bias")}
    expected, values = _eager(block, call)
    assert torch.equal(gm(call["sample"], values["to_k"], values["to_v"])[0], expected)


# --- DropPrediction ---------------------------------------------------------------------------------------------------

def test_drop_prediction_keeps_the_other_outputs_and_frees_what_only_it_needed(captured):
    block, call, capture = captured
    gm = copy_graph_module(capture.graph_module)
    to_out = _linear(gm, "to_out")
    ExposeValues([to_out])(gm)
    assert DropPrediction()(gm).modified
    assert gm.graph.output_node().args[0] == (None, to_out)
    EliminateDeadCode()(gm)
    gm.recompile()
    assert _count(gm, aten.dropout.default) == 0 and _count(gm, SDPA) == 1
    assert {n.meta["nn_module_stack"][next(reversed(n.meta["nn_module_stack"]))][0] for n in gm.graph.nodes
            if n.target is LINEAR} == {"to_q", "to_k", "to_v", "to_out"}
    assert _held(gm) == {f"{m}.{p}" for m in ("to_q", "to_k", "to_v", "to_out") for p in ("weight", "bias")}
    prediction, value = _run(gm, call)
    assert prediction is None
    assert torch.equal(value, _eager(block, call)[1]["to_out"])
    assert not DropPrediction()(gm).modified  # already dropped
    assert gm.graph.output_node().args[0] == (None, to_out)


def test_drop_prediction_refuses_a_graph_without_outputs():
    graph = fx.Graph()
    graph.placeholder("x")
    graph.output(())
    with pytest.raises(ValueError, match="no outputs to drop a prediction from"):
        DropPrediction()(fx.GraphModule(torch.nn.Module(), graph))


# --- new_node, call_traced, first_user ----------------------------------------------------------------------------

def test_new_node_carries_the_value_and_provenance(captured):
    block, call, capture = captured
    gm = copy_graph_module(capture.graph_module)
    to_out = _linear(gm, "to_out")
    with gm.graph.inserting_after(to_out):
        halves = new_node(gm.graph, aten.split.Tensor, (to_out, 4, -1), like=to_out)
    with gm.graph.inserting_after(halves):
        first = new_node(gm.graph, operator.getitem, (halves, 0), like=to_out)
    assert tuple(first.meta["val"].shape) == (2, 6, 4) and first.meta["val"].dtype == torch.float32
    assert detect_fake_mode([first.meta["val"]]) is detect_fake_mode([to_out.meta["val"]])  # the graph's fake mode
    for key in ("nn_module_stack", "stack_trace"):
        assert first.meta[key] == to_out.meta[key]
    gm.graph.output_node().args = ((*gm.graph.output_node().args[0], first),)
    gm.graph.lint()
    gm.recompile()
    out = _run(gm, call)
    assert torch.equal(out[1], _eager(block, call)[1]["to_out"][..., :4])


def test_call_traced_inserts_every_output_of_a_torch_function(captured):
    block, call, capture = captured
    gm = copy_graph_module(capture.graph_module)
    graph = gm.graph
    ff, to_out = _linear(gm, "ff"), _linear(gm, "to_out")
    output = graph.output_node()
    before = len(graph.nodes)

    def top_rows(a, b, k, *, scale):
        score = (a * scale).sum(-1)
        return score.argsort(-1, True)[:, :k], a - b

    with graph.inserting_before(output):
        index, diff = call_traced(graph, top_rows, ff, to_out, 3, like=ff, scale=0.5)
    assert index.meta["val"].shape == (2, 3) and index.meta["val"].dtype == torch.int64
    assert diff.meta["val"].shape == (2, 6, 8)
    new = list(graph.nodes)[before - 1:-1]  # right before the output, in order
    assert len(new) == len(graph.nodes) - before and index in new and diff in new
    assert all(n.meta["nn_module_stack"] == ff.meta["nn_module_stack"] for n in new)
    output.args = ((*output.args[0], index, diff),)
    graph.lint()
    gm.recompile()
    out = _run(gm, call)
    _, values = _eager(block, call)
    assert torch.equal(out[1], (values["ff"] * 0.5).sum(-1).argsort(-1, True)[:, :3])
    assert torch.equal(out[2], values["ff"] - values["to_out"])


def test_call_traced_needs_fake_values():
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.zeros(2)  # a real tensor: no fake mode to trace in
    with pytest.raises(ValueError, match=r"call_traced\(neg\) needs fake values"):
        call_traced(graph, torch.neg, x, like=x)


def test_first_user_is_the_earliest_user(captured):
    _, _, capture = captured
    gm = copy_graph_module(capture.graph_module)
    sample = next(n for n in gm.graph.nodes if n.name == "sample")
    assert first_user(sample) is _linear(gm, "to_q")  # not the residual add, which comes later
    assert first_user(gm.graph.output_node()) is None
    dead = [n for n in gm.graph.nodes if n.op == "get_attr"][0]
    with gm.graph.inserting_after(dead):
        lonely = gm.graph.call_function(aten.neg.default, (dead,))
    assert first_user(lonely) is None
