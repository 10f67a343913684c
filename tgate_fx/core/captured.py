"""What a capture is: the input signature of a denoiser call, and its flat graph.

Plain data and the helpers that read a call: :class:`InputSignature`
(:func:`signature_of`), :func:`normalize_call`, :func:`tensor_inputs`, and
:class:`Capture` with its flat ``GraphModule`` (:func:`flat_graph_module`,
:func:`parameter_paths`). Making one (``torch.export``) is
:mod:`~tgate_fx.core.capture`; storing one is :mod:`~tgate_fx.core.capture_store`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils import _pytree as pytree

from .conventions import PerSampleLists, convention_of
from .meta import ATTR_PATH

__all__ = ["Capture", "InputSignature", "attribute_of", "flat_graph_module", "fresh_containers", "normalize_call", "parameter_paths",
           "signature_of", "tensor_inputs"]

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


def normalize_call(denoiser: torch.nn.Module | inspect.Signature, args: tuple, kwargs: dict,
                   convention: PerSampleLists | None = None) -> tuple[dict[str, Any], bool]:
    """Bind a denoiser call to its ``forward`` parameters (or to a given signature), by name.

    A denoiser with a call convention (:mod:`.conventions`: per-sample lists) has its call put in the
    engine's form: batched tensors under the names ``hidden_states``, ``timestep``, ``encoder_hidden_states``.
    Bound to a signature, the call follows ``convention`` (the signature's denoiser's).

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
    if not isinstance(denoiser, inspect.Signature):
        convention = convention_of(denoiser)
    if convention is not None:  # per-sample lists: stacked, under the engine's names (see .conventions)
        call = convention.batched(call)
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
            value = attribute_of(owner, path)
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


def attribute_of(owner: torch.nn.Module, path: str) -> Any:
    """``owner``'s attribute at a dotted ``path`` (``"down_blocks.0.conv.weight"``)."""
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
