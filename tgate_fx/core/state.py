"""The module state a captured graph bakes in, as a fingerprint: a graph must never outlive it.

``torch.export`` traces Python: whatever the modules' attributes decided
during the trace (which attention processor runs, LoRA adapters and their
scales, IP-adapter scales, fused projections, PAG processors, a replaced
parameter object) is frozen into the graph, while parameter *values* are
read live (the graph holds the model's own parameter objects). A
:func:`fingerprint` lists, for every submodule, its class, its
plain-data attributes (numbers, strings, booleans, ``None`` and containers
of them), its processor's class and plain-data attributes, and the identity,
shape and dtype of each parameter and buffer it holds. Two fingerprints
differ whenever a state change could change the traced graph; the runtime
checks it at the start of every generation and captures again on a change.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["fingerprint"]

_PLAIN = (bool, int, float, str, type(None))
# nn.Module's own bookkeeping: hooks are fingerprinted by identity, the rest says nothing about the graph.
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as hashable plain data, or ``...`` if it is not plain data."""
    if isinstance(value, _PLAIN):
        return value
    if depth < 3 and isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v, depth + 1) for v in value]
        return (type(value).__name__, tuple(sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items))
    if depth < 3 and isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _plain(v, depth + 1)) for k, v in value.items())))
    if isinstance(value, torch.dtype):
        return str(value)
    return ...


def _attributes(obj: Any) -> tuple:
    out = []
    for key, value in vars(obj).items():
        if key in _MODULE_INTERNALS or key == "_internal_dict":  # diffusers' config: fixed at construction
            continue
        if isinstance(value, _PLAIN):
            out.append((key, value))
            continue
        plain = _plain(value)
        if plain is not ...:
            out.append((key, plain))
    return tuple(out)


def fingerprint(module: torch.nn.Module, portable: bool = False) -> tuple:
    """What of ``module``'s state a captured graph depends on (see the module docstring).

    ``portable=True`` leaves out object identities (hooks are listed by type,
    parameters by name, shape and dtype): the same state gives the same
    fingerprint in another process, as the capture store's keys need.
    """
    state = []
    for name, sub in module.named_modules():
        hooks = tuple(tuple((type(h).__qualname__ if portable else id(h)) for h in getattr(sub, k).values())
                      for k in _HOOKS)
        entry = [name, type(sub).__qualname__, _attributes(sub), hooks]
        processor = getattr(sub, "processor", None)
        if processor is not None and not isinstance(processor, torch.nn.Module):
            entry += [type(processor).__qualname__, _attributes(processor)]
        entry.append(tuple((k, *(() if portable else (id(t),)), tuple(t.shape), str(t.dtype))
                           for k, t in [*sub._parameters.items(), *sub._buffers.items()] if t is not None))
        state.append(tuple(entry))
    return tuple(state)
