"""The method interface, exercised whole by a toy method on a hand-built module, in milliseconds.

The toy method caches the output of a module ``block1`` on even steps and
reuses it on odd ones (a "record"/"reuse" pair), scales the input of
``block0`` by a factor through its own transform pass, which also writes a
cache of its own (a "transform" with a :class:`CacheIO`), reads the
:class:`ScheduleContext` (timesteps, the other methods' barriers and dropped
halves), and is bound to its denoiser without its config being mutated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.fx as fx

from tgate_fx.core.capture import capture_denoiser
from tgate_fx.core.graph_passes import GraphPass, PassResult, new_node
from tgate_fx.core.meta import tag_key
from tgate_fx.core.method import (RECORD, REUSE, TRANSFORM, CacheKey, Method, MethodStep, Rewrite, ScheduleContext,
                                  as_methods)
from tgate_fx.core.plan import Plan
from tgate_fx.core.variants import CapturedGraphs, walk_plan


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block0 = torch.nn.Linear(4, 4)
        self.block1 = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 4)

    def forward(self, sample, return_dict=True):
        h = self.block0(sample).relu()
        return (self.head(h + self.block1(h)),)


@dataclass(frozen=True)
class ToyConfig:
    scale: float = 2.0
    width: int | None = None  # derived from the denoiser by bind

    def to_dict(self):
        return {"scale": self.scale, "width": self.width}


class _Scale(GraphPass):
    """Multiply the tagged nodes' values by ``factor``; write the scaled value to a cache of its own."""

    def __init__(self, nodes, factor, caches):
        self.nodes, self.factor, self.caches = nodes, factor, caches

    def call(self, gm: fx.GraphModule) -> PassResult:
        for node in self.nodes:
            with gm.graph.inserting_after(node):
                scaled = new_node(gm.graph, torch.ops.aten.mul.Tensor, (node, self.factor), like=node)
            node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
            self.caches.write(CacheKey("toy", "block0", "scaled"), scaled)
        return PassResult(gm, bool(self.nodes))


class Toy(Method):
    name = "toy"
    title = "Toy"
    config_class = ToyConfig

    def bind(self, denoiser):
        if not hasattr(denoiser, "block1"):
            raise TypeError(f"Toy cannot apply to {type(denoiser).__name__}: it has no block1")
        return Toy(replace(self.config, width=denoiser.block1.in_features))

    def annotate(self, gm, regions):
        key = tag_key(self.name)
        regions.output_of("block1").meta[key] = {"group": "out", "site": "block1", "slot": "out"}
        regions.output_of("block0").meta[key] = {"group": "input", "site": "block0", "slot": "in"}

    def barriers(self, ctx):
        return frozenset({0})

    def validate(self, ctx):
        if ctx.num_steps < 2:
            raise ValueError("Toy needs two steps")

    def schedule(self, ctx: ScheduleContext):
        out = []
        for i in range(ctx.num_steps):
            scale = Rewrite(self.name, "input", TRANSFORM, option=self.config.scale)
            if i % 2 == 0 or i in ctx.barriers:
                out.append(MethodStep("toy_record", frozenset({Rewrite(self.name, "out", RECORD), scale})))
            else:
                out.append(MethodStep("toy_reuse", frozenset({Rewrite(self.name, "out", REUSE), scale}),
                                      drops_uncond=ctx.timesteps is not None and ctx.timesteps[i] < 0))
        return out

    def transform_pass(self, nodes, option, caches):
        return _Scale(nodes, option, caches)


class Observer(Method):
    """A second method that only reads the context the plan gives it."""

    name = "observer"
    title = "Observer"
    config_class = dict
    seen: list = []

    def annotate(self, gm, regions):
        pass

    def barriers(self, ctx):
        return frozenset({3})

    def schedule(self, ctx):
        Observer.seen.append(ctx)
        return [MethodStep("obs")] * ctx.num_steps


def _oracle(module, x, steps, scale):
    """Eager: block0's output scaled; block1's output recorded on even steps, reused on odd ones."""
    outs, cached = [], None
    for i in range(steps):
        h = (module.block0(x) * scale).relu()
        if i % 2 == 0:
            cached = module.block1(h)
        outs.append(module.head(h + cached))
    return outs


def test_toy_method_runs_the_whole_interface():
    module = Tiny().eval()
    config = ToyConfig()
    toy = Toy(config).bind(module)
    assert toy.config.width == 4 and config.width is None  # bound, the user's config untouched
    with pytest.raises(TypeError, match="Toy cannot apply to Linear"):
        Toy(config).bind(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Toy needs two steps"):
        Plan(1, toy, cfg=False)

    x = torch.randn(2, 4)
    capture = capture_denoiser(module, {"sample": x}, store=None)
    graphs = CapturedGraphs.from_capture(capture, [toy])
    plan = Plan(4, toy, cfg=False)
    assert [s.variant.name for s in plan.steps] == ["toy_record", "toy_reuse", "toy_record", "toy_reuse"]
    caches: dict = {}
    expected = _oracle(module, x, 4, config.scale)
    with torch.no_grad():
        for step, (_, variant) in zip(plan.steps, walk_plan(plan, lambda s: graphs)):
            inputs = {"sample": x, **{name: caches[key] for key, name in variant.cache_inputs.items()}}
            prediction, *written = variant(inputs)
            caches.update(zip(variant.records, written))
            assert torch.equal(prediction, expected[step.step]), step
            assert CacheKey("toy", "block0", "scaled") in variant.records  # the transform's own write
    reuse = graphs.variant(plan.steps[1].variant)
    assert not any("block1" in str(n.meta.get("nn_module_stack", "")) for n in reuse.graph_module.graph.nodes
                   if n.op == "call_function")  # block1 is dead code where its output is reused


def test_schedule_context_holds_the_other_methods_barriers_and_dropped_halves():
    Observer.seen.clear()
    toy = Toy(ToyConfig())
    plan = Plan(4, [toy, Observer({})], cfg=True, timesteps=[3, -1, 2, 1])
    ctx = Observer.seen[-1]
    assert ctx == ScheduleContext(4, True, (3.0, -1.0, 2.0, 1.0), barriers=frozenset({0}),
                                  drops_uncond=frozenset({1}))
    assert not ctx.pairs(1) and ctx.pairs(2)
    assert plan.steps[3].variant.name == "toy_record+obs"  # Observer's barrier at 3 makes Toy record there
    assert plan.steps[1].drops_uncond and not plan.steps[1].cfg


def test_as_methods_refuses_a_method_twice_and_keeps_registration_order():
    with pytest.raises(ValueError, match="each method may appear once"):
        as_methods([Toy(ToyConfig()), Toy(ToyConfig())])
    with pytest.raises(ValueError, match="timesteps must have one value per step"):
        Plan(4, Toy(ToyConfig()), cfg=False, timesteps=[1, 2])
