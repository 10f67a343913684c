"""tgate_fx: T-GATE for diffusers pipelines, as torch.fx graph rewrites.

Example::

    import tgate_fx
    tgate_fx.optimize(pipe, gate_step=10, sp_interval=5, fi_interval=1, warm_up=2)
    image = pipe(prompt, num_inference_steps=25).images[0]
    print(tgate_fx.report(pipe))
    tgate_fx.restore(pipe)
"""

from .api import get_runtime, optimize, restore
from .config import TGateConfig
from .macs import count_macs, plan_macs
from .plan import Plan
from .report import report

__all__ = ["Plan", "TGateConfig", "count_macs", "get_runtime", "optimize", "plan_macs", "report", "restore"]
__version__ = "0.1.0"
