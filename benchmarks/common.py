"""Helpers shared by the benchmark scripts: the CPU's name, and a denoiser stand-in that times its calls."""

from __future__ import annotations

import platform
import time

__all__ = ["TimedDenoiser", "cpu_model"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class TimedDenoiser:
    """Stands in for a pipeline's denoiser and records the wall time of each call.

    Install it with ``object.__setattr__(pipe, "unet", TimedDenoiser(pipe.unet))``
    (a plain assignment would register it in the pipeline's config). It times
    from outside whatever the denoiser is: eager, compiled, or onnxruntime.
    """

    def __init__(self, inner):
        self.inner = inner
        self.times: list[float] = []

    @property
    def seconds(self) -> float:
        """Time spent in calls since :attr:`times` was last cleared."""
        return sum(self.times)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.times.append(time.perf_counter() - start)

    def __getattr__(self, name):
        return getattr(self.inner, name)
