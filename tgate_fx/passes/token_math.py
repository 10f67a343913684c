"""The math of token-wise caching, as plain torch functions: scores, top-k selection, bonus, scatter.

:class:`~tgate_fx.passes.cache_tokens.CacheTokens` traces these into the
graph (:func:`~tgate_fx.core.graph_passes.inline.call_traced`); they are
also ordinary functions that a test can call on real tensors. Each follows
the official ToCa code (``cache_functions/``) operation for operation, so the
traced graph computes what the eager reference does, bit for bit.

Shapes: ``B`` samples, ``N`` tokens, ``k`` tokens to refresh. A CFG batch
holds its two halves ``[uncond, cond]`` one after the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TokenSelection", "attention_entropy", "attention_entropy_part", "attention_received",
           "attention_received_mean", "refreshed_counts", "scatter_rows", "scatter_tokens", "select_tokens", "spatial_bonus"]


@dataclass(frozen=True)
class TokenSelection:
    """How tokens are ranked for a refresh (``score + cache_weight * stale / interval``, then the spatial bonus).

    Attributes:
        interval: The full-step interval N (the staleness is divided by it).
        cache_weight: Weight of the staleness term (the official ``soft_fresh_weight``).
        random: Rank by uniform random scores (the ablation) instead of the score source.
        add_one: Add 1 to the score source before it is normalised (the official code does for the
            cross-attention entropy).
        share_rows: The score has one row per CFG pair, shared by both halves (repeated to the batch).
        bonus_ratio: The best token of each ``bonus_grid`` x ``bonus_grid`` cell gains this times its score
            (0: no spatial bonus, as the official FLUX code; the tokens then need not form a grid).
        bonus_grid: Cell side of the spatial bonus (the tokens must form a square grid it divides).
    """

    interval: int
    cache_weight: float
    random: bool
    add_one: bool
    share_rows: bool
    bonus_ratio: float
    bonus_grid: int


def attention_entropy(amap: torch.Tensor, pairs: bool) -> torch.Tensor:
    """``-sum(c log(c + 1e-7))`` per query of a head-mean map ``(B, Nq, Nk)``: ``(B, Nq)``, or ``(B/2, Nq)``
    where ``pairs``: the two CFG halves side by side, each halved, as the official block-diagonal map has them."""
    if pairs:
        half = amap.shape[0] // 2
        amap = torch.cat([amap[:half] * 0.5, amap[half:2 * half] * 0.5], -1)
    return -(amap * torch.log(amap + 1e-7)).sum(-1)


def attention_entropy_part(amap: torch.Tensor) -> torch.Tensor:
    """One sample's part of the entropy of a CFG pair's side-by-side map, for a pair whose halves run as two
    calls: ``2 * -sum(c log(c + 1e-7))`` with ``c`` the halved head-mean map ``(B, Nq, Nk)``: ``(B, Nq)``. The
    mean of the two halves' parts is the sum of their halves' entropies, :func:`attention_entropy`'s pair
    score with each half summed on its own (x2 and /2 are exact in floating point)."""
    half = amap * 0.5
    return 2 * -(half * torch.log(half + 1e-7)).sum(-1)


def attention_received(amap: torch.Tensor) -> torch.Tensor:
    """The attention each token receives, summed over the queries of a head-mean map ``(B, N, N)``: ``(B, N)``."""
    return amap.sum(1)


def attention_received_mean(amap: torch.Tensor) -> torch.Tensor:
    """The attention each token receives, averaged over the queries of a head-mean map ``(B, N, N)``: ``(B, N)``
    (the official FLUX code's ``attn_map.mean(dim=1).mean(dim=1)``, heads then queries)."""
    return amap.mean(1)


def spatial_bonus(score: torch.Tensor, ratio: float, grid: int) -> torch.Tensor:
    """``local_selection_with_bonus``: in each ``grid`` x ``grid`` cell of the square token grid, the best
    token's score gains ``ratio`` times itself."""
    batch, tokens = score.shape
    side = int(tokens ** 0.5)
    if side * side != tokens or side % grid:
        raise ValueError(f"the spatial bonus needs a square token grid divisible by {grid}; got {tokens} tokens")
    cells = side // grid
    x = score.view(batch, cells, grid, cells, grid).permute(0, 1, 3, 2, 4).contiguous().view(batch, -1, grid * grid)
    top, where = x.max(-1, keepdim=True)
    x = x + torch.zeros_like(x).scatter(-1, where, 1) * top * ratio
    return x.view(batch, cells, cells, grid, grid).permute(0, 1, 3, 2, 4).contiguous().view(batch, tokens)


def select_tokens(source: torch.Tensor | None, count: torch.Tensor, k: int, sel: TokenSelection) -> torch.Tensor:
    """The ``(B, k)`` int64 positions of the tokens to refresh, best first.

    ``source``: the score source, ``(B, N)`` or ``(B/2, N)`` with ``sel.share_rows`` (ignored with
    ``sel.random``); ``count``: ``(B, N)`` int32, partial steps since each token was fresh.
    """
    batch, tokens = count.shape
    rows = batch // 2 if sel.share_rows else batch
    if sel.random:
        score = torch.rand([rows, tokens], dtype=torch.float32, device=count.device)
    else:
        if sel.add_one:
            source = source + 1
        norm = torch.linalg.vector_norm(source, 2, [1], True)
        score = source / norm.clamp_min(1e-12).expand(rows, tokens)
    if sel.share_rows:
        score = score.repeat(2, 1)
    score = score + count.to(torch.float32) / sel.interval * sel.cache_weight
    if sel.bonus_ratio:
        score = spatial_bonus(score, sel.bonus_ratio, sel.bonus_grid)
    return torch.argsort(score, -1, True)[:, :k]


def refreshed_counts(count: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Every token one step staler, the refreshed ones (``index``; ``None``: none) back to 0."""
    stale = count + 1
    return stale if index is None else stale.scatter(1, index, 0)


def scatter_tokens(cache: torch.Tensor, index: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """``cache`` ``(B, N, C)`` with rows ``index`` ``(B, k)`` replaced by ``fresh`` ``(B, k, C)``."""
    batch, k = index.shape
    return cache.scatter(1, index.unsqueeze(-1).expand(batch, k, cache.shape[-1]), fresh)


def scatter_rows(score: torch.Tensor, index: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """``score`` ``(R, N)`` with entries ``index[:R]`` replaced by ``fresh`` ``(R, k)``."""
    return score.scatter(1, index[:score.shape[0]], fresh)
