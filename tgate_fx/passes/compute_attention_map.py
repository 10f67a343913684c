"""Compute the head-mean attention map of attention cores, explicitly, next to them.

Takes ``scaled_dot_product_attention`` nodes (queries ``(B, H, Lq, d)``, keys
``(B, H, Lk, d)``, an optional additive float or boolean mask). Inserts,
right after each, what ToCa's official ``cached_attention_forward``
computes: ``softmax((q * scale) @ k^T + mask, -1).mean(1)``, with ``scale``
the core's (default ``1 / d ** 0.5``); with ``scale_logits``, the official
FLUX code's ``softmax((q @ k^T) * scale + mask, -1).mean(1)``. The core itself is unchanged (its output
is still computed by the fused kernel); dead-code elimination drops the map
where nothing reads it. Guarantees: new nodes carry ``meta["val"]`` and the
core's provenance; :attr:`ComputeAttentionMap.maps` holds the ``(B, Lq, Lk)``
map node of each core, in the order given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx

from ..core.graph_passes import GraphPass, PassResult, first_user
from ..core.graph_passes import new_node

__all__ = ["ComputeAttentionMap"]

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


class ComputeAttentionMap(GraphPass):
    def __init__(self, cores: Sequence[fx.Node], scale_logits: bool = False):
        self.cores = list(cores)
        self.scale_logits = scale_logits
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
