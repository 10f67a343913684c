"""Z-Image (``ZImageTransformer2DModel``: lists of per-sample tensors, single-stream ``layers``) served by tgate_fx.

* The capture: the engine's batched form of the call (:mod:`tgate_fx.core.conventions`) traced through the
  transformer's own forward predicts what the eager transformer does, bit for bit, and the optimized pipeline
  gets the transformer's list output back.
* The block cache equals diffusers' own ``FirstBlockCacheConfig`` hook (``ZImageTransformerBlock`` is in its
  block registry) bit for bit, with CFG (one batch of 2 a step, the conditional half first) and without, and
  a wrong threshold gives another image; FORA (``fora_interval``) equals the hook forced to that schedule.
* T-GATE, DeepCache and ToDo refuse it at ``optimize`` with their reason.
* Captions of different token counts (the prompt and the negative prompt of a CFG call): one zero-padded
  batch and its lengths (one capture per combination), exact against the unoptimized pipeline and diffusers'
  hook, whether the captions pad to one multiple of 32 or to two (the main blocks then attend under a mask).
  ToCa equals its oracle on the first and refuses the second with its reason; tensors that differ in another
  way are refused naming their shapes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import tgate_fx
from conftest import spy_method
from tgate_fx import BlockCacheConfig, DeepCacheConfig, TGateConfig, ToDoConfig
from tgate_fx.core.capture import capture_denoiser
from tgate_fx.core.captured import normalize_call, signature_of
from tgate_fx.core.conventions import convention_of
from tgate_fx.methods.blockcache.method import BlockCache
from tgate_fx.tiny_extra import tiny_zimage

pytestmark = pytest.mark.e2e

STEPS = 6
THRESHOLD = 0.7  # the hook computes at steps 0, 2, 4 and skips at 1, 3, 5 (CFG on and off)
OTHER_THRESHOLD = 0.6  # it skips at step 1 only


def _generate(pipe, call: dict, steps: int = STEPS) -> torch.Tensor:
    return pipe(generator=torch.Generator().manual_seed(0), output_type="latent", num_inference_steps=steps,
                **call).images


def _first_call(pipe, call: dict) -> tuple[tuple, dict]:
    """The (args, kwargs) of the transformer's first call in a 2-step generation (its own list form)."""
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        _generate(pipe, call, steps=2)
    finally:
        handle.remove()
    return calls[0]


@contextlib.contextmanager
def _block_input_named_x():
    """diffusers 0.42.1's hooks read a block's input as ``hidden_states`` by name, which ZImageTransformerBlock
    calls ``x`` (its registry entry keeps the default name), and raise ``ValueError``; the oracle is the hook
    with that one lookup asking for ``x``."""
    from diffusers.hooks._helpers import TransformerBlockMetadata
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    lookup = TransformerBlockMetadata._get_parameter_from_args_kwargs

    def named_x(self, identifier, args=(), kwargs=None):
        if self._cls is ZImageTransformerBlock and identifier == "hidden_states":
            identifier = "x"
        return lookup(self, identifier, args, kwargs)

    TransformerBlockMetadata._get_parameter_from_args_kwargs = named_x
    try:
        yield
    finally:
        TransformerBlockMetadata._get_parameter_from_args_kwargs = lookup


def _hook(pipe, call: dict, threshold: float, decide=None) -> tuple[torch.Tensor, list[bool]]:
    """A generation under diffusers' First Block Cache hook (one cache context around it: ZImagePipeline sets
    none; the block's input looked up as ``x``, see :func:`_block_input_named_x`); ``decide(hook, residual)``
    replaces its decision."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
    from diffusers.hooks import first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    transformer = pipe.transformer
    apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=threshold))
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.invalidate_child_registries_cache()
    decisions: list[bool] = []
    _set_cache_context(transformer, CacheContext("all"))
    try:
        with spy_method(first_block_cache.FBCHeadBlockHook, "_should_compute_remaining_blocks", decisions, decide), \
                _block_input_named_x():
            out = _generate(pipe, call)
    finally:
        _set_cache_context(transformer, None)
        registry.remove_hook(first_block_cache._FBC_LEADER_BLOCK_HOOK, recurse=True)
        registry.remove_hook(first_block_cache._FBC_BLOCK_HOOK, recurse=True)
    return out, decisions


@pytest.mark.parametrize("guidance_scale", [3.0, 0.0], ids=["cfg", "no-cfg"])
def test_capture_predicts_the_eager_transformer(guidance_scale):
    pipe, call = tiny_zimage(guidance_scale=guidance_scale)
    args, kwargs = _first_call(pipe, call)
    assert isinstance(args[0], list) and len(args[0]) == (2 if guidance_scale else 1)
    engine, _ = normalize_call(pipe.transformer, args, kwargs)
    assert tuple(engine["hidden_states"].shape) == (len(args[0]), 16, 1, 16, 16)
    assert tuple(engine["encoder_hidden_states"].shape) == (len(args[0]), 9, 16)
    capture = capture_denoiser(pipe.transformer, engine, store=None)
    sdpa = [n for n in capture.graph_module.graph.nodes
            if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 4  # noise refiner, context refiner, two layers
    with torch.no_grad():
        expected = torch.stack(pipe.transformer(*args, **kwargs)[0])
        prediction = capture.graph_module(**capture.flat_inputs(engine))[0]
    assert torch.equal(prediction, expected)
    # the autocast(enabled=False) regions of its timestep and rotary embeddings are inlined: no subgraph
    # modules, so the disk capture store can describe the graph
    assert not any(n.target is torch.ops.higher_order.wrap_with_autocast for n in capture.graph_module.graph.nodes)


def test_the_capture_store_serves_a_second_process(tmp_path):
    from tgate_fx.core.capture_store import CaptureStore

    pipe, call = tiny_zimage()
    plain = _generate(pipe, call, steps=3)
    outs = []
    for _ in range(2):  # the second runtime loads the first one's entry
        tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=0.0))
        tgate_fx.get_runtime(pipe).capture_store = CaptureStore(str(tmp_path))
        outs.append(_generate(pipe, call, steps=3))
        outs.append([g.capture.from_store for g in tgate_fx.get_runtime(pipe).captures])
        tgate_fx.restore(pipe)
    assert outs[1] == [False] and outs[3] == [True]
    assert torch.equal(outs[0], plain) and torch.equal(outs[2], plain)


def test_samples_that_differ_in_another_way_are_refused_with_their_shapes():
    pipe, call = tiny_zimage()
    transformer, t = pipe.transformer, torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match=r"x .*\(16, 1, 16, 16\), \(16, 1, 8, 8\)\]\); give every sample the "
                                         r"same shape"):
        normalize_call(transformer, ([torch.randn(16, 1, 16, 16), torch.randn(16, 1, 8, 8)], t,
                                     [torch.randn(9, 16)] * 2), {})  # images of two sizes
    engine, _ = normalize_call(transformer, ([torch.randn(16, 1, 16, 16)] * 2, t,
                                             [torch.randn(9, 16), torch.randn(5, 16)]), {})
    engine = {**engine, "encoder_hidden_states": engine["encoder_hidden_states"][:1]}  # two lengths, one caption
    with pytest.raises(ValueError, match=r"encoder_hidden_states_lengths gives 2 lengths for 1 samples"):
        convention_of(transformer).own_call(engine)
    call["negative_prompt_embeds"] = [torch.randn(5, 8)]  # another feature size
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=0.0))
    with pytest.raises(ValueError, match=r"cap_feats.*\(9, 16\), \(5, 8\)\]\); they may differ in their first "
                                         r"dimension \(the token count\) only"):
        _generate(pipe, call, steps=2)


# --- captions of different token counts (CFG: the prompt and its negative) -------------------------------------

# (prompt tokens, negative prompt tokens): padded by the transformer to 64 and 32 (the main blocks then attend
# under a mask over the shorter sequence's padding), and both to 64 (no mask).
RAGGED = {"two-multiples": (40, 9), "one-multiple": (40, 50)}


def _ragged(lengths: tuple[int, int]):
    pipe, call = tiny_zimage()
    g = torch.Generator().manual_seed(7)
    call["prompt_embeds"], call["negative_prompt_embeds"] = ([torch.randn(n, 16, generator=g)] for n in lengths)
    return pipe, call


def _main_masks(capture) -> list[bool]:
    """Whether each attention core of the main blocks has a mask."""
    return [len(n.args) > 3 and n.args[3] is not None for n in capture.graph_module.graph.nodes
            if n.target is torch.ops.aten.scaled_dot_product_attention.default
            and list(n.meta["nn_module_stack"].values())[-1][0].startswith("layers.")]


@pytest.mark.parametrize("case", RAGGED)
def test_ragged_capture_predicts_the_eager_transformer(case):
    lengths = RAGGED[case]
    pipe, call = _ragged(lengths)
    args, kwargs = _first_call(pipe, call)
    assert [len(c) for c in args[2]] == list(lengths)  # the pipeline's call: the conditional caption first
    engine, _ = normalize_call(pipe.transformer, args, kwargs)
    captions = engine["encoder_hidden_states"]
    assert tuple(captions.shape) == (2, max(lengths), 16) and engine["encoder_hidden_states_lengths"] == lengths
    assert torch.equal(captions[1, :lengths[1]], args[2][1]) and not captions[1, lengths[1]:].any()  # zeros
    capture = capture_denoiser(pipe.transformer, engine, store=None)
    assert _main_masks(capture) == [case == "two-multiples"] * 2
    with torch.no_grad():
        expected = torch.stack(pipe.transformer(*args, **kwargs)[0])
        prediction = capture.graph_module(**capture.flat_inputs(engine))[0]
    assert torch.equal(prediction, expected)
    # the lengths are a constant of the signature: the shorter caption a token shorter, another capture
    short = lengths.index(min(lengths))
    cut = [c[:-1] if i == short else c for i, c in enumerate(args[2])]
    other, _ = normalize_call(pipe.transformer, (args[0], args[1], cut), kwargs)
    assert signature_of(other) != signature_of(engine) and signature_of(other).tensors == signature_of(engine).tensors


@pytest.mark.parametrize("case", RAGGED)
def test_ragged_block_cache_equals_diffusers_first_block_cache(case):
    pipe, call = _ragged(RAGGED[case])
    baseline = _generate(pipe, call)
    call_equal = tiny_zimage()[1]  # captions of 9 tokens each
    baseline_equal = _generate(pipe, call_equal)
    reference, hook_decisions = _hook(pipe, call, THRESHOLD)
    assert (reference - baseline).abs().max() > 0 and not all(hook_decisions), "the hook changed nothing"
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=THRESHOLD))
    ours: list[str] = []
    with spy_method(BlockCache, "decide", ours):
        result = _generate(pipe, call)
    assert [d == "compute" for d in ours] == hook_decisions
    torch.testing.assert_close(result, reference, rtol=0, atol=0)
    # nothing cached: the unoptimized pipeline, bit for bit; and the equal-length call beside it, its own capture
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=0.0))
    torch.testing.assert_close(_generate(pipe, call), baseline, rtol=0, atol=0)
    torch.testing.assert_close(_generate(pipe, call_equal), baseline_equal, rtol=0, atol=0)
    lengths = [dict(g.capture.signature.constants).get("encoder_hidden_states_lengths_1")
               for g in tgate_fx.get_runtime(pipe).captures]
    assert lengths == [str(RAGGED[case][1]), None]


def test_ragged_toca_equals_the_oracle_where_the_captions_pad_to_one_length():
    from tgate_fx import ToCaConfig

    steps = 10
    pipe, call = _ragged(RAGGED["one-multiple"])
    plain = _generate(pipe, call, steps)
    c = ToCaConfig().resolved("flux")
    expected, kinds = _toca_oracle(pipe, call, steps, c)
    assert "ToCa" in kinds and not torch.equal(expected, plain)
    tgate_fx.optimize(pipe, toca=ToCaConfig())
    torch.testing.assert_close(_generate(pipe, call, steps), expected, rtol=0, atol=0)


def test_ragged_toca_refuses_captions_that_pad_to_two_lengths():
    from tgate_fx import ToCaConfig

    pipe, call = _ragged(RAGGED["two-multiples"])
    call_one = _ragged(RAGGED["one-multiple"])[1]
    plain_one = _generate(pipe, call_one, steps=4)
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=THRESHOLD), toca=ToCaConfig())
    with pytest.raises(ValueError, match=r"ToCa cannot serve this batch: its samples' sequences \(image and caption "
                                         r"tokens\) differ in length .* layers\.0\.attention attends over 128 "
                                         r"tokens under a mask.*count those rows in each sample's k"):
        _generate(pipe, call, steps=4)
    # the runtime serves the next call, whose captions pad to one length
    got = _generate(pipe, call_one, steps=4)
    assert torch.isfinite(got).all() and not torch.equal(got, plain_one)


@pytest.mark.parametrize("guidance_scale", [3.0, 0.0], ids=["cfg", "no-cfg"])
def test_block_cache_equals_diffusers_first_block_cache(guidance_scale):
    pipe, call = tiny_zimage(guidance_scale=guidance_scale)
    baseline = _generate(pipe, call)
    reference, hook_decisions = _hook(pipe, call, THRESHOLD)
    assert (reference - baseline).abs().max() > 0, "the hook changed nothing: the test could not fail"
    assert not all(hook_decisions), "the hook never skipped"
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=THRESHOLD))
    ours: list[str] = []
    with spy_method(BlockCache, "decide", ours):
        result = _generate(pipe, call)
    assert [d == "compute" for d in ours] == hook_decisions
    torch.testing.assert_close(result, reference, rtol=0, atol=0)
    torch.testing.assert_close(_generate(pipe, call), reference, rtol=0, atol=0)  # a second generation afresh
    # the test can fail: another threshold skips at other steps and gives another image
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=OTHER_THRESHOLD))
    assert not torch.equal(_generate(pipe, call), reference)
    # threshold 0 computes every step: the unoptimized pipeline, bit for bit
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=0.0))
    torch.testing.assert_close(_generate(pipe, call), baseline, rtol=0, atol=0)


def test_fora_interval_equals_the_hook_forced_to_that_schedule():
    pipe, call = tiny_zimage()
    plain = _generate(pipe, call)
    expected, _ = _hook(pipe, call, 0.0, decide=lambda hook, residual, n=iter(range(99)): next(n) % 3 == 0)
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(fora_interval=3))
    ours: list[str] = []
    with spy_method(BlockCache, "decide", ours):
        got = _generate(pipe, call)
    assert ours == ["compute" if step % 3 == 0 else "skip" for step in range(STEPS)]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, plain)


def test_the_optimized_transformer_returns_its_list_form():
    pipe, call = tiny_zimage()
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=THRESHOLD))
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        _generate(pipe, call, steps=2)
    finally:
        handle.remove()
    from torch._subclasses.fake_tensor import FakeTensor

    outputs = [o for o in outputs if not isinstance(o[0], FakeTensor)]  # the export runs the forward too
    assert len(outputs) == 2
    assert all(isinstance(o[0], list) and [tuple(t.shape) for t in o[0]] == [(16, 1, 16, 16)] * 2 for o in outputs)


@pytest.mark.parametrize("kwargs,reason", [
    (dict(tgate=TGateConfig(gate_step=1)),
     "T-GATE cannot apply to ZImageTransformer2DModel: it caches cross-attention"),
    (dict(deepcache=DeepCacheConfig()), "DeepCache needs a UNet"),
    (dict(todo=ToDoConfig()), "ToDo cannot apply to ZImageTransformer2DModel: none of its attention modules is a "
                              "cross-attention"),
], ids=["tgate", "deepcache", "todo"])
def test_refusals(kwargs, reason):
    pipe, _ = tiny_zimage()
    with pytest.raises(TypeError, match=reason):
        tgate_fx.optimize(pipe, **kwargs)


# --- ToCa: the FLUX rules on Z-Image's single-sequence blocks (chosen; methods/toca/single_sequence.py) --------


def _toca_oracle(pipe, call, steps: int, c) -> tuple[torch.Tensor, list[str]]:
    from oracle_toca_zimage import ZImageToCaOracle

    oracle = ZImageToCaOracle(pipe.transformer, num_steps=steps, fresh_threshold=c.interval, fresh_ratio=c.ratio,
                              soft_fresh_weight=c.cache_weight,
                              ratio_scheduler="ToCa" if c.schedule == "ToCa-flux" else c.schedule)
    try:
        return _generate(pipe, call, steps), oracle.steps
    finally:
        oracle.close()


@pytest.mark.parametrize("guidance_scale", [3.0, 0.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("settings", [{}, {"ratio": 0.3, "interval": 3}], ids=["default", "ratio0.3"])
def test_toca_equals_the_oracle_of_the_chosen_rules(settings, guidance_scale):
    from tgate_fx import ToCaConfig

    steps = 10
    pipe, call = tiny_zimage(guidance_scale=guidance_scale)
    plain = _generate(pipe, call, steps)
    c = ToCaConfig(**settings).resolved("flux")
    expected, kinds = _toca_oracle(pipe, call, steps, c)
    assert "ToCa" in kinds and not torch.equal(expected, plain)
    tgate_fx.optimize(pipe, toca=ToCaConfig(**settings))
    got = _generate(pipe, call, steps)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    plan = tgate_fx.get_runtime(pipe).last_plan
    assert [s.methods["toca"].columns[0][1] for s in plan.steps] == \
        ["full" if k == "full" else "partial" for k in kinds]
    # the test can fail: another ratio refreshes other tokens and gives another image
    tgate_fx.optimize(pipe, toca=ToCaConfig(**{**settings, "ratio": c.ratio / 2}))
    assert not torch.equal(_generate(pipe, call, steps), expected)


def test_toca_partial_step_computes_no_main_attention():
    from tgate_fx import ToCaConfig

    pipe, call = tiny_zimage()
    tgate_fx.optimize(pipe, toca=ToCaConfig())
    runtime = tgate_fx.get_runtime(pipe)
    with runtime.tracing() as trace:
        _generate(pipe, call, 4)
    partial = next(v for p, _, v in trace if p.methods["toca"].columns[0][1] == "partial")
    cores = [p for n in partial.graph_module.graph.nodes
             if n.target is torch.ops.aten.scaled_dot_product_attention.default
             for p, _ in list((n.meta.get("nn_module_stack") or {}).values())[-1:]]
    assert cores == ["noise_refiner.0.attention", "context_refiner.0.attention"]  # the refiners run in full


def test_block_cache_composes_with_toca():
    from tgate_fx import ToCaConfig

    pipe, call = tiny_zimage()
    plain = _generate(pipe, call, 8)
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=THRESHOLD), toca=ToCaConfig())
    got = _generate(pipe, call, 8)
    assert torch.isfinite(got).all() and not torch.equal(got, plain)


def test_report_says_what_applies_and_how_calls_are_served():
    pipe, call = tiny_zimage()
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=THRESHOLD))
    _generate(pipe, call, steps=2)
    text = tgate_fx.report(pipe)
    assert "ToCa yes" in text and "Block cache (First Block Cache) yes" in text
    assert "T-GATE no (it caches cross-attention" in text and "ToDo no (none of its attention modules" in text
    assert "DeepCache no (DeepCache needs a UNet" in text
    assert "calls: ZImageTransformer2DModel takes x, cap_feats as lists of per-sample tensors" in text
    assert "cap_feats's samples may differ in token count (zero-padded to the longest, one export per combination " \
           "of lengths); otherwise equal-shaped samples only" in text


def test_cfg_truncation_switches_guidance_off_part_way():
    """``cfg_truncation=0.5``: Z-Image's pipeline drops guidance at its late steps (a batch of 1) while
    ``do_classifier_free_guidance`` stays on; its per-step ``apply_cfg`` decides, and the block cache follows
    the switch (caches dropped, the no-CFG plan from there). ToCa's partial steps cannot: a clear error."""
    from tgate_fx import ToCaConfig

    pipe, call = tiny_zimage()
    call["cfg_truncation"] = 0.5
    plain = _generate(pipe, call)
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=0.0))
    torch.testing.assert_close(_generate(pipe, call), plain, rtol=0, atol=0)
    tgate_fx.optimize(pipe, blockcache=BlockCacheConfig(threshold=THRESHOLD))
    with tgate_fx.get_runtime(pipe).tracing() as trace:
        got = _generate(pipe, call)
    cfg = [s.cfg for s, _, _ in trace]
    assert True in cfg and False in cfg and cfg == sorted(cfg, reverse=True)
    assert torch.isfinite(got).all() and not torch.equal(got, plain)
    tgate_fx.optimize(pipe, toca=ToCaConfig())
    with pytest.raises(RuntimeError, match="cannot follow that switch"):
        _generate(pipe, call, 10)
