"""ToDo as a method: tags on the key/value projections of self-attention, one transform at every step.

Annotation: for each self-attention site (:mod:`tgate_fx.core.analysis`),
the nodes of ``to_k`` and ``to_v`` that read the site's key/value input (the
normed hidden states; both must read the same node) are tagged with group
``"depth1"``, ``"depth2"`` or ``"deeper"`` (see :class:`ToDoConfig` for
depth), slots ``"k"`` and ``"v"``. The tag also holds the site's token
grid and its factor, resolved for this capture's latent (``"auto"`` depends
on it). Sites whose factor is 1 are not tagged: nothing changes there.

The grid comes from the graph: the 4-D ``(B, C, h, w)`` feature map entering
the site's ``Transformer2DModel`` (UNets), or the latent itself when the
site sits in a top-level transformer (PixArt, DiT), reduced by the patch
size ``p = sqrt(h * w / N)``, which must be an integer dividing both sides.
Non-square grids follow. A grid the factor does not divide is an error
(``ValueError`` naming the site, grid and factor), raised when a step first
uses that capture: the runtime tags every capture when the methods change,
and one resolution's grid must not refuse another's generation.

Schedule: every step transforms every depth whose configured factor is not
1 (``"auto"`` included), with option ``(factor setting, mode)``; the pass is
:class:`~tgate_fx.passes.DownsampleKeyValues`. One graph serves every step
(composed with other methods, their variants each get it), except, with
``skip_timestep_zero``, a step whose timestep is <= 0: it transforms nothing
(label ``todo_off``), as the official processor downsamples only while
``timestep / 1000 > 0``. Without known timesteps no step is taken for 0.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.fx as fx

from ...core.analysis import (Regions, _type_name, _within, cross_attention_modules, describe_attention,
                              is_text_conditioned, joint_attention_modules)
from ...core.method import TRANSFORM, Method, MethodStep, Rewrite, ScheduleContext
from ...core.meta import tag_key
from ...passes import DownsampleKeyValues
from ...passes.downsample_key_values import KeyValueSite
from .config import ToDoConfig, auto_factor

__all__ = ["GROUPS", "ToDo", "site_depth"]

NAME = "todo"
GROUPS = ("depth1", "depth2", "deeper")
_LATENT_INPUTS = ("sample", "hidden_states")


def site_depth(latent_hw: tuple[int, int], tokens: int) -> int:
    """``round(sqrt(H * W / N))``: how many times a site's grid of ``tokens`` is reduced from the latent."""
    return max(1, round(math.sqrt(latent_hw[0] * latent_hw[1] / tokens)))


def _group(depth: int) -> str:
    return GROUPS[min(depth, 3) - 1]


def _shape(node) -> tuple[int, ...]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _latent(graph: fx.Graph) -> fx.Node:
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in _LATENT_INPUTS and len(_shape(node)) == 4:
            return node
    raise ValueError(f"ToDo needs the denoiser's 4-D latent input (one of {_LATENT_INPUTS}); the graph has none")


def _transformer_scope(node: fx.Node) -> str | None:
    """Path of the innermost ``*Transformer2DModel`` module holding ``node``, if it is not the root."""
    found = None
    for path, module_type in (node.meta.get("nn_module_stack") or {}).values():
        if path and _type_name(module_type).endswith("Transformer2DModel"):
            found = path
    return found


def _feature_maps(graph: fx.Graph) -> dict[str, tuple[int, int]]:
    """Transformer2DModel path -> (h, w) of the 4-D feature map entering it."""
    members: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        scope = _transformer_scope(node) if node.op == "call_function" else None
        if scope is not None:
            members.setdefault(scope, []).append(node)
    out = {}
    for path, nodes in members.items():
        inside = set(nodes)
        maps = [_shape(i)[-2:] for n in nodes for i in n.all_input_nodes if i not in inside and len(_shape(i)) == 4]
        if maps:
            out[path] = maps[0]
    return out


def _grid(feature: tuple[int, int], tokens: int, where: str) -> tuple[int, int]:
    h, w = feature
    patch = math.isqrt(h * w // tokens) if tokens and h * w % tokens == 0 else 0
    if not patch or patch * patch * tokens != h * w or h % patch or w % patch:
        raise ValueError(f"ToDo cannot place the {tokens} tokens of {where} on a grid: the feature map entering it "
                         f"is {h}x{w}, which no integer patch size reduces to {tokens} tokens")
    return h // patch, w // patch


def _kv_consumers(nodes: list[fx.Node], path: str) -> tuple[fx.Node, fx.Node]:
    members = set(nodes)
    found = []
    for proj in ("to_k", "to_v"):
        readers = [n for n in nodes if n.op == "call_function"
                   and any(_within(p, f"{path}.{proj}") for p, _ in n.meta["nn_module_stack"].values())
                   and n.args and isinstance(n.args[0], fx.Node) and n.args[0] not in members]
        if len(readers) != 1:
            raise ValueError(f"ToDo expects one node of {path}.{proj} to read the key/value input, found "
                             f"{[n.name for n in readers]}")
        found.append(readers[0])
    if found[0].args[0] is not found[1].args[0]:
        raise ValueError(f"ToDo needs {path}.to_k and .to_v to read the same input; they read "
                         f"{found[0].args[0].name} and {found[1].args[0].name}")
    return found[0], found[1]


def _self_attention_depths(denoiser) -> list[int]:
    """The depths of ``denoiser``'s self-attention read off its modules (empty: not known before a capture).

    A UNet's level i is at depth 2**i (its mid block at the last level's); a patch-embedding transformer
    puts every block at depth ``patch_size``.
    """
    downs = getattr(denoiser, "down_blocks", None)
    if downs is not None:
        depths = {2 ** i for i, block in enumerate(downs) if len(getattr(block, "attentions", None) or ())}
        mid = getattr(denoiser, "mid_block", None)
        if mid is not None and len(getattr(mid, "attentions", None) or ()):
            depths.add(2 ** (len(downs) - 1))
        return sorted(depths)
    patch = getattr(getattr(denoiser, "config", None), "patch_size", None)
    if isinstance(patch, (tuple, list)):
        patch = patch[-1]
    return [patch] if isinstance(patch, int) and patch >= 1 else []


class ToDo(Method):
    """ToDo, token downsampling of self-attention keys/values (arXiv 2402.13573); settings in :class:`ToDoConfig`."""

    name = NAME
    config_class = ToDoConfig
    title = "ToDo"

    def bind(self, denoiser) -> "ToDo":
        from diffusers import UNetMotionModel, UNetSpatioTemporalConditionModel
        name = type(denoiser).__name__
        if isinstance(denoiser, (UNetMotionModel, UNetSpatioTemporalConditionModel)) or "3D" in name:
            raise TypeError(
                f"ToDo cannot apply to {name}: it downsamples the 2-D token grid of an image's self-attention, and "
                f"{name} is a video denoiser (frames, packed or temporal tokens), for which no downsampling rule is "
                "defined. T-GATE applies to it: optimize(pipe, gate_step=...).")
        added = joint_attention_modules(denoiser)
        if added:
            raise TypeError(
                f"ToDo cannot apply to {name}: its attention adds the conditioning's keys/values to the image's "
                f"({added[0]}: joint attention as in SD3 and Flux, or Kandinsky's added K/V), so downsampling the "
                "image keys/values would change what the conditioning attends with; no rule is defined for it.")
        if not is_text_conditioned(denoiser):
            raise TypeError(f"ToDo cannot apply to {name}: it is defined for text-conditioned denoisers, and "
                            f"{name} takes no text embeddings (encoder_hidden_states)")
        if not cross_attention_modules(denoiser):
            raise TypeError(
                f"ToDo cannot apply to {name}: none of its attention modules is a cross-attention "
                f"({describe_attention(denoiser)}), so its text joins the image tokens in one sequence (as in "
                "Lumina2 and Flux's single-stream blocks); downsampling that sequence would drop text tokens, and "
                "no rule is defined for it.")
        if "image_rotary_emb" in inspect.signature(denoiser.forward).parameters:
            raise TypeError(
                f"ToDo cannot apply to {name}: its self-attention applies rotary position embeddings "
                "(image_rotary_emb, one per image token) to the keys after to_k, so keys downsampled before to_k "
                "would no longer match their positions; no rule is defined for it.")
        return self

    def inert_reason(self, denoiser) -> str | None:
        depths = _self_attention_depths(denoiser)
        if not depths or any(self.config.setting(d) != 1 for d in depths):
            return None
        c = self.config
        return (f"every self-attention of {type(denoiser).__name__} sits at depth {'/'.join(map(str, depths))} (its token "
                f"grid's reduction from the latent), where ToDoConfig(factor={c.factor!r}, "
                f"factor_depth2={c.factor_depth2}, factor_deeper={c.factor_deeper}) downsamples by 1; set the factor "
                "of that depth, e.g. ToDoConfig(factor_depth2=2)")

    def factor_at(self, depth: int, latent_hw: tuple[int, int]) -> int:
        """The factor of a site at ``depth`` for a latent of ``latent_hw``."""
        setting = self.config.setting(depth)
        return auto_factor(latent_hw[0] * latent_hw[1]) if setting == "auto" else setting

    def annotate(self, graph_module: fx.GraphModule, regions: Regions) -> None:
        graph = graph_module.graph
        latent_hw = _shape(_latent(graph))[-2:]
        by_name = {n.name: n for n in graph.nodes}
        selfs = [s for s in regions.attention if s.role == "self"]
        if not selfs:
            raise ValueError(f"ToDo found no self-attention in this denoiser's graph ({len(regions.attention)} "
                             "attention sites); it downsamples self-attention keys/values only")
        maps = None
        key = tag_key(NAME)
        for site in selfs:
            nodes = [by_name[n] for n in site.nodes]
            to_k, to_v = _kv_consumers(nodes, site.path)
            tokens = _shape(to_k.args[0])[1]
            depth = site_depth(latent_hw, tokens)
            factor = self.factor_at(depth, latent_hw)
            if factor == 1:
                continue
            if maps is None:
                maps = _feature_maps(graph)
            scope = _transformer_scope(to_k)
            error = None
            try:
                grid = _grid(maps[scope] if scope in maps else latent_hw, tokens, site.path)
            except ValueError as e:
                grid, error = (0, 0), str(e)
            if error is None and (grid[0] % factor or grid[1] % factor):
                error = (f"ToDo: the {grid[0]}x{grid[1]} token grid of {site.path} (depth {depth}, latent "
                         f"{latent_hw[0]}x{latent_hw[1]}) is not divisible by its factor {factor}; choose a factor "
                         f"dividing both sides or a resolution whose grid it divides")
            for node, slot in ((to_k, "k"), (to_v, "v")):
                node.meta[key] = {"group": _group(depth), "site": site.path, "slot": slot,
                                  "grid": grid, "factor": factor, "depth": depth, "error": error}

    def schedule(self, ctx: ScheduleContext) -> list[MethodStep]:
        c, num_steps, timesteps = self.config, ctx.num_steps, ctx.timesteps
        rewrites = frozenset(Rewrite(NAME, group, TRANSFORM, option=(c.setting(d), c.mode))
                             for d, group in enumerate(GROUPS, 1) if c.setting(d) != 1)
        factors = "/".join(str(c.setting(d)) for d in (1, 2, 3))
        step = MethodStep("todo", rewrites, columns=(("todo", f"{factors} {c.mode}" if rewrites else "off"),))
        if not (c.skip_timestep_zero and rewrites and timesteps is not None):
            return [step] * num_steps
        skipped = MethodStep("todo_off", columns=(("todo", "off (t=0)"),))
        return [skipped if t <= 0 else step for t in timesteps]

    def transform_pass(self, nodes: list, option, caches) -> DownsampleKeyValues:
        setting, mode = option
        key = tag_key(NAME)
        by_site: dict[str, list[fx.Node]] = {}
        for node in nodes:
            by_site.setdefault(node.meta[key]["site"], []).append(node)
        sites = []
        for consumers in by_site.values():
            tag = consumers[0].meta[key]
            if tag["error"]:
                raise ValueError(tag["error"])
            if setting != "auto" and tag["factor"] != setting:
                raise ValueError(f"ToDo's tag on {tag['site']} says factor {tag['factor']}, the step {setting}; "
                                 "annotate the graph again")
            sites.append(KeyValueSite(tuple(consumers), tag["grid"], tag["factor"]))
        return DownsampleKeyValues(sites, mode)

    def describe(self) -> str:
        c = self.config
        return (f"factor={c.factor!r}, factor_depth2={c.factor_depth2}, factor_deeper={c.factor_deeper}, "
                f"mode={c.mode!r}, skip_timestep_zero={c.skip_timestep_zero}")
