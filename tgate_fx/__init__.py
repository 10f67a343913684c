"""tgate_fx: training-free acceleration of diffusers pipelines (T-GATE, DeepCache, ToDo, ToCa, a block cache), as torch.fx graph rewrites.

Example::

    import tgate_fx
    tgate_fx.optimize(pipe, gate_step=10, sp_interval=5, fi_interval=1, warm_up=2)      # T-GATE
    tgate_fx.optimize(pipe, tgate=tgate_fx.TGateConfig(10, 1, 1, 0),
                      deepcache=tgate_fx.DeepCacheConfig(cache_interval=3))           # composed
    tgate_fx.optimize(pipe, blockcache=tgate_fx.BlockCacheConfig(threshold=0.05))      # transformers
    image = pipe(prompt, num_inference_steps=25).images[0]
    print(tgate_fx.report(pipe))
    tgate_fx.restore(pipe)
"""

from .accounting.macs import count_macs, plan_macs
from .accounting.report import report
from .api import get_runtime, optimize, restore
from .core.plan import Plan
from .methods import BlockCacheConfig, DeepCacheConfig, TGateConfig, ToCaConfig, ToDoConfig

__all__ = ["BlockCacheConfig", "DeepCacheConfig", "Plan", "TGateConfig", "ToCaConfig", "ToDoConfig", "count_macs", "get_runtime", "optimize", "plan_macs",
           "report", "restore"]
from ._version import __version__
