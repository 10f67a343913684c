"""The installer: a hook on the user's own denoiser module that hands its calls to a runtime.

``pipe.unet`` / ``pipe.transformer`` stays the very module the user loaded:
its class, attributes, ``config``, ``save_pretrained``, ``from_pipe`` and
``copy.deepcopy`` behave as without tgate_fx. The hook is an instance
attribute ``forward``, as diffusers' ``HookRegistry`` and accelerate install
theirs, plus ``_reset_stateful_cache`` (diffusers calls it on every component
when a pipeline call ends):

* a call of the module runs ``runtime.forward(*args, **kwargs)``;
* within :func:`bypassed` (the capture's export and eager checks, in the
  thread that runs them) it runs what it wraps, the module's own ``forward``;
* it is never traced by dynamo (``torch.compiler.disable``): under
  ``torch.compile(module)`` or ``module.compile()`` the module's frame
  compiles nothing, and the runtime compiles its graph variants with the
  same dynamo context (see :meth:`DenoiserRuntime._active_compiler
  <tgate_fx.core.runtime.DenoiserRuntime>`), ``fullgraph=True`` included;
* ``copy.deepcopy`` of the module gives the copy a hook with a runtime of its
  own (graphs are not copied: they hold the original's parameters).

accelerate's offload hooks (``enable_model_cpu_offload``) always stay
outermost, whichever came first: accelerate's ``forward`` moves the weights and
calls ``module._old_forward``, which is this hook. Installed under an existing
accelerate hook, this hook takes the place of ``_old_forward``, so that
accelerate re-installing its hooks after every pipeline call (it restores
``forward`` from ``_old_forward``) keeps it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
from typing import Any

import torch

__all__ = ["DenoiserHook", "bypassed", "install", "installed_runtime", "uninstall"]

_FULLGRAPH_NOTE = ("tgate_fx's runtime switches graph variants between denoising steps; its frame is run eagerly and "
                   "the variants are compiled, each as a full graph, with the same torch.compile options")


class DenoiserHook:
    """The ``forward`` tgate_fx installs on a denoiser: calls go to ``runtime``.

    Attributes:
        runtime: What runs the calls (a :class:`~tgate_fx.core.runtime.DenoiserRuntime`).
        wrapped: The ``forward`` the module had before (its own, or another hook's).
    """

    def __init__(self, module: torch.nn.Module, runtime: Any, wrapped: Any):
        self.module = module
        self.runtime = runtime
        self.wrapped = wrapped
        self.__wrapped__ = wrapped  # inspect.signature(module.forward) is the module's own signature
        self._bypass = threading.local()

    @functools.partial(torch.compiler.disable, reason=_FULLGRAPH_NOTE)
    def __call__(self, *args, **kwargs):
        if getattr(self._bypass, "depth", 0):
            return self.wrapped(*args, **kwargs)
        return self.runtime.forward(*args, **kwargs)

    @property
    def __code__(self):
        """The wrapped forward's code (``torch.export`` reads ``module.forward.__code__`` for its messages)."""
        fn = self.wrapped
        while isinstance(fn, functools.partial):
            fn = fn.func
        return fn.__code__

    def reset_stateful_cache(self, recurse: bool = True) -> None:
        """What diffusers calls at the end of every pipeline call: ends the runtime's generation (and runs
        the module's own reset, diffusers' hook registry, if it has one)."""
        self.runtime.reset()
        own = getattr(type(self.module), "_reset_stateful_cache", None)
        if own is not None:
            own(self.module, recurse)

    def __deepcopy__(self, memo):
        module = memo.get(id(self.module))
        if module is None:  # the hook copied on its own: it keeps serving its module
            return self
        hook = DenoiserHook(module, self.runtime.copy_for(module, memo), copy.deepcopy(self.wrapped, memo))
        memo[id(self)] = hook
        return hook

    def __repr__(self) -> str:
        return f"<tgate_fx hook of {type(self.module).__name__}: {self.runtime!r}>"


def _hook_of(module: torch.nn.Module) -> DenoiserHook | None:
    """The tgate_fx hook on ``module``: its ``forward``, or, under an accelerate hook, the forward it wraps."""
    for candidate in (module.__dict__.get("forward"), module.__dict__.get("_old_forward")):
        if isinstance(candidate, DenoiserHook) and candidate.module is module:
            return candidate
    return None


def installed_runtime(module: Any) -> Any | None:
    """The runtime installed on ``module`` (``None`` if there is none)."""
    hook = _hook_of(module) if isinstance(module, torch.nn.Module) else None
    return hook.runtime if hook is not None else None


def install(module: torch.nn.Module, runtime: Any) -> DenoiserHook:
    """Hook ``module`` so that its calls run ``runtime.forward``; an existing tgate_fx hook is replaced."""
    uninstall(module)
    if _accelerate_wraps(module):
        hook = DenoiserHook(module, runtime, module._old_forward)
        module._old_forward = hook
    else:
        hook = DenoiserHook(module, runtime, module.forward)
        module.forward = hook
    module._reset_stateful_cache = hook.reset_stateful_cache
    return hook


def _accelerate_wraps(module: torch.nn.Module) -> bool:
    return hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ and "forward" in module.__dict__


def uninstall(module: torch.nn.Module) -> bool:
    """Remove the tgate_fx hook from ``module``; ``False`` if it had none."""
    hook = _hook_of(module)
    if hook is None:
        return False
    own_forward = getattr(hook.wrapped, "__self__", None) is module and \
        getattr(hook.wrapped, "__func__", None) is getattr(type(module), "forward", None)
    if module.__dict__.get("forward") is hook:
        if own_forward:
            del module.__dict__["forward"]
        else:
            module.forward = hook.wrapped
    else:  # an accelerate hook wraps it: unwrap underneath
        module._old_forward = hook.wrapped
    if module.__dict__.get("_reset_stateful_cache") == hook.reset_stateful_cache:
        del module.__dict__["_reset_stateful_cache"]
    return True


@contextlib.contextmanager
def bypassed(module: torch.nn.Module):
    """Within the block, in this thread, calls of ``module`` run its own ``forward``, not the runtime."""
    hook = _hook_of(module)
    if hook is None:
        yield module
        return
    hook._bypass.depth = getattr(hook._bypass, "depth", 0) + 1
    try:
        yield module
    finally:
        hook._bypass.depth -= 1
