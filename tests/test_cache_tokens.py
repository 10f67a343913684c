"""Millisecond tests of token-wise caching: the traced math, call_traced, and the CacheTokens pass on a hand-built module."""

from __future__ import annotations

import pytest
import torch

from tgate_fx.core.capture import capture_denoiser
from tgate_fx.core.graph_passes import EliminateDeadCode, ExposeValues, call_traced
from tgate_fx.core.method import CacheKey
from tgate_fx.core.variants import CacheIO, copy_graph_module
from tgate_fx.passes import CacheTokens, CountReset, TokenRefresh, TokenSelection
from tgate_fx.passes.token_math import attention_entropy, refreshed_counts, scatter_tokens, select_tokens, spatial_bonus


def _bonus_reference(score, ratio, grid):
    out = score.clone()
    batch, tokens = score.shape
    side = int(tokens ** 0.5)
    for b in range(batch):
        for ci in range(0, side, grid):
            for cj in range(0, side, grid):
                cell = [(i * side + j) for i in range(ci, ci + grid) for j in range(cj, cj + grid)]
                best = max(cell, key=lambda t: (score[b, t].item(), -cell.index(t)))
                out[b, best] = score[b, best] + score[b, best] * ratio
    return out


def test_spatial_bonus_raises_the_best_token_of_each_cell():
    torch.manual_seed(0)
    score = torch.rand(2, 64)
    assert torch.allclose(spatial_bonus(score, 0.4, 4), _bonus_reference(score, 0.4, 4))
    with pytest.raises(ValueError, match="square token grid divisible by 3"):
        spatial_bonus(score, 0.4, 3)


def test_select_tokens_ranks_normalised_score_plus_staleness():
    torch.manual_seed(0)
    source, count = torch.rand(2, 16), torch.randint(0, 3, (2, 16), dtype=torch.int32)
    sel = TokenSelection(interval=3, cache_weight=0.25, random=False, add_one=False, share_rows=False,
                         bonus_ratio=0.0, bonus_grid=1)
    expected = (source / source.norm(dim=1, keepdim=True) + count / 3 * 0.25).argsort(-1, descending=True)[:, :5]
    assert torch.equal(select_tokens(source, count, 5, sel), expected)
    shared = TokenSelection(3, 0.25, False, False, True, 0.0, 1)  # one score row per CFG pair
    index = select_tokens(source[:1], torch.zeros(2, 16, dtype=torch.int32), 5, shared)
    assert torch.equal(index[0], index[1])


def test_counts_and_scatter():
    count = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32)
    index = torch.tensor([[2, 0]])
    assert refreshed_counts(count, index).tolist() == [[0, 2, 0, 4]]
    assert refreshed_counts(count, None).tolist() == [[1, 2, 3, 4]]
    cache, fresh = torch.zeros(1, 4, 2), torch.ones(1, 2, 2)
    assert scatter_tokens(cache, index, fresh)[0, :, 0].tolist() == [1, 0, 1, 0]


def test_attention_entropy_of_cfg_pairs_is_the_official_block_diagonal_map():
    amap = torch.softmax(torch.randn(4, 6, 5), -1)
    pairs = attention_entropy(amap, True)
    joint = torch.cat([amap[:2] * 0.5, amap[2:] * 0.5], -1)
    assert pairs.shape == (2, 6)
    assert torch.allclose(pairs, -(joint * torch.log(joint + 1e-7)).sum(-1))


class TokenMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ff = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))

    def forward(self, sample, return_dict=True):
        h = sample * 2
        return (h + self.ff(h),)


def _captured():
    x = torch.randn(1, 16, 4)
    capture = capture_denoiser(TokenMLP().eval(), {"sample": x}, store=None)
    return capture, x


def test_call_traced_inserts_a_torch_function_and_refuses_constants():
    capture, x = _captured()
    gm = copy_graph_module(capture.graph_module)
    out = gm.graph.output_node()
    value = out.args[0][0]
    with gm.graph.inserting_before(out):
        top = call_traced(gm.graph, lambda v, k: v.sum(-1).argsort(-1, True)[:, :k], value, 3, like=value)
    out.args = ((value, top),)
    gm.recompile()
    prediction, got = gm(x)
    assert torch.equal(got, prediction.sum(-1).argsort(-1, True)[:, :3])
    assert top.meta["val"].shape == (1, 3)
    const = torch.ones(4)  # a tensor the function closes over becomes a constant of the trace: refused
    with pytest.raises(ValueError, match="pass tensors as arguments"):
        call_traced(gm.graph, lambda v: v + const, value, like=value)


def _refresh(k):
    """The MLP refreshed on k tokens from a cache; returns (graph module, its cache inputs, oracle)."""
    capture, x = _captured()
    gm = copy_graph_module(capture.graph_module)
    graph = gm.graph
    nodes = list(graph.nodes)
    mul = next(n for n in nodes if n.target is torch.ops.aten.mul.Tensor)
    ff_out = next(n for n in reversed(nodes) if n.target is torch.ops.aten.linear.default)
    io = CacheIO(graph)
    sel = TokenSelection(3, 0.25, False, False, False, 0.0, 1)
    cache_key, count_key, score_key = (CacheKey("t", "ff", s) for s in ("out", "count", "score"))
    CacheTokens(io, refreshes=[TokenRefresh(mul, ff_out, k, cache_key, count_key, sel, score=score_key)])(gm)
    ExposeValues(list(io.writes.values()))(gm)
    EliminateDeadCode()(gm)
    gm.recompile()
    return gm, io, x


@pytest.mark.parametrize("k", [0, 5, 16])
def test_cache_tokens_refreshes_k_tokens_and_keeps_the_rest(k):
    gm, io, x = _refresh(k)
    module = TokenMLP().eval()
    torch.manual_seed(1)
    cache, score = torch.randn(1, 16, 4), torch.rand(1, 16)
    count = torch.randint(0, 3, (1, 16), dtype=torch.int32)
    inputs = {CacheKey("t", "ff", "out"): cache, CacheKey("t", "ff", "count"): count,
              CacheKey("t", "ff", "score"): score}
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    by_name = {key.input_name(): v for key, v in inputs.items()}
    prediction, *written = gm(*(x if n == "sample" else by_name[n] for n in names))
    with torch.no_grad():
        h = x * 2
        full = module.ff(h)
    sel = TokenSelection(3, 0.25, False, False, False, 0.0, 1)
    if k == 0:
        index, new_cache = None, cache
    elif k == 16:
        index, new_cache = select_tokens(score, count, k, sel), full
    else:
        index = select_tokens(score, count, k, sel)
        new_cache = cache.clone()
        new_cache[0, index[0]] = full[0, index[0]]
    assert torch.allclose(prediction, h + new_cache, atol=1e-6)
    written = dict(zip(io.writes, written))
    assert torch.allclose(written[CacheKey("t", "ff", "out")], new_cache, atol=1e-6)
    assert torch.equal(written[CacheKey("t", "ff", "count")], refreshed_counts(count, index))
    linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == (0 if k == 0 else 2)  # k = 0: the MLP is not computed at all
    if 0 < k < 16:
        assert all(n.meta["val"].shape[1] == k for n in linears)  # the MLP runs on k tokens only


def test_count_reset_writes_zeros():
    capture, x = _captured()
    gm = copy_graph_module(capture.graph_module)
    like = next(n for n in gm.graph.nodes if n.op == "call_function")
    io = CacheIO(gm.graph)
    CacheTokens(io, resets=[CountReset(like, CacheKey("t", "ff", "count"), 2, 16)])(gm)
    ExposeValues(list(io.writes.values()))(gm)
    gm.recompile()
    _, zeros = gm(x)
    assert zeros.dtype == torch.int32 and zeros.shape == (2, 16) and not zeros.any()
