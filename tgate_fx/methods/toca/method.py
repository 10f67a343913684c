"""ToCa as a method: per-block caches of attention, cross-attention and MLP outputs, refreshed token by token.

Annotation (per transformer block ``transformer_blocks.<l>`` of a
``PixArtTransformer2DModel`` or ``DiTTransformer2DModel``): the self-attention
output (``attn1``'s ``to_out``), the cross-attention output (``attn2``'s, PixArt)
and the MLP output (``ff``'s) are tagged ``attn``/``cross``/``mlp`` (layer 0:
``attn0``/``cross0``/``mlp0``): what the official code caches, after the
projection and before the block's gate. The nodes the step transforms act on
are tagged ``tokens``/``tokens0``: ``attn2``'s attention core (PixArt:
cross-attention refresh and its map), ``ff``'s first projection (MLP refresh)
and, on DiT, ``attn1``'s attention core (its map scores the tokens).

Schedule (:func:`~tgate_fx.methods.toca.config.step_kinds`): a *full* step
records every module output and, through its transform, the score source of
each block (PixArt: the entropy of the cross-attention map per token, the two
CFG halves side by side as the official block-diagonal attention has them;
DiT: the attention each token receives) and zero "steps since fresh"
counters. A *partial* step reads self-attention from its cache, and for the
cross-attention (PixArt) and the MLP selects the top-k tokens by score
(``normalise(source) + w * counter / N``, plus the spatial bonus), runs the
module on them (:class:`~tgate_fx.passes.RestrictToTokens`), scatters the rows
into the cached tensor and writes it, the counters and (PixArt) the map's
refreshed rows back as caches. k is fixed per step, layer and module (the
option of the step's transform carries the official step, the number of
steps and whether the batch is a CFG pair), so shapes are static. A *mixed*
step is full in layer 0 and partial in the others (the official per-layer
interval update).

Composition: another method's barriers are full steps; where another method
reads a module's output from its own cache (T-GATE's cross-attention after
its gate), ToCa neither refreshes nor re-scores it (the map keeps its last
computed rows); where another method drops the unconditional half of the
CFG batch (:attr:`~tgate_fx.core.method.ScheduleContext.drops_uncond`), ToCa
scores each sample alone. A method that reuses what ToCa caches itself (e.g.
self-attention) conflicts with it on the same nodes: the variant refuses
the composition with ``ValueError`` naming both methods and the node.
"""

from __future__ import annotations

import hashlib
import operator

import torch
import torch.fx as fx

from ...core.analysis import Regions, _within
from ...core.meta import TAG
from ...core.method import RECORD, REUSE, TRANSFORM, CacheKey, Method, MethodStep, Rewrite, ScheduleContext
from ...core.meta import tag_key
from ...passes import ComputeAttentionMap, RestrictToTokens, TokenRegion
from ...core.graph_passes import GraphPass, PassResult
from ...passes.restrict_to_tokens import call_with_meta
from .config import ToCaConfig, fresh_count, fresh_ratio, official_step, step_kinds

__all__ = ["ToCa"]

NAME = "toca"
aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_FAMILY_OF = {"PixArtTransformer2DModel": "pixart", "DiTTransformer2DModel": "dit"}


def _stack(node: fx.Node) -> list[str]:
    return [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _in(node: fx.Node, scope: str) -> bool:
    return any(_within(p, scope) for p in _stack(node))


def _val(node: fx.Node):
    return node.meta["val"]


class ToCa(Method):
    """ToCa, token-wise feature caching (ICLR 2025); settings in :class:`ToCaConfig`."""

    name = NAME
    config_class = ToCaConfig
    title = "ToCa"

    def __init__(self, config: ToCaConfig):
        super().__init__(config if config.family is None else config.resolved())

    # --- which denoisers -------------------------------------------------------
    def bind(self, denoiser) -> "ToCa":
        """ToCa with the official defaults of ``denoiser``'s family filled in (a new method; the config is kept)."""
        family = _FAMILY_OF.get(type(denoiser).__name__)
        if family is None:
            raise TypeError(f"ToCa cannot apply to {type(denoiser).__name__}: it follows the official rules for "
                            "PixArt (PixArtTransformer2DModel, PixArt-alpha and -sigma) and DiT "
                            "(DiTTransformer2DModel) transformer blocks only")
        if self.config.family not in (None, family):
            raise ValueError(f"ToCaConfig(family={self.config.family!r}) does not fit {type(denoiser).__name__} "
                             f"(family {family!r}); use family=None or {family!r}")
        return self if self.config.family == family else ToCa(self.config.resolved(family))

    # --- tags ------------------------------------------------------------------
    def annotate(self, graph_module: fx.GraphModule, regions: Regions) -> None:
        c = self._config()
        blocks = regions.children("", "transformer_blocks")
        if not blocks:
            raise ValueError("ToCa needs a transformer with transformer_blocks (PixArt, DiT); this graph has none")
        key = tag_key(NAME)
        sites = {s.path: s for s in regions.attention}
        by_name = {n.name: n for n in graph_module.graph.nodes}
        nodes = [n for n in graph_module.graph.nodes if n.op == "call_function"]
        for layer, block in enumerate(blocks):
            suffix = "0" if layer == 0 else ""
            attn1, attn2, ff = f"{block}.attn1", f"{block}.attn2", f"{block}.ff"
            if attn1 not in sites or sites[attn1].role != "self":
                raise ValueError(f"ToCa expects self-attention at {attn1}")
            cross = c.family == "pixart"
            if cross and (attn2 not in sites or sites[attn2].role != "cross"):
                raise ValueError(f"ToCa (PixArt) expects cross-attention at {attn2}")
            ff_out = regions.output_of(ff)
            ff_first = next(n for n in nodes if _in(n, ff))
            info = {"layer": layer, "depth": len(blocks), "block": block, "attn1": attn1, "attn2": attn2, "ff": ff}
            tags = [(by_name[sites[attn1].value], "attn", "attn"), (ff_out, "mlp", "mlp"),
                    (ff_first, "tokens", "mlp_tokens")]
            core1 = [n for n in nodes if n.target is SDPA and _in(n, attn1)]
            if cross:
                core2 = [n for n in nodes if n.target is SDPA and _in(n, attn2)]
                if len(core2) != 1:
                    raise ValueError(f"ToCa expects one attention core in {attn2}, found {len(core2)}")
                tags += [(by_name[sites[attn2].value], "cross", "cross"), (core2[0], "tokens", "cross_tokens")]
            else:
                if len(core1) != 1:
                    raise ValueError(f"ToCa expects one attention core in {attn1}, found {len(core1)}")
                tags.append((core1[0], "tokens", "score_tokens"))
            for node, group, slot in tags:
                node.meta[key] = {"group": group + suffix, "site": block, "slot": slot, **info}

    # --- schedule --------------------------------------------------------------
    def _config(self) -> ToCaConfig:
        if not self.config.is_resolved:
            raise ValueError("ToCaConfig has no family: give ToCaConfig(family='pixart' or 'dit'), or bind the "
                             "method to its denoiser (tgate_fx.optimize does)")
        return self.config

    def schedule(self, ctx: ScheduleContext) -> list[MethodStep]:
        """Full, mixed and partial steps; where another method drops the unconditional half, ToCa scores each
        sample alone (the batch holds no CFG pairs there)."""
        c = self._config()
        num_steps = ctx.num_steps
        kinds = step_kinds(c, num_steps, ctx.barriers)
        out = []
        for i, kind in enumerate(kinds):
            pairs = ctx.pairs(i)
            s = official_step(c.family, i, num_steps)
            full = ("full", pairs)
            partial = ("partial", s, num_steps, pairs)
            rewrites = []
            for suffix, layer_full in (("0", kind != "partial"), ("", kind == "full")):
                modules = ("attn", "cross", "mlp") if c.family == "pixart" else ("attn", "mlp")
                if layer_full:
                    rewrites += [Rewrite(NAME, m + suffix, RECORD) for m in modules]
                    rewrites.append(Rewrite(NAME, "tokens" + suffix, TRANSFORM, option=full))
                else:
                    rewrites += [Rewrite(NAME, "attn" + suffix, REUSE),
                                 Rewrite(NAME, "tokens" + suffix, TRANSFORM, option=partial)]
            label = {"full": "toca_full", "mixed": "toca_mixed", "partial": "toca_partial"}[kind]
            if kind != "full":  # each partial step has its own k: its own graph
                label += "_" + hashlib.sha1(repr(partial).encode()).hexdigest()[:6]
            out.append(MethodStep(label, frozenset(rewrites), phase="", columns=(("toca", kind),)))
        return out

    def transform_pass(self, nodes: list, option, caches) -> "_ToCaPass":
        return _ToCaPass(self._config(), nodes, option, caches)

    def describe(self) -> str:
        c = self.config
        return (f"family={c.family!r}, interval={c.interval}, ratio={c.ratio}, schedule={c.schedule!r}, "
                f"score={c.score!r}, cache_weight={c.cache_weight}, bonus=({c.bonus_ratio}, {c.bonus_grid}), "
                f"compat={c.compat!r}")


class _ToCaPass(GraphPass):
    """One step's ToCa rewrite of the tagged blocks (full: score sources and counters; partial: token refresh)."""

    def __init__(self, config: ToCaConfig, nodes: list[fx.Node], option, caches):
        self.config = config
        self.nodes = list(nodes)
        self.option = option
        self.caches = caches  # the variant's CacheIO

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        self.graph = graph_module.graph
        key = tag_key(NAME)
        for node in self.nodes:  # graph order: a block's cross-attention before its MLP
            tag = node.meta[key]
            if self.option[0] == "full":
                self._full(node, tag)
            else:
                self._partial(node, tag)
        return PassResult(graph_module, bool(self.nodes))

    # --- helpers ---------------------------------------------------------------
    def _op(self, target, *args, like, **kwargs) -> fx.Node:
        return call_with_meta(self.graph, target, args, kwargs, like=like)

    def _key(self, tag: dict, slot: str) -> CacheKey:
        return CacheKey(NAME, tag["site"], slot)

    def _scope_nodes(self, scope: str) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "call_function" and _in(n, scope)]

    def _value(self, path: str) -> fx.Node:
        return next(n for n in self.graph.nodes if n.meta.get(TAG, {}).get("site") == path
                    and n.meta[TAG].get("value") and _in(n, path))

    def _first_user(self, node: fx.Node) -> fx.Node:
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return min(node.users, key=order.__getitem__)

    def _entropy(self, amap: fx.Node, pairs: bool, like: fx.Node) -> fx.Node:
        """-sum(c log(c + 1e-7)) per query row of a head-mean cross-attention map; CFG halves side by side."""
        if pairs:
            half = _val(amap).shape[0] // 2
            first = self._op(aten.slice.Tensor, amap, 0, 0, half, like=like)
            second = self._op(aten.slice.Tensor, amap, 0, half, 2 * half, like=like)
            amap = self._op(aten.cat.default, [self._op(aten.mul.Tensor, first, 0.5, like=like),
                                               self._op(aten.mul.Tensor, second, 0.5, like=like)], -1, like=like)
        logs = self._op(aten.log.default, self._op(aten.add.Tensor, amap, 1e-7, like=like), like=like)
        total = self._op(aten.sum.dim_IntList, self._op(aten.mul.Tensor, amap, logs, like=like), [-1], like=like)
        return self._op(aten.neg.default, total, like=like)

    def _attention_map(self, core: fx.Node) -> fx.Node:
        """The head-mean attention map of ``core`` (:class:`ComputeAttentionMap`), with a softmax ONNX exports."""
        amap = ComputeAttentionMap([core])
        amap(self.graph.owning_module)
        probs = amap.maps[0].args[0]
        if probs.target is aten._softmax.default:  # the same kernel; the ONNX exporters know only aten.softmax
            probs.target, probs.args = aten.softmax.int, probs.args[:2]
        return amap.maps[0]

    def _score_source(self, core: fx.Node, tag: dict, pairs: bool) -> fx.Node:
        amap = self._attention_map(core)
        if self.config.family == "pixart":
            return self._entropy(amap, pairs, like=core)
        return self._op(aten.sum.dim_IntList, amap, [1], like=core)

    # --- full ------------------------------------------------------------------
    def _full(self, node: fx.Node, tag: dict) -> None:
        pairs = self.option[1]
        slot = tag["slot"]
        io = self.caches
        if slot in ("cross_tokens", "score_tokens"):
            with self.graph.inserting_before(self._first_user(node)):
                io.write(self._key(tag, "score"), self._score_source(node, tag, pairs))
        if slot in ("cross_tokens", "mlp_tokens"):
            module = "cross" if slot == "cross_tokens" else "mlp"
            batch, tokens = _val(node).shape[0], self._tokens(tag, module)
            with self.graph.inserting_after(node):
                zeros = self._op(aten.zeros.default, [batch, tokens], like=node, dtype=torch.int32,
                                 device=_val(node).device)
            io.write(self._key(tag, "count_" + module), zeros)

    def _tokens(self, tag: dict, module: str) -> int:
        return _val(self._source(tag, module)).shape[1]

    def _source(self, tag: dict, module: str) -> fx.Node:
        if module == "cross":
            to_q = next(n for n in self._scope_nodes(tag["attn2"] + ".to_q"))
            return to_q.args[0]
        out = self._module_output(tag, "mlp")
        gated = [u for u in out.users if u.target in (aten.mul.Tensor,)]
        if len(gated) != 1 or len(gated[0].users) != 1:
            raise ValueError(f"ToCa expects {tag['ff']}'s output to be gated once, then added to the residual")
        add = next(iter(gated[0].users))
        residual = [a for a in add.args if isinstance(a, fx.Node) and a is not gated[0]]
        if add.target is not aten.add.Tensor or len(residual) != 1:
            raise ValueError(f"ToCa expects {tag['ff']}'s gated output to be added to the residual stream")
        return residual[0]

    def _module_output(self, tag: dict, module: str) -> fx.Node:
        if module == "cross":
            return self._value(tag["attn2"])
        inside = self._scope_nodes(tag["ff"])
        members = set(inside)
        leaving = [n for n in inside if any(u not in members for u in n.users)]
        if len(leaving) != 1:
            raise ValueError(f"ToCa expects one output of {tag['ff']}, found {[n.name for n in leaving]}")
        return leaving[0]

    # --- partial ---------------------------------------------------------------
    def _partial(self, node: fx.Node, tag: dict) -> None:
        _, s, num_steps, pairs = self.option
        c = self.config
        slot = tag["slot"]
        if slot == "score_tokens":  # DiT's self-attention is read from its cache on partial steps
            return
        module = "cross" if slot == "cross_tokens" else "mlp"
        io = self.caches
        source = self._source(tag, module)
        output = self._module_output(tag, module)
        batch, tokens = _val(source).shape[:2]
        ratio = fresh_ratio(c, s, num_steps, tag["layer"], module, tag["depth"])
        k = fresh_count(c, ratio, tokens)
        anchor = self._first_user(output)
        cache = io.read(self._key(tag, module), _val(output))
        count = io.read(self._key(tag, "count_" + module), _empty_like(source, (batch, tokens), torch.int32))
        rows = batch // 2 if pairs else batch
        score_key = self._key(tag, "score")
        with self.graph.inserting_before(anchor):
            stale = self._op(aten.add.Tensor, count, 1, like=output)
            if k == 0:
                new_cache, new_count = cache, stale
            else:
                index = self._select(tag, k, count, pairs, score_key, tokens, output)
                new_count = self._op(aten.scatter.value, stale, 1, index, 0, like=output)
            if 0 < k < tokens:
                restrict = RestrictToTokens([TokenRegion(source, output, index)])
                restrict(self.graph.owning_module)
                copies = restrict.copies[0]
                fresh = copies[output]
                wide = self._op(aten.expand.default, self._op(aten.unsqueeze.default, index, -1, like=output),
                                [batch, k, _val(output).shape[-1]], like=output)
                new_cache = self._op(aten.scatter.src, cache, 1, wide, fresh, like=output)
                if module == "cross" and c.family == "pixart":
                    core = next(copies[n] for n in copies if n.target is SDPA)
                    rows_h = self._entropy(self._attention_map(core), pairs, like=core)
                    sub = self._op(aten.slice.Tensor, index, 0, 0, rows, like=output) if pairs else index
                    score = io.read(score_key, _empty_like(source, (rows, tokens), torch.float32))
                    io.write(score_key, self._op(aten.scatter.src, score, 1, sub, rows_h, like=output))
            elif k >= tokens:  # every token is fresh: the module's own output, and its whole map
                new_cache = output
        if k >= tokens and module == "cross" and c.family == "pixart":
            with self.graph.inserting_before(self._first_user(node)):
                io.write(score_key, self._score_source(node, tag, pairs))
        if new_cache is not output:
            output.replace_all_uses_with(new_cache)
        io.write(self._key(tag, module), new_cache)
        io.write(self._key(tag, "count_" + module), new_count)

    def _select(self, tag, k, count, pairs, score_key, tokens, like) -> fx.Node:
        """Top-k token indices ``(B, k)``: score source + cache frequency + spatial bonus, as the official code.

        PixArt's score and the random score are shared by the two halves of a CFG pair; DiT's
        attention score is each sample's own.
        """
        c = self.config
        op = lambda target, *a, **kw: self._op(target, *a, like=like, **kw)
        batch = _val(count).shape[0]
        share = pairs and (c.family == "pixart" or c.score == "random")
        rows = batch // 2 if share else batch
        if c.score == "random":
            score = op(aten.rand.default, [rows, tokens], dtype=torch.float32, device=_val(count).device)
        else:
            source = self.caches.read(score_key, _empty_like(count, (rows, tokens), torch.float32))
            if c.family == "pixart":
                source = op(aten.add.Tensor, source, 1)
            norm = op(aten.linalg_vector_norm.default, source, 2, [1], True)
            denom = op(aten.expand.default, op(aten.clamp_min.default, norm, 1e-12), [rows, tokens])
            score = op(aten.div.Tensor, source, denom)
        if share:
            score = op(aten.repeat.default, score, [2, 1])
        soft = op(aten.div.Tensor, op(aten.to.dtype, count, torch.float32), c.interval)
        score = op(aten.add.Tensor, score, op(aten.mul.Tensor, soft, c.cache_weight))
        score = self._bonus(score, op)
        order = op(aten.argsort.default, score, -1, True)
        return op(aten.slice.Tensor, order, 1, 0, k)

    def _bonus(self, score: fx.Node, op) -> fx.Node:
        """``local_selection_with_bonus``: the best token of each grid cell gains ``bonus_ratio`` x its score."""
        c = self.config
        batch, tokens = _val(score).shape
        side = int(tokens ** 0.5)
        g = c.bonus_grid
        if side * side != tokens or side % g:
            raise ValueError(f"ToCa's spatial bonus needs a square token grid divisible by bonus_grid={g}; "
                             f"this graph has {tokens} tokens")
        x = op(aten.view.default, score, [batch, side // g, g, side // g, g])
        x = op(aten.clone.default, op(aten.permute.default, x, [0, 1, 3, 2, 4]), memory_format=torch.contiguous_format)
        x = op(aten.view.default, x, [batch, -1, g * g])
        best = op(aten.max.dim, x, -1, True)
        top, where = op(operator.getitem, best, 0), op(operator.getitem, best, 1)
        mask = op(aten.scatter.value, op(aten.zeros_like.default, x), -1, where, 1)
        x = op(aten.add.Tensor, x, op(aten.mul.Tensor, op(aten.mul.Tensor, mask, top), c.bonus_ratio))
        x = op(aten.view.default, x, [batch, side // g, side // g, g, g])
        x = op(aten.clone.default, op(aten.permute.default, x, [0, 1, 3, 2, 4]), memory_format=torch.contiguous_format)
        return op(aten.view.default, x, [batch, tokens])


def _empty_like(node: fx.Node, shape: tuple[int, ...], dtype: torch.dtype):
    """A fake value of ``shape`` and ``dtype`` on ``node``'s device, in its fake mode (a cache input's ``meta["val"]``)."""
    val = _val(node)
    from torch._guards import detect_fake_mode

    with detect_fake_mode([val]) or torch._subclasses.FakeTensorMode():
        return val.new_empty(shape, dtype=dtype)
