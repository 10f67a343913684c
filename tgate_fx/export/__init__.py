"""Deployment: T-GATE phase graphs as ONNX models, and an onnxruntime denoiser that runs them.

Export once, with torch::

    from tgate_fx.export import export_onnx
    export_onnx(pipe, "bundle", height=512, width=512, num_inference_steps=25, progress=True)

Run anywhere onnxruntime runs, in the unmodified diffusers pipeline::

    from tgate_fx.export import OnnxDenoiser
    OnnxDenoiser.from_dir("bundle", providers=["CPUExecutionProvider"]).install(pipe)
    image = pipe("a photo of a cat", num_inference_steps=25).images[0]

See ``docs/onnx.md`` for the bundle layout and GPU deployment.
"""

from .exporter import export_onnx
from .runner import OnnxDenoiser

__all__ = ["OnnxDenoiser", "export_onnx"]
