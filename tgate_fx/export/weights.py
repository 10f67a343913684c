"""One weights file for every model of a bundle.

The graph variants of a capture share the denoiser's parameters, and the
exporters write each variant with its own copy of them. This module moves the
tensors of a set of ONNX models into a single external-data file, each
distinct tensor once: two initializers whose dtype, shape and bytes are equal
are stored at the same offset, whatever their names. Content rather than
names decides because exporters rename tensors they produce by constant
folding (a transposed ``Linear`` weight becomes ``onnx::MatMul_123``), and
those are equal across variants too.

Tensors smaller than ``min_bytes`` stay inside their model: they are scalars
and shape constants, and moving them would cost more in references than it
saves.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["SharedWeights", "WeightsWriter"]

# Large tensors start on a page boundary so that onnxruntime can map them
# instead of reading them; small ones only need an aligned start.
_PAGE = 4096
_PAGE_ALIGN_FROM = 1 << 20
_ALIGN = 64


@dataclass
class SharedWeights:
    """What a :class:`WeightsWriter` wrote.

    Attributes:
        path: The weights file.
        bytes: Its size.
        tensors: Distinct tensors stored.
        references: Initializers, over all models, that now point into it.
    """

    path: str
    bytes: int
    tensors: int
    references: int


def _tensors(graph) -> Iterator:
    """Every tensor of ``graph`` that can carry data: initializers and tensor attributes, in subgraphs too."""
    from onnx import AttributeProto

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == AttributeProto.GRAPH:
                yield from _tensors(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _tensors(g)


def _payload(tensor) -> bytes | None:
    """The tensor's bytes in external-data layout (little-endian raw data), or ``None`` if it has none."""
    from onnx import TensorProto, numpy_helper

    if tensor.data_location == TensorProto.EXTERNAL:
        raise ValueError(f"tensor {tensor.name!r} still refers to external data; load the model with its data first")
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    return numpy_helper.to_array(tensor).tobytes()


def _clear_data(tensor) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)


class WeightsWriter:
    """Writes the shared weights file, one model at a time (models are edited in place).

    Only one model needs to be in memory at once: add it, then save it next to
    the weights file without external-data conversion (``onnx.save(model, path)``);
    its tensors already point into the file.

    Example::

        with WeightsWriter(os.path.join(out_dir, "weights.bin")) as weights:
            for model, path in models:
                weights.add(model)
                onnx.save(model, path)
        print(weights.result)
    """

    def __init__(self, path: str, *, min_bytes: int = 1024):
        self.path = path
        self.min_bytes = min_bytes
        self._location = os.path.basename(path)
        self._offsets: dict[tuple, tuple[int, int]] = {}
        self._references = 0
        self._file = open(path, "wb")
        self.result: SharedWeights | None = None

    def add(self, model) -> int:
        """Move ``model``'s tensors into the file; returns how many now refer to it."""
        from onnx import TensorProto

        count = 0
        for tensor in _tensors(model.graph):
            data = _payload(tensor)
            if data is None or len(data) < self.min_bytes:
                continue
            key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).digest())
            if key not in self._offsets:
                f = self._file
                align = _PAGE if len(data) >= _PAGE_ALIGN_FROM else _ALIGN
                f.write(b"\0" * (-f.tell() % align))
                self._offsets[key] = (f.tell(), len(data))
                f.write(data)
            offset, length = self._offsets[key]
            _clear_data(tensor)
            tensor.data_location = TensorProto.EXTERNAL
            del tensor.external_data[:]
            for k, v in (("location", self._location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = k, v
            count += 1
        self._references += count
        return count

    def close(self) -> SharedWeights:
        if self.result is None:
            self.result = SharedWeights(self.path, self._file.tell(), len(self._offsets), self._references)
            self._file.close()
        return self.result

    def __enter__(self) -> "WeightsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
