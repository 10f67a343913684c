"""Regional compilation (``compile={"regional": True}``): each distinct block compiled once, shared by every variant."""

import operator

import pytest
import torch
import torch.fx as fx
from torch._dynamo.utils import counters

import tgate_fx
from conftest import latents
from tgate_fx.core.blockwise import RegionalCompiler, region_of, split_regions
from tgate_fx.tiny import tiny_pipeline

STEPS = 8
METHODS = {
    "tgate": [tgate_fx.TGateConfig(gate_step=4, sp_interval=2, fi_interval=2, warm_up=1)],
    "deepcache": [tgate_fx.DeepCacheConfig(cache_interval=3, cache_branch_id=0)],
}


class CountingBackend:
    """A dynamo backend that runs the captured graph as it is (like ``"eager"``) and records each one."""

    def __init__(self):
        self.graphs: list[str] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm.code)
        return gm.forward


def _snapshot():
    return {k: dict(v) for k, v in counters.items() if v}


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(METHODS))
def test_each_distinct_region_compiles_once_and_the_second_generation_compiles_nothing(name):
    backend = CountingBackend()
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), methods=METHODS[name],
                             compile={"backend": backend, "regional": True})
    torch._dynamo.reset()
    counters.clear()
    runtime = tgate_fx.get_runtime(pipe)
    with runtime.tracing() as trace:
        first = latents(pipe, num_inference_steps=STEPS)
    stats = runtime._compiler.stats()
    variants = {id(v) for _, _, v in trace}
    assert stats["graphs"] == len(variants) >= 2 and stats["whole"] == 0
    # one dynamo graph per distinct region, no more: shared across sites and variants
    assert len(backend.graphs) == counters["stats"]["unique_graphs"] == stats["regions"]
    assert stats["sites"] > stats["regions"], stats
    assert not counters.get("graph_break")

    counters.clear()
    second = latents(pipe, prompt="a green star at night", seed=7, num_inference_steps=STEPS)
    assert _snapshot() == {}, "the second generation must not compile or recompile anything"
    assert len(backend.graphs) == stats["regions"]
    assert not torch.equal(first, second)

    # the captured aten ops run unchanged, in the same order: bit-exact with the uncompiled runtime
    reference = tgate_fx.optimize(tiny_pipeline("sd15"), methods=METHODS[name])
    assert torch.equal(first, latents(reference, num_inference_steps=STEPS))


@pytest.mark.e2e
def test_a_block_shared_by_variants_and_sites_has_one_code():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), methods=METHODS["tgate"])
    runtime = tgate_fx.get_runtime(pipe)
    with runtime.tracing() as trace:
        latents(pipe, num_inference_steps=STEPS)
    compiler = RegionalCompiler(lambda fn: fn)
    graphs = {v.name: v.graph_module for _, _, v in trace}
    for gm in graphs.values():
        compiler(gm)
    # two resnets of one shape (down_blocks.0.resnets.0 and .1 of the tiny UNet, or any repeated pair) at the
    # CFG batch: the same region in every batch-2 variant
    most_shared = max(c.sites for c in compiler.compiled.values())
    assert most_shared >= len([n for n in graphs if n != "fi_record" and n != "fi_reuse"])
    regions = split_regions(graphs["sp_compute"].graph)
    labels = [r.label for r in regions]
    assert "down_blocks.0.resnets.0" in labels and "down_blocks.0.attentions.0" in labels
    assert "mid_block.attentions.0.transformer_blocks.0" in labels
    # a getitem stays in the region of the node it reads
    for r in regions:
        for n in r.nodes:
            if n.target is operator.getitem and n.args[0].op == "call_function":
                assert n.args[0] in r.nodes or n.args[0] is r.nodes[0].prev


@pytest.mark.parametrize("path, region", [
    ("down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.0"),
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0", "down_blocks.0.attentions.1"),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", "mid_block.attentions.0.transformer_blocks.0"),
    ("transformer_blocks.7.ff.net.2", "transformer_blocks.7"),
    ("time_embedding.linear_1", "time_embedding"),
    ("", None),
])
def test_region_of_a_module_path(path, region):
    graph = fx.Graph()
    node = graph.placeholder("x")
    node.meta["nn_module_stack"] = {"L__self__": ("", object), "inner": (path, object)}
    assert region_of(node) == region


def test_a_graph_that_cannot_be_split_is_compiled_whole():
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))  # call_module nodes
    whole = []
    compiler = RegionalCompiler(lambda fn: whole.append(fn) or fn)
    run = compiler(gm)
    x = torch.randn(2, 4)
    assert torch.equal(run(x), gm(x))
    assert len(whole) == 1 and compiler.stats()["whole"] == 1
    assert "call_module" in compiler.fallbacks[0]
