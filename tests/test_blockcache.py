"""The block cache against diffusers' own FirstBlockCache hook (a published implementation), bit for bit.

Each family runs a seeded generation three ways: unoptimized, with
``FirstBlockCacheConfig(threshold)`` applied by diffusers, and with
``tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold))``. The
threshold is high enough that the hook skips the blocks on most steps, so the
test can fail: the hook's result differs from the unoptimized one, and both
runs must skip at the same steps.

Pipelines without a cache context of their own (SD3, Flux Kontext, FLUX.2)
run the hook inside one ``cache_context`` around the pipeline call.

FLUX.2 and Chroma join their streams into one sequence between their double-
and single-stream blocks. The hook cannot serve them as it is: its tail hook
subtracts the head's pair of outputs from the one joined tensor and raises
(FLUX.2), or its registry has no metadata for the blocks (Chroma). The oracle
there is the hook with its rule applied to each stream (:func:`_joined`): the
tail residual is the joined output minus the join of the head's outputs, and
the head splits it back into the text and image residuals it adds.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import tgate_fx
from conftest import spy_method
from tgate_fx import BlockCacheConfig, tiny_extra
from tgate_fx.core.rebatch import RebatchWarning
from tgate_fx.methods.blockcache.method import BLOCK_LISTS, BlockCache

pytestmark = pytest.mark.e2e

STEPS = 6
THRESHOLD = 0.5
# Tiny random FLUX.2 and Chroma change their first block's residual by about its size every step (relative
# changes 0.84-1.6): a threshold of 1 skips some steps and computes others.
THRESHOLDS = {"flux2": 1.0, "flux2_klein_cfg": 1.0, "chroma": 1.0}
FAMILIES = {
    "flux": tiny_extra.tiny_flux,
    "flux_true_cfg": lambda: tiny_extra.tiny_flux(true_cfg_scale=4.0),
    "flux_kontext": lambda: tiny_extra.tiny_flux(kontext=True),
    "sd3": lambda: tiny_extra.tiny_sd3(num_layers=2),
    "sd35": lambda: tiny_extra.tiny_sd3(dual_attention=True, num_layers=2),
    "qwenimage_true_cfg": tiny_extra.tiny_qwenimage,
    "hunyuanvideo": tiny_extra.tiny_hunyuanvideo,
    "cogvideox": lambda: tiny_extra.tiny_cogvideox(num_layers=2),
    "wan": tiny_extra.tiny_wan,
    "ltx": lambda: tiny_extra.tiny_ltx(num_layers=2),
    "flux2": tiny_extra.tiny_flux2,
    "flux2_klein_cfg": lambda: tiny_extra.tiny_flux2(klein=True),
    "chroma": tiny_extra.tiny_chroma,
}
# SD3's last block has no text output (context_pre_only): the hook subtracts the head's text output from
# None there. The oracle is the hook with a zero text residual there (the text stream is not read after it).
_TAIL_WITHOUT_TEXT = {"sd3", "sd35"}
# The hook needs a cache context; these pipelines do not set one.
_NO_CONTEXT = {"flux_kontext", "sd3", "sd35", "flux2"}
_TWO_CALLS_NO_CONTEXT = {"chroma"}
# The streams are joined into one sequence between the block lists (text first).
_JOINED = {"flux2", "flux2_klein_cfg", "chroma"}


def _generate(pipe, call: dict) -> torch.Tensor:
    out = pipe(generator=torch.Generator().manual_seed(0), output_type="latent", num_inference_steps=STEPS, **call)
    return out.frames if hasattr(out, "frames") else out.images


@contextlib.contextmanager
def _one_context(transformer):
    """One cache context around a whole generation (SD3's transformer has no ``cache_context`` method)."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(transformer, CacheContext("all"))
    try:
        yield
    finally:
        _set_cache_context(transformer, None)


@contextlib.contextmanager
def _context_per_call(transformer):
    """A cache context for each of the two calls of a step (Chroma runs CFG as two calls and sets none)."""
    forward, calls = transformer.forward, [0]

    def with_context(*args, **kwargs):
        calls[0] += 1
        with transformer.cache_context("cond" if calls[0] % 2 else "uncond"):
            return forward(*args, **kwargs)

    transformer.forward = with_context
    try:
        yield
    finally:
        del transformer.forward


@contextlib.contextmanager
def _tail_without_text():
    """The hook, with its tail's text residual zero where the last block has no text output."""
    from diffusers.hooks import first_block_cache

    block_forward = first_block_cache.FBCBlockHook.new_forward

    def forward(self, module, *args, **kwargs):
        state = self.state_manager.get_state()
        if not (self.is_tail and state.should_compute):
            return block_forward(self, module, *args, **kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        state.tail_block_residuals = (output[self._metadata.return_hidden_states_index] - state.head_block_output[0],
                                      torch.zeros_like(state.head_block_output[1]))
        return output

    first_block_cache.FBCBlockHook.new_forward = forward  # before the hooks are made: they bind it
    try:
        yield
    finally:
        first_block_cache.FBCBlockHook.new_forward = block_forward


@contextlib.contextmanager
def _joined():
    """The hook on a transformer that joins its streams (text first) before its last blocks: the tail's
    residual is its output minus the join of the head's two outputs, and the head splits it back into the
    image and text residuals it adds on a skipped step. Chroma's blocks get the metadata of FLUX's."""
    from diffusers.hooks import first_block_cache
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
    from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock, ChromaTransformerBlock

    hooks = first_block_cache.FBCHeadBlockHook, first_block_cache.FBCBlockHook
    head_forward, block_forward = hooks[0].new_forward, hooks[1].new_forward

    def head(self, module, *args, **kwargs):
        state = self.state_manager.get_state()
        residuals = state.tail_block_residuals
        if residuals is not None and residuals[1] is None:  # the tail's joined residual: split it
            image = self._metadata._get_parameter_from_args_kwargs("hidden_states", args, kwargs).shape[1]
            text = residuals[0].shape[1] - image
            state.tail_block_residuals = (residuals[0][:, text:], residuals[0][:, :text])
        return head_forward(self, module, *args, **kwargs)

    def block(self, module, *args, **kwargs):
        state = self.state_manager.get_state()
        if not (self.is_tail and state.should_compute and isinstance(state.head_block_output, list)):
            return block_forward(self, module, *args, **kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        image, text = state.head_block_output
        state.tail_block_residuals = (output - torch.cat([text, image], dim=1), None)
        return output

    hooks[0].new_forward, hooks[1].new_forward = head, block
    TransformerBlockRegistry.register(ChromaTransformerBlock, TransformerBlockMetadata(1, 0))
    TransformerBlockRegistry.register(ChromaSingleTransformerBlock, TransformerBlockMetadata(0, None))
    try:
        yield
    finally:
        hooks[0].new_forward, hooks[1].new_forward = head_forward, block_forward
        for cls in (ChromaTransformerBlock, ChromaSingleTransformerBlock):
            TransformerBlockRegistry._registry.pop(cls)


def _diffusers_fbc(pipe, call: dict, family: str) -> tuple[torch.Tensor, list[bool]]:
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
    from diffusers.hooks import first_block_cache

    transformer = pipe.transformer
    patch = _tail_without_text() if family in _TAIL_WITHOUT_TEXT else _joined() if family in _JOINED else \
        contextlib.nullcontext()
    with patch:
        apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=THRESHOLDS.get(family, THRESHOLD)))
    # as CacheMixin.enable_cache does: later context updates must reach the new block hooks
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    decisions: list[bool] = []
    context = _one_context(transformer) if family in _NO_CONTEXT else \
        _context_per_call(transformer) if family in _TWO_CALLS_NO_CONTEXT else contextlib.nullcontext()
    try:
        with spy_method(first_block_cache.FBCHeadBlockHook, "_should_compute_remaining_blocks", decisions), context:
            out = _generate(pipe, call)
    finally:
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.remove_hook(first_block_cache._FBC_LEADER_BLOCK_HOOK, recurse=True)
        registry.remove_hook(first_block_cache._FBC_BLOCK_HOOK, recurse=True)
    return out, decisions


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_equals_diffusers_first_block_cache(family):
    if family == "chroma":  # its guidance embedding holds a tensor of the batch's size: exported per batch
        warnings.filterwarnings("ignore", category=RebatchWarning)
    pipe, call = FAMILIES[family]()
    baseline = _generate(pipe, call)
    reference, hook_decisions = _diffusers_fbc(pipe, call, family)
    assert (reference - baseline).abs().max() > 0, "the hook changed nothing: the test could not fail"
    assert not all(hook_decisions), "the hook never skipped"
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=THRESHOLDS.get(family, THRESHOLD)))
    ours: list[str] = []
    with spy_method(BlockCache, "decide", ours):
        result = _generate(pipe, call)
    assert [d == "compute" for d in ours] == hook_decisions
    torch.testing.assert_close(result, reference, rtol=0, atol=0)
    # a second generation starts afresh (the hook's state is reset at the end of every pipeline call)
    torch.testing.assert_close(_generate(pipe, call), reference, rtol=0, atol=0)


def _flux_equal_streams(true_cfg_scale: float = 1.0):
    """Tiny FLUX with as many text tokens as image tokens (16): the streams have one shape."""
    pipe, call = tiny_extra.tiny_flux(size=8, true_cfg_scale=true_cfg_scale)
    g = torch.Generator().manual_seed(7)
    call.update(prompt_embeds=torch.randn(1, 16, 32, generator=g), max_sequence_length=16)
    if true_cfg_scale > 1:
        call.update(negative_prompt_embeds=torch.randn(1, 16, 32, generator=g))
    return pipe, call


@pytest.mark.parametrize("true_cfg_scale,batch", [(1.0, 1), (4.0, 1), (4.0, 3)])
def test_streams_of_one_token_count_are_told_apart_by_data_flow(true_cfg_scale, batch):
    """16 text and 16 image tokens: the head's text stream is the residual update of a value made from the
    text alone, the tail's image stream is what the output is made of; equal to diffusers' hook, which
    knows the streams from the block's return order."""
    pipe, call = _flux_equal_streams(true_cfg_scale)
    call["num_images_per_prompt"] = batch
    baseline = _generate(pipe, call)
    reference, decisions = _diffusers_fbc(pipe, call, "flux")
    assert (reference - baseline).abs().max() > 0 and not all(decisions)
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=THRESHOLD))
    torch.testing.assert_close(_generate(pipe, call), reference, rtol=0, atol=0)


def test_threshold_zero_equals_the_unoptimized_pipeline():
    pipe, call = tiny_extra.tiny_flux()
    baseline = _generate(pipe, call)
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=0.0))
    torch.testing.assert_close(_generate(pipe, call), baseline, rtol=0, atol=0)


def test_skip_step_runs_no_block_after_the_first():
    pipe, call = tiny_extra.tiny_flux()
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=THRESHOLD))
    runtime = tgate_fx.get_runtime(pipe)
    with runtime.tracing() as trace:
        _generate(pipe, call)
    names = [v.name.split("~")[1] for _, _, v in trace]  # an alternative resolved twice has a digest suffix
    assert names[:2] == ["head", "compute"] and "skip" in names

    def blocks(variant):
        return {p for n in variant.graph_module.graph.nodes
                for p, _ in (n.meta.get("nn_module_stack") or {}).values() if p.split(".")[0] in BLOCK_LISTS}

    by_name = {v.name.split("~")[1]: v for _, _, v in trace}
    head, compute, skip = by_name["head"], by_name["compute"], by_name["skip"]
    assert head.graph_module.graph.output_node().args[0][0] is None
    assert {p for p in blocks(head) if p.count(".") == 1} == {"transformer_blocks.0"}
    assert blocks(skip) == set()
    assert "single_transformer_blocks.1" in blocks(compute) and "transformer_blocks.0" not in blocks(compute)


@pytest.mark.filterwarnings("ignore::tgate_fx.core.rebatch.RebatchWarning")  # Chroma's guidance tensor follows the batch
def test_refusals(monkeypatch):
    from tgate_fx import tiny
    from tgate_fx.core.method import InertMethodWarning

    unet = tiny.tiny_pipeline("sd15")
    with pytest.raises(TypeError, match="use DeepCache"):
        tgate_fx.optimize(unet, blockcache=BlockCacheConfig())
    # streams joined between the blocks, but not by one concatenation of the head's two streams: the tail's
    # joined output matches no stream, and the graph is refused at the first call
    from tgate_fx.methods.blockcache import method as blockcache_method

    pipe, call = tiny_extra.tiny_flux2()
    monkeypatch.setattr(blockcache_method, "_join", lambda *args: None)
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig())
    with pytest.raises(ValueError, match="matches no single stream"):
        _generate(pipe, call)
    monkeypatch.undo()
    pipe, call = tiny_extra.tiny_flux2(size=8)  # 16 image tokens and 16 text tokens: which part is which?
    call.update(prompt_embeds=torch.randn(1, 16, 32), max_sequence_length=16)
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig())
    with pytest.raises(ValueError, match="as many tokens each"):
        _generate(pipe, call)
    pipe, call = tiny_extra.tiny_sd3()  # one block: nothing after the first; inert, said so, and exact
    baseline = _generate(pipe, call)
    with pytest.warns(InertMethodWarning, match="one transformer block"):
        tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=10.0))
    torch.testing.assert_close(_generate(pipe, call), baseline, rtol=0, atol=0)
    for bad in (-0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="threshold"):
            BlockCacheConfig(threshold=bad)


def test_onnx_export_is_refused():
    from tgate_fx.export import export_onnx

    pipe, call = tiny_extra.tiny_flux()
    with pytest.raises(ValueError, match="chooses each step's graph at run time"):
        export_onnx(pipe, "/tmp/never", methods=[BlockCacheConfig()], num_inference_steps=2, **call)


def test_macs_of_a_step_are_its_head_plus_the_alternative_it_takes():
    pipe, call = tiny_extra.tiny_flux()
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig())
    _generate(pipe, call)
    runtime = tgate_fx.get_runtime(pipe)
    graphs = runtime.captures[0]
    plan = tgate_fx.Plan(6, runtime.methods, cfg=False)
    every = tgate_fx.plan_macs(graphs, plan)
    assert every.total == every.baseline  # head + compute is the whole graph, nothing counted twice
    skipping = tgate_fx.plan_macs(graphs, plan, choices=lambda step: "skip" if step % 2 else None)
    head = next(v for v in skipping.variants.values() if v.name.split("~")[1] == "head").count.total
    skip = next(v for v in skipping.variants.values() if v.name.split("~")[1] == "skip").count.total
    compute = next(v for v in skipping.variants.values() if v.name.split("~")[1] == "compute").count.total
    assert head + compute == every.baseline // 6
    assert 0 < head + skip < (head + compute) / 2  # the tiny Flux has 4 blocks: a skip step runs one
    assert skipping.total == 3 * (head + compute) + 3 * (head + skip)


# --- composed with T-GATE ----------------------------------------------------------------------------------------

TGATE = dict(gate_step=4, sp_interval=2, fi_interval=1, warm_up=1)


@contextlib.contextmanager
def _forced_at(steps: frozenset[int], step_of):
    """The hook's decision, made to compute every block at ``steps`` (the other method's barriers)."""
    from diffusers.hooks import first_block_cache

    original = first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks

    def decide(self, residual):
        return True if step_of() in steps else original(self, residual)

    first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks = decide
    try:
        yield
    finally:
        first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks = original


@pytest.mark.parametrize("family", ["ltx", "wan"])
def test_composed_with_tgate_equals_the_hook_and_the_tgate_oracle_together(family):
    """T-GATE's processors (the eager oracle of the reference) inside diffusers' FirstBlockCache hook, which
    computes every block at T-GATE's barriers (its gate, and the step after it where the CFG batch is halved):
    a skipped block runs no processor, so its caches keep their last values, as the variants' do."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
    from diffusers.hooks import first_block_cache
    from oracle import run_oracle, run_split_cfg_oracle

    pipe, call = FAMILIES[family]()
    steps = 8
    kw = dict(generator=torch.Generator().manual_seed(0), output_type="latent", num_inference_steps=steps, **call)
    plain = pipe(**{**kw, "generator": torch.Generator().manual_seed(0)}).frames
    barriers = frozenset({TGATE["gate_step"] - 1, TGATE["gate_step"]})
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=THRESHOLD))
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).invalidate_child_registries_cache()
    decisions: list[bool] = []
    try:
        if family == "wan":  # CFG as two calls a step, conditional first
            step_of = lambda: (pipe.transformer.calls - 1) // 2
            with _forced_at(barriers, step_of), spy_method(first_block_cache.FBCHeadBlockHook,
                                                      "_should_compute_remaining_blocks", decisions):
                expected = run_split_cfg_oracle(pipe, "transformer", pipe.transformer, **TGATE, **kw).frames
        else:
            step_of = lambda: pipe.transformer.step - 1
            with _forced_at(barriers, step_of), spy_method(first_block_cache.FBCHeadBlockHook,
                                                      "_should_compute_remaining_blocks", decisions):
                expected = run_oracle(pipe, "transformer", cfg=True, **TGATE, **kw).frames
    finally:
        registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
        registry.remove_hook(first_block_cache._FBC_LEADER_BLOCK_HOOK, recurse=True)
        registry.remove_hook(first_block_cache._FBC_BLOCK_HOOK, recurse=True)
    assert not all(decisions), "the hook never skipped"
    tgate_fx.optimize(pipe, tgate=tgate_fx.TGateConfig(**TGATE), blockcache=BlockCacheConfig(threshold=THRESHOLD))
    ours: list[str] = []
    with spy_method(BlockCache, "decide", ours):
        got = pipe(**{**kw, "generator": torch.Generator().manual_seed(0)}).frames
    assert "skip" in ours
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, plain)


# --- composed with ToCa ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_composed_with_toca_equals_the_hook_around_the_toca_oracle(family):
    """FLUX, FLUX.2: the flux-ToCa rules (the eager oracle's block forwards) inside diffusers' FirstBlockCache
    hook (on FLUX.2 with its rule applied to each stream of the join, :func:`_joined`): a skipped block runs
    no ToCa forward, so its caches, scores and counters keep their last values, as the variants' do."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
    from diffusers.hooks import first_block_cache
    from oracle_toca_flux import FluxToCaOracle

    steps = 10
    threshold = THRESHOLDS.get(family, THRESHOLD)
    pipe, call = FAMILIES[family]()
    kw = dict(output_type="latent", num_inference_steps=steps, **call)
    plain = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    oracle = FluxToCaOracle(pipe.transformer, num_steps=steps)  # its block forwards first: the hook wraps them
    with _joined() if family in _JOINED else contextlib.nullcontext():
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=threshold))
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).invalidate_child_registries_cache()
    decisions: list[bool] = []
    context = _one_context(pipe.transformer) if family in _NO_CONTEXT else contextlib.nullcontext()
    try:
        with spy_method(first_block_cache.FBCHeadBlockHook, "_should_compute_remaining_blocks", decisions), context:
            expected = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
        registry.remove_hook(first_block_cache._FBC_LEADER_BLOCK_HOOK, recurse=True)
        registry.remove_hook(first_block_cache._FBC_BLOCK_HOOK, recurse=True)
        oracle.close()
    assert not all(decisions) and "ToCa" in oracle.steps
    tgate_fx.optimize(pipe, toca=tgate_fx.ToCaConfig(), blockcache=BlockCacheConfig(threshold=threshold))
    ours: list[str] = []
    with spy_method(BlockCache, "decide", ours):
        got = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert [d == "compute" for d in ours] == decisions
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, plain)


# --- FORA: a fixed interval ----------------------------------------------------------------------------------


def test_fora_interval_equals_the_hook_forced_to_that_schedule():
    """fora_interval=3: every block runs at steps 0, 3, 6, ... and the cached residual is added at the others,
    whatever the residual; the oracle is diffusers' hook with its decision replaced by that schedule."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
    from diffusers.hooks import first_block_cache

    pipe, call = tiny_extra.tiny_flux(true_cfg_scale=4.0)  # two calls a step, each with its own state
    plain = _generate(pipe, call)
    calls = []
    original = first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks

    def every_third(self, residual):
        calls.append(None)
        return (len(calls) - 1) // 2 % 3 == 0

    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.0))
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).invalidate_child_registries_cache()
    first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks = every_third
    try:
        expected = _generate(pipe, call)
    finally:
        first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks = original
        registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
        registry.remove_hook(first_block_cache._FBC_LEADER_BLOCK_HOOK, recurse=True)
        registry.remove_hook(first_block_cache._FBC_BLOCK_HOOK, recurse=True)
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(fora_interval=3))
    ours: list[str] = []
    with spy_method(BlockCache, "decide", ours):
        got = _generate(pipe, call)
    assert ours == [("compute" if step % 3 == 0 else "skip") for step in range(STEPS) for _ in range(2)]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, plain)
    plan = tgate_fx.get_runtime(pipe).last_plan
    graphs = tgate_fx.get_runtime(pipe).captures[0]
    macs = tgate_fx.plan_macs(graphs, tgate_fx.Plan(STEPS, tgate_fx.get_runtime(pipe).methods, cfg=False))
    assert macs.total < macs.baseline  # the schedule is fixed: the skipped steps are counted as skipped
    assert [s.methods["blockcache"].label for s in plan.steps] == ["bc_compute", "bc_skip", "bc_skip"] * 2
    with pytest.raises(ValueError, match="fora_interval"):
        BlockCacheConfig(fora_interval=0)
