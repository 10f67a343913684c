"""Helpers shared by the benchmark scripts: the machine, a denoiser stand-in that times its calls, and plots."""

from __future__ import annotations

import importlib.util
import os
import platform
import time

__all__ = ["TimedDenoiser", "allocator", "cpu_model", "machine", "require_matplotlib", "speedup_bars"]

# The environment variables that change how CPU tensors get their memory: PyTorch's huge pages for tensors of
# 2 MiB and more, and glibc malloc's tunables (read when the process starts). ToCa's score map at thousands of
# tokens is a few fresh tensors of up to 32 MiB per query chunk, and with glibc's defaults some of them are
# fresh pages each time (see docs/benchmarks.md): these settings change its cost, so the results record them.
ALLOCATOR_VARIABLES = ("THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                       "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX", "LD_PRELOAD")


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


def allocator() -> str:
    """The allocator settings of this process's environment (:data:`ALLOCATOR_VARIABLES` that are set), or
    ``"default"``."""
    set_ = [f"{name}={os.environ[name]}" for name in ALLOCATOR_VARIABLES if os.environ.get(name)]
    return " ".join(set_) or "default"


def machine(**extra: str) -> dict:
    """CPU, cores, the allocator settings and the versions of Python, torch and diffusers (plus ``extra``
    entries)."""
    import diffusers
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "allocator": allocator(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, **extra, "python": platform.python_version()}


def require_matplotlib(no_plot: bool) -> None:
    """Stop before any work if a plot is asked for and matplotlib is missing."""
    if not no_plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("matplotlib is needed for the plot: pip install -e '.[bench]', or pass --no-plot")


def speedup_bars(path: str, labels: list[str], bars: dict[str, list[float]], title: str) -> None:
    """A bar chart of speed-ups over the baseline: one group per label, one bar per entry of ``bars``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 1.5), 4))
    for i, (name, values) in enumerate(bars.items()):
        offset = (i - (len(bars) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(labels))], values, width, label=name)
    ax.set_xticks(list(range(len(labels))), [label.replace(" (", "\n(") for label in labels], fontsize=7)
    ax.set_ylabel("speed-up over baseline")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
