"""A capture cache on disk: captured graphs, never weights, keyed by everything that changes them.

``torch.export`` is the first call's main cost (seconds for a tiny UNet, tens
of seconds for SD-XL), and it is paid again in every new process. A
:class:`CaptureStore` keeps the flat captured graph of each (model, call
signature, module state) in a file, so that a later process binds it to its
own model instead of exporting again.

What is stored: every node of the flat graph (op, target, arguments), the
metadata the analysis and passes read (``val`` as shape/stride/dtype/device,
``nn_module_stack``, ``stack_trace``, the parameter path of each
``get_attr``), and the values of small constants the trace lifted out of the
code. Parameters and buffers are *not* stored: on load each ``get_attr`` is
bound, by its path, to the model's own parameter object, whose shape and
dtype must match the stored ones.

The key (SHA-256) covers the denoiser class, its config, the call's input
signature (shapes, dtypes, devices, constants), a portable fingerprint of the
module state a trace bakes in (attention processors, adapters and their
scales, fused projections, parameter shapes; see :mod:`~tgate_fx.core.state`)
and the torch, diffusers and tgate_fx versions. An entry is a header (format,
key, SHA-256 of the payload) and a zlib-compressed payload of plain data,
read back with an unpickler that admits no class at all. An entry that is
unreadable, corrupt, for another key, or that does not bind to the model
(a parameter missing or of another shape) is deleted and captured again;
it is never used.

Where: ``$TGATE_FX_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/tgate_fx/captures``,
else ``~/.cache/tgate_fx/captures``. ``TGATE_FX_CAPTURE_CACHE=0`` turns it
off. Writes go to a temporary file, flushed to disk and renamed into place,
so concurrent processes never read a half-written entry. Processes that
share a store (replicas on one volume) take the entry's lock file
(``<entry>.lock``, ``fcntl.flock``) around "load, else export and save"
(:meth:`CaptureStore.exclusive`): the first exports, the others wait and
load its entry, so one key is exported once. A corrupt entry is deleted only
if it is still the file that was read (a concurrent writer's good entry is
kept).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import operator
import os
import pickle
import tempfile
import time
import zlib
from typing import Any

import torch
import torch.fx as fx

from .captured import Capture, InputSignature, flat_graph_module, tensor_inputs
from .meta import ATTR_PATH
from .state import fingerprint

__all__ = ["DEFAULT", "CaptureStore", "default_store", "resolve_store"]

FORMAT = 1
_MAGIC = b"tgate_fx.capture\n"
_OFF = ("0", "off", "false", "no")


#: ``store=`` value meaning "the store the environment configures" (see :func:`default_store`).
DEFAULT = "default"


def resolve_store(store: Any = DEFAULT) -> CaptureStore | None:
    """``store`` itself, or for :data:`DEFAULT`, the store the environment configures (``None``: off)."""
    return default_store() if store == DEFAULT else store


def default_store() -> CaptureStore | None:
    """The store the environment asks for (see the module docstring), or ``None`` if it is off."""
    if os.environ.get("TGATE_FX_CAPTURE_CACHE", "1").strip().lower() in _OFF:
        return None
    directory = os.environ.get("TGATE_FX_CACHE_DIR")
    if not directory:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        directory = os.path.join(base, "tgate_fx", "captures")
    return CaptureStore(directory)


class _Unstorable(Exception):
    """The graph holds something this format does not describe (it is then exported each time)."""


class CaptureStore:
    """Captured graphs on disk, under ``directory`` (created on first write).

    Attributes:
        hits, misses: Loads that found a usable entry, and that did not.
        rejected: Entries found but refused (corrupt, stale, not binding), each deleted.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.hits = self.misses = self.rejected = 0

    def __repr__(self) -> str:
        return f"CaptureStore({self.directory!r}, hits={self.hits}, misses={self.misses}, rejected={self.rejected})"

    # --- keys ------------------------------------------------------------------
    @staticmethod
    def key(module: torch.nn.Module, signature: InputSignature) -> str:
        """SHA-256 of everything that changes the graph ``module`` gives for calls of ``signature``."""
        import diffusers

        from .._version import __version__

        cls = type(module)
        config = getattr(module, "config", None)
        parts = [
            FORMAT, f"{cls.__module__}.{cls.__qualname__}",
            # diffusers' private config entries (`_use_default_values`: a list in set order) vary by process
            json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")} if config is not None
                       else None, sort_keys=True, default=str),
            signature.structure,
            [(n, list(s), str(d), str(dev)) for n, s, d, dev in signature.tensors],
            list(signature.constants),
            repr(fingerprint(module, portable=True)),
            torch.__version__, diffusers.__version__, __version__,
        ]
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    def path(self, key: str) -> str:
        return os.path.join(self.directory, key[:2], key + ".capture")

    @contextlib.contextmanager
    def exclusive(self, key: str):
        """Hold the lock of ``key``'s entry (a lock file next to it, ``flock``): every process that shares
        the store and asks for the same key waits here, so only the first exports and the others load
        what it saved. Where ``fcntl`` is missing (Windows) nothing is locked: the writes stay atomic, a
        key may then be exported by more than one process."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        lock = f"{self.path(key)}.lock"
        try:
            os.makedirs(os.path.dirname(lock), exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # a read-only store: nothing will be written, nothing to order
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # --- load / save -------------------------------------------------------------
    def load(self, key: str, module: torch.nn.Module, call: dict[str, Any]) -> Capture | None:
        """The stored capture of ``key`` bound to ``module``, or ``None`` (a bad entry is deleted)."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                read_as = os.fstat(f.fileno())
                blob = f.read()
        except OSError:
            self.misses += 1
            return None
        start = time.perf_counter()
        try:
            data = _read(blob, key)
            capture = _decode(data, module)
            if sorted(capture.input_names) != sorted(tensor_inputs(call)):
                raise ValueError(f"inputs {capture.input_names} differ from the call's")
        except Exception:  # noqa: BLE001 - any failure means the entry cannot be trusted
            self.rejected += 1
            self.misses += 1
            _remove_if_same(path, read_as)
            return None
        capture.seconds = time.perf_counter() - start
        capture.from_store = True
        self.hits += 1
        return capture

    # --- facts about an entry --------------------------------------------------------
    def _fact_path(self, key: str, fact: str) -> str:
        return f"{self.path(key)}.{fact}"

    def _digest(self, key: str) -> str | None:
        try:
            with open(self.path(key), "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        except OSError:
            return None

    def record_fact(self, key: str, fact: str) -> None:
        """Remember that ``fact`` (e.g. ``"batch2.checked"``) holds for the entry of ``key`` as it is now."""
        digest = self._digest(key)
        if digest is None:
            return
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path(key)), prefix=".tmp_")
        with os.fdopen(fd, "w") as f:
            f.write(digest)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._fact_path(key, fact))

    def has_fact(self, key: str, fact: str) -> bool:
        """Whether ``fact`` was recorded for the entry of ``key`` exactly as it is now (a rewritten entry
        has none)."""
        try:
            with open(self._fact_path(key, fact)) as f:
                recorded = f.read()
        except OSError:
            return False
        return recorded == self._digest(key)

    def save(self, key: str, capture: Capture) -> bool:
        """Store ``capture`` under ``key``; ``False`` if its graph holds what the format cannot describe."""
        try:
            payload = zlib.compress(pickle.dumps(_encode(capture), protocol=pickle.HIGHEST_PROTOCOL), 3)
        except _Unstorable:
            return False
        header = json.dumps({"format": FORMAT, "key": key, "sha256": hashlib.sha256(payload).hexdigest()})
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC + header.encode() + b"\n" + payload)
                f.flush()
                os.fsync(f.fileno())  # a crash after the rename leaves the whole entry, not an empty file
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
        return True


def _remove_if_same(path: str, read_as: os.stat_result) -> None:
    """Delete ``path`` if it is still the file ``read_as`` describes (not one a writer renamed in since)."""
    try:
        now = os.stat(path)
    except OSError:
        return
    if (now.st_ino, now.st_dev, now.st_mtime_ns, now.st_size) == (read_as.st_ino, read_as.st_dev,
                                                                   read_as.st_mtime_ns, read_as.st_size):
        _remove(path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class _PlainUnpickler(pickle.Unpickler):
    """Reads plain data only: an entry can never make the loader build an object."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"capture entries hold plain data only, not {module}.{name}")


def _read(blob: bytes, key: str) -> dict:
    if not blob.startswith(_MAGIC):
        raise ValueError("not a capture entry")
    header, _, payload = blob[len(_MAGIC):].partition(b"\n")
    meta = json.loads(header)
    if meta.get("format") != FORMAT or meta.get("key") != key:
        raise ValueError("another format or key")
    if hashlib.sha256(payload).hexdigest() != meta.get("sha256"):
        raise ValueError("payload checksum differs")
    return _PlainUnpickler(io.BytesIO(zlib.decompress(payload))).load()


# --- encoding ----------------------------------------------------------------------
_PY_TARGETS = {f"operator.{name}": getattr(operator, name) for name in ("getitem", "add", "sub", "mul",
                                                                         "floordiv", "truediv", "neg")}


def _target(target: Any) -> tuple:
    if isinstance(target, torch._ops.OpOverload):
        namespace, name = target._schema.name.split("::")
        return ("op", namespace, name, target._overloadname)
    for key, fn in _PY_TARGETS.items():
        if target is fn:
            return ("py", key)
    if isinstance(target, str):
        return ("str", target)
    raise _Unstorable(f"target {target!r}")


def _resolve(spec: tuple) -> Any:
    kind = spec[0]
    if kind == "op":
        _, namespace, name, overload = spec
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    if kind == "py":
        return _PY_TARGETS[spec[1]]
    return spec[1]


def _arg(x: Any, ids: dict) -> Any:
    if isinstance(x, fx.Node):
        return ("n", ids[x])
    if isinstance(x, (bool, int, float, str)) or x is None:
        return ("v", x)
    if isinstance(x, (list, tuple)):
        return ("l" if isinstance(x, list) else "t", [_arg(v, ids) for v in x])
    if isinstance(x, dict):
        return ("d", [(k, _arg(v, ids)) for k, v in x.items()])
    if isinstance(x, torch.dtype):
        return ("dtype", str(x).removeprefix("torch."))
    if isinstance(x, torch.device):
        return ("device", str(x))
    if isinstance(x, torch.memory_format):
        return ("memory_format", str(x).removeprefix("torch."))
    if isinstance(x, torch.layout):
        return ("layout", str(x).removeprefix("torch."))
    if isinstance(x, slice):
        return ("slice", [_arg(v, ids) for v in (x.start, x.stop, x.step)])
    raise _Unstorable(f"argument {x!r}")


def _unarg(spec: Any, nodes: list) -> Any:
    kind, value = spec
    if kind == "n":
        return nodes[value]
    if kind == "v":
        return value
    if kind in ("l", "t"):
        items = [_unarg(v, nodes) for v in value]
        return items if kind == "l" else tuple(items)
    if kind == "d":
        return {k: _unarg(v, nodes) for k, v in value}
    if kind == "dtype":
        return getattr(torch, value)
    if kind == "device":
        return torch.device(value)
    if kind in ("memory_format", "layout"):
        return getattr(torch, value)
    if kind == "slice":
        return slice(*(_unarg(v, nodes) for v in value))
    raise ValueError(f"unknown argument kind {kind!r}")


def _val(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("T", list(x.shape), list(x.stride()), str(x.dtype).removeprefix("torch."), str(x.device))
    if isinstance(x, (list, tuple)):
        return ("l" if isinstance(x, list) else "t", [_val(v) for v in x])
    if isinstance(x, (bool, int, float)) or x is None:
        return ("v", x)
    raise _Unstorable(f"value {type(x).__name__}")


def _unval(spec: Any, mode) -> Any:
    kind = spec[0]
    if kind == "T":
        # a fake tensor straight from a meta tensor: no dispatch through the fake mode (10x faster)
        from torch._subclasses.fake_tensor import FakeTensor

        _, shape, stride, dtype, device = spec
        meta = torch.empty_strided(shape, stride, dtype=getattr(torch, dtype), device="meta")
        return FakeTensor(mode, meta, torch.device(device))
    if kind in ("l", "t"):
        items = [_unval(v, mode) for v in spec[1]]
        return items if kind == "l" else tuple(items)
    return spec[1]


def _module_stack(stack: dict) -> list:
    out = []
    for key, (path, kind) in stack.items():
        out.append((key, path, kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"))
    return out


def _encode(capture: Capture) -> dict:
    gm = capture.graph_module
    ids: dict[fx.Node, int] = {}
    nodes, constants = [], {}
    for i, node in enumerate(gm.graph.nodes):
        ids[node] = i
        if node.op == "call_module":
            raise _Unstorable("call_module")
        entry = {"op": node.op, "name": node.name, "target": _target(node.target),
                 "args": _arg(node.args, ids), "kwargs": _arg(node.kwargs, ids)}
        if "val" in node.meta:
            entry["val"] = _val(node.meta["val"])
        if "nn_module_stack" in node.meta:
            entry["stack"] = _module_stack(node.meta["nn_module_stack"])
        if "stack_trace" in node.meta:
            entry["trace"] = node.meta["stack_trace"]
        if node.op == "get_attr":
            entry["path"] = node.meta.get(ATTR_PATH, node.target)
            value = getattr(gm, node.target)
            if not isinstance(value, torch.Tensor):
                raise _Unstorable(f"attribute {node.target} of type {type(value).__name__}")
            if not isinstance(value, torch.nn.Parameter) and entry["path"] not in capture.state_paths:
                if value.device.type == "meta":
                    raise _Unstorable("a constant on the meta device")
                constants[entry["path"]] = (str(value.dtype).removeprefix("torch."), list(value.shape),
                                            value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                                            if value.numel() else b"")
        nodes.append(entry)
    return {"nodes": nodes, "inputs": list(capture.input_names), "constants": constants}


def _decode(data: dict, module: torch.nn.Module) -> Capture:
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = fx.Graph()
    nodes: list[fx.Node] = []
    vals = []
    for entry in data["nodes"]:
        args = _unarg(entry["args"], nodes)
        kwargs = _unarg(entry["kwargs"], nodes)
        node = graph.create_node(entry["op"], _resolve(entry["target"]), args, kwargs, name=entry["name"])
        if node.name != entry["name"]:
            raise ValueError(f"node name {entry['name']} is taken")
        if "stack" in entry:
            node.meta["nn_module_stack"] = {k: (p, kind) for k, p, kind in entry["stack"]}
        if "trace" in entry:
            node.meta["stack_trace"] = entry["trace"]
        if "path" in entry:
            node.meta[ATTR_PATH] = entry["path"]
        vals.append((node, entry.get("val")))
        nodes.append(node)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for node, spec in vals:
        if spec is not None:
            node.meta["val"] = _unval(spec, mode)
    constants = {path: _constant(*spec) for path, spec in data["constants"].items()}
    gm = flat_graph_module(module, graph, constants)
    for node in gm.graph.nodes:  # every bound attribute must be what the graph was traced with
        if node.op == "get_attr":
            value, val = getattr(gm, node.target), node.meta.get("val")
            if isinstance(val, torch.Tensor) and (tuple(value.shape) != tuple(val.shape) or value.dtype != val.dtype):
                raise ValueError(f"{node.meta[ATTR_PATH]} is {tuple(value.shape)} {value.dtype}, the graph was "
                                 f"traced with {tuple(val.shape)} {val.dtype}")
    return Capture(None, gm, data["inputs"], 0.0)


def _constant(dtype: str, shape: list, raw: bytes) -> torch.Tensor:
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return t.view(getattr(torch, dtype)).reshape(shape).clone()
