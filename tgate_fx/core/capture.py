"""Capture: one denoiser call -> one flat FX graph, via ``torch.export``.

A capture is made lazily, from the real arguments of a denoiser call, with
non-strict ``torch.export`` and static shapes. Each distinct
:class:`InputSignature` (tensor shapes, dtypes and devices, which optional
inputs are present, and the values of non-tensor arguments) gets its own
capture; the caller keeps them in a dict keyed by signature. The runtime
exports once per resolution and derives the capture of each batch size from
that one trace (:mod:`~tgate_fx.core.rebatch`).

The exported program is turned into a *flat* ``GraphModule``: its placeholders
are the tensor leaves of the call (named after their argument, e.g.
``added_cond_kwargs_text_embeds``), its output is a tuple whose first element
is the denoiser's prediction. Parameters are ``get_attr`` nodes that refer to
the denoiser's own parameter objects: nothing is copied. They are registered
on the graph module under flat names (``down_blocks_0_resnets_0_conv1_weight``)
so that the generated code reads each with one attribute lookup instead of a
walk down the module tree (a walk costs about a quarter of a small UNet's
call); :func:`parameter_paths` maps the flat names back to the denoiser's.
"""

from __future__ import annotations

import contextlib
import operator
import time
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .capture_store import DEFAULT, resolve_store
from .conventions import convention_of
from .captured import Capture, flat_graph_module, fresh_containers, parameter_paths, signature_of, tensor_inputs
from .hook import bypassed

__all__ = ["as_traced", "capture_denoiser", "state_paths"]



# Export records `.to()` metadata checks as side-effecting assertion nodes.
# Shapes are static here, so they guard nothing at run time, and they would
# keep otherwise dead attention subgraphs alive.
_METADATA_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}
_WRAP_WITH_AUTOCAST = torch.ops.higher_order.wrap_with_autocast


def _disabled_autocast(node: fx.Node) -> bool:
    """Whether ``node`` runs a subgraph under an autocast region that changes nothing: ``autocast(device,
    enabled=False)`` while no autocast of that device is on (Z-Image's timestep and rotary embeddings)."""
    return (node.op == "call_function" and node.target is _WRAP_WITH_AUTOCAST and node.args[2] is False
            and not torch.is_autocast_enabled(node.args[0]))


def _inline(graph: fx.Graph, sub: fx.GraphModule, inputs: tuple, env: dict) -> tuple:
    """Copy ``sub``'s nodes into ``graph`` on ``inputs``; its outputs."""
    sub_env: dict[fx.Node, Any] = {}
    placeholders = iter(inputs)
    for node in sub.graph.nodes:
        if node.op == "placeholder":
            sub_env[node] = env[next(placeholders)]
        elif node.op == "output":
            return tuple(fx.node.map_arg(node.args[0], lambda n: sub_env[n]))
        elif node.op == "call_function" and node.target in _METADATA_ASSERTS:
            continue
        else:
            sub_env[node] = graph.node_copy(node, lambda n: sub_env[n])
    raise ValueError("an autocast subgraph without an output")


def _flatten_exported(exported: torch.export.ExportedProgram) -> tuple[fx.GraphModule, list[str]]:
    unlifted = exported.module()
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    input_names: list[str] = []
    for node in unlifted.graph.nodes:
        if _disabled_autocast(node):  # its ops, in line: the passes and the capture store see them
            env[node] = _inline(graph, getattr(unlifted, node.args[4].target), node.args[5:], env)
            continue
        if node.op == "call_function" and node.target is operator.getitem and isinstance(env.get(node.args[0]), tuple):
            env[node] = env[node.args[0]][node.args[1]]
            continue
        if node.op == "get_attr" and all(_disabled_autocast(u) for u in node.users) and node.users:
            continue  # the subgraph of an inlined autocast region
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                env[node] = graph.node_copy(node, lambda n: env[n])
                input_names.append(node.name)
            else:
                env[node] = val  # a specialised constant (None, a bool, a number)
        elif node.op == "output":
            outputs = pytree.tree_leaves(fx.node.map_arg(node.args[0], lambda n: env[n]))
            graph.output(tuple(outputs))
        elif node.op == "call_function" and node.target in _METADATA_ASSERTS:
            continue
        elif node.op == "call_module" and node.target == "_guards_fn":
            continue  # export's checks of the input shapes: a capture is keyed by them already
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return flat_graph_module(unlifted, graph), input_names


def capture_denoiser(module: torch.nn.Module, call: dict[str, Any], store: Any = DEFAULT) -> Capture:
    """Export ``module`` for the normalized call ``call`` (see :func:`normalize_call`).

    ``store``: a :class:`~tgate_fx.core.capture_store.CaptureStore` to load
    the graph from (and to save a new export to), ``None`` for none, or the
    default, the one the environment configures (on unless
    ``TGATE_FX_CAPTURE_CACHE=0``).

    An accelerate hook on the module (``enable_model_cpu_offload`` and the
    like) is left out of the trace: it moves weights, which a graph cannot do
    (the runtime calls the hook around each graph call instead).
    """
    signature = signature_of(call)
    store = resolve_store(store)
    key = store.key(module, signature) if store is not None else None
    if store is None:
        return _export(module, call, signature, None, None)
    with store.exclusive(key):  # processes sharing the store: the first exports, the others load its entry
        stored = store.load(key, module, call)
        if stored is not None:
            stored.signature = signature
            stored.state_paths = state_paths(module, stored.graph_module)
            return stored
        return _export(module, call, signature, store, key)


def _export(module: torch.nn.Module, call: dict[str, Any], signature: Any, store: Any, key: str | None) -> Capture:
    start = time.perf_counter()
    with as_traced(module):
        exported = torch.export.export(module, (), {**fresh_containers(call), "return_dict": False}, strict=False)
    gm, input_names = _flatten_exported(exported)
    if sorted(input_names) != sorted(tensor_inputs(call)):
        raise RuntimeError(f"export named the inputs {input_names}, expected {sorted(tensor_inputs(call))}")
    capture = Capture(signature, gm, input_names, time.perf_counter() - start, state_paths(module, gm))
    if store is not None:
        store.save(key, capture)
    return capture


@contextlib.contextmanager
def as_traced(module: torch.nn.Module):
    """Within the block, ``module`` runs as a capture traces it: in eval mode, without autograd, its own
    ``forward`` (tgate_fx's hook bypassed, in this thread) and without the accelerate hook on it (which
    moves weights; see :func:`capture_denoiser`); a denoiser with a call convention (:mod:`.conventions`)
    takes calls in the engine's form."""
    was_training = module.training
    hooked = "forward" in vars(module) and hasattr(module, "_hf_hook") and hasattr(module, "_old_forward")
    if hooked:
        wrapped, module.forward = module.forward, module._old_forward
    module.eval()
    try:
        with torch.no_grad(), bypassed(module), _engine_form(module):
            yield module
    finally:
        module.train(was_training)
        if hooked:
            module.forward = wrapped


@contextlib.contextmanager
def _engine_form(module: torch.nn.Module):
    """Within the block, a denoiser with a call convention (:mod:`.conventions`) takes calls in the engine's
    form (entered after :func:`bypassed`, which finds tgate_fx's hook as the module's ``forward``)."""
    convention = convention_of(module)
    if convention is None:
        yield
        return
    convention.prepare(module)
    own = vars(module).get("forward")
    module.forward = convention.forward_of(module, module.forward)
    try:
        yield
    finally:
        if own is None:
            del module.__dict__["forward"]
        else:
            module.forward = own


def state_paths(module: torch.nn.Module, gm: fx.GraphModule) -> frozenset[str]:
    """Paths of ``module``'s parameters and buffers that ``gm`` reads."""
    state = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    return frozenset(p for p in parameter_paths(gm).values() if p in state)
