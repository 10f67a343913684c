"""Multiply-accumulate counts of graph nodes, from their fake-tensor metadata.

Counted: ``linear``, convolutions, ``mm``/``bmm``/``matmul``/``addmm``/
``baddbmm``, and, when asked, the core of scaled-dot-product attention
(``Q K^T`` and ``A V``). Everything else counts zero, as in calflops' figures
for Linear and Conv layers, which the T-GATE paper reports.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

__all__ = ["node_macs"]

aten = torch.ops.aten

_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
_MATMULS = {aten.mm.default, aten.bmm.default, aten.matmul.default}
_SDPA = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}


def _val(arg):
    return arg.meta.get("val") if isinstance(arg, fx.Node) else None


def _first(val):
    return val[0] if isinstance(val, (tuple, list)) else val


def node_macs(node: fx.Node, *, include_attention: bool = False) -> int:
    """Multiply-accumulates ``node`` performs (0 for nodes that are not counted)."""
    if node.op != "call_function":
        return 0
    target = node.target
    out = _first(node.meta.get("val"))
    if not isinstance(out, torch.Tensor):
        return 0
    if target is aten.linear.default:
        weight = _val(node.args[1])
        return out.numel() * weight.shape[1]
    if target in _CONVS:
        weight = _val(node.args[1])
        return out.numel() * math.prod(weight.shape[1:])
    if target in _MATMULS or target in (aten.addmm.default, aten.baddbmm.default):
        a = _val(node.args[1] if target in (aten.addmm.default, aten.baddbmm.default) else node.args[0])
        return out.numel() * a.shape[-1]
    if include_attention and target in _SDPA:
        q, k, v = (_val(a) for a in node.args[:3])
        batch = math.prod(q.shape[:-2])
        return batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0
