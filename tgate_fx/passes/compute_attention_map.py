"""Compute the head-mean attention map of attention cores, explicitly, next to them.

Takes ``scaled_dot_product_attention`` nodes (queries ``(B, H, Lq, d)``, keys
``(B, H, Lk, d)``, an optional additive float or boolean mask). Inserts,
right after each, what ToCa's official ``cached_attention_forward``
computes: ``softmax((q * scale) @ k^T + mask, -1).mean(1)``, with ``scale``
the core's (default ``1 / d ** 0.5``); with ``scale_logits``, the official
FLUX code's ``softmax((q @ k^T) * scale + mask, -1).mean(1)``. The core itself is unchanged (its output
is still computed by the fused kernel); dead-code elimination drops the map
where nothing reads it. With ``rows=(start, stop)``, only the map of those
queries is formed (``(B, stop - start, Lk)``; the mask's rows too, where it has
one per query): a consumer that reduces the map (ToCa's score) forms it in
query chunks of at most :data:`MAP_CHUNK_BYTES`, and at most
:data:`MAX_MAP_CHUNKS` chunks (:func:`query_chunks`); on the CPU, of at most
:data:`CPU_MAP_CHUNK_BYTES`.
Guarantees: new nodes carry ``meta["val"]`` and the core's provenance;
:attr:`ComputeAttentionMap.maps` holds the map node of each core, in the order
given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx

from ..core.graph_passes import GraphPass, PassResult, first_user
from ..core.graph_passes import new_node

__all__ = ["CPU_MAP_CHUNK_BYTES", "MAP_CHUNK_BYTES", "MAX_MAP_CHUNKS", "ComputeAttentionMap", "query_chunks"]

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
# The largest per-head map ``B x H x rows x Lk`` formed at once (its logits and softmax each at most this; read
# at pass time, so a test may lower it): a larger map is formed in query chunks. 1 GiB: FLUX.1 at 1024^2
# (24 heads, 4608 tokens, bf16: 1.02 GB) is one chunk; HunyuanVideo at 720p x 129 frames (680 GB) is 637.
MAP_CHUNK_BYTES = 2 ** 30
# At most this many chunks per core: the chunks are unrolled in the graph (about 8 nodes each), and a graph of
# thousands of them takes tens of minutes to build. Past it the chunks grow instead: HunyuanVideo at 720p x
# 129 frames forms 64 chunks of about 10.6 GB (bf16) each, not 637 of 1 GiB.
MAX_MAP_CHUNKS = 64
# On the CPU a chunk is at most this (still at most MAX_MAP_CHUNKS of them): the map's passes (its product, the
# logits' scale, the softmax, the head mean) are memory-bound there, and a chunk of 1 GiB is fresh pages and
# main-memory traffic for each. Measured on one thread at FLUX.1-dev's 4608 joint tokens (24 heads, fp32), one
# block's score: 6.4-8.5 s in chunks of 1 GiB, 2.8-3.0 s in chunks of 28 MB, 4.4 s in chunks of 7 MB (the
# product's blocks too small); the fused attention itself took 2.2 s.
CPU_MAP_CHUNK_BYTES = 2 ** 25


def query_chunks(core: fx.Node, limit: int | None = None) -> list[tuple[int, int]] | None:
    """The query ranges ``(start, stop)`` whose maps are each at most ``limit`` bytes (default
    :data:`MAP_CHUNK_BYTES`; on the CPU at most :data:`CPU_MAP_CHUNK_BYTES`) for the attention core ``core``, at
    most :data:`MAX_MAP_CHUNKS` of them (larger chunks past that); ``None`` if the whole map fits (one chunk)."""
    limit = MAP_CHUNK_BYTES if limit is None else limit
    q, k = core.args[0].meta["val"], core.args[1].meta["val"]
    if q.device.type == "cpu":
        limit = min(limit, CPU_MAP_CHUNK_BYTES)
    batch, heads, queries = q.shape[0], q.shape[1], q.shape[-2]
    row = batch * heads * k.shape[-2] * q.element_size()  # one query's map, all heads
    if row * queries <= limit:
        return None
    rows = max(1, limit // row, -(-queries // MAX_MAP_CHUNKS))
    return [(start, min(start + rows, queries)) for start in range(0, queries, rows)]


class ComputeAttentionMap(GraphPass):
    def __init__(self, cores: Sequence[fx.Node], scale_logits: bool = False, rows: tuple[int, int] | None = None):
        self.cores = list(cores)
        self.scale_logits = scale_logits
        self.rows = rows
        self.maps: list[fx.Node] = []

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        self.maps = []
        for core in self.cores:
            if core.graph is not graph or core.target is not SDPA:
                raise ValueError(f"{core.name} is not a scaled_dot_product_attention node of this graph")
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
            bound = {**dict(zip(names, core.args)), **core.kwargs}
            if bound.get("is_causal"):
                raise ValueError(f"{core.name} is causal; only non-causal attention maps are computed")
            q, k, mask = bound["query"], bound["key"], bound.get("attn_mask")
            scale = bound.get("scale")
            if scale is None:
                scale = 1.0 / q.meta["val"].shape[-1] ** 0.5  # as the official code (and d ** -0.5 may differ by an ulp)
            anchor = first_user(core)
            with graph.inserting_before(anchor) if anchor is not None else graph.inserting_after(core):
                if self.rows is not None:  # the queries of the range, and the mask's rows where it has them
                    start, stop = self.rows
                    queries = q.meta["val"].shape[-2]
                    q = new_node(graph, aten.slice.Tensor, (q, -2, start, stop), like=core)
                    if mask is not None and mask.meta["val"].dim() >= 2 and mask.meta["val"].shape[-2] == queries > 1:
                        mask = new_node(graph, aten.slice.Tensor, (mask, -2, start, stop), like=core)
                keys_t = new_node(graph, aten.transpose.int, (k, -2, -1), like=core)
                if self.scale_logits:
                    logits = new_node(graph, aten.matmul.default, (q, keys_t), like=core)
                    logits = new_node(graph, aten.mul.Tensor, (logits, scale), like=core)
                else:
                    scaled = new_node(graph, aten.mul.Tensor, (q, scale), like=core)
                    logits = new_node(graph, aten.matmul.default, (scaled, keys_t), like=core)
                if mask is not None:
                    if mask.meta["val"].dtype == torch.bool:
                        logits = new_node(graph, aten.masked_fill.Scalar,
                                                (logits, new_node(graph, aten.logical_not.default, (mask,),
                                                                        like=core), float("-inf")), like=core)
                    else:
                        logits = new_node(graph, aten.add.Tensor, (logits, mask), like=core)
                probs = new_node(graph, aten._softmax.default, (logits, -1, False), like=core)
                self.maps.append(new_node(graph, aten.mean.dim, (probs, [1]), like=core))
        return PassResult(graph_module, bool(self.cores))
