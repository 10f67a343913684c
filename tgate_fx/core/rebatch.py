"""One capture per resolution: a trace at a *probe* batch, specialised to every batch size asked for.

A T-GATE generation runs the CFG batch before its gate and half of it after;
users ask for one picture or four. Exporting each batch size costs a whole
``torch.export`` (tens of seconds for SD-XL). Here the denoiser is exported
once per *batch-free* signature (shapes with the batch left out), at a probe
batch P: the smallest prime from 11 up that divides no dimension of the
call's tensors and none of the denoiser's parameters. Its inputs are fake
tensors, so nothing of that size is allocated.

In the static graph of that trace the sizes that follow the batch are
multiples of P (``P``, ``P * heads``, ``P * frames``) and, P dividing no
other dimension, no other size is. The graph for batch N is a copy of the
probe graph with every integer ``k * P`` in the node arguments and in the
recorded shapes and strides replaced by ``k * N``: a fraction of a second
instead of an export.
The disk store (:mod:`~tgate_fx.core.capture_store`) keeps the probe
capture, so a second process serves every batch size of that resolution
from one entry.

That reasoning is not taken on trust. A parameter or constant whose shape
holds a multiple of P stops the specialisation, and every specialised graph
is checked once, on the real call that asked for it, against the denoiser
itself run eagerly: every node must compute the shape and dtype it records
(the passes that build the variants read those records), and the outputs
must agree within ``TOLERANCE`` of their largest magnitude (calls on the
meta device, which are only counted and inspected, have no values: their
graphs are checked for the shapes alone). A trace
that depends on the batch in another way (a loop over the batch, a batch
split inside the model) fails to specialise or fails the check; that batch
size is then exported on its own, with a :class:`RebatchWarning`, and the
failed graph is never run for a step. With a capture store, a passed check
is recorded next to the stored probe graph (bound to its digest), so a later
process that loads the same entry does not check that batch size again.

A constant of the model's code can be a multiple of P by chance (Wan's rotary
split at head dim 128 is ``[44, 42, 42]``, and 44 = 4 x 11): the specialised
graph then fails its check. Once per resolution the denoiser is then exported
again, at a second probe Q that divides no integer of the first probe graph:
the constants that are not the batch's are the same in both traces, so none
of them is a multiple of Q. Only if that one fails too is each batch size
exported on its own.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils import _pytree as pytree

from .capture import as_traced, capture_denoiser, state_paths
from .capture_store import DEFAULT, resolve_store
from .conventions import convention_of
from .captured import Capture, InputSignature, fresh_containers, signature_of
from .meta import ATTR_PATH
from .generation import batched_sizes

__all__ = ["BatchCaptures", "RebatchError", "RebatchWarning", "TOLERANCE", "check_capture", "probe_batch", "specialize"]

# Candidates for the probe batch, in order of preference (small: a trace that loops over the batch stays small).
_PRIMES = (11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 101, 103, 107,
           109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167, 173, 179, 181, 191, 193, 197, 199)
# A specialised graph's outputs may differ from the eager denoiser's by this much of their largest magnitude.
TOLERANCE = 1e-4


class RebatchError(Exception):
    """The probe capture cannot serve a batch size (the batch size is then exported on its own)."""


class RebatchWarning(UserWarning):
    """A batch size was exported on its own: correct, but the first call paid another export."""


def probe_batch(dims: set[int]) -> int | None:
    """The smallest candidate prime dividing none of ``dims`` (``None`` if every candidate divides one)."""
    for p in _PRIMES:
        if all(d % p for d in dims if d):
            return p
    return None


def _tensor_dims(tensors) -> set[int]:
    return {d for t in tensors for d in t.shape}


def _multiple(value: Any, probe: int) -> bool:
    return type(value) is int and value != 0 and value % probe == 0


class _Rebatch:
    """Replaces every integer ``k * probe`` by ``k * batch``: in node arguments, and in recorded values."""

    def __init__(self, probe: int, batch: int):
        self.probe, self.batch = probe, batch

    def size(self, value: Any) -> Any:
        return value // self.probe * self.batch if _multiple(value, self.probe) else value

    def arg(self, a: Any) -> Any:
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self.arg(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self.arg(a.start), self.arg(a.stop), self.arg(a.step))
        return self.size(a)

    def val(self, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return type(v)(self.val(x) for x in v)
        if isinstance(v, FakeTensor):
            shape, stride = [self.size(d) for d in v.shape], [self.size(d) for d in v.stride()]
            if shape == list(v.shape) and stride == list(v.stride()):
                return v
            # straight from a meta tensor, in the recorded value's fake mode: no dispatch
            return FakeTensor(v.fake_mode, torch.empty_strided(shape, stride, dtype=v.dtype, device="meta"), v.device)
        return self.size(v)


def specialize(probe_capture: Capture, probe: int, batch: int) -> Capture:
    """The capture for ``batch`` from ``probe_capture``, traced at batch ``probe``; it is not modified.

    The new graph module shares the probe capture's parameters; its Python code is generated at its
    first call (the runtime runs only the variants built from it). Raises :class:`RebatchError` if a
    parameter or constant the graph reads has a size that is a multiple of ``probe`` (it could not
    be told from a batch size).
    """
    source = probe_capture.graph_module
    for node in source.graph.nodes:
        val = node.meta.get("val")
        if node.op == "get_attr" and isinstance(val, torch.Tensor) and any(_multiple(d, probe) for d in val.shape):
            raise RebatchError(f"{node.meta.get(ATTR_PATH, node.target)} has shape {tuple(val.shape)}, a multiple of "
                               f"the probe batch {probe}")
    rebatch = _Rebatch(probe, batch)
    graph = fx.Graph()
    graph.output(graph.graph_copy(source.graph, {}))
    for node in graph.nodes:
        if node.op in ("call_function", "call_method"):
            node.args, node.kwargs = rebatch.arg(node.args), rebatch.arg(node.kwargs)
        if "val" in node.meta:
            node.meta["val"] = rebatch.val(node.meta["val"])
    gm = _LazyGraphModule(source, graph, class_name=type(source).__name__)
    return Capture(None, gm, list(probe_capture.input_names), 0.0)


def check_capture(capture: Capture, module: torch.nn.Module, call: dict[str, Any]) -> None:
    """Run ``capture`` and ``module`` eagerly on ``call``; :class:`RebatchError` unless they agree.

    Agree: every node of the graph computes the shape and dtype it records (what the passes read);
    the same number of outputs as the denoiser, of the same shapes and dtypes, and values within
    ``TOLERANCE`` of the largest magnitude of the eager output. A call on the meta device has no
    values: its graph is run on it for the shapes alone (its graphs are counted and inspected, never
    run for a picture: ``tgate-fx inspect --arch``, :mod:`tgate_fx.accounting`; a wrong shape there
    is a wrong count).
    """
    inputs = capture.flat_inputs(call)
    if any(t.device.type == "meta" for t in inputs.values()):
        try:  # no values to compare, but every node must still compute the shape it records
            _ShapeChecked(capture.graph_module).run(*(inputs[name] for name in capture.input_names))
        except RebatchError:
            raise
        except Exception as e:  # noqa: BLE001 - a graph that does not run is a graph that does not fit
            raise RebatchError(f"the graph does not run on the meta device: {type(e).__name__}: {e}") from None
        return
    with as_traced(module):
        expected = [t for t in pytree.tree_leaves(module(**fresh_containers(call), return_dict=False)) if isinstance(t, torch.Tensor)]
        try:
            got = list(_ShapeChecked(capture.graph_module).run(*(inputs[name] for name in capture.input_names)))
        except RebatchError:
            raise
        except Exception as e:  # noqa: BLE001 - a graph that does not run is a graph that does not fit
            raise RebatchError(f"the graph does not run: {type(e).__name__}: {e}") from None
    if len(got) != len(expected):
        raise RebatchError(f"{len(got)} outputs, the denoiser returns {len(expected)}")
    for i, (g, e) in enumerate(zip(got, expected)):
        if g.shape != e.shape or g.dtype != e.dtype:
            raise RebatchError(f"output {i} is {tuple(g.shape)} {g.dtype}, the denoiser's {tuple(e.shape)} {e.dtype}")
        if not e.numel():
            continue
        e, g = e.double(), g.double()
        error, scale = (g - e).abs().max().item(), e.abs().max().item()
        if not error <= TOLERANCE * max(scale, 1.0):  # NaN fails too
            raise RebatchError(f"output {i} differs from the denoiser's by {error:.3g} (largest |value| {scale:.3g})")


class _ShapeChecked(fx.Interpreter):
    """Runs a graph and checks every value against the shape and dtype its node records (the passes
    that build the variants read those)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        val = n.meta.get("val")
        pairs = zip(result, val) if isinstance(result, (list, tuple)) and isinstance(val, (list, tuple)) \
            else [(result, val)]
        for got, recorded in pairs:
            if isinstance(got, torch.Tensor) and isinstance(recorded, torch.Tensor) and (
                    got.shape != recorded.shape or got.dtype != recorded.dtype):
                raise RebatchError(f"node {n.name} computes {tuple(got.shape)} {got.dtype}, its record says "
                                   f"{tuple(recorded.shape)} {recorded.dtype}")
        return result


class BatchCaptures:
    """The captures of one denoiser, at any batch size, from one export per batch-free signature.

    Calling it with a normalized call returns that call's :class:`Capture`
    (specialised from the probe capture, checked against the denoiser on the
    call itself). The caller keeps the captures; this keeps the probe
    captures.

    Args:
        module: The denoiser.
        sample_arg: The name of its latents argument (whose first dimension is the batch).
        store: The capture store for the probe captures (see :func:`capture_denoiser`).

    Attributes:
        fallbacks: ``(batch, reason)`` of each batch size exported on its own.
    """

    def __init__(self, module: torch.nn.Module, sample_arg: str, store: Any = DEFAULT):
        self.module = module
        self.sample_arg = sample_arg
        self.store = store
        self.fallbacks: list[tuple[int, str]] = []
        # batch-free signature -> (probe capture, its store key, its probe batch), or None (its export failed)
        self._probes: dict[InputSignature, tuple[Capture, str | None, int] | None] = {}
        self._reprobed: set[InputSignature] = set()
        self._module_dims: set[int] | None = None

    def clear(self) -> None:
        """Forget the probe captures (the denoiser's state changed)."""
        self._probes.clear()
        self._module_dims = None

    def __call__(self, call: dict[str, Any]) -> Capture:
        start = time.perf_counter()
        convention = convention_of(self.module)
        if convention is not None and convention.unrolled_batch:  # its trace loops over the batch: one per size
            return capture_denoiser(self.module, call, resolve_store(self.store))
        sample = call[self.sample_arg]
        batch, sizes = sample.shape[0], batched_sizes(sample, type(self.module).__name__)
        if self._module_dims is None:
            self._module_dims = _tensor_dims([*self.module.parameters(), *self.module.buffers()])
        tensors = [x for x in pytree.tree_leaves(call) if isinstance(x, torch.Tensor)]
        dims = _tensor_dims(tensors) | self._module_dims
        probe = probe_batch(dims)
        if probe is None:
            return self._alone(call, batch, "every candidate probe batch divides a dimension of the call or model")
        probe_call = _probe_call(call, sizes, batch, probe)
        key = signature_of(probe_call)  # the batch-free signature
        store = resolve_store(self.store)
        if key not in self._probes:
            try:
                self._probes[key] = self._export_probe(probe_call, probe, store)
            except Exception as e:  # noqa: BLE001 - the plain export below decides whether the call can be captured
                self._probes[key] = None
                return self._alone(call, batch, f"the export at probe batch {probe} failed: {type(e).__name__}: {e}")
        if self._probes[key] is None:
            return self._alone(call, batch, f"the export at probe batch {probe} failed before")
        try:
            capture = self._specialized(self._probes[key], batch, call, store)
        except Exception as e:  # noqa: BLE001 - a constant may be a multiple of the probe by chance: probe again
            second = self._second_probe(key, call, sizes, batch, store, dims)
            if second is None:
                return self._alone(call, batch, f"{type(e).__name__}: {e}")
            try:
                capture = self._specialized(second, batch, call, store)
            except Exception as e2:  # noqa: BLE001 - any failure: this batch size is exported on its own
                return self._alone(call, batch, f"{type(e2).__name__}: {e2} (and at the first probe batch: "
                                                f"{type(e).__name__}: {e})")
        capture.signature = signature_of(call)
        capture.state_paths = state_paths(self.module, capture.graph_module)
        capture.from_store = self._probes[key][0].from_store
        capture.seconds = time.perf_counter() - start
        return capture

    def _export_probe(self, probe_call, probe: int, store) -> tuple[Capture, str | None, int]:
        return (capture_denoiser(self.module, probe_call, store),
                store.key(self.module, signature_of(probe_call)) if store is not None else None, probe)

    def _specialized(self, probed: tuple[Capture, str | None, int], batch: int, call, store) -> Capture:
        """The probe capture specialised to ``batch`` and checked on ``call`` (raises if it does not fit)."""
        traced, stored_as, probe = probed
        capture = specialize(traced, probe, batch)
        # A specialisation depends on nothing but the stored probe graph and the batch: once checked, it is
        # known good in every process that loads that same entry (the store key covers the model and its state).
        # on the meta device only the shapes can be checked (its own fact: before the shape check, meta calls
        # were not checked at all, and stores may hold their "checked" facts)
        meta = any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in pytree.tree_leaves(call))
        fact = f"batch{batch}.shapes.checked" if meta else f"batch{batch}.checked"
        if stored_as is None or not store.has_fact(stored_as, fact):
            check_capture(capture, self.module, call)
            if stored_as is not None:
                store.record_fact(stored_as, fact)
        return capture

    def _second_probe(self, key, call, sizes, batch: int, store, dims: set[int]):
        """Once per batch-free signature: the export at a probe dividing no integer of the first probe graph
        (and no dimension), which then serves that signature; ``None`` if there is none or it fails."""
        if key in self._reprobed:
            return None
        self._reprobed.add(key)
        traced, _, first = self._probes[key]
        probe = probe_batch(dims | _graph_ints(traced.graph_module.graph) | {first})
        if probe is None:
            return None
        try:
            self._probes[key] = self._export_probe(_probe_call(call, sizes, batch, probe), probe, store)
        except Exception:  # noqa: BLE001 - the caller exports this batch size on its own
            return None
        return self._probes[key]

    def _alone(self, call: dict[str, Any], batch: int, reason: str) -> Capture:
        self.fallbacks.append((batch, reason))
        warnings.warn(f"tgate_fx: batch {batch} is exported on its own, not served by the capture of its "
                      f"resolution ({reason[:500]})", RebatchWarning, stacklevel=3)
        return capture_denoiser(self.module, call, resolve_store(self.store))


def _graph_ints(graph: fx.Graph) -> set[int]:
    """The absolute values of the integers in the graph's node arguments (sizes, split sizes, slices)."""
    out: set[int] = set()

    def visit(a: Any) -> None:
        if isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)
        elif isinstance(a, slice):
            visit((a.start, a.stop, a.step))
        elif type(a) is int:
            out.add(abs(a))

    for node in graph.nodes:
        visit((node.args, node.kwargs))
    return out


def _probe_call(call: dict[str, Any], sizes: set[int], batch: int, probe: int) -> dict[str, Any]:
    """``call`` as fake tensors, every batched tensor at batch ``probe`` (nothing is allocated)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.ndim and x.shape[0] in sizes:
            with mode:
                return torch.empty((x.shape[0] // batch * probe, *x.shape[1:]), dtype=x.dtype, device=x.device)
        return mode.from_tensor(x)

    return pytree.tree_map(fake, call)
