"""DeepCache as a tgate_fx method: equal to the published code, alone and with T-GATE; graphs; errors.

The oracles are the published packages, run by ``reference_deepcache.py``:
``DeepCache==0.1.1`` (``DeepCacheSDHelper``, uniform mode) and
``tgate==1.0.0`` (``TgateSDDeepCacheLoader`` / ``TgateSDXLDeepCacheLoader``).
Same tiny models, seeds and settings; final latents, fp32, bit for bit.
"""

import pytest
import torch

import tgate_fx
from conftest import latents
from tgate_fx.tiny import tiny_pipeline
from tgate_fx import DeepCacheConfig, TGateConfig
from tgate_fx.core.analysis import TAG
from tgate_fx.core.captured import parameter_paths

pytest.importorskip("DeepCache")
pytest.importorskip("tgate")

from reference_deepcache import deepcache_latents, tgate_deepcache_latents  # noqa: E402

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

STEPS = 8

# (family, cache_interval, cache_branch_id): branch 0 is the published default; 1-5 cut deeper.
ALONE = [("sd15", 3, 0), ("sd15", 2, 1), ("sd15", 4, 5), ("sdxl", 3, 0), ("sdxl", 2, 2), ("sdxl", 3, 4),
         ("sd21", 3, 0), ("sd15_img2img", 3, 0), ("sd15_controlnet", 2, 1)]


@pytest.mark.parametrize("family,interval,branch", ALONE, ids=[f"{f}-{i}-{b}" for f, i, b in ALONE])
def test_deepcache_equals_published_helper(family, interval, branch):
    expected = deepcache_latents(family, interval, branch, STEPS)
    pipe = tgate_fx.optimize(tiny_pipeline(family), deepcache=DeepCacheConfig(interval, branch))
    got = latents(pipe, num_inference_steps=STEPS)
    assert torch.equal(got, expected), (got - expected).abs().max().item()
    plan = tgate_fx.get_runtime(pipe).last_plan
    assert [s.variant.name for s in plan.steps[:2]] == ["dc_full", "dc_partial"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_deepcache_interval_1_is_the_original_pipeline(family):
    pipe = tiny_pipeline(family)
    plain = latents(pipe, num_inference_steps=STEPS)
    tgate_fx.optimize(pipe, deepcache=DeepCacheConfig(cache_interval=1))
    assert torch.equal(latents(pipe, num_inference_steps=STEPS), plain)


# The published setting of T-GATE + DeepCache (tgate README) and one other.
COMPOSED = [("sd15", (10, 1, 1, 0), (3, 0), 25), ("sdxl", (10, 1, 1, 0), (3, 0), 25),
            ("sd15", (5, 2, 2, 1), (2, 1), 12), ("sdxl", (4, 3, 1, 2), (3, 2), 10)]


@pytest.mark.parametrize("family,tgate,deepcache,steps", COMPOSED,
                         ids=[f"{c[0]}-{'-'.join(map(str, c[1] + c[2]))}" for c in COMPOSED])
def test_tgate_with_deepcache_equals_published_loader(family, tgate, deepcache, steps):
    expected = tgate_deepcache_latents(family, *tgate, *deepcache, steps)
    pipe = tgate_fx.optimize(tiny_pipeline(family), tgate=TGateConfig(*tgate), deepcache=DeepCacheConfig(*deepcache))
    got = latents(pipe, num_inference_steps=steps)
    assert torch.equal(got, expected), (got - expected).abs().max().item()


def _unet_blocks(variant):
    """Top-level UNet blocks (down_blocks.i, mid_block, up_blocks.i) with any computation left in ``variant``."""
    blocks = set()
    for node in variant.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            parts = path.split(".")
            if parts[0] in ("down_blocks", "up_blocks"):
                blocks.add(".".join(parts[:2]))
            elif parts[0] == "mid_block":
                blocks.add("mid_block")
    return blocks


def test_partial_steps_leave_no_deep_block_work():
    pipe = tgate_fx.optimize(tiny_pipeline("sdxl"), deepcache=DeepCacheConfig(3, 0))
    latents(pipe, num_inference_steps=4)
    graphs = tgate_fx.get_runtime(pipe).captures[0]
    variants = {v.name: v for v in graphs.variants.values()}
    full, partial = variants["dc_full"], variants["dc_partial"]
    ups = graphs.regions.children("", "up_blocks")
    last = ups[-1]
    assert _unet_blocks(full) == {*graphs.regions.children("", "down_blocks"), "mid_block", *ups}
    # Branch 0 on SD-XL: only the last up block's last resnet runs (its first down block has no attention).
    assert _unet_blocks(partial) == {last}
    modules = {path for n in partial.graph_module.graph.nodes if n.op == "call_function"
               for path, _ in (n.meta.get("nn_module_stack") or {}).values() if path.startswith(last + ".")}
    resnets = graphs.regions.children(last, "resnets")
    assert {m for m in modules if m.count(".") == 3} == {resnets[-1]}
    assert not any(n.meta.get(TAG) for n in partial.graph_module.graph.nodes if n.op == "call_function")
    # the deep blocks' weights are not even held by the partial variant
    params = set(parameter_paths(partial.graph_module).values())
    assert not any(p.startswith(("mid_block.", "down_blocks.", ups[0] + ".")) for p in params)
    assert partial.input_names[-1] == "cache_deepcache_" + resnets[-1].replace(".", "_") + "_input"
    assert full.records == partial.reads and len(full.records) == 1


def test_composed_variants_are_built_once_per_distinct_union():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), tgate=TGateConfig(4, 1, 1, 0), deepcache=DeepCacheConfig(3, 0))
    latents(pipe, num_inference_steps=10)
    runtime = tgate_fx.get_runtime(pipe)
    names = [s.variant.name for s in runtime.last_plan.steps]
    built = sorted(v.name for c in runtime.captures for v in c.variants.values())
    assert built == sorted(set(names))
    # at the gate step T-GATE records every site (DeepCache restarted: a full step) as the CFG mean
    gate = next(v for c in runtime.captures for v in c.variants.values() if v.name == "gate+dc_full")
    assert {k.method for k in gate.records} == {"tgate", "deepcache"}
    sites = runtime.captures[0].sites
    assert len([k for k in gate.records if k.method == "tgate"]) == len([s for s in sites if s.role != "other"])


def test_deepcache_on_a_transformer_is_refused_by_optimize():
    pipe = tgate_fx.optimize(tiny_pipeline("pixart_alpha"))
    with pytest.raises(TypeError, match="DeepCache needs a UNet"):
        tgate_fx.optimize(pipe, deepcache=DeepCacheConfig())


def test_branch_beyond_the_unet_is_refused():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"))
    with pytest.raises(ValueError, match="cache_branch_id=30 points at down block 10, but this UNet has"):
        tgate_fx.optimize(pipe, deepcache=DeepCacheConfig(cache_interval=2, cache_branch_id=30))
    assert [m.name for m in tgate_fx.get_runtime(pipe).methods] == ["tgate"]  # left as it was


def test_methods_rewriting_the_same_node_differently_are_refused():
    from tgate_fx.core.method import RECORD, REUSE, Method, MethodStep, Rewrite, tag_key
    from tgate_fx.core.plan import VariantSpec
    from tgate_fx.core.variants import resolve

    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), gate_step=2)
    latents(pipe, num_inference_steps=3)
    graphs = tgate_fx.get_runtime(pipe).captures[0]
    graph = graphs.capture.graph_module.graph
    value = next(n for n in graph.nodes if n.meta.get(tag_key("tgate"), {}).get("group") == "cross")
    value.meta[tag_key("other")] = {"group": "g", "site": "elsewhere", "slot": "out"}
    try:
        spec = VariantSpec("clash", frozenset([Rewrite("tgate", "cross", REUSE), Rewrite("other", "g", REUSE)]))
        with pytest.raises(ValueError, match="methods 'other' and 'tgate' cannot be composed"):
            resolve(graph, spec)
        # a record of a value another method reads from its cache records what the step uses (ToCa + T-GATE)
        spec = VariantSpec("read", frozenset([Rewrite("tgate", "cross", REUSE), Rewrite("other", "g", RECORD)]))
        resolved = resolve(graph, spec)
        assert [k.method for k, _ in resolved.records] == ["other"] and "tgate" in {k.method for k in resolved.reads}
    finally:
        del value.meta[tag_key("other")]


def test_optimize_keywords():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"))
    runtime = tgate_fx.get_runtime(tgate_fx.optimize(pipe, methods=[DeepCacheConfig(2), TGateConfig(3)]))
    assert [m.name for m in runtime.methods] == ["tgate", "deepcache"]
    runtime = tgate_fx.get_runtime(tgate_fx.optimize(pipe, deepcache=DeepCacheConfig(2)))
    assert [m.name for m in runtime.methods] == ["deepcache"]
    runtime = tgate_fx.get_runtime(tgate_fx.optimize(pipe, gate_step=3, deepcache=DeepCacheConfig(2)))
    assert [m.describe() for m in runtime.methods] == [
        "gate_step=3, sp_interval=5, fi_interval=1, warm_up=2", "cache_interval=2, cache_branch_id=0"]
    with pytest.raises(TypeError, match="given twice"):
        tgate_fx.optimize(pipe, gate_step=3, tgate=TGateConfig())
    with pytest.raises(TypeError, match="methods=\\[...\\] alone"):
        tgate_fx.optimize(pipe, gate_step=3, methods=[TGateConfig()])
    with pytest.raises(TypeError, match="deepcache must be a DeepCacheConfig"):
        tgate_fx.optimize(pipe, deepcache=3)


def _published_step_macs(family, settings, deepcache, steps):
    """Linear+Conv MACs of each UNet call the published T-GATE + DeepCache makes (forward hooks on the leaves)."""
    import tgate

    from reference_deepcache import TGATE_DEEPCACHE_LOADERS

    reference = getattr(tgate, TGATE_DEEPCACHE_LOADERS[family])(tiny_pipeline(family), *deepcache)
    unet, per_call, handles = reference.unet, [], []
    handles.append(unet.register_forward_pre_hook(lambda m, a, k: per_call.append(0), with_kwargs=True))

    def count(module, args, out):
        k = module.in_features if isinstance(module, torch.nn.Linear) else \
            module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        per_call[-1] += out.numel() * k

    for module in unet.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            handles.append(module.register_forward_hook(count))
    try:
        reference.tgate("a red circle on a blue background", generator=torch.Generator().manual_seed(0),
                        num_inference_steps=steps, output_type="latent", gate_step=settings[0],
                        sp_interval=settings[1], fi_interval=settings[2], warm_up=settings[3],
                        **reference.tiny_call_kwargs)
    finally:
        for h in handles:
            h.remove()
        reference.deepcache.disable()
    return per_call


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_each_step_computes_what_the_published_code_computes(family):
    """Per step, the MACs of our variant equal those of the modules the published code runs (hooks)."""
    from tgate_fx.accounting.macs import count_macs

    tgate, deepcache, steps = (4, 1, 1, 0), (3, 0), 10
    expected = _published_step_macs(family, tgate, deepcache, steps)
    pipe = tgate_fx.optimize(tiny_pipeline(family), tgate=TGateConfig(*tgate), deepcache=DeepCacheConfig(*deepcache))
    with tgate_fx.get_runtime(pipe).tracing() as trace:
        latents(pipe, num_inference_steps=steps)
    got = [count_macs(variant).total for _, _, variant in trace]
    assert got == expected
