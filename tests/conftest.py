import contextlib
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests export every capture themselves; the disk capture cache is tested explicitly (test_capture_store.py).
os.environ.setdefault("TGATE_FX_CAPTURE_CACHE", "0")
warnings.filterwarnings("ignore", message=".*should be kept in float32.*")

from tgate_fx.tiny import FAMILIES  # noqa: E402

PROMPT = "a red circle on a blue background"


@contextlib.contextmanager
def spy_method(cls, name: str, log: list, replace=None):
    """Within the block, each call of ``cls.name`` (or of ``replace`` in its place) appends its result to ``log``."""
    original = getattr(cls, name)

    def spy(self, *args):
        out = original(self, *args) if replace is None else replace(self, *args)
        log.append(out)
        return out

    setattr(cls, name, spy)
    try:
        yield
    finally:
        setattr(cls, name, original)


def latents(pipe, prompt=PROMPT, seed=0, **kwargs):
    """Final latents of one generation with a fixed seed."""
    call = {**pipe.tiny_call_kwargs, **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="latent", **call).images


@contextlib.contextmanager
def eager_denoiser(pipe):
    """Within the block (in this thread), an optimized pipeline's denoiser runs its own eager forward; the
    pipeline's denoiser attribute is put back as it was after the block (tests swap in oracles there)."""
    import tgate_fx
    from tgate_fx.core.hook import bypassed
    from tgate_fx.core.runtime import find_denoiser

    name, _ = find_denoiser(pipe)
    installed = getattr(pipe, name)
    try:
        with bypassed(tgate_fx.get_runtime(pipe).denoiser):
            yield pipe
    finally:
        object.__setattr__(pipe, name, installed)


@pytest.fixture(scope="session")
def families():
    return FAMILIES


def record_calls(pipe, attr: str, **kwargs):
    """The (args, kwargs) of every denoiser call of one generation (eager)."""
    module = getattr(pipe, attr)
    calls = []
    handle = module.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        latents(pipe, **kwargs)
    finally:
        handle.remove()
    return module, calls
