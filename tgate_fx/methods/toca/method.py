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
module on them, scatters the rows into the cached tensor and writes it, the
counters and (PixArt) the map's refreshed rows back as caches. The graph
surgery is :class:`~tgate_fx.passes.CacheTokens`; this module only says
where (the tags name each block's score core, module source and output) and
with which settings. k is fixed per step, layer and module (the
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

import torch
import torch.fx as fx

from ...core.analysis import Regions, _within
from ...core.method import RECORD, REUSE, TRANSFORM, CacheKey, Method, MethodStep, Rewrite, ScheduleContext
from ...core.meta import tag_key
from ...passes import CacheTokens, CountReset, ScoreSite, TokenRefresh, TokenSelection
from .config import ToCaConfig, official_step, refresh_count, step_kinds, step_weighted
from .flux import FLUX_GROUPS, annotate_flux, flux_pass
from .single_sequence import BLOCK_LIST, annotate_single_sequence, check_unpadded

__all__ = ["ToCa"]

NAME = "toca"
SDPA = torch.ops.aten.scaled_dot_product_attention.default
_FAMILY_OF = {"PixArtTransformer2DModel": "pixart", "DiTTransformer2DModel": "dit", "FluxTransformer2DModel": "flux",
              "ChromaTransformer2DModel": "flux", "SD3Transformer2DModel": "flux",
              "QwenImageTransformer2DModel": "flux", "CogVideoXTransformer3DModel": "flux",
              "HunyuanVideoTransformer3DModel": "flux", "LTXVideoTransformer3DModel": "opensora",
              "WanTransformer3DModel": "opensora", "Flux2Transformer2DModel": "flux",
              "ZImageTransformer2DModel": "flux"}  # its single-sequence blocks: see .single_sequence
# The MLP of a block, by the block's class, where it is not ``ff`` (PixArt, DiT, LTX-Video).
_MLP_OF = {"WanTransformerBlock": "ffn"}


def _in(node: fx.Node, scope: str) -> bool:
    return any(_within(p, scope) for p, _ in (node.meta.get("nn_module_stack") or {}).values())


_CHECKS = (torch.ops.aten._assert_tensor_metadata.default,)


def _noop_cast(node: fx.Node) -> bool:
    """Whether ``node`` is a cast to its input's own dtype (``aten.to``: Wan's ``.float()`` in fp32)."""
    return (node.target is torch.ops.aten.to.dtype and isinstance(node.args[0], fx.Node)
            and node.meta["val"].dtype == node.args[0].meta["val"].dtype)


def _past_casts(node: fx.Node) -> fx.Node:
    """``node``, or the value its one no-op cast passes on."""
    users = [u for u in node.users if u.target not in _CHECKS]
    return _past_casts(users[0]) if len(users) == 1 and _noop_cast(users[0]) else node


def _before_casts(node: fx.Node) -> fx.Node:
    """``node``, or the value it is a no-op cast of."""
    return _before_casts(node.args[0]) if _noop_cast(node) else node


def _residual(ff: str, out: fx.Node) -> fx.Node:
    """The residual stream the gated MLP output ``out`` is added to: the MLP's token source."""
    gated = [u for u in _past_casts(out).users if u.target is torch.ops.aten.mul.Tensor]
    if len(gated) != 1 or len(gated[0].users) != 1:
        raise ValueError(f"ToCa expects {ff}'s output to be gated once, then added to the residual")
    add = next(iter(gated[0].users))
    residual = [a for a in add.args if isinstance(a, fx.Node) and a is not gated[0]]
    if add.target is not torch.ops.aten.add.Tensor or len(residual) != 1:
        raise ValueError(f"ToCa expects {ff}'s gated output to be added to the residual stream")
    return _before_casts(residual[0])  # the stream before its no-op cast (its other users, e.g. the norm, cast anew)


def _writes_score(family: str, kind: str, suffix: str) -> bool:
    """Whether a step of ``kind`` writes the score of the blocks of group ``suffix`` (``"0"``: layer 0)."""
    if family in ("flux", "opensora"):  # one kind for every layer; Open-Sora's cross_cached keeps the score
        return kind == "full"
    return kind == "full" or (kind == "mixed" and suffix == "0")


def _reads_score(family: str, kind: str, suffix: str) -> bool:
    """Whether a step of ``kind`` refreshes tokens of the blocks of group ``suffix`` (reads their score if its
    k > 0)."""
    if family in ("flux", "opensora"):
        return kind == "partial"
    return kind == "partial" or (kind == "mixed" and suffix == "")


def score_readers(c: ToCaConfig, kinds: list[str], i: int, suffix: str, alone: bool) -> tuple:
    """The official steps (``None`` where k does not depend on the step) of the steps that may read the score
    written at step ``i`` in the blocks of group ``suffix``: the refreshing steps after ``i``, up to the next
    step that writes the score anew (``alone``) or to the end of the generation (composed with other methods,
    whose rewrites may leave a later full step's score unwritten, e.g. a block cache skipping the blocks).
    Empty with ``score="random"`` (the selection draws its scores) and with ``ratio=0`` (every k is 0).
    Deduplicated and sorted (``None`` once)."""
    if c.score == "random" or c.ratio == 0:
        return ()
    num_steps, out = len(kinds), set()
    for j in range(i + 1, num_steps):
        if alone and _writes_score(c.family, kinds[j], suffix):
            break
        if _reads_score(c.family, kinds[j], suffix):
            out.add(official_step(c.family, j, num_steps) if step_weighted(c) else None)
    return tuple(sorted(out, key=lambda s: -1 if s is None else s))


def read_scores(c: ToCaConfig, nodes: list[fx.Node], option, key: str) -> frozenset[tuple[str, str]]:
    """``(site, slot)`` of the scores a full step's ``option`` says a later step reads: those of a block whose
    refresh (a tagged node among ``nodes``) has k > 0 at one of the option's reader steps. The others are not
    computed (a score nothing reads is pure cost: the explicit attention map)."""
    _, _, _, num_steps, readers = option
    by_name = {n.name: n for n in nodes[0].graph.nodes} if nodes else {}
    out = set()
    for node in nodes:
        tag = node.meta[key]
        if "source" not in tag:  # a score core
            continue
        tokens = by_name[tag["source"]].meta["val"].shape[1]
        if any(refresh_count(c, tag, s, num_steps, tokens) > 0 for s in readers):
            out.add((tag["site"], tag.get("score", "score")))
    return frozenset(out)


def _opensora_rewrites(kind: str, full, partial) -> list[Rewrite]:
    """Open-Sora's modules at a step of ``kind``: full records self-attention, cross-attention and MLP and
    scores the tokens; ``"cross_cached"`` records self-attention and MLP (counters reset), with
    cross-attention from its cache; partial reads both attentions and refreshes the MLP."""
    groups = [g + suffix for suffix in ("0", "") for g in ("attn", "cross", "mlp", "tokens")]
    rewrites = []
    for g in groups:
        module = g.rstrip("0")
        if kind == "full":
            rewrites.append(Rewrite(NAME, g, TRANSFORM, option=full) if module == "tokens" else Rewrite(NAME, g, RECORD))
        elif kind == "cross_cached":
            rewrites.append(Rewrite(NAME, g, TRANSFORM, option=("reset", *full[1:3])) if module == "tokens"
                            else Rewrite(NAME, g, REUSE if module == "cross" else RECORD))
        elif module == "tokens":  # the MLP's refresh writes its cache
            rewrites.append(Rewrite(NAME, g, TRANSFORM, option=partial))
        elif module != "mlp":
            rewrites.append(Rewrite(NAME, g, REUSE))
    return rewrites


class ToCa(Method):
    """ToCa, token-wise feature caching (ICLR 2025); settings in :class:`ToCaConfig`."""

    name = NAME
    config_class = ToCaConfig
    title = "ToCa"

    def __init__(self, config: ToCaConfig):
        super().__init__(config if config.family is None else config.resolved())
        self._alone = False  # until compose says so: then a score is kept wherever any later step may read it

    # --- which denoisers -------------------------------------------------------
    def bind(self, denoiser) -> "ToCa":
        """ToCa with the official defaults of ``denoiser``'s family filled in (a new method; the config is kept)."""
        family = _FAMILY_OF.get(type(denoiser).__name__)
        if family is None:
            raise TypeError(f"ToCa cannot apply to {type(denoiser).__name__}: it follows the official rules for "
                            "PixArt (PixArtTransformer2DModel, PixArt-alpha and -sigma), DiT "
                            "(DiTTransformer2DModel) and FLUX (FluxTransformer2DModel: FLUX.1, FLUX.1 Kontext; "
                            "ChromaTransformer2DModel; Flux2Transformer2DModel; and with FLUX's rules the blocks of "
                            "SD3Transformer2DModel, QwenImageTransformer2DModel, CogVideoXTransformer3DModel and "
                            "HunyuanVideoTransformer3DModel, and ZImageTransformer2DModel's single-sequence blocks) "
                            "and Open-Sora (with its rules the blocks of LTXVideoTransformer3DModel and "
                            "WanTransformer3DModel) transformer blocks only")
        if self.config.family not in (None, family):
            raise ValueError(f"ToCaConfig(family={self.config.family!r}) does not fit {type(denoiser).__name__} "
                             f"(family {family!r}); use family=None or {family!r}")
        return self if self.config.family == family else ToCa(self.config.resolved(family))

    # --- tags ------------------------------------------------------------------
    def annotate(self, graph_module: fx.GraphModule, regions: Regions) -> None:
        """Tag each block's cached outputs and the nodes its transform acts on; each ``tokens`` tag names
        (by node name) the block's score core, and the token source and output of the module it refreshes."""
        c = self._config()
        if c.family == "flux" and regions.children("", BLOCK_LIST):  # Z-Image: self-attention then MLP, one sequence
            return annotate_single_sequence(graph_module, regions, tag_key(NAME), _in, _residual)
        if c.family == "flux":
            return annotate_flux(graph_module, regions, tag_key(NAME), _in, _residual)
        blocks = regions.children("", "transformer_blocks") or regions.children("", "blocks")  # Wan: blocks
        if not blocks:
            raise ValueError("ToCa needs a transformer with transformer_blocks (PixArt, DiT, LTX-Video) or blocks "
                             "(Wan); this graph has none")
        key = tag_key(NAME)
        sites = {s.path: s for s in regions.attention}
        by_name = {n.name: n for n in graph_module.graph.nodes}
        nodes = [n for n in graph_module.graph.nodes if n.op == "call_function"]
        cross = c.family in ("pixart", "opensora")

        def core_of(path: str) -> fx.Node:
            cores = [n for n in nodes if n.target is SDPA and _in(n, path)]
            if len(cores) != 1:
                raise ValueError(f"ToCa expects one attention core in {path}, found {len(cores)}")
            return cores[0]

        for layer, block in enumerate(blocks):
            suffix = "0" if layer == 0 else ""
            mlp = _MLP_OF.get(regions.modules[block].rsplit(".", 1)[-1], "ff")
            attn1, attn2, ff = f"{block}.attn1", f"{block}.attn2", f"{block}.{mlp}"
            if attn1 not in sites or sites[attn1].role != "self":
                raise ValueError(f"ToCa expects self-attention at {attn1}")
            if cross and (attn2 not in sites or sites[attn2].role != "cross"):
                raise ValueError(f"ToCa ({c.family}) expects cross-attention at {attn2}")
            ff_out = regions.output_of(ff)
            ff_first = next(n for n in nodes if _in(n, ff))
            info = {"layer": layer, "depth": len(blocks), "block": block}
            tags = [(by_name[sites[attn1].value], "attn", "attn", {}), (ff_out, "mlp", "mlp", {}),
                    (ff_first, "tokens", "mlp_tokens", {"source": _residual(ff, ff_out).name, "output": ff_out.name})]
            if cross:
                core2, out2 = core_of(attn2), by_name[sites[attn2].value]
                to_q = next(n for n in nodes if _in(n, attn2 + ".to_q"))
                tags += [(out2, "cross", "cross", {}),
                         (core2, "tokens", "cross_tokens",
                          {"source": to_q.args[0].name, "output": out2.name, "core": core2.name})]
            else:
                core1 = core_of(attn1)
                tags.append((core1, "tokens", "score_tokens", {"core": core1.name}))
            for node, group, slot, names in tags:
                node.meta[key] = {"group": group + suffix, "site": block, "slot": slot, **info, **names}

    # --- schedule --------------------------------------------------------------
    def _config(self) -> ToCaConfig:
        if not self.config.is_resolved:
            raise ValueError("ToCaConfig has no family: give ToCaConfig(family='pixart', 'dit' or 'flux'), or bind the "
                             "method to its denoiser (tgate_fx.optimize does)")
        return self.config

    def schedule(self, ctx: ScheduleContext) -> list[MethodStep]:
        """Full, mixed and partial steps; where another method drops the unconditional half, ToCa scores each
        sample alone (the batch holds no CFG pairs there)."""
        c = self._config()
        num_steps = ctx.num_steps
        if ctx.split and c.family != "flux" and (c.family != "opensora" or c.score == "random"):
            raise ValueError(f"ToCa ({c.family}, score={c.score!r}) shares one token selection between the two "
                             "halves of a CFG pair, which this pipeline runs as two denoiser calls a step; only the "
                             "Open-Sora rules with the attention score share it across the calls. Call it without "
                             "guidance, or use score='attention'")
        kinds = step_kinds(c, num_steps, ctx.barriers)
        out = []
        for i, kind in enumerate(kinds):
            pairs = ctx.pairs(i)
            s = official_step(c.family, i, num_steps) if step_weighted(c) else None
            split = ctx.split and pairs  # the pair's halves are the step's two calls
            # a full step's option names the steps that may read its scores (see score_readers)
            full = lambda suffix="": ("full", pairs, split, num_steps, score_readers(c, kinds, i, suffix, self._alone))
            partial = ("partial", s, num_steps, pairs, split)
            rewrites, fulls = [], []
            if c.family == "flux":  # one kind for every layer (flux-ToCa's cal_type runs once per call)
                if kind == "full":
                    fulls.append(full())
                    rewrites += [Rewrite(NAME, g, RECORD) for g in FLUX_GROUPS]
                    rewrites.append(Rewrite(NAME, "tokens", TRANSFORM, option=fulls[-1]))
                else:
                    rewrites += [Rewrite(NAME, "attn", REUSE), Rewrite(NAME, "tokens", TRANSFORM, option=partial)]
            if c.family == "opensora":  # each module on its own cycle, one kind for every layer
                fulls += [full()] if kind == "full" else []
                rewrites += _opensora_rewrites(kind, full(), partial)
            for suffix, layer_full in (("0", kind != "partial"), ("", kind == "full")) \
                    if c.family not in ("flux", "opensora") else ():
                modules = ("attn", "cross", "mlp") if c.family == "pixart" else ("attn", "mlp")
                if layer_full:
                    fulls.append(full(suffix))
                    rewrites += [Rewrite(NAME, m + suffix, RECORD) for m in modules]
                    rewrites.append(Rewrite(NAME, "tokens" + suffix, TRANSFORM, option=fulls[-1]))
                else:
                    rewrites += [Rewrite(NAME, "attn" + suffix, REUSE),
                                 Rewrite(NAME, "tokens" + suffix, TRANSFORM, option=partial)]
            label = {"full": "toca_full", "mixed": "toca_mixed", "partial": "toca_partial",
                     "cross_cached": "toca_cross_cached"}[kind]
            if kind == "full" and not any(f[-1] for f in fulls):
                label += "_unread"  # no score is read before the next full step (or at all)
            elif kind == "full" and (step_weighted(c) or not all(f[-1] for f in fulls)):
                label += "_" + hashlib.sha1(repr(fulls).encode()).hexdigest()[:6]  # its readers are its own
            if kind not in ("full", "cross_cached"):  # a partial step whose k depends on the step has its own graph
                label += "_" + hashlib.sha1(repr((partial, fulls)).encode()).hexdigest()[:6]
            out.append(MethodStep(label, frozenset(rewrites), phase="", columns=(("toca", kind),)))
        return out

    def compose(self, others: list[Method]) -> None:
        # Alone, every full step writes every score of its blocks; another method's rewrites may leave a full
        # step's blocks uncomputed (a block cache's skip, T-GATE's cached cross-attention), so that a score
        # written earlier is read later: composed, a score is kept wherever any later step may read it.
        self._alone = not others
        # Open-Sora's rules reuse cross-attention from ToCa's own cache on partial steps, where T-GATE reads it
        # from its gate's: two reads of one value, with no published semantics for both.
        if self.config.family == "opensora" and any(o.name == "tgate" for o in others):
            raise ValueError("ToCa's Open-Sora rules and T-GATE both reuse the cross-attention of this video DiT; "
                             "use one of them (each composes with the block cache)")

    def transform_pass(self, nodes: list, option, caches) -> CacheTokens:
        """The step's :class:`~tgate_fx.passes.CacheTokens`: on a full step the score sources and zero
        counters of every tagged block; on a partial step the refresh of each block's cross-attention
        (PixArt) and MLP, k tokens each (from the official schedule; ``option`` carries the official step,
        the steps and whether the batch holds CFG pairs)."""
        c = self._config()
        if not nodes:
            return CacheTokens(caches)
        check_unpadded(nodes, tag_key(NAME))  # Z-Image: samples of different lengths, padded (see .single_sequence)
        read = read_scores(c, nodes, option, tag_key(NAME)) if option[0] == "full" else frozenset()
        if c.family == "flux":
            return flux_pass(c, NAME, nodes, option, caches, tag_key(NAME), read)
        by_name = {n.name: n for n in nodes[0].graph.nodes}
        tag_of = tag_key(NAME)
        cross_scored = c.family in ("pixart", "opensora")  # the cross-attention map's entropy scores the tokens
        rule = "entropy" if cross_scored else "received"
        split = option[2] if option[0] in ("full", "reset") else option[4]  # CFG as two calls a step: each call
        # scores its half, the runtime averages
        scores, resets, refreshes = [], [], []
        for node in nodes:  # graph order: a block's cross-attention before its MLP
            tag = node.meta[tag_of]
            slot = tag["slot"]
            key = lambda name: CacheKey(NAME, tag["site"], name)
            module = {"cross_tokens": "cross", "mlp_tokens": "mlp"}.get(slot)
            if option[0] in ("full", "reset"):  # "reset" (Open-Sora): the MLP's counters, not the score
                pairs = option[1]
                if "core" in tag and option[0] == "full" and (tag["site"], "score") in read:
                    scores.append(ScoreSite(by_name[tag["core"]], key("score"), "entropy_part", mean=True) if split
                                  else ScoreSite(by_name[tag["core"]], key("score"), rule, pairs))
                if module:
                    tokens = by_name[tag["source"]].meta["val"].shape[1]
                    resets.append(CountReset(node, key("count_" + module), node.meta["val"].shape[0], tokens))
                continue
            _, step, num_steps, pairs, _ = option
            if module is None or (module == "cross" and c.family == "opensora"):
                continue  # read from the cache: DiT's self-attention; Open-Sora's cross-attention (k = 0)
            source, output = by_name[tag["source"]], by_name[tag["output"]]
            pixart_cross = module == "cross" and c.family == "pixart" and c.score != "random"
            selection = TokenSelection(
                interval=c.interval, cache_weight=c.cache_weight, random=c.score == "random",
                add_one=cross_scored, share_rows=pairs and not split and (cross_scored or c.score == "random"),
                bonus_ratio=c.bonus_ratio, bonus_grid=c.bonus_grid)
            refreshes.append(TokenRefresh(
                source, output, refresh_count(c, tag, step, num_steps, source.meta["val"].shape[1]), key(module),
                key("count_" + module), selection, score=key("score"),
                rescore=rule if pixart_cross else None, core=by_name[tag["core"]] if pixart_cross else None,
                pairs=pairs))
        return CacheTokens(caches, scores, resets, refreshes)

    def describe(self) -> str:
        c = self.config
        return (f"family={c.family!r}, interval={c.interval}, ratio={c.ratio}, schedule={c.schedule!r}, "
                f"score={c.score!r}, cache_weight={c.cache_weight}, bonus=({c.bonus_ratio}, {c.bonus_grid}), "
                f"compat={c.compat!r}")


