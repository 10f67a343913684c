"""T-GATE's idea on joint attention: where to tag an MMDiT's double-stream blocks, and the query restriction.

In an MMDiT (SD3 / SD3.5, FLUX's double-stream blocks, Qwen-Image) the text
tokens enter each block's attention as extra keys and values, next to the
image's, and the block updates a text stream of its own (projections,
output projection, MLP). The text tokens there play the role that
cross-attention's keys and values play in a UNet: T-GATE's observation is
that this conditioning converges after a few steps. The rule, per joint
block, as the eager oracle (``tests/oracle_tgate_joint.py``) does it:

* at the gate step, record the text tokens' keys (the output of the text key
  projection, after its norm where the block has one: ``norm_added_k``, else
  ``add_k_proj``), their values (``add_v_proj``) and the block's text-stream
  output, each the mean of the two CFG halves where CFG runs;
* after it, read all three from the cache, drop the unconditional branch,
  and run the attention on the image queries only (the text rows of its
  output are not read: the text stream's output comes from the cache). The
  text stream's projections (``add_q/k/v_proj``, ``to_add_out``), its norms
  and its MLP are then dead code. What follows the keys (the joint rotary
  embedding of FLUX, applied to the joined keys) is computed on the cached
  keys as on fresh ones.

FLUX's and HunyuanVideo's single-stream blocks (text and image tokens as one
sequence through shared weights) are not rewritten: they compute every
token, from the text stream the last double-stream block hands them (read
from the cache after the gate).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...core.analysis import Regions
from ...core.graph_passes import downstream
from ...passes import QueryRows, RestrictQueries

__all__ = ["JOINT_BLOCKS", "JOINT_KV", "JOINT_QUERY", "JOINT_TEXT", "annotate_joint", "joint_pass"]

JOINT_KV = "joint_kv"
JOINT_TEXT = "joint_text"
JOINT_QUERY = "joint_query"

# Double-stream blocks the rule serves, by class: their attention is ``<block>.attn``, with the text stream's
# projections add_q/k/v_proj (and to_add_out where the block outputs a text stream).
JOINT_BLOCKS = frozenset({"FluxTransformerBlock", "ChromaTransformerBlock", "JointTransformerBlock",
                          "QwenImageTransformerBlock", "Flux2TransformerBlock"})

SDPA = torch.ops.aten.scaled_dot_product_attention.default
CAT = torch.ops.aten.cat.default


def joint_blocks(regions: Regions) -> list[str]:
    """The double-stream blocks (``transformer_blocks.<i>``) of a captured graph whose attention has added
    keys/values, in order."""
    return [b for b in regions.children("", "transformer_blocks") if f"{b}.attn.add_k_proj" in regions.modules]


def annotate_joint(regions: Regions, key: str) -> list[str]:
    """Tag every joint block (see the module docstring) under ``node.meta[key]``; returns their attention paths.

    Raises:
        ValueError: for a joint block of a class the rule does not know, or whose graph lacks what it reads.
    """
    blocks = joint_blocks(regions)
    nodes_of = {b: regions.nodes_of(b) for b in blocks}
    for block in blocks:
        kind = regions.modules[block].rsplit(".", 1)[-1]
        if kind not in JOINT_BLOCKS:
            raise ValueError(f"T-GATE's joint-attention rule has no layout for {block} ({kind}); it serves "
                             f"{', '.join(sorted(JOINT_BLOCKS))}")
        attn = f"{block}.attn"
        members = set(nodes_of[block])
        cores = [n for n in regions.nodes_of(attn) if n.target is SDPA]
        if len(cores) != 1:
            raise ValueError(f"T-GATE expects one attention core in {attn}, found {len(cores)}")
        core = cores[0]
        key_path = f"{attn}.norm_added_k" if f"{attn}.norm_added_k" in regions.modules else f"{attn}.add_k_proj"
        text_k, text_v = regions.output_of(key_path), regions.output_of(f"{attn}.add_v_proj")
        image_q, text_q = regions.output_of(f"{attn}.to_q"), regions.output_of(f"{attn}.add_q_proj")
        from_image, from_text = downstream([image_q], members), downstream([text_q], members)
        joins = [n for n in nodes_of[block] if n.target is CAT and n in from_image and n in from_text
                 and core in downstream([n], members) and all(a in from_image or a in from_text for a in n.args[0])]
        if len(joins) != 1:
            raise ValueError(f"T-GATE expects {attn} to join its text and image queries once, found {len(joins)}")
        join = joins[0]
        keep = [i for i, a in enumerate(join.args[0]) if a in from_image and a not in from_text]
        if len(keep) != 1 or len(join.args[0]) != 2:
            raise ValueError(f"T-GATE expects {join.name} to join one text and one image query part")
        text_out = []
        if f"{attn}.to_add_out" in regions.modules:
            from_text_out = downstream([regions.output_of(f"{attn}.to_add_out")], members)
            text_out = [n for n in regions.values_leaving(block) if n in from_text_out]
        if len(text_out) > 1:
            raise ValueError(f"T-GATE expects {block} to output one text stream, found {len(text_out)}")
        for node, group, site, slot, extra in (
                (text_k, JOINT_KV, attn, "text_k", {}), (text_v, JOINT_KV, attn, "text_v", {}),
                (core, JOINT_QUERY, attn, "queries", {"join": join.name, "keep": keep[0]}),
                *[(n, JOINT_TEXT, block, "text_out", {}) for n in text_out]):
            if key in node.meta:
                raise ValueError(f"T-GATE would tag {node.name} twice ({node.meta[key]['slot']}, {slot})")
            node.meta[key] = {"group": group, "site": site, "slot": slot, **extra}
    return [f"{b}.attn" for b in blocks]


def joint_pass(nodes: list[fx.Node], key: str) -> RestrictQueries:
    """The step's :class:`~tgate_fx.passes.RestrictQueries` on the tagged cores: each on its image queries."""
    by_name = {n.name: n for n in nodes[0].graph.nodes} if nodes else {}
    return RestrictQueries([QueryRows(n, by_name[n.meta[key]["join"]], n.meta[key]["keep"]) for n in nodes])
