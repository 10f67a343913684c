"""ToDo as a tgate_fx method: equal to an eager oracle of the official processor, alone and composed; graphs; errors.

The oracle (``oracle_todo.py``) is an ``AttnProcessor2_0`` subclass on the
eager denoiser's self-attention modules that downsamples the keys/values as
the official ``merge.py: up_or_downsample`` does, choosing the level with
the official ``ceil(sqrt(H*W // N))``. Composed oracles: T-GATE's eager
oracle (``oracle.py``, caching processors) with the ToDo processor as its
inner processor on self-attention; the published ``DeepCacheSDHelper``
(``reference_deepcache.py``) on the eager UNet carrying the ToDo processors;
all three: the published ``tgate`` T-GATE + DeepCache loader with ToDo as the
official code installs it (pre-hooks on ``to_k``/``to_v``,
``oracle_todo.install_todo_hooks``). Final latents, fp32.
"""

import contextlib

import pytest
import torch

import tgate_fx
from conftest import eager_denoiser, latents
from tgate_fx.tiny import tiny_pipeline
from oracle import OracleDenoiser
from oracle_todo import install_todo
from tgate_fx import DeepCacheConfig, TGateConfig, ToDoConfig
from tgate_fx.core.analysis import TAG
from tgate_fx.methods.todo.config import auto_factor

STEPS = 3
TOL = 1e-5
aten = torch.ops.aten


def _denoiser(pipe):
    return tgate_fx.get_runtime(pipe).denoiser


def _oracle_latents(pipe, factors, mode, skip_timestep_zero=False, steps=STEPS, **call):
    denoiser = _denoiser(pipe)
    with eager_denoiser(pipe):
        state, undo = install_todo(denoiser, factors, mode, skip_timestep_zero=skip_timestep_zero)
        try:
            return latents(pipe, num_inference_steps=steps, **call), state
        finally:
            undo()


# (family, (depth-1, depth-2, deeper factors), mode, height/width px). Tiny latents are px / 2:
# 32 px -> a 16x16 latent; 48 px -> 24x24, whose depth-1 (24) and depth-2 (12) grids 3 divides.
# SD-XL and PixArt have self-attention at depth 2 only.
CASES = [
    ("sd15", (2, 2, 1), "nearest", (32, 32)),
    ("sd15", (2, 2, 1), "nearest-exact", (32, 32)),
    ("sd15", (2, 1, 1), "avg_pool", (32, 32)),
    ("sd15", (2, 2, 1), "max_pool", (32, 32)),
    ("sd15", (3, 3, 1), "nearest", (48, 48)),
    ("sd15", (3, 1, 1), "avg_pool", (48, 48)),
    ("sd15", (2, 2, 1), "nearest", (48, 32)),  # non-square: 24x16 and 12x8 grids
    ("sdxl", (1, 2, 1), "nearest", (32, 32)),
    ("sdxl", (1, 2, 1), "max_pool", (32, 32)),
    ("sdxl", (1, 3, 1), "nearest-exact", (48, 48)),
    ("pixart_alpha", (1, 2, 1), "nearest-exact", (32, 32)),
    ("pixart_alpha", (1, 2, 1), "avg_pool", (32, 32)),
    ("pixart_alpha", (1, 3, 1), "max_pool", (48, 48)),
]


@pytest.mark.e2e
@pytest.mark.parametrize("family,factors,mode,size", CASES,
                         ids=[f"{c[0]}-{''.join(map(str, c[1]))}-{c[2]}-{c[3][0]}x{c[3][1]}" for c in CASES])
def test_todo_equals_eager_oracle(family, factors, mode, size):
    pipe = tgate_fx.optimize(tiny_pipeline(family))
    call = {"height": size[0], "width": size[1]}
    expected, state = _oracle_latents(pipe, factors, mode, **call)
    assert any(kv < n for n, kv in state.calls), "the oracle downsampled nothing: the case tests nothing"
    tgate_fx.optimize(pipe, todo=ToDoConfig(*factors, mode=mode))
    with tgate_fx.get_runtime(pipe).tracing() as trace:
        got = latents(pipe, num_inference_steps=STEPS, **call)
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, diff
    # Every self-attention call of the graph that ran has the key/value length the oracle used.
    variant = trace[0][2]
    graph_kv = sorted((q, k) for q, k, role in _sdpa_lengths(variant) if role == "self")
    assert graph_kv == sorted(state.calls[:len(graph_kv)])


def _sdpa_lengths(variant):
    """(query tokens, key/value tokens, role) of every attention core of a variant."""
    out = []
    for node in variant.graph_module.graph.nodes:
        if node.op == "call_function" and node.target is aten.scaled_dot_product_attention.default:
            q, k = (a.meta["val"] for a in node.args[:2])
            out.append((q.shape[-2], k.shape[-2], node.meta[TAG]["role"]))
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["sd15", "pixart_alpha"])
def test_factor_1_is_the_original_pipeline_bit_for_bit(family):
    pipe = tgate_fx.optimize(tiny_pipeline(family))
    with eager_denoiser(pipe):
        plain = latents(pipe, num_inference_steps=STEPS)
    tgate_fx.optimize(pipe, todo=ToDoConfig(factor=1, factor_depth2=1, factor_deeper=1))
    assert torch.equal(latents(pipe, num_inference_steps=STEPS), plain)
    tgate_fx.optimize(pipe, todo=ToDoConfig(factor="auto"))  # 16x16 latent: auto picks 1
    assert torch.equal(latents(pipe, num_inference_steps=STEPS), plain)


@pytest.mark.e2e
def test_cross_attention_and_queries_untouched_in_the_graph():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), todo=ToDoConfig(2, 2, 2, mode="avg_pool"))
    latents(pipe, num_inference_steps=STEPS)
    graphs = tgate_fx.get_runtime(pipe).captures[0]
    (variant,) = [v for v in graphs.variants.values()]
    lengths = _sdpa_lengths(variant)
    text = graphs.capture.graph_module.graph.find_nodes(op="placeholder", target="encoder_hidden_states")[0]
    text_len = text.meta["val"].shape[1]
    sites = {s.path: s for s in graphs.sites}
    assert {(q, k) for q, k, role in lengths if role == "cross"} == {(256, text_len), (64, text_len)}
    assert {(q, k) for q, k, role in lengths if role == "self"} == {(256, 64), (64, 16)}
    for node in variant.graph_module.graph.nodes:
        tag = node.meta.get(TAG)
        if tag and tag.get("value"):  # every attention output keeps its N tokens
            assert tuple(node.meta["val"].shape) == sites[tag["site"]].value_shape
    pools = [n for n in variant.graph_module.graph.nodes if n.target is aten.avg_pool2d.default]
    assert len(pools) == sum(s.role == "self" for s in graphs.sites)
    assert all(n.meta[TAG]["role"] == "self" and "val" in n.meta for n in pools)


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_todo_with_tgate_equals_composed_oracle(family):
    """T-GATE oracle (caching processors) with the ToDo processor inside each self-attention's."""
    settings = dict(gate_step=4, sp_interval=2, fi_interval=2, warm_up=0)
    steps = 6
    factors = (2, 2, 1)
    pipe = tgate_fx.optimize(tiny_pipeline(family))
    installed = getattr(pipe, "unet")
    oracle = OracleDenoiser(_denoiser(pipe), cfg=True, **settings)
    _, undo = install_todo(oracle.denoiser, factors, "nearest",
                           wrap=lambda name, module, todo: _with_inner(module.processor, todo))
    object.__setattr__(pipe, "unet", oracle)
    try:
        expected = latents(pipe, num_inference_steps=steps)
    finally:
        undo()
        oracle.close()
        object.__setattr__(pipe, "unet", installed)
    tgate_fx.optimize(pipe, tgate=TGateConfig(**settings), todo=ToDoConfig(*factors))
    got = latents(pipe, num_inference_steps=steps)
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, diff
    labels = [s.variant.name for s in tgate_fx.get_runtime(pipe).last_plan.steps]
    assert {"sp_reuse+todo", "gate+todo", "fi_reuse+todo"} <= set(labels), labels


def _with_inner(processor, inner):
    processor.inner = inner
    return processor


@pytest.mark.e2e
@pytest.mark.parametrize("family,interval,branch", [("sd15", 3, 0), ("sdxl", 2, 1)])
def test_todo_with_deepcache_equals_published_helper_on_todo_processors(family, interval, branch):
    pytest.importorskip("DeepCache")
    from reference_deepcache import deepcache_latents

    steps = 5
    factors = (2, 2, 1)
    pipe = tgate_fx.optimize(tiny_pipeline(family))
    denoiser = _denoiser(pipe)
    with eager_denoiser(pipe):
        _, undo = install_todo(denoiser, factors, "max_pool")
        try:
            expected = deepcache_latents(family, interval, branch, steps, pipe=pipe)
        finally:
            undo()
    tgate_fx.optimize(pipe, deepcache=DeepCacheConfig(interval, branch), todo=ToDoConfig(*factors, mode="max_pool"))
    got = latents(pipe, num_inference_steps=steps)
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, diff
    assert [s.variant.name for s in tgate_fx.get_runtime(pipe).last_plan.steps[:2]] == ["dc_full+todo",
                                                                                      "dc_partial+todo"]


@contextlib.contextmanager
def _scheduler(pipe, scheduler_cls, **config):
    """``pipe.scheduler`` replaced by ``scheduler_cls`` (same betas, ``config`` overrides) within the block."""
    saved = pipe.scheduler
    pipe.scheduler = scheduler_cls.from_config(saved.config, **config)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = saved


# Schedulers whose last timestep is 0 (checked in the test): Euler with "linspace" spacing (999, 666, 333, 0.0),
# DDIM with "leading" spacing and steps_offset=0 (750, 500, 250, 0).
ZERO_SCHEDULERS = [("sd15", "EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
                   ("sdxl", "DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 0}),
                   ("pixart_alpha", "DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 0})]


@pytest.mark.e2e
@pytest.mark.parametrize("family,scheduler,config", ZERO_SCHEDULERS, ids=[f"{c[0]}-{c[1]}" for c in ZERO_SCHEDULERS])
def test_step_at_timestep_zero_is_not_downsampled_as_in_the_official_code(family, scheduler, config):
    import diffusers

    pipe = tgate_fx.optimize(tiny_pipeline(family))
    factors = (2, 2, 1)
    steps = 4
    with _scheduler(pipe, getattr(diffusers, scheduler), **config):
        expected, state = _oracle_latents(pipe, factors, "nearest", skip_timestep_zero=True, steps=steps)
        every_step, _ = _oracle_latents(pipe, factors, "nearest", steps=steps)
        assert (expected - every_step).abs().max().item() > 1e-4, "the timestep-0 rule changes nothing here"
        tgate_fx.optimize(pipe, todo=ToDoConfig(*factors))  # skip_timestep_zero=True is the default
        with tgate_fx.get_runtime(pipe).tracing() as trace:
            got = latents(pipe, num_inference_steps=steps)
        plan = tgate_fx.get_runtime(pipe).last_plan
        assert plan.timesteps[-1] == 0.0 and plan.timesteps[0] > 0
        assert [s.variant.name for s in plan.steps] == ["todo"] * (steps - 1) + ["todo_off"]
        diff = (got - expected).abs().max().item()
        assert diff <= TOL, diff
        # the last step ran the graph with every self-attention at full length, the others downsampled
        assert {q == k for q, k, role in _sdpa_lengths(trace[-1][2]) if role == "self"} == {True}
        assert {q == k for q, k, role in _sdpa_lengths(trace[0][2]) if role == "self"} == {False}
        # without the rule, every step is downsampled (the oracle's other run)
        tgate_fx.optimize(pipe, todo=ToDoConfig(*factors, skip_timestep_zero=False))
        assert (latents(pipe, num_inference_steps=steps) - every_step).abs().max().item() <= TOL
    # schedules that never reach 0 keep one graph
    tgate_fx.optimize(pipe, todo=ToDoConfig(*factors))
    latents(pipe, num_inference_steps=steps)
    assert {s.variant.name for s in tgate_fx.get_runtime(pipe).last_plan.steps} == {"todo"}


def test_plan_without_timesteps_assumes_none_is_zero():
    config = ToDoConfig(2)
    assert [s.variant.name for s in tgate_fx.Plan(3, config, cfg=True).steps] == ["todo"] * 3
    plan = tgate_fx.Plan(3, config, cfg=True, timesteps=[900, 450.5, 0])
    assert [s.variant.name for s in plan.steps] == ["todo", "todo", "todo_off"]
    assert plan.to_dict()["timesteps"] == [900.0, 450.5, 0.0]
    assert "off (t=0)" in str(plan)
    with pytest.raises(ValueError, match=r"one value per step \(3\), got 2"):
        tgate_fx.Plan(3, config, cfg=True, timesteps=[1, 0])


@pytest.mark.e2e
def test_grid_not_divisible_by_the_factor_is_refused():
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), todo=ToDoConfig(3))
    with pytest.raises(ValueError, match=r"16x16 token grid .* not divisible by its factor 3"):
        latents(pipe, num_inference_steps=STEPS)


@pytest.mark.parametrize("kwargs,match", [
    ({"factor": 0}, "factor"), ({"factor": "big"}, "factor"), ({"factor_depth2": 0}, "factor_depth2"),
    ({"factor_deeper": -1}, "factor_deeper"), ({"mode": "bilinear"}, "mode"),
    ({"skip_timestep_zero": "yes"}, "skip_timestep_zero"),
])
def test_bad_settings_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToDoConfig(**kwargs)


def test_auto_factor_follows_the_official_demo():
    # SD 1.5 latents of 512, 768, 1024, 1536, 2048 px (VAE factor 8).
    assert [auto_factor((px // 8) ** 2) for px in (512, 768, 1024, 1536, 2048)] == [1, 2, 2, 3, 4]


@pytest.mark.e2e
def test_all_three_methods_run_with_every_computed_self_attention_downsampled():
    """Graph side of the composition (numbers: the test against the published loader above): the three run
    (the runtime checks every cache read against the variant's shapes) and each variant's self-attention
    computed there reads N / 4 keys/values."""
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), tgate=TGateConfig(4, 2, 2, 0), deepcache=DeepCacheConfig(2, 0),
                             todo=ToDoConfig(2, 2))
    latents(pipe, num_inference_steps=6)
    runtime = tgate_fx.get_runtime(pipe)
    names = {s.variant.name for s in runtime.last_plan.steps}
    assert {"sp_reuse+dc_partial+todo", "gate+dc_full+todo"} <= names, names
    variants = [v for g in runtime.captures for v in g.variants.values() if v.name in names]
    computed = 0
    for variant in variants:
        selfs = [(q, k) for q, k, role in _sdpa_lengths(variant) if role == "self"]
        assert all(k * 4 == q for q, k in selfs), (variant.name, selfs)
        computed += len(selfs)
    assert computed


# (family, T-GATE (gate, sp, fi, warm-up), DeepCache (interval, branch), steps, ToDo factors): the published
# T-GATE + DeepCache setting, and others.
ALL_THREE = [("sd15", (10, 1, 1, 0), (3, 0), 12, (2, 2, 1)), ("sd15", (4, 2, 2, 1), (2, 1), 7, (2, 1, 1)),
             ("sdxl", (4, 1, 1, 0), (3, 0), 7, (1, 2, 1))]


@pytest.mark.e2e
@pytest.mark.parametrize("family,tgate,deepcache,steps,factors", ALL_THREE,
                         ids=[f"{c[0]}-{'-'.join(map(str, c[1] + c[2]))}-{''.join(map(str, c[4]))}"
                              for c in ALL_THREE])
def test_all_three_methods_equal_the_published_tgate_deepcache_with_official_todo_hooks(
        family, tgate, deepcache, steps, factors):
    """Oracle: the published ``tgate==1.0.0`` T-GATE + DeepCache loader (which runs ``DeepCache==0.1.1``) on a
    fresh tiny pipeline, with ToDo applied the official way (pre-hooks on ``attn1.to_k``/``to_v``)."""
    pytest.importorskip("tgate")
    pytest.importorskip("DeepCache")
    import tgate as tgate_package

    from conftest import PROMPT
    from oracle_todo import install_todo_hooks
    from reference_deepcache import TGATE_DEEPCACHE_LOADERS
    from tgate_fx.tiny import tiny_pipeline

    loader = getattr(tgate_package, TGATE_DEEPCACHE_LOADERS[family])
    reference = loader(tiny_pipeline(family), cache_interval=deepcache[0], cache_branch_id=deepcache[1])
    undo = install_todo_hooks(reference.unet, factors, "nearest")
    try:
        expected = reference.tgate(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                                   output_type="latent", gate_step=tgate[0], sp_interval=tgate[1],
                                   fi_interval=tgate[2], warm_up=tgate[3], **reference.tiny_call_kwargs).images
    finally:
        undo()
        reference.deepcache.disable()
    pipe = tgate_fx.optimize(tiny_pipeline(family), tgate=TGateConfig(*tgate), deepcache=DeepCacheConfig(*deepcache),
                             todo=ToDoConfig(*factors))
    with tgate_fx.get_runtime(pipe).tracing() as trace:
        got = latents(pipe, num_inference_steps=steps)
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, diff
    names = [s.variant.name for s in tgate_fx.get_runtime(pipe).last_plan.steps]
    assert any("dc_partial" in n for n in names) and all(n.endswith("+todo") for n in names), names
    assert any(q > k for _, _, v in trace for q, k, role in _sdpa_lengths(v) if role == "self")
    tgate_fx.optimize(pipe, tgate=TGateConfig(*tgate), deepcache=DeepCacheConfig(*deepcache))
    assert (latents(pipe, num_inference_steps=steps) - expected).abs().max().item() > 1e-3, "ToDo changed nothing"


def test_cli_flags_for_todo():
    import argparse

    from tgate_fx.cli._methods import add_method_arguments, methods_from_args

    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    (todo,) = methods_from_args(parser.parse_args(["--no-tgate", "--factor", "auto", "--factor-depth2", "2"]))
    assert todo == ToDoConfig(factor="auto", factor_depth2=2)
    with pytest.raises(ValueError, match="factor"):
        methods_from_args(parser.parse_args(["--no-tgate", "--factor", "0"]))


@pytest.mark.e2e
def test_macs_count_what_todo_removes():
    """Per step, ToDo (factor 2 everywhere on tiny SD-1.5) removes 3/4 of every self-attention core and of
    the to_k/to_v projections, and nothing else; the attention core is counted apart."""
    from tgate_fx.core.cost import node_macs
    from tgate_fx.accounting.macs import plan_macs
    from tgate_fx.core.method import tag_key
    from tgate_fx.methods import as_methods

    config = ToDoConfig(2, 2, 2)
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), todo=config)
    latents(pipe, num_inference_steps=2)
    graphs = next(g for g in tgate_fx.get_runtime(pipe).captures
                  if g.capture.graph_module.graph.find_nodes(op="placeholder", target="sample")[0]
                  .meta["val"].shape == (2, 4, 16, 16))
    plan = tgate_fx.Plan(2, as_methods([config]), cfg=False)  # the batch-2 capture counted as 2 images
    with_core = plan_macs(graphs, plan, batch_size=2, include_attention=True)
    linear_conv = plan_macs(graphs, plan, batch_size=2)
    kv = [n for n in graphs.capture.graph_module.graph.nodes if tag_key("todo") in n.meta]
    assert len(kv) == 2 * sum(s.role == "self" for s in graphs.sites)
    removed_core = sum(s.attention_macs for s in graphs.sites if s.role == "self") * 3 // 4
    removed_kv = sum(node_macs(n) for n in kv) * 3 // 4
    assert linear_conv.baseline - linear_conv.total == 2 * removed_kv
    core_base = with_core.baseline - linear_conv.baseline
    core_todo = with_core.total - linear_conv.total
    assert core_base - core_todo == 2 * removed_core > 0


@pytest.mark.e2e
def test_onnx_bundle_with_tgate_and_todo_matches_torch(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from tgate_fx.export import OnnxDenoiser, export_onnx

    methods, steps = [TGateConfig(3, 2, 2, 0), ToDoConfig(2, 2, mode="avg_pool")], 5
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), methods=methods)
    ref = latents(pipe, num_inference_steps=steps)
    call = dict(pipe.tiny_call_kwargs)
    export_onnx(pipe, str(tmp_path), call.pop("height"), call.pop("width"), num_inference_steps=steps,
                methods=methods, **call)
    saved = pipe.unet
    OnnxDenoiser.from_dir(str(tmp_path)).install(pipe)
    try:
        got = latents(pipe, num_inference_steps=steps)
    finally:
        object.__setattr__(pipe, "unet", saved)
    assert (got - ref).abs().max().item() <= 1e-4  # onnxruntime's float32 kernels round differently
    with eager_denoiser(pipe):
        plain = latents(pipe, num_inference_steps=steps)
    assert (plain - ref).abs().max().item() > 1e-2  # the bound sees the methods
