"""The model zoo as users meet it (issue 20): each case named after what a user does.

Every case either works exactly (with nothing cached, it equals the unoptimized
pipeline) or is refused at ``optimize`` with the reason.
"""

import pytest
import torch

import tgate_fx
from tgate_fx.core.rebatch import BatchCaptures
from tgate_fx.core.capture import capture_denoiser, normalize_call
from tgate_fx.methods import DeepCacheConfig, TGateConfig, ToDoConfig
from tgate_fx.tiny_extra import tiny_t2i_adapter

pytestmark = pytest.mark.e2e


def _latents(pipe, kw, steps=4):
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent",
                num_inference_steps=steps, **kw).images


NOTHING_CACHED = {
    "tgate": TGateConfig(gate_step=4, sp_interval=1, fi_interval=1, warm_up=4),
    "deepcache": DeepCacheConfig(cache_interval=1),
    "todo": ToDoConfig(factor=1),
}


@pytest.mark.parametrize("method", sorted(NOTHING_CACHED))
def test_t2i_adapter_first_generation_with_nothing_cached_equals_the_unoptimized_pipeline(method):
    # The UNet pops the adapter's residuals off the list the pipeline passes. The first call runs the
    # export and the eager check of the rebatched graph on that call: the real call must still get
    # the whole list (it once ran step 0 without the adapter, 0.085 away from the unoptimized pipeline).
    pipe, kw = tiny_t2i_adapter()
    baseline = _latents(pipe, kw)
    tgate_fx.optimize(pipe, methods=[NOTHING_CACHED[method]])
    assert torch.equal(_latents(pipe, kw), baseline)
    assert torch.equal(_latents(pipe, kw), baseline)


class _Consuming(torch.nn.Module):
    """A denoiser that consumes its inputs as diffusers' UNet does with adapter residuals."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, sample, residuals: list, extra: dict, return_dict: bool = True):
        x = self.proj(sample)
        while residuals:
            x = x + residuals.pop(0)
        x = x * extra.pop("scale")
        return (x,)


def test_the_first_call_check_and_the_export_never_mutate_the_call_arguments():
    module = _Consuming().eval()
    residuals = [torch.randn(2, 3, 4), torch.randn(2, 3, 4)]
    extra = {"scale": torch.tensor(2.0)}
    call, _ = normalize_call(module, (torch.randn(2, 3, 4), residuals, extra), {})
    BatchCaptures(module, "sample", store=None)(call)  # export at the probe batch + check on the call
    assert len(residuals) == 2 and list(extra) == ["scale"]
    direct = capture_denoiser(module, call, store=None)  # a plain export of the live call
    assert len(residuals) == 2 and list(extra) == ["scale"]
    expected = module(torch.clone(call["sample"]), list(residuals), dict(extra))[0]
    got = direct.graph_module(*(direct.flat_inputs(call)[n] for n in direct.input_names))[0]
    assert torch.equal(got, expected)
