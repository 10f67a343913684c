"""ToCa on blocks of ONE token sequence that run a self-attention, then an MLP (Z-Image's ``layers``), under the
FLUX rules (:mod:`.flux`: schedule, ratios, score and the steps' transform are FLUX's).

Z-Image's ``ZImageTransformerBlock`` holds its image and caption tokens in one sequence (one modulation for
both), as FLUX's single-stream blocks do, but its self-attention and MLP are sequential: each normed, gated
and added to the residual in turn (FLUX's single-stream block runs them in parallel and projects their
concatenation). No official ToCa code has this block; the rule chosen is the official code's for a
self-attention followed by an MLP (FLUX's double-stream stream, DiT's block), on the one sequence:

* a full step records the attention output (``to_out``'s, before ``attention_norm2`` and the gate) and the MLP
  output (after ``ffn_norm2``, before the gate: what the official code caches, "after the projection, before
  the gate"), and the score: the self-attention map's attention received per token (heads, then queries
  averaged, logits scaled), as FLUX's single-stream blocks score;
* a partial step reads the attention output from the cache and refreshes the MLP (``ffn_norm1``, the
  modulation, ``feed_forward``, ``ffn_norm2``) on the top-k tokens of the sequence, each sample of a CFG
  batch with its own selection (FLUX's rule), at FLUX's single-stream ratio ``R * (1.5 - layer / 27) * 1.6``.

The refiner blocks before the main ones (``noise_refiner``, ``context_refiner``) run in full every step: the
rules apply to the main blocks, as FLUX's apply to its block lists.

A batch whose samples' sequences differ in length (captions that pad to different multiples of 32) is padded
to the longest, and the blocks attend under a mask over the keys. The rule cannot run on it as it runs on each
sample: the shorter samples' padding rows would count in their k, add their attention to the score's mean over
queries and could be refreshed in place of real tokens. Such a capture is tagged, and its transform refused
(:func:`check_unpadded`, at the first call); captions that pad to one length need no mask and are served.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...core.analysis import Regions

__all__ = ["SEQUENCE_LAYOUTS", "annotate_single_sequence", "check_unpadded"]

SDPA = torch.ops.aten.scaled_dot_product_attention.default
# By block class: (self-attention, the MLP's first module, the MLP's last module). The MLP region runs from the
# residual stream through the first module to the last one's output.
SEQUENCE_LAYOUTS = {"ZImageTransformerBlock": ("attention", "ffn_norm1", "ffn_norm2")}
BLOCK_LIST = "layers"


def annotate_single_sequence(graph_module: fx.GraphModule, regions: Regions, key: str, inside, residual) -> None:
    """Tag the blocks of ``layers`` (see the module docstring) under ``node.meta[key]``, with the slots
    :func:`~tgate_fx.methods.toca.flux.flux_pass` reads for a single-stream block.

    ``inside(node, path)``: whether a node was computed in module ``path``; ``residual(module, output)``: the
    residual stream the gated ``output`` of ``module`` is added to.
    """
    blocks = regions.children("", BLOCK_LIST)
    if not blocks:
        raise ValueError(f"ToCa needs a transformer with {BLOCK_LIST}; this graph has none")
    nodes = [n for n in graph_module.graph.nodes if n.op == "call_function"]
    by_name = {n.name: n for n in graph_module.graph.nodes}
    sites = {s.path: s for s in regions.attention}

    def tag(node: fx.Node, group: str, site: str, slot: str, **info) -> None:
        if key in node.meta:
            raise ValueError(f"ToCa would tag {node.name} twice ({node.meta[key]['slot']}, {slot})")
        node.meta[key] = {"group": group, "site": site, "slot": slot, **info}

    for layer, block in enumerate(blocks):
        kind = regions.modules[block].rsplit(".", 1)[-1]
        if kind not in SEQUENCE_LAYOUTS:
            raise ValueError(f"ToCa has no layout for the block {block} ({kind}); it knows {sorted(SEQUENCE_LAYOUTS)}")
        attn, first, last = (f"{block}.{name}" for name in SEQUENCE_LAYOUTS[kind])
        if attn not in sites or sites[attn].role != "self":
            raise ValueError(f"ToCa expects self-attention at {attn}")
        cores = [n for n in nodes if n.target is SDPA and inside(n, attn)]
        if len(cores) != 1:
            raise ValueError(f"ToCa expects one attention core in {attn}, found {len(cores)}")
        mlp = regions.output_of(last)
        source = residual(last, mlp)
        core = cores[0]
        if core.meta["val"].shape[2] != source.meta["val"].shape[1]:
            raise ValueError(f"ToCa expects {attn} to attend over the tokens its MLP reads")
        info = {"layer": layer, "depth": len(blocks), "block": block, "stream": "single"}
        mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
        padded = {"batch_padding": mask.name} if isinstance(mask, fx.Node) else {}
        tag(by_name[sites[attn].value], "attn", block, "attn", **info)
        tag(mlp, "mlp", block, "mlp", **info)
        tag(core, "tokens", block, "score_tokens", core=core.name, **padded, **info)
        tag(next(n for n in nodes if inside(n, first)), "tokens", block, "mlp_tokens", source=source.name,
            output=mlp.name, module="mlp", score="score", **info)


def check_unpadded(nodes: list[fx.Node], key: str) -> None:
    """Raise ``ValueError`` if a block among the tagged ``nodes`` attends over a batch padded to its longest
    sample (see the module docstring)."""
    padded = [n for n in nodes if "batch_padding" in n.meta[key]]
    if padded:
        tag = padded[0].meta[key]
        tokens = padded[0].meta["val"].shape[2]
        raise ValueError(
            f"ToCa cannot serve this batch: its samples' sequences (image and caption tokens) differ in length (the "
            f"captions pad to different multiples of 32), so {tag['block']}.attention attends over {tokens} tokens "
            "under a mask, and the shorter samples carry padding rows. ToCa's rule would count those rows in each "
            "sample's k, add their attention to its score and could refresh them in place of its own tokens. Give "
            "the prompt and the negative prompt token counts that round up to one multiple of 32 (the block cache "
            "serves any lengths), or tgate_fx.restore(pipe)")
