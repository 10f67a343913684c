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
import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils import _pytree as pytree

__all__ = [
    "Capture",
    "as_traced",
    "InputSignature",
    "capture_denoiser",
    "fresh_containers",
    "normalize_call",
    "parameter_paths",
    "resolve_store",
    "signature_of",
    "state_paths",
    "tensor_inputs",
]

# node.meta key of a get_attr node: the attribute's path in the denoiser.
ATTR_PATH = "tgate_fx_attr_path"


@dataclass(frozen=True)
class InputSignature:
    """What makes two denoiser calls share one captured graph."""

    structure: str
    tensors: tuple[tuple[str, tuple[int, ...], torch.dtype, torch.device], ...]
    constants: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        parts = [f"{name}: {list(shape)} {str(dtype).replace('torch.', '')}"
                 for name, shape, dtype, _ in self.tensors]
        return ", ".join(parts)


def _leaf_name(path) -> str:
    return "_".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def tensor_inputs(call: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a normalized call, named as graph inputs (``added_cond_kwargs_text_embeds``, ...)."""
    leaves, _ = pytree.tree_flatten_with_path(call)
    return {_leaf_name(path): leaf for path, leaf in leaves if isinstance(leaf, torch.Tensor)}


def signature_of(kwargs: dict[str, Any]) -> InputSignature:
    leaves, spec = pytree.tree_flatten_with_path(kwargs)
    tensors, constants = [], []
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            tensors.append((_leaf_name(path), tuple(leaf.shape), leaf.dtype, leaf.device))
        else:
            constants.append((_leaf_name(path), repr(leaf)))
    return InputSignature(str(spec), tuple(tensors), tuple(constants))


def normalize_call(denoiser: torch.nn.Module | inspect.Signature, args: tuple,
                   kwargs: dict) -> tuple[dict[str, Any], bool]:
    """Bind a denoiser call to its ``forward`` parameters (or to a given signature), by name.

    Returns the arguments without ``return_dict`` (captures always return a
    tuple) and the ``return_dict`` the caller asked for. A Python-number
    ``timestep`` becomes the tensor the denoiser itself would build from it,
    so that it is a graph input instead of a constant baked into the graph.
    """
    sig = denoiser if isinstance(denoiser, inspect.Signature) else inspect.signature(denoiser.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"the call does not match the denoiser's forward{sig}: {e}") from None
    call = dict(bound.arguments)
    for name, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in call:
            call.update(call.pop(name))
    return_dict = call.pop("return_dict", True)
    if "timestep" in call and not isinstance(call["timestep"], torch.Tensor):
        t = call["timestep"]
        ref = next(v for v in call.values() if isinstance(v, torch.Tensor))
        dtype = torch.float64 if isinstance(t, float) else torch.int64
        if ref.device.type in ("mps", "npu"):
            dtype = torch.float32 if isinstance(t, float) else torch.int32
        call["timestep"] = torch.tensor([t], dtype=dtype, device=ref.device)
    return call, return_dict


def fresh_containers(call: dict[str, Any]) -> dict[str, Any]:
    """``call`` with every list, tuple and dict rebuilt (the tensors themselves are shared).

    Denoisers consume some of their inputs: the UNet pops T2I-Adapter's
    ``down_intrablock_additional_residuals`` off their list as it goes down. Anything that runs
    the denoiser's Python on a call besides the call itself (an export, the
    first-call check) takes a copy, so that the real call gets its arguments as
    the pipeline built them.
    """
    return pytree.tree_map(lambda x: x, call)


# Export records `.to()` metadata checks as side-effecting assertion nodes.
# Shapes are static here, so they guard nothing at run time, and they would
# keep otherwise dead attention subgraphs alive.
_METADATA_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}


def _flatten_exported(exported: torch.export.ExportedProgram) -> tuple[fx.GraphModule, list[str]]:
    unlifted = exported.module()
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    input_names: list[str] = []
    for node in unlifted.graph.nodes:
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


def flat_graph_module(owner: torch.nn.Module, graph: fx.Graph,
                      constants: dict[str, torch.Tensor] | None = None) -> fx.GraphModule:
    """``graph`` as a linted ``GraphModule`` whose attributes are ``owner``'s, registered under flat names.

    An attribute path that ``owner`` lacks is looked up in ``constants``
    (tensors the trace lifted out of the code; see :mod:`.capture_store`).
    """
    # Its Python code is generated at its first call: the runtime runs the variants built from it, not it.
    gm = _LazyGraphModule(_flat_attributes(owner, graph, constants or {}), graph, class_name="CapturedDenoiser")
    gm.graph.lint()
    return gm


def _flat_attributes(owner: torch.nn.Module, graph: fx.Graph, constants: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module holding every attribute ``graph`` reads, under a flat name; get_attr targets renamed to match."""
    root = torch.nn.Module()
    for node in graph.nodes:
        if node.op == "call_module":
            name = node.target.replace(".", "_")
            root.add_module(name, owner.get_submodule(node.target))
            node.target = name
            continue
        if node.op != "get_attr":
            continue
        path = node.meta.get(ATTR_PATH, node.target)
        try:
            value = _attribute(owner, path)
        except AttributeError:
            if path not in constants:
                raise
            value = constants[path]
        name = path.replace(".", "_")
        while hasattr(root, name) and getattr(root, name) is not value:
            name += "_"
        if isinstance(value, torch.nn.Parameter):
            root.register_parameter(name, value)
        elif isinstance(value, torch.Tensor):
            root.register_buffer(name, value)
        else:
            setattr(root, name, value)
        node.meta[ATTR_PATH] = path
        node.target = name
    return root


def _attribute(owner: torch.nn.Module, path: str) -> Any:
    value: Any = owner
    for part in path.split("."):
        value = getattr(value, part)
    return value


def parameter_paths(graph_module: fx.GraphModule) -> dict[str, str]:
    """Flat attribute name -> the attribute's path in the denoiser, for every get_attr of a captured graph."""
    return {n.target: n.meta.get(ATTR_PATH, n.target) for n in graph_module.graph.nodes if n.op == "get_attr"}


class Capture:
    """The captured graph of one denoiser for one input signature.

    Attributes:
        signature: The input signature this graph was captured for.
        graph_module: Flat ``GraphModule``; every attention site computed.
        input_names: Its placeholders, in order.
        seconds: Wall time of the export (or of the load from a capture store).
        state_paths: Paths of the denoiser's parameters and buffers the graph reads
            (bound from the model, never stored).
        from_store: Loaded from a :class:`~tgate_fx.core.capture_store.CaptureStore`.
    """

    def __init__(self, signature: InputSignature | None, graph_module: fx.GraphModule, input_names: list[str],
                 seconds: float, state_paths: frozenset[str] = frozenset()):
        self.signature = signature
        self.graph_module = graph_module
        self.input_names = input_names
        self.seconds = seconds
        self.state_paths = state_paths
        self.from_store = False

    def flat_inputs(self, call: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The graph inputs of a normalized call, by placeholder name."""
        return tensor_inputs(call)

    def __repr__(self) -> str:
        return f"Capture({self.signature.describe()}; {len(self.graph_module.graph.nodes)} nodes)"


_DEFAULT = "default"


def resolve_store(store: Any = _DEFAULT):
    """``store`` itself, or for the default, the store the environment configures (``None``: off)."""
    if store == _DEFAULT:
        from .capture_store import default_store

        return default_store()
    return store


def capture_denoiser(module: torch.nn.Module, call: dict[str, Any], store: Any = _DEFAULT) -> Capture:
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
    if store is not None:
        stored = store.load(key, module, call)
        if stored is not None:
            stored.signature = signature
            stored.state_paths = state_paths(module, stored.graph_module)
            return stored
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
    """Within the block, ``module`` runs as a capture traces it: in eval mode, without autograd, and
    without the accelerate hook on its ``forward`` (which moves weights; see :func:`capture_denoiser`)."""
    was_training = module.training
    hooked = "forward" in vars(module) and hasattr(module, "_hf_hook") and hasattr(module, "_old_forward")
    if hooked:
        wrapped, module.forward = module.forward, module._old_forward
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)
        if hooked:
            module.forward = wrapped


def state_paths(module: torch.nn.Module, gm: fx.GraphModule) -> frozenset[str]:
    """Paths of ``module``'s parameters and buffers that ``gm`` reads."""
    state = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    return frozenset(p for p in parameter_paths(gm).values() if p in state)
