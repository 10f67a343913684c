"""The tiny SD3, Qwen-Image, HunyuanVideo and CogVideoX builders of ``tgate_fx.tiny_extra``.

Each builder generates 2 steps of finite latents of the documented shape,
the same seed builds the same pipeline (bit-exact latents) and another seed
another one, the denoiser is called as the docstring says (CFG as a batch or
as two calls), and its first call is captured: a graph with the expected
attention calls that predicts what the eager denoiser does. The runtime's
path is checked too: one trace at the probe batch of ``core.rebatch`` serves
the call's batch (and the half of a CFG batch) without a fallback export,
which a size that is a multiple of the probe (11) would break.
"""

import pytest
import torch

from tgate_fx.core.capture import capture_denoiser
from tgate_fx.core.captured import normalize_call
from tgate_fx.core.generation import take_half
from tgate_fx.core.rebatch import BatchCaptures
from tgate_fx.tiny_extra import tiny_cogvideox, tiny_hunyuanvideo, tiny_qwenimage, tiny_sd3

pytestmark = pytest.mark.e2e

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _generate(builder, seed=0, **options):
    """Final latents of a 2-step generation, and the (args, kwargs) of every denoiser call."""
    pipe, call = builder(seed, **options)
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        out = pipe(generator=torch.Generator().manual_seed(0), output_type="latent", num_inference_steps=2, **call)
    finally:
        handle.remove()
    return pipe, (out.frames if hasattr(out, "frames") else out.images), calls


def _check(builder, shape, *, batches, sdpa, **options):
    """``batches``: the batch size of each denoiser call; ``sdpa``: attention calls in the captured graph."""
    pipe, got, calls = _generate(builder, **options)
    assert got.shape == shape
    assert torch.isfinite(got).all()
    assert torch.equal(got, _generate(builder, **options)[1])
    assert not torch.equal(got, _generate(builder, seed=1, **options)[1])
    assert [kwargs["hidden_states"].shape[0] for _, kwargs in calls] == batches

    denoiser = pipe.transformer
    args, kwargs = calls[0]
    call, _ = normalize_call(denoiser, args, kwargs)
    capture = capture_denoiser(denoiser, call, store=None)
    nodes = capture.graph_module.graph.nodes
    assert sum(node.target is SDPA for node in nodes) == sdpa
    with torch.no_grad():
        expected = denoiser(*args, **kwargs)[0]
        prediction = capture.graph_module(**capture.flat_inputs(call))[0]
    assert torch.equal(prediction, expected)

    captures = BatchCaptures(denoiser, "hidden_states", store=None)
    served = [call] + ([take_half(call, "hidden_states", type(denoiser).__name__)] if batches[0] == 2 else [])
    for c in served:
        served_capture = captures(c)
        with torch.no_grad():
            prediction = served_capture.graph_module(**served_capture.flat_inputs(c))[0]
            assert torch.equal(prediction, denoiser(**c, return_dict=False)[0])
    assert not captures.fallbacks
    return calls


@pytest.mark.parametrize("dual_attention", [False, True], ids=["sd3", "sd35-dual-attention"])
def test_tiny_sd3(dual_attention):
    # CFG as one batch of 2 a step; SD3.5's block adds a second (image-only) attention
    _check(tiny_sd3, (1, 4, 32, 32), batches=[2, 2], sdpa=2 if dual_attention else 1, dual_attention=dual_attention)


def test_tiny_qwenimage():
    # true CFG: two calls of batch 1 a step; the masked text reaches the transformer
    calls = _check(tiny_qwenimage, (1, 16, 16), batches=[1, 1, 1, 1], sdpa=2)
    masks = [kwargs["encoder_hidden_states_mask"] for _, kwargs in calls]
    assert all(mask is not None and mask.tolist() == [[1] * 6 + [0] * 2] for mask in masks)


def test_tiny_hunyuanvideo():
    # embedded guidance: one call of batch 1 a step; token refiner, double- and single-stream block
    _check(tiny_hunyuanvideo, (1, 4, 3, 4, 4), batches=[1, 1], sdpa=3)


def test_tiny_cogvideox():
    # (batch, latent frames, channels, height, width); CFG as one batch of 2 a step
    _check(tiny_cogvideox, (1, 3, 4, 4, 4), batches=[2, 2], sdpa=1)
