"""The graph rewrites that make a variant exportable to ONNX (:mod:`tgate_fx.export.lowering`) keep what the
graph computes: each rewritten graph against the function it was traced from, on random inputs."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from tgate_fx.export.lowering import (complex_as_real, lowered_for_onnx, pad_sequences_written_out,
                                      view_writes_functionalized)

TABLE = torch.polar(torch.ones(16, 4), torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))


def rotary(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Z-Image's rotary embedding, condensed: a complex table indexed, split and joined, then a complex product."""
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, L, H, 4)
    table = TABLE[ids]  # (L, 4) complex64
    left, right = table.split([1, 3], dim=-1)
    table = torch.cat([right[:, :1], left, right[:, 1:]], dim=-1)
    table = pad_sequence([table, table[:3]], batch_first=True)  # (2, L, 4)
    out = torch.view_as_real(z * table.unsqueeze(-2)).flatten(3)
    return out + torch.view_as_real(table.select(0, 1)).sum()


def _traced(fn, *args) -> torch.fx.GraphModule:
    """``fn``'s ATen graph as the captures are (``torch.export``; constants read by ``get_attr``)."""
    class Fn(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    return torch.export.export(Fn(), args).module()


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _complex_nodes(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype.is_complex]


def test_complex_values_are_carried_as_real_pairs():
    g = torch.Generator().manual_seed(0)
    x, ids = torch.randn(2, 6, 3, 8, generator=g), torch.randint(0, 16, (6,), generator=g)
    gm = _traced(rotary, x, ids)
    assert _complex_nodes(gm)  # the test traces what it means to
    lowered = lowered_for_onnx(gm)
    assert not _complex_nodes(lowered)
    assert not any(n.meta["val"].dtype.is_complex for n in lowered.graph.nodes
                   if n.op == "get_attr" and isinstance(n.meta.get("val"), torch.Tensor))
    assert not [n for n in lowered.graph.nodes if n.target is torch.ops.aten.pad_sequence.default]
    # the complex product written out as (ac - bd) + (ad + bc)i: torch's complex kernel rounds alike here
    torch.testing.assert_close(_first(lowered(x, ids)), rotary(x, ids), rtol=0, atol=1e-6)
    assert _complex_nodes(gm)  # the caller's graph is left as it was


def test_an_unknown_complex_op_is_refused_by_name():
    gm = _traced(lambda x: torch.view_as_real(torch.exp(torch.view_as_complex(x))), torch.randn(4, 2))
    with pytest.raises(NotImplementedError, match="aten.exp.default on a complex tensor"):
        complex_as_real(gm)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_sequence_written_out(batch_first, side):
    def padded(a, b, c):
        return pad_sequence([a, b, c], batch_first=batch_first, padding_value=0.5, padding_side=side)

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(5, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(5, 3, generator=g))
    gm = _traced(padded, *args)
    pad_sequences_written_out(gm)
    gm.recompile()
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.pad_sequence.default]
    assert torch.equal(_first(gm(*args)), padded(*args))


def masked(x):
    """Z-Image's attention mask for samples of different lengths, condensed (``mask[i, :n] = 1``), and a fill
    of a Python number through two views."""
    mask = torch.zeros((2, 5), dtype=torch.bool)
    for i, n in enumerate((5, 3)):
        mask[i, :n] = 1
    scale = torch.ones(2, 5)
    scale[1, 1:4].fill_(0.5)
    return x.masked_fill(mask.logical_not()[:, :, None], 0.0) * scale[:, :, None]


def _writes(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.target in (torch.ops.aten.fill_.Tensor, torch.ops.aten.fill_.Scalar)]


def test_writes_through_views_are_written_out_of_place():
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    gm = _traced(masked, x)
    assert len(_writes(gm)) == 3  # the test traces what it means to
    view_writes_functionalized(gm)
    gm.recompile()
    assert not _writes(gm)
    assert torch.equal(_first(gm(x)), masked(x))


def test_another_write_through_views_is_refused_by_name():
    def added(x):
        t = torch.zeros(2, 5)
        t[1, :3] += 1
        return x * t

    gm = _traced(added, torch.randn(2, 5))
    with pytest.raises(NotImplementedError, match=r"cannot write the in-place aten\.\w+_\.\w+ .* out of place"):
        view_writes_functionalized(gm)
