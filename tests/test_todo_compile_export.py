"""ToDo, alone and with T-GATE, under torch.compile and in an ONNX bundle, with a schedule that reaches timestep 0.

DDIM with ``"leading"`` spacing and ``steps_offset=0`` ends at timestep 0
(666, 333, 0 for 3 steps), so a generation runs two variants: ``todo`` (keys/values downsampled) and, at the
last step, ``todo_off`` (the official skip of timestep 0). Both are
compiled once, and exported and run by onnxruntime as stored.
"""

import contextlib

import pytest
import torch
from torch._dynamo.utils import counters

import tgate_fx
from conftest import eager_denoiser, latents
from tgate_fx import ToDoConfig
from tgate_fx.tiny import tiny_pipeline

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

STEPS = 3
CONFIG = ToDoConfig(2, 2)
# ToDo alone, and composed with T-GATE (gate at step 2: the last step also drops the unconditional half)
METHODS = {"todo": dict(tgate=None, todo=CONFIG),
           "tgate+todo": dict(tgate=tgate_fx.TGateConfig(gate_step=2, sp_interval=1, fi_interval=1, warm_up=0),
                              todo=CONFIG)}


@contextlib.contextmanager
def _ending_at_zero(pipe):
    from diffusers import DDIMScheduler

    saved = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(saved.config, timestep_spacing="leading", steps_offset=0)
    try:
        yield
    finally:
        pipe.scheduler = saved


def _snapshot():
    return {k: dict(v) for k, v in counters.items() if v}


@pytest.mark.parametrize("methods", list(METHODS))
def test_todo_compiles_each_variant_once_and_nothing_in_a_second_generation(methods):
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **METHODS[methods], compile={"backend": "eager"})
    with _ending_at_zero(pipe):
        torch._dynamo.reset()
        counters.clear()
        with tgate_fx.get_runtime(pipe).tracing() as trace:
            first = latents(pipe, num_inference_steps=STEPS)
        labels = [s.methods["todo"].label for s in tgate_fx.get_runtime(pipe).last_plan.steps]
        assert labels == ["todo"] * 2 + ["todo_off"]
        variants = len({id(v) for _, _, v in trace})
        assert variants == (2 if methods == "todo" else 3)
        assert counters["stats"]["unique_graphs"] == variants  # one graph per variant, each compiled once
        assert not counters.get("graph_break")  # and fullgraph=True would have raised on a break
        counters.clear()
        second = latents(pipe, prompt="a green star at night", seed=7, num_inference_steps=STEPS)
        assert _snapshot() == {}, "the second generation must not compile or recompile anything"
        assert not torch.equal(first, second)
    # the eager backend runs the same aten graphs: equal to the uncompiled runtime (same seeded weights)
    reference = tgate_fx.optimize(tiny_pipeline("sd15"), **METHODS[methods])
    with _ending_at_zero(reference):
        assert torch.equal(first, latents(reference, num_inference_steps=STEPS))


@pytest.mark.parametrize("methods", list(METHODS))
def test_todo_onnx_bundle_matches_torch(methods, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from tgate_fx.export import OnnxDenoiser, export_onnx

    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), **METHODS[methods])
    with _ending_at_zero(pipe):
        ref = latents(pipe, num_inference_steps=STEPS)
        call = dict(pipe.tiny_call_kwargs)
        export_onnx(pipe, str(tmp_path), call.pop("height"), call.pop("width"), num_inference_steps=STEPS,
                    methods=[c for c in METHODS[methods].values() if c is not None], **call)
        saved = pipe.unet
        onnx_denoiser = OnnxDenoiser.from_dir(str(tmp_path))
        onnx_denoiser.install(pipe)
        try:
            got = latents(pipe, num_inference_steps=STEPS)
        finally:
            object.__setattr__(pipe, "unet", saved)
        assert onnx_denoiser.stored_plan.steps[-1].variant.endswith("todo_off")
        assert (got - ref).abs().max().item() <= 1e-4  # onnxruntime's float32 kernels round differently
        with eager_denoiser(pipe):
            plain = latents(pipe, num_inference_steps=STEPS)
        assert (plain - ref).abs().max().item() > 1e-2  # the bound sees ToDo
