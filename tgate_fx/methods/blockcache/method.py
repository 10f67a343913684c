"""First Block Cache as a method: a head graph, then either the other blocks or their cached residual.

The blocks are what diffusers' block hooks take: the children of the
denoiser that are ``ModuleList`` s named ``transformer_blocks``,
``single_transformer_blocks``, ``blocks``, ``layers``, ... (:data:`BLOCK_LISTS`),
in the order the denoiser registers them; the *head* is the first block, the
*tail* the last.

Annotation, on the captured graph:

* the head's outputs are its values read outside it: the *image* stream (the
  block's ``hidden_states`` output) and, for a dual-stream block (Flux, SD3,
  Qwen-Image, HunyuanVideo, CogVideoX), the *text* stream, told apart by the
  text's token count, or where both have as many tokens by data flow (the text
  output updates a value made from the text alone; in the last block, the
  image stream is the one the model's output is made of); anything else is
  refused, never guessed;
* the head's image input is the value its image output adds its residual to
  (followed back through the block's residual additions);
* the *boundary* is every value computed for the head (the head and what it
  depends on: embeddings, timestep and rotary embeddings) that the rest of
  the graph reads;
* the tail's outputs (the values read after it) are paired with the head's
  output of the same stream; where the streams are joined into one sequence
  between the block lists (FLUX.2: ``cat([text, image], 1)`` before its
  single-stream blocks), the tail's *joined* output is paired with the join of
  the head's outputs, in the graph's order: its residual is the one of each
  stream, side by side. diffusers' hook cannot serve this case (its tail hook
  subtracts the head's pair of outputs from one tensor and raises); the
  residual rule is its rule applied to each stream, and is tested against the
  hook with the joined residual split back into the streams.

Every step is a :class:`~tgate_fx.core.method.Choice`: the head variant
records the boundary and runs nothing else; :meth:`BlockCache.decide`
computes the head's residual and compares it with the one of the last step
that computed everything, exactly as diffusers' ``FBCHeadBlockHook`` does
(the same operations, on the same tensors); then the ``compute`` variant runs
the rest from the boundary and records the tail's outputs, or the ``skip``
variant reads the tail's outputs as ``residual + head output`` (the residual
being ``tail output - head output`` of that step), so that only what follows
the blocks (the final norm and projection) runs.

A graph whose streams leave the head through anything but the blocks (an
operation between two blocks, a skip connection into the final layers) is
refused: there, skipping the blocks would not be what the hook does.

Composition (T-GATE, ToCa): the other methods' rewrites of a step apply to its
head and to both alternatives (a block the step skips runs none of them, as a skipped
block's attention processors do not run in eager code). At the other
methods' barriers (T-GATE's gate and the step after it, where a CFG batch is
halved) every block runs, and the head residual is taken there.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ...core.analysis import Regions
from ...core.graph_passes import downstream, upstream
from ...core.method import RECORD, REUSE, CacheKey, Choice, Method, MethodStep, Rewrite, ScheduleContext
from ...core.meta import tag_key
from .config import BlockCacheConfig

__all__ = ["BLOCK_LISTS", "BlockCache", "block_paths"]

NAME = "blockcache"
HEAD, TAIL = "head", "tail"
IMAGE, TEXT, JOINED = "image", "text", "joined"
COMPUTE, SKIP = "compute", "skip"
# The ModuleList names diffusers' transformer-block hooks look for (diffusers.hooks._common).
BLOCK_LISTS = frozenset({"blocks", "transformer_blocks", "single_transformer_blocks", "layers",
                         "visual_transformer_blocks", "temporal_transformer_blocks"})

_CHOICE = Choice(
    head=frozenset([Rewrite(NAME, HEAD, RECORD)]),
    alternatives=((COMPUTE, frozenset([Rewrite(NAME, HEAD, REUSE), Rewrite(NAME, TAIL, RECORD)])),
                  (SKIP, frozenset([Rewrite(NAME, HEAD, REUSE), Rewrite(NAME, TAIL, REUSE)]))))
_STEP = MethodStep("bc", choice=_CHOICE, columns=(("blockcache", "choice"),))
# A barrier of another method (T-GATE's gate, where the batch changes): every block runs.
_BARRIER = MethodStep("bc_barrier", choice=Choice(_CHOICE.head, _CHOICE.alternatives[:1]),
                      columns=(("blockcache", "compute (barrier)"),))
_INERT = MethodStep("bc_full", columns=(("blockcache", "one block: full"),))
# FORA: the step's alternative is fixed by the schedule (the head still runs: its output is what the
# cached residual is added to).
_FORA_COMPUTE = MethodStep("bc_compute", choice=Choice(_CHOICE.head, _CHOICE.alternatives[:1]),
                           columns=(("blockcache", "compute"),))
_FORA_SKIP = MethodStep("bc_skip", choice=Choice(_CHOICE.head, _CHOICE.alternatives[1:]),
                        columns=(("blockcache", "skip"),))
# Cross-attention (Wan, LTX) and joint attention feed their streams through these; a residual
# addition is followed through dtype casts and views back to the block's input.
_PASS_THROUGH = {torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.type_as.default,
                 torch.ops.aten.clone.default, torch.ops.aten.view.default, torch.ops.aten.alias.default}
SAMPLE_INPUTS = ("hidden_states", "sample")


def block_paths(denoiser: torch.nn.Module) -> list[str]:
    """Paths of the denoiser's transformer blocks, in the order diffusers' block hooks take them."""
    out = []
    for name, child in denoiser.named_children():
        if name in BLOCK_LISTS and isinstance(child, torch.nn.ModuleList):
            out += [f"{name}.{i}" for i in range(len(child))]
    return out


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _latent_dependents(graph: fx.Graph) -> set[fx.Node]:
    """The nodes that depend on the denoiser's latent input (a block's streams; not, e.g., a cast of the
    timestep embedding that the next blocks share)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder" and n.name in SAMPLE_INPUTS]
    if not placeholders:
        raise ValueError(f"block cache: the graph has no latent input ({' or '.join(SAMPLE_INPUTS)})")
    return downstream(placeholders[:1])


def _text_tokens(graph: fx.Graph) -> int | None:
    for node in graph.nodes:
        if node.op == "placeholder" and node.name == "encoder_hidden_states":
            shape = _shape(node)
            return shape[1] if shape and len(shape) >= 2 else None
    return None


def _streams(outputs: list[fx.Node], text_tokens: int | None, head: str, from_latents=None) -> dict[str, fx.Node]:
    """The head's outputs by stream (see the module docstring). Two outputs of the same token count are told
    apart by ``from_latents(output)``: whether the value the output is a residual update of depends on the
    latent input (the image stream's does; in the first block the text stream's comes from the text alone)."""
    if len(outputs) == 1:
        return {IMAGE: outputs[0]}
    shapes = [_shape(n) for n in outputs]
    if len(outputs) == 2 and all(s and len(s) >= 2 for s in shapes):
        text = [n for n, s in zip(outputs, shapes) if s[1] == text_tokens]
        if len(text) == 2 and from_latents is not None:
            text = [n for n in outputs if not from_latents(n)]
        if len(text) == 1:
            return {TEXT: text[0], IMAGE: next(n for n in outputs if n is not text[0])}
    raise ValueError(f"block cache: the first block {head!r} has {len(outputs)} outputs of shapes {shapes}, and "
                     f"the image stream cannot be told from the text stream ({text_tokens} text tokens); it needs "
                     "one output, or two whose token counts differ (choose another resolution or text length)")


def _residual_input(output: fx.Node, members: set[fx.Node], head: str) -> fx.Node:
    """The value from outside the head that its image output is a residual update of."""
    found, stack, seen = [], [output], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node not in members:
            if _shape(node) == _shape(output):
                found.append(node)
            continue
        if node.target == torch.ops.aten.add.Tensor:
            stack.extend(a for a in node.args[:2] if isinstance(a, fx.Node))
        elif node.target in _PASS_THROUGH and isinstance(node.args[0], fx.Node):
            stack.append(node.args[0])
    if len(found) != 1:
        raise ValueError(f"block cache: cannot find the input the first block {head!r} adds its residual to "
                         f"(candidates: {[n.name for n in found]}); the block is not a residual block")
    return found[0]


def _join(graph: fx.Graph, streams: dict[str, fx.Node], later: tuple[str, ...]) -> fx.Node | None:
    """The one concatenation of the two streams along the tokens outside the blocks after the first (FLUX.2
    joins its text and image streams between its double- and single-stream blocks), or ``None``."""
    if len(streams) != 2:
        return None
    later = set(later)
    flowing = downstream(list(streams.values()))
    joins = [n for n in graph.nodes if n.target is torch.ops.aten.cat.default and n in flowing
             and len(n.args[0]) == 2 and (n.args[1] if len(n.args) > 1 else 0) in (1, -2)
             and not any(p in later for p, _ in (n.meta.get("nn_module_stack") or {}).values())]
    if len(joins) != 1:
        return None
    if sorted(_shape(a)[1] for a in joins[0].args[0]) != sorted(_shape(n)[1] for n in streams.values()):
        return None
    if _shape(streams[IMAGE])[1] == _shape(streams[TEXT])[1]:
        raise ValueError("block cache: the streams are joined between the blocks and have as many tokens each; "
                         "which part of the join is which stream cannot be told (choose another text length)")
    return joins[0]


def _stream_of(part: fx.Node, streams: dict[str, fx.Node]) -> str:
    """Which stream a part of the join is, by its token count (the two counts differ, see :func:`_join`)."""
    return next(s for s, n in streams.items() if _shape(n)[1] == _shape(part)[1])


class BlockCache(Method):
    """First Block Cache; settings in :class:`BlockCacheConfig`."""

    name = NAME
    config_class = BlockCacheConfig
    title = "Block cache (First Block Cache)"

    def __init__(self, config: BlockCacheConfig, blocks: tuple[str, ...] = ()):
        super().__init__(config)
        self.blocks = tuple(blocks)
        self.join_order: tuple[str, ...] = ()  # the streams' order in their join, where the tail outputs it

    def bind(self, denoiser) -> "BlockCache":
        blocks = block_paths(denoiser)
        if not blocks:
            raise TypeError(f"the block cache needs a transformer with blocks in {' / '.join(sorted(BLOCK_LISTS))}; "
                            f"{type(denoiser).__name__} has none. For UNets, use DeepCache")
        return BlockCache(self.config, tuple(blocks))

    def inert_reason(self, denoiser) -> str | None:
        if len(block_paths(denoiser)) < 2:
            return f"{type(denoiser).__name__} has one transformer block: there are no blocks after the first to skip"
        return None

    def _keys(self) -> dict[str, CacheKey]:
        if not self.blocks:
            raise RuntimeError("the block cache is not bound to a denoiser (Method.bind)")
        head, tail = self.blocks[0], self.blocks[-1]
        return {"image_in": CacheKey(NAME, head, "image_in"), IMAGE: CacheKey(NAME, head, "image_out"),
                TEXT: CacheKey(NAME, head, "text_out"), "tail_" + IMAGE: CacheKey(NAME, tail, IMAGE),
                "tail_" + TEXT: CacheKey(NAME, tail, TEXT), "tail_" + JOINED: CacheKey(NAME, tail, JOINED)}

    # --- tags ------------------------------------------------------------------
    def annotate(self, graph_module: fx.GraphModule, regions: Regions) -> None:
        if len(self.blocks) < 2:  # inert (see inert_reason): every step computes everything
            return
        head, tail = self._keys()[IMAGE].site, self._keys()["tail_" + IMAGE].site
        for path in (head, tail):
            if path not in regions.modules:
                raise ValueError(f"block cache: block {path!r} is not called in the captured graph")
        graph = graph_module.graph
        members = set(regions.nodes_of(head))
        latents = _latent_dependents(graph)

        def from_latents(output: fx.Node) -> bool:
            try:
                return _residual_input(output, members, head) in latents
            except ValueError:  # e.g. a text stream broadcast from one sample: not an update of the latents'
                return False

        streams = _streams([n for n in regions.values_leaving(head) if n in latents], _text_tokens(graph), head,
                           from_latents)
        image_in = _residual_input(streams[IMAGE], members, head)
        tails: dict[str, fx.Node] = {}
        leaving = [n for n in regions.values_leaving(tail) if n in latents]
        returned = upstream(list(graph.output_node().all_input_nodes))
        join = _join(graph, streams, self.blocks[1:])
        for value in leaving:
            match = [s for s, n in streams.items() if _shape(n) == _shape(value)]
            if not match and join is not None and _shape(value) == _shape(join):
                match = [JOINED]
            if len(match) == 2:  # streams of one token count: the image stream is the one the output is made of
                made_of = [v for v in leaving if v in returned]
                match = ([IMAGE] if value is made_of[0] else [TEXT]) if len(made_of) == 1 else match
            if len(match) != 1 or match[0] in tails:
                raise ValueError(f"block cache: the last block {tail!r} outputs {value.name} "
                                 f"{_shape(value)}, which matches no single stream of the first block "
                                 f"({ {s: _shape(n) for s, n in streams.items()} })")
            tails[match[0]] = value
        if JOINED in tails:
            if any(s in tails for s in streams):
                raise ValueError(f"block cache: the last block {tail!r} outputs both the joined streams and a "
                                 "stream of its own; the residual of neither is defined")
            self.join_order = tuple(_stream_of(a, streams) for a in join.args[0])
        computed = upstream(list(streams.values()))  # what the head stage computes
        boundary = self._boundary(computed, streams, image_in)
        self._check_skippable(graph, regions, streams, tails, boundary, join if JOINED in tails else None)
        tag = tag_key(NAME)
        slots = {image_in: "image_in", streams[IMAGE]: "image_out", **({streams[TEXT]: "text_out"} if TEXT in streams else {})}
        for node in boundary:
            node.meta[tag] = {"group": HEAD, "site": head, "slot": slots.get(node, node.name)}
        for stream, node in tails.items():
            node.meta[tag] = {"group": TAIL, "site": tail, "slot": stream}

    @staticmethod
    def _boundary(computed: set[fx.Node], streams: dict[str, fx.Node], image_in: fx.Node) -> list[fx.Node]:
        """The head stage's values the rest of the graph reads (tuples stand for the items read of them)."""
        out = dict.fromkeys([*streams.values(), image_in])
        for node in list(computed):
            if node.op != "call_function" or all(u in computed for u in node.users):
                continue
            if isinstance(node.meta.get("val"), torch.Tensor):
                out[node] = None
                continue
            for user in node.users:
                if user in computed:
                    continue
                if user.target is not operator.getitem:
                    raise ValueError(f"block cache: {user.name} reads the non-tensor value {node.name} of the "
                                     "first block's inputs")
                out[user] = None
        return list(out)

    def _check_skippable(self, graph: fx.Graph, regions: Regions, streams: dict, tails: dict,
                         boundary: list[fx.Node], join: fx.Node | None = None) -> None:
        """Refuse a graph where skipping the blocks would not be what diffusers' hooks do."""
        later = set(self.blocks[1:])

        def block_of(node: fx.Node) -> str | None:
            return next((p for p, _ in (node.meta.get("nn_module_stack") or {}).values() if p in later), None)

        between = (downstream(list(streams.values())) & upstream(list(tails.values()))) - set(streams.values())
        outside = sorted(n.name for n in between if n.op == "call_function" and block_of(n) is None and n is not join)
        if outside:
            raise ValueError(f"block cache: the streams pass through {outside[:5]} between the blocks; skipping the "
                             "blocks would skip them too, which diffusers' block hooks do not")
        cut = set(boundary) | set(tails.values())
        live = upstream(graph.output_node().all_input_nodes, stop=cut)
        inside = sorted(n.name for n in live - cut if n.op == "call_function" and block_of(n) is not None)
        if inside:
            raise ValueError(f"block cache: the final layers read values of the blocks after the first other than "
                             f"the last block's outputs ({inside[:5]}); they cannot be skipped")

    # --- schedule --------------------------------------------------------------
    def schedule(self, ctx: ScheduleContext) -> list[MethodStep]:
        if len(self.blocks) < 2:
            return [_INERT] * ctx.num_steps
        interval = self.config.fora_interval
        if interval is None:
            return [_BARRIER if step in ctx.barriers else _STEP for step in range(ctx.num_steps)]
        out, anchor = [], 0
        for step in range(ctx.num_steps):
            if step in ctx.barriers:
                anchor = step
            out.append(_FORA_COMPUTE if (step - anchor) % interval == 0 else _FORA_SKIP)
        return out

    def decide(self, step: int, caches: dict, labels: tuple[str, ...] = (COMPUTE, SKIP)) -> str:
        """``"compute"`` or ``"skip"``, as diffusers' ``FBCHeadBlockHook`` decides, with its arithmetic.

        State kept in ``caches`` (the generation's, per CFG call where CFG is two calls): the head residual
        and outputs of the last computing step, and the tail residual of each stream."""
        keys = self._keys()
        state = {name: CacheKey(NAME, "state", name) for name in
                 ("residual", "fresh", "snap_" + IMAGE, "snap_" + TEXT, "res_" + IMAGE, "res_" + TEXT,
                  "res_" + JOINED)}
        residual = caches[keys[IMAGE]] - caches[keys["image_in"]]
        previous = caches.get(state["residual"])
        compute = COMPUTE in labels
        if previous is not None and labels == (COMPUTE, SKIP):
            absmean = (residual - previous).abs().mean()
            previous_absmean = previous.abs().mean()
            compute = (absmean / previous_absmean).item() > self.config.threshold
        streams = [s for s in (IMAGE, TEXT) if keys[s] in caches]
        if compute:
            caches[state["residual"]] = residual
            for s in streams:
                caches[state["snap_" + s]] = caches[keys[s]]
            caches[state["fresh"]] = True
            return COMPUTE
        tails = [s for s in (*streams, JOINED) if keys["tail_" + s] in caches]

        def head(s: str, prefix: str = "") -> torch.Tensor:  # a stream's head output, or their join
            if s != JOINED:
                return caches[state[prefix + s]] if prefix else caches[keys[s]]
            return torch.cat([head(part, prefix) for part in self.join_order], dim=1)

        if caches.pop(state["fresh"], False):  # the tail outputs are those of the last computing step
            for s in tails:
                caches[state["res_" + s]] = caches[keys["tail_" + s]] - head(s, "snap_")
        for s in tails:
            caches[keys["tail_" + s]] = caches[state["res_" + s]] + head(s)
        return SKIP

    def describe(self) -> str:
        if self.config.fora_interval is not None:
            return f"fora_interval={self.config.fora_interval}"
        return f"threshold={self.config.threshold}"
