"""ToCa on FLUX's blocks, as the official FLUX code does it (``flux-ToCa``'s ``DoubleStreamBlock`` and
``SingleStreamBlock``): where to tag a captured FLUX transformer, and what a step's transform does. The
same rules serve the joint blocks of SD3 / SD3.5 (see :data:`DOUBLE_STREAM_LAYOUTS`).

Double-stream block (``transformer_blocks.<l>``): a full step records the
joint attention's image and text outputs (after ``to_out`` / ``to_add_out``;
the official code caches the attention before its projections and projects
it again, the same values), the image and the text MLP outputs, and the score
of each stream: the self-attention map (``softmax(q k^T * scale)``, heads
then queries averaged: the attention each key receives) cut into its text and
image columns. A partial step reads both attention outputs from the cache,
and refreshes the top-k tokens of each MLP, each stream with its own score,
counters and k.

Single-stream block (``single_transformer_blocks.<l>``, text and image tokens
as one sequence): a full step records the attention output, the output
projection's output and the score (the whole map). A partial step reads the
attention from the cache and refreshes the top-k tokens of the MLP branch and
of the output projection (over the cached attention's rows of those tokens).

The layer index restarts at 0 in the single-stream blocks, as the official
code's ``current['layer']``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...core.analysis import Regions
from ...core.graph_passes import downstream
from ...core.method import CacheKey
from ...passes import CacheTokens, CountReset, ScoreSite, TokenRefresh, TokenSelection
from .config import ToCaConfig, refresh_count

__all__ = ["DOUBLE_STREAM_LAYOUTS", "JOINT_SEQUENCE_LAYOUTS", "SINGLE_STREAM_LAYOUTS", "annotate_flux", "flux_pass",
           "FLUX_GROUPS"]

# The double-stream blocks the FLUX rules serve, by class: (image attention output, text attention output,
# image MLP, text MLP, whether the joint sequence has the text tokens first). SD3's, Qwen-Image's and
# HunyuanVideo's joint blocks have FLUX's double-stream structure under other names; SD3 and HunyuanVideo
# put the image tokens first. A block without a text output (SD3's last, ``context_pre_only``) has only
# the image stream's tags; SD3.5's second, image-only self-attention (``attn2``) is cached as the joint
# attention is (no official counterpart: its output is reused on partial steps).
DOUBLE_STREAM_LAYOUTS = {
    "FluxTransformerBlock": ("attn.to_out", "attn.to_add_out", "ff", "ff_context", True),
    "ChromaTransformerBlock": ("attn.to_out", "attn.to_add_out", "ff", "ff_context", True),
    "JointTransformerBlock": ("attn.to_out", "attn.to_add_out", "ff", "ff_context", False),
    "QwenImageTransformerBlock": ("attn.to_out", "attn.to_add_out", "img_mlp", "txt_mlp", True),
    "HunyuanVideoTransformerBlock": ("attn.to_out", "attn.to_add_out", "ff", "ff_context", False),
    "Flux2TransformerBlock": ("attn.to_out", "attn.to_add_out", "ff", "ff_context", True),
}
# Single-stream blocks (FLUX's, Chroma's, HunyuanVideo's, FLUX.2's) are found by their list,
# single_transformer_blocks; the order of the text and image tokens in them does not matter to the rules (one
# score over all tokens). Their parts, where they are not FLUX's (the attention ``attn``, the output projection
# ``proj_out`` over the attention and the MLP branch, which starts at ``proj_mlp``), by class: (the module
# whose attention output is joined with the MLP branch, the output projection, the MLP branch's first module).
# FLUX.2's parallel block computes its attention's q, k, v and its MLP branch in one projection
# (``attn.to_qkv_mlp_proj``) and projects both joined in ``attn.to_out``: a partial step runs that projection
# for its fresh tokens (their q, k, v unused: the attention is read from the cache, as FLUX's partial steps read
# it; no official counterpart, FLUX.2 postdates the official code).
SINGLE_STREAM_LAYOUTS = {"Flux2SingleTransformerBlock": ("attn", "attn.to_out", "attn.to_qkv_mlp_proj")}
_FLUX_SINGLE = ("attn", "proj_out", "proj_mlp")

SDPA = torch.ops.aten.scaled_dot_product_attention.default
# What a full step records: the double stream's attention outputs and MLP outputs, the single stream's
# attention and output projection. A partial step reads "attn" (the double stream's attention) from the
# cache; the single stream's attention is read inside its refresh.
FLUX_GROUPS = ("attn", "mlp", "single_attn", "single_out")


# Blocks with a joint attention (an image and a text output) and ONE MLP over the joined text and image
# tokens (CogVideoX): (attention module, MLP module). No official counterpart; chosen: the attention is
# cached as FLUX's double-stream blocks cache theirs, and the MLP refreshes the top-k tokens of the joined
# sequence, scored by the whole map (the attention each token receives), with one counter and one k, at
# the double-stream ratio (every block of the model is one of these).
JOINT_SEQUENCE_LAYOUTS = {"CogVideoXBlock": ("attn1", "ff")}


def _annotate_joint_sequence(regions: Regions, block: str, layout, text_input, core_of, first_in, tag, info) -> None:
    attn_path, mlp_path = (f"{block}.{name}" for name in layout)
    core = core_of(attn_path)
    outputs = regions.values_leaving(attn_path)
    text = text_input.meta["val"].shape[1] if text_input is not None else None
    by_stream = {("txt" if n.meta["val"].shape[1] == text else "img"): n for n in outputs}
    if len(outputs) != 2 or set(by_stream) != {"txt", "img"}:
        raise ValueError(f"ToCa expects {attn_path} to return an image and a text output ({text} text tokens), "
                         f"found {[tuple(n.meta['val'].shape) for n in outputs]}")
    members = set(regions.nodes_of(mlp_path))
    sources = {a for n in members for a in n.all_input_nodes if a not in members and a.op == "call_function"}
    if len(sources) != 1:
        raise ValueError(f"ToCa expects {mlp_path} to read one input (the joined tokens), found {len(sources)}")
    source = sources.pop()
    if core.meta["val"].shape[2] != source.meta["val"].shape[1]:
        raise ValueError(f"ToCa expects {attn_path} to attend over the tokens {mlp_path} reads")
    mlp = regions.output_of(mlp_path)
    tag(by_stream["img"], "attn", block, "attn_img", **info)
    tag(by_stream["txt"], "attn", block, "attn_txt", **info)
    tag(mlp, "mlp", block, "mlp", **info)
    tag(core, "tokens", block, "score_tokens", core=core.name, text=text, columns={"mlp": None}, **info)
    tag(first_in(mlp_path), "tokens", block, "mlp_tokens", source=source.name, output=mlp.name, module="mlp",
        score="score_mlp", **info)


def _single_attention(regions: Regions, path: str) -> fx.Node:
    """A single-stream block's attention output over all its tokens: the module's output, or (HunyuanVideo,
    whose attention returns the image and the text rows apart) the one concatenation of its outputs."""
    leaving = regions.values_leaving(path)
    if len(leaving) == 1:
        return leaving[0]
    joins = {u for n in leaving for u in n.users if u.target is torch.ops.aten.cat.default
             and all(n in u.all_input_nodes for n in leaving)}
    if len(joins) != 1:
        raise ValueError(f"ToCa expects {path} to output its tokens once, or in parts joined once; "
                         f"found {len(leaving)} outputs and {len(joins)} joins")
    return joins.pop()


def _joined_with_mlp(regions: Regions, path: str, core: fx.Node) -> fx.Node:
    """FLUX.2's parallel block: module ``path`` projects its attention and its MLP branch together; the
    attention output is the part of the one concatenation inside it that is made from the attention ``core``."""
    members = set(regions.nodes_of(path))
    below = downstream([core], within=members)
    joins = [n for n in members if n.target is torch.ops.aten.cat.default and n in below]
    if len(joins) != 1:
        raise ValueError(f"ToCa expects {path} to join its attention output with its MLP branch once, "
                         f"found {len(joins)} joins")
    parts = [a for a in joins[0].args[0] if a in below]
    if len(parts) != 1 or len(joins[0].args[0]) != 2:
        raise ValueError(f"ToCa expects {path} to join one attention output with one MLP branch")
    return parts[0]


def annotate_flux(graph_module: fx.GraphModule, regions: Regions, key: str, inside, residual) -> None:
    """Tag FLUX's double- and single-stream blocks (see the module docstring) under ``node.meta[key]``.

    ``inside(node, path)``: whether a node was computed in module ``path``; ``residual(module, output)``: the
    residual stream the gated ``output`` of ``module`` is added to.
    """
    double = regions.children("", "transformer_blocks")
    single = regions.children("", "single_transformer_blocks")
    if not double and not single:
        raise ValueError("ToCa (FLUX) needs transformer_blocks or single_transformer_blocks; this graph has none")
    nodes = [n for n in graph_module.graph.nodes if n.op == "call_function"]

    def core_of(path: str) -> fx.Node:
        cores = [n for n in nodes if n.target is SDPA and inside(n, path)]
        if len(cores) != 1:
            raise ValueError(f"ToCa expects one attention core in {path}, found {len(cores)}")
        return cores[0]

    def first_in(path: str) -> fx.Node:
        return next(n for n in nodes if inside(n, path))

    def tag(node: fx.Node, group: str, site: str, slot: str, **info) -> None:
        if key in node.meta:
            raise ValueError(f"ToCa would tag {node.name} twice ({node.meta[key]['slot']}, {slot})")
        node.meta[key] = {"group": group, "site": site, "slot": slot, **info}

    text_input = next((n for n in graph_module.graph.nodes
                       if n.op == "placeholder" and n.name == "encoder_hidden_states"), None)
    for layer, block in enumerate(double):
        info = {"layer": layer, "depth": len(double), "block": block, "stream": "double"}
        kind = regions.modules[block].rsplit(".", 1)[-1]
        if kind in JOINT_SEQUENCE_LAYOUTS:
            _annotate_joint_sequence(regions, block, JOINT_SEQUENCE_LAYOUTS[kind], text_input, core_of, first_in,
                                     tag, info)
            continue
        if kind not in DOUBLE_STREAM_LAYOUTS:
            raise ValueError(f"ToCa (FLUX rules) has no layout for the double-stream block {block} ({kind})")
        img_attn_path, txt_attn_path, img_mlp_path, txt_mlp_path, text_first = DOUBLE_STREAM_LAYOUTS[kind]
        with_text = f"{block}.{txt_mlp_path}" in regions.modules  # SD3's last block has no text stream out
        img_attn = regions.output_of(f"{block}.{img_attn_path}")
        img_mlp = regions.output_of(f"{block}.{img_mlp_path}")
        core = core_of(f"{block}.attn")
        image = img_attn.meta["val"].shape[1]
        joint = core.meta["val"].shape[2]
        text = joint - image
        if text_input is not None and text != text_input.meta["val"].shape[1]:
            raise ValueError(f"ToCa expects {block}.attn to attend over the text and the image tokens "
                             f"({text_input.meta['val'].shape[1]} + {image}), it attends over {joint}")
        columns = {"txt_mlp": (0, text), "img_mlp": (text, None)} if text_first else \
            {"img_mlp": (0, image), "txt_mlp": (image, None)}
        tag(img_attn, "attn", block, "attn_img", **info)
        tag(img_mlp, "mlp", block, "img_mlp", **info)
        mlps = [(f"{block}.{img_mlp_path}", img_mlp, "img_mlp")]
        if with_text:
            txt_attn, txt_mlp = regions.output_of(f"{block}.{txt_attn_path}"), regions.output_of(f"{block}.{txt_mlp_path}")
            tag(txt_attn, "attn", block, "attn_txt", **info)
            tag(txt_mlp, "mlp", block, "txt_mlp", **info)
            mlps.append((f"{block}.{txt_mlp_path}", txt_mlp, "txt_mlp"))
        if f"{block}.attn2" in regions.modules:  # SD3.5's image-only self-attention
            tag(regions.output_of(f"{block}.attn2.to_out"), "attn", block, "attn2", **info)
        tag(core, "tokens", block, "score_tokens", core=core.name, text=text,
            columns={m: columns[m] for _, _, m in mlps}, **info)
        for ff, out, module in mlps:
            tag(first_in(ff), "tokens", block, module + "_tokens", source=residual(ff, out).name, output=out.name,
                module=module, score="score_" + module, **info)
    for layer, block in enumerate(single):
        info = {"layer": layer, "depth": len(single), "block": block, "stream": "single"}
        kind = regions.modules[block].rsplit(".", 1)[-1]
        attn_path, out_path, mlp_path = (f"{block}.{name}" for name in SINGLE_STREAM_LAYOUTS.get(kind, _FLUX_SINGLE))
        core = core_of(attn_path)
        attn = _joined_with_mlp(regions, attn_path, core) if kind in SINGLE_STREAM_LAYOUTS else \
            _single_attention(regions, attn_path)
        out = regions.output_of(out_path)
        tag(attn, "single_attn", block, "attn", **info)
        tag(out, "single_out", block, "total", **info)
        tag(core, "tokens", block, "score_tokens", core=core.name, **info)
        tag(first_in(mlp_path), "tokens", block, "mlp_tokens", source=residual(out_path, out).name,
            output=out.name, module="mlp", cache="total", score="score", attn=attn.name, **info)


def flux_pass(c: ToCaConfig, method: str, nodes: list[fx.Node], option, caches, key: str,
              read=frozenset()) -> CacheTokens:
    """The step's :class:`~tgate_fx.passes.CacheTokens` on FLUX's tagged ``nodes``: on a full step the scores
    (per stream in the double-stream blocks) a later step reads (``read``: their ``(site, slot)``) and zero
    counters; on a partial step the refresh of each MLP (double stream) and of each single-stream block's MLP
    branch and output projection."""
    by_name = {n.name: n for n in nodes[0].graph.nodes}
    scores, resets, refreshes = [], [], []
    for node in nodes:
        tag = node.meta[key]
        site = lambda slot: CacheKey(method, tag["site"], slot)
        if tag["slot"] == "score_tokens":
            if option[0] == "full":
                core = by_name[tag["core"]]
                if tag["stream"] == "double":
                    for module, columns in tag["columns"].items():
                        if (tag["site"], "score_" + module) in read:
                            scores.append(ScoreSite(core, site("score_" + module), "received_mean", columns=columns,
                                                    scale_logits=True))
                elif (tag["site"], "score") in read:
                    scores.append(ScoreSite(core, site("score"), "received_mean", scale_logits=True))
            continue
        source, output = by_name[tag["source"]], by_name[tag["output"]]
        tokens = source.meta["val"].shape[1]
        count = site("count_" + tag["module"])
        if option[0] == "full":
            resets.append(CountReset(node, count, node.meta["val"].shape[0], tokens))
            continue
        num_steps = option[2]
        selection = TokenSelection(interval=c.interval, cache_weight=c.cache_weight, random=c.score == "random",
                                   add_one=False, share_rows=False,
                                   bonus_ratio=c.bonus_ratio, bonus_grid=c.bonus_grid)
        cached = ((by_name[tag["attn"]], site("attn")),) if "attn" in tag else ()
        refreshes.append(TokenRefresh(source, output, refresh_count(c, tag, None, num_steps, tokens),
                                      site(tag.get("cache", tag["module"])), count, selection, score=site(tag["score"]),
                                      cached_inputs=cached))
    return CacheTokens(caches, scores, resets, refreshes)
