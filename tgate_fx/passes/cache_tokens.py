"""Token-wise caching of module outputs: score tokens, refresh the top k, keep the rest from a cache.

What ToCa (ICLR 2025) does to a transformer block, as one pass over the
graph, driven by data: the method says which attention cores score tokens,
which module outputs are cached, how many tokens each refreshes, and under
which cache keys (:class:`~tgate_fx.core.method.CacheKey`) the values live;
this pass knows nothing of steps, schedules or pipelines. The math is in
:mod:`tgate_fx.passes.token_math`, traced into the graph.

* :class:`ScoreSite`: write the score source of an attention core (the
  entropy of its head-mean map per query, or the attention each token
  receives, summed or averaged over the queries; optionally of a range of
  its key columns) to a cache;
* :class:`CountReset`: write zero "steps since fresh" counters;
* :class:`TokenRefresh`: read a module's cached output and counters, pick the
  top-k tokens (:func:`~tgate_fx.passes.token_math.select_tokens`), run the
  module on them only (:class:`~tgate_fx.passes.RestrictToTokens`), scatter
  the fresh rows into the cache, replace the module's output by it, and write
  the cache and the counters back (k = 0: the cache as is; k >= N: the module
  as is). With ``rescore``, the refreshed rows of the score are recomputed
  from the restricted attention core (the official cross-attention rule).
  With ``cached_inputs``, values inside the region are read from caches
  first (the official FLUX single-stream block: the attention is cached, the
  MLP branch and the output projection are refreshed).

Guarantees: the graph computes exactly the traced functions; new nodes carry
``meta["val"]`` and the provenance of the node they extend; cache reads and
writes go through the variant's :class:`~tgate_fx.core.variants.CacheIO`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ..core.graph_passes import GraphPass, PassResult, call_traced, first_user, new_node
from . import compute_attention_map
from .compute_attention_map import ComputeAttentionMap, query_chunks
from .restrict_to_tokens import RestrictToTokens, TokenRegion
from .token_math import (TokenSelection, attention_entropy, attention_entropy_part, attention_received,
                         attention_received_mean, refreshed_counts, scatter_rows, scatter_tokens, select_tokens)

__all__ = ["CacheTokens", "CountReset", "ScoreSite", "TokenRefresh"]

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
RULES = ("entropy", "entropy_part", "received", "received_mean")


@dataclass(frozen=True)
class ScoreSite:
    """Write the score source of attention ``core`` to cache ``key``.

    ``rule``: ``"entropy"`` (:func:`~tgate_fx.passes.token_math.attention_entropy`, with ``pairs``),
    ``"entropy_part"`` (:func:`~tgate_fx.passes.token_math.attention_entropy_part`: one half's part of a
    pair's entropy, written with ``mean``),
    ``"received"`` (:func:`~tgate_fx.passes.token_math.attention_received`) or ``"received_mean"``
    (:func:`~tgate_fx.passes.token_math.attention_received_mean`). ``columns``: ``(start, stop)``, keep
    these key positions of a per-key score (``stop=None``: to the end), e.g. one stream of a joint
    attention. ``scale_logits``: the map scales the logits, not the queries (see
    :class:`~tgate_fx.passes.ComputeAttentionMap`). ``mean``: the write is one call's part of a value
    the runtime averages over the calls of a split-CFG step (:meth:`~tgate_fx.core.variants.CacheIO.write`).
    Sites of one core with the same rule, pairing and scaling share one map.
    """

    core: fx.Node
    key: object
    rule: str
    pairs: bool = False
    columns: tuple[int, int | None] | None = None
    scale_logits: bool = False
    mean: bool = False

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"ScoreSite.rule must be one of {RULES}, got {self.rule!r}")
        if self.columns is not None and self.rule.startswith("entropy"):
            raise ValueError("ScoreSite.columns selects keys; the entropy rule scores queries")


@dataclass(frozen=True)
class CountReset:
    """Write ``(batch, tokens)`` int32 zeros to cache ``key``, right after ``like``."""

    like: fx.Node
    key: object
    batch: int
    tokens: int


@dataclass(frozen=True)
class TokenRefresh:
    """Refresh ``k`` tokens of the token-wise region ``source`` -> ``output`` from caches.

    ``cache`` holds the output ``(B, N, C)``, ``count`` the int32 staleness ``(B, N)``, ``score`` the score
    source (``None`` with ``selection.random``). ``rescore``: the rule with which the restricted copy of the
    region's attention core ``core`` recomputes the refreshed rows of ``score`` (``None``: the score is kept).
    ``cached_inputs``: ``(node, key)`` pairs, ``(B, N, C)`` values of the region read from cache ``key``
    instead (every use of ``node`` reads the cache; the restricted copy its rows at the index).
    """

    source: fx.Node
    output: fx.Node
    k: int
    cache: object
    count: object
    selection: TokenSelection
    score: object = None
    rescore: str | None = None
    core: fx.Node | None = None
    pairs: bool = False
    cached_inputs: tuple[tuple[fx.Node, object], ...] = ()


def _fake(like: fx.Node, shape, dtype: torch.dtype) -> torch.Tensor:
    """A fake value of ``shape`` and ``dtype`` on ``like``'s device, in its fake mode (a cache input's value)."""
    val = like.meta["val"]
    with detect_fake_mode([val]) or torch._subclasses.FakeTensorMode():
        return val.new_empty(tuple(shape), dtype=dtype)


def _score_of(amap: torch.Tensor, rule: str, pairs: bool) -> torch.Tensor:
    if rule == "entropy":
        return attention_entropy(amap, pairs)
    if rule == "entropy_part":
        return attention_entropy_part(amap)
    return attention_received(amap) if rule == "received" else attention_received_mean(amap)


def _chunk_score(amap: torch.Tensor, rule: str, pairs: bool) -> torch.Tensor:
    """One query chunk's part of the score: its queries' scores (entropy), or the attention each key receives
    from them, summed (received)."""
    return _score_of(amap, rule, pairs) if rule.startswith("entropy") else amap.sum(1)


def _joined_score(rule: str, queries: int, *parts: torch.Tensor) -> torch.Tensor:
    """The score from its query chunks' parts: the chunks' queries side by side (entropy), or the sum of the
    received attention over the chunks (divided by the queries for ``received_mean``)."""
    if rule.startswith("entropy"):
        return torch.cat(parts, 1)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total / queries if rule == "received_mean" else total


def _columns(score: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
    return score[:, start:stop]


class CacheTokens(GraphPass):
    """Score sites, counter resets and token refreshes, in the order given (see the module docstring).

    Args:
        scores, resets, refreshes: What to insert.
        caches: The variant's :class:`~tgate_fx.core.variants.CacheIO`.
    """

    def __init__(self, caches, scores=(), resets=(), refreshes=()):
        self.caches = caches
        self.scores, self.resets, self.refreshes = list(scores), list(resets), list(refreshes)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        shared: dict[tuple, fx.Node] = {}
        for site in self.scores:
            which = (site.core, site.rule, site.pairs, site.scale_logits)
            if which not in shared:
                shared[which] = self._score(graph, *which)
            score = shared[which]
            if site.columns is not None:
                with graph.inserting_before(score.next):  # traced nodes keep their order
                    score = call_traced(graph, _columns, score, *site.columns, like=site.core)
            self.caches.write(site.key, score, mean=site.mean)
        for reset in self.resets:
            with graph.inserting_before(reset.like.next):  # before, not after: traced nodes keep their order
                zeros = call_traced(graph, torch.zeros, [reset.batch, reset.tokens], like=reset.like,
                                    dtype=torch.int32, device=reset.like.meta["val"].device)
            self.caches.write(reset.key, zeros)
        for refresh in self.refreshes:
            self._refresh(graph, refresh)
        return PassResult(graph_module, bool(self.scores or self.resets or self.refreshes))

    def _score(self, graph: fx.Graph, core: fx.Node, rule: str, pairs: bool, scale_logits: bool = False) -> fx.Node:
        """The score source of ``core``, inserted before the core's first user; where the per-head map is larger
        than :data:`~tgate_fx.passes.compute_attention_map.MAP_CHUNK_BYTES`, formed and reduced chunk by chunk of
        queries (the same score up to the rounding of the sum over the chunks)."""
        chunks = query_chunks(core, compute_attention_map.MAP_CHUNK_BYTES) if first_user(core) is not None else None
        parts = []
        for rows in chunks or [None]:
            maps = ComputeAttentionMap([core], scale_logits, rows)
            maps(graph.owning_module)
            amap = maps.maps[0]
            probs = amap.args[0]
            if probs.target is aten._softmax.default:  # the same kernel; the ONNX exporters know only aten.softmax
                probs.target, probs.args = aten.softmax.int, probs.args[:2]
            with graph.inserting_before(amap.next):
                if chunks is None:
                    return call_traced(graph, _score_of, amap, rule, pairs, like=core)
                if rule.startswith("entropy"):
                    parts.append(call_traced(graph, _chunk_score, amap, rule, pairs, like=core))
                else:  # one node, not a traced call: a large map has hundreds of chunks per core
                    parts.append(new_node(graph, aten.sum.dim_IntList, (amap, [1]), like=core))
        with graph.inserting_before(parts[-1].next):
            queries = core.args[0].meta["val"].shape[-2]
            if rule.startswith("entropy"):
                return call_traced(graph, _joined_score, rule, queries, *parts, like=core)
            total = parts[0]  # _joined_score's sum, node by node
            for part in parts[1:]:
                total = new_node(graph, aten.add.Tensor, (total, part), like=core)
            return new_node(graph, aten.div.Tensor, (total, queries), like=core) if rule == "received_mean" else total

    def _refresh(self, graph: fx.Graph, r: TokenRefresh) -> None:
        io, output = self.caches, r.output
        batch, tokens = r.source.meta["val"].shape[:2]
        rows = batch // 2 if r.selection.share_rows else batch
        cache = io.read(r.cache, output.meta["val"])
        count = io.read(r.count, _fake(r.source, (batch, tokens), torch.int32))
        gathered = []
        for node, key in r.cached_inputs:  # before the region is found: what the node computed is not in it
            value = io.read(key, node.meta["val"])
            node.replace_all_uses_with(value)
            gathered.append(value)
        new_cache = output
        with graph.inserting_before(first_user(output)):
            if r.k == 0:
                index, new_cache = None, cache
            else:
                score = None if r.selection.random else io.read(r.score, _fake(r.source, (rows, tokens),
                                                                                 torch.float32))
                index = call_traced(graph, select_tokens, score, count, r.k, r.selection, like=output)
            new_count = call_traced(graph, refreshed_counts, count, index, like=output)
            if 0 < r.k < tokens:
                restrict = RestrictToTokens([TokenRegion(r.source, output, index, tuple(gathered))])
                restrict(graph.owning_module)
                copies = restrict.copies[0]
                new_cache = call_traced(graph, scatter_tokens, cache, index, copies[output], like=output)
                if r.rescore:
                    core = copies[r.core]
                    fresh = self._score(graph, core, r.rescore, r.pairs)
                    old = io.read(r.score, _fake(r.source, (rows, tokens), torch.float32))
                    io.write(r.score, call_traced(graph, scatter_rows, old, index, fresh, like=output))
        if r.k >= tokens and r.rescore:  # every token is fresh: the module's own output, and its whole score
            io.write(r.score, self._score(graph, r.core, r.rescore, r.pairs))
        if new_cache is not output:
            output.replace_all_uses_with(new_cache)
        io.write(r.cache, new_cache)
        io.write(r.count, new_count)
