"""Analysis: find the regions of a captured denoiser (attention sites, module outputs) and tag them.

An *attention site* is one call of an attention module (diffusers
``Attention``, or another class of :data:`ATTENTION_TYPES`), found
through ``node.meta["nn_module_stack"]`` (the module may sit anywhere in a
node's stack, not only innermost). For each site this module decides:

* its **role**: ``"cross"`` when its keys/values come from
  ``encoder_hidden_states`` (directly or through a projection such as
  PixArt's caption projection) rather than from the queries' input,
  ``"self"`` otherwise;
* its **value** node: the output of ``to_out`` (out-projection and dropout),
  before the residual add and ``rescale_output_factor``. That is what T-GATE
  caches and what a cache read replaces.

Every node of a site gets ``node.meta["tgate_fx"] = {"site": path, "role": role}``,
and the value node additionally ``"value": True``. Methods read these
regions to place their own tags; passes read tags; nothing downstream
matches node names.

Besides attention sites, :class:`Regions` knows every module call of the
graph (its path and class) and finds the single value leaving a module
(:meth:`Regions.output_of`): a UNet's down/mid/up path, transformer blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .conventions import forward_parameters
from .cost import node_macs
from .meta import TAG

__all__ = ["ATTENTION_TYPES", "TAG", "AttentionSite", "Regions", "analyze", "attention_modules", "conditioning_inputs",
           "cross_attention_modules", "describe_attention", "find_attention_sites", "is_attention_module",
           "is_text_conditioned", "joint_attention_modules", "site_tag"]

TEXT_INPUT = "encoder_hidden_states"

# Attention module classes, by qualified name as recorded in nn_module_stack. Each has the
# structure analysis reads: to_q, to_k (or fused to_qkv/to_kv) and to_v projections, a to_out
# output, and keys/values from `encoder_hidden_states` when that argument is passed (LTX-Video's
# and Wan's own classes share it with diffusers' Attention).
ATTENTION_TYPES = frozenset({
    "diffusers.models.attention_processor.Attention",
    "diffusers.models.transformers.transformer_ltx.LTXAttention",
    "diffusers.models.transformers.transformer_wan.WanAttention",
})


def is_attention_module(module: torch.nn.Module, types: frozenset[str] = ATTENTION_TYPES) -> bool:
    """Whether ``module`` is an instance of one of the attention classes analysis finds sites of."""
    return _type_name(type(module)) in types


def attention_modules(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every attention module of ``denoiser``, of any diffusers attention class: ``Attention`` and
    every ``AttentionModuleMixin`` (``FluxAttention``, ``WanAttention``, ...), not only those analysis
    finds sites of. For deciding, before anything is captured, what a method can apply to."""
    from diffusers.models.attention_processor import Attention

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # diffusers before 0.35
        AttentionModuleMixin = Attention
    return [(name, m) for name, m in denoiser.named_modules()
            if isinstance(m, (Attention, AttentionModuleMixin)) or is_attention_module(m)]


def joint_attention_modules(denoiser: torch.nn.Module) -> list[str]:
    """Paths of the attention modules that add the conditioning's own keys and values to the image's
    (``added_kv_proj_dim``: the double-stream joint attention of SD3, Flux, Qwen-Image, HunyuanVideo,
    AuraFlow, and Kandinsky's added K/V)."""
    return [name for name, m in attention_modules(denoiser) if getattr(m, "added_kv_proj_dim", None) is not None]


def cross_attention_modules(denoiser: torch.nn.Module) -> list[str]:
    """Paths of the attention modules that may be cross-attention (keys and values from a separate input)
    without added keys/values: built as one (``is_cross_attention``), or of a class analysis reads that
    does not say (``LTXAttention``; the capture's analysis then decides each site's role from the graph)."""
    out = []
    for name, m in attention_modules(denoiser):
        if getattr(m, "added_kv_proj_dim", None) is not None:
            continue
        cross = getattr(m, "is_cross_attention", None)
        if cross or (cross is None and is_attention_module(m)):
            out.append(name)
    return out


def conditioning_inputs(denoiser: torch.nn.Module) -> list[str]:
    """The conditioning arguments of the denoiser's ``forward``: text (``encoder_hidden_states`` and the
    per-encoder ``encoder_hidden_states_*`` of HunyuanDiT or HiDream) and classes (``class_labels``)."""
    return [name for name in forward_parameters(denoiser) if name.startswith(TEXT_INPUT) or name == "class_labels"]


def is_text_conditioned(denoiser: torch.nn.Module) -> bool:
    """Whether the denoiser takes text embeddings (see :func:`conditioning_inputs`)."""
    return any(name.startswith(TEXT_INPUT) for name in conditioning_inputs(denoiser))


def describe_attention(denoiser: torch.nn.Module) -> str:
    """The attention classes of ``denoiser`` with their processors, e.g. ``FluxAttention (FluxAttnProcessor)``."""
    kinds = []
    for _, m in attention_modules(denoiser):
        processor = getattr(m, "processor", None)
        kind = type(m).__name__ + (f" ({type(processor).__name__})" if processor is not None else "")
        if kind not in kinds:
            kinds.append(kind)
    return ", ".join(kinds) or "none"


@dataclass(frozen=True)
class AttentionSite:
    """One attention module call in a captured graph.

    Attributes:
        path: Module path, e.g. ``"down_blocks.1.attentions.0.transformer_blocks.0.attn2"``.
        role: ``"self"``, ``"cross"``, or ``"other"`` (keys/values from an input
            other than the text; never cached).
        value: Name of the node holding the cached value (the ``to_out`` output).
        nodes: Names of every node inside the module.
        query_shape: Shape of the queries' input.
        kv_shape: Shape of the keys/values' input.
        value_shape: Shape of the cached value.
        macs: Multiply-accumulates of the site's projections (Linear/Conv).
        attention_macs: Multiply-accumulates of its SDPA core.
    """

    path: str
    role: str
    value: str
    nodes: tuple[str, ...]
    query_shape: tuple[int, ...]
    kv_shape: tuple[int, ...]
    value_shape: tuple[int, ...]
    macs: int
    attention_macs: int


def site_tag(node: fx.Node) -> dict | None:
    """The analysis tag of ``node``, or ``None`` outside attention sites."""
    return node.meta.get(TAG)


def _type_name(t) -> str:
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


def _within(path: str, scope: str) -> bool:
    return path == scope or path.startswith(scope + ".")


def _attention_scope(node: fx.Node, types: frozenset[str]) -> str | None:
    """Path of the innermost attention module in ``node``'s module stack."""
    found = None
    for path, module_type in (node.meta.get("nn_module_stack") or {}).values():
        if _type_name(module_type) in types:
            found = path
    return found


def _external_source(node: fx.Node, members: set[fx.Node]) -> fx.Node:
    """Follow the data input of ``node`` back until it leaves the site.

    Stops early at a node of the site that joins several inputs (a ``cat``, as
    perturbed-attention guidance's processor builds its query/key input).
    """
    while node in members and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _first_in_submodule(nodes: list[fx.Node], scope: str) -> fx.Node | None:
    for n in nodes:
        if n.op == "call_function" and any(_within(p, scope) for p, _ in (n.meta.get("nn_module_stack") or {}).values()):
            return n
    return None


def _shape(node: fx.Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def find_attention_sites(gm: fx.GraphModule, attention_types: frozenset[str] = ATTENTION_TYPES,
                         unreadable: dict[str, str] | None = None) -> list[AttentionSite]:
    """Find, classify and tag every attention site of ``gm``, in graph order.

    Raises:
        ValueError: if a site does not have the structure of a diffusers
            ``Attention`` call (a ``to_q``/``to_k`` projection, a ``to_out``
            output, and a single value leaving the module); with ``unreadable``
            given, such a site is left out and its path -> the reason stored there.
    """
    by_site: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        scope = _attention_scope(node, attention_types)
        if scope is not None:
            by_site.setdefault(scope, []).append(node)

    text_dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if (node.op == "placeholder" and node.name == TEXT_INPUT) or any(
            i in text_dependent for i in node.all_input_nodes
        ):
            text_dependent.add(node)

    sites = []
    for path, nodes in by_site.items():
        members = set(nodes)
        # fused projections (`pipe.fuse_qkv_projections()`): to_qkv for self-attention, to_kv for cross
        to_q = _first_in_submodule(nodes, path + ".to_q") or _first_in_submodule(nodes, path + ".to_qkv")
        to_k = (_first_in_submodule(nodes, path + ".to_k") or _first_in_submodule(nodes, path + ".to_qkv")
                or _first_in_submodule(nodes, path + ".to_kv"))
        outs = [n for n in nodes if any(_within(p, path + ".to_out")
                                         for p, _ in (n.meta.get("nn_module_stack") or {}).values())]
        leaving = [n for n in nodes if any(u not in members for u in n.users)]
        if to_q is None or to_k is None or not outs or len(leaving) != 1:
            reason = (f"attention module {path!r} does not look like a diffusers Attention call "
                      f"(query/key projections to_q/to_k, to_qkv or to_kv: to_q={to_q}, to_k={to_k}, "
                      f"to_out nodes={len(outs)}, outputs={[n.name for n in leaving]})")
            if unreadable is None:
                raise ValueError(reason)
            unreadable[path] = reason
            continue
        value = outs[-1]
        q_src = _external_source(to_q, members)
        kv_src = _external_source(to_k, members)
        if kv_src is q_src:
            role = "self"
        else:
            # Keys/values from another input: cross-attention when that input is
            # the text; anything else (e.g. image-prompt keys) is left alone.
            role = "cross" if kv_src in text_dependent else "other"
        for n in nodes:
            n.meta[TAG] = {"site": path, "role": role, **({"value": True} if n is value else {})}
        sites.append(AttentionSite(
            path=path, role=role, value=value.name, nodes=tuple(n.name for n in nodes),
            query_shape=_shape(q_src), kv_shape=_shape(kv_src), value_shape=_shape(value),
            macs=sum(node_macs(n) for n in nodes),
            attention_macs=sum(node_macs(n, include_attention=True) - node_macs(n) for n in nodes),
        ))
    return sites


@dataclass
class Regions:
    """The regions of one captured graph.

    Attributes:
        graph_module: The (tagged) captured graph.
        modules: Path -> class name of every module called in the graph, in
            order of first appearance (``"up_blocks.3.resnets.0"`` ->
            ``"diffusers...ResnetBlock2D"``).
        unreadable: Path -> why, for each attention module whose call does not have the structure of
            a diffusers ``Attention`` call (a joint attention returning two streams, say).
    """

    graph_module: fx.GraphModule
    sites: list[AttentionSite]
    modules: dict[str, str]
    unreadable: dict[str, str] = field(default_factory=dict)

    @property
    def attention(self) -> list[AttentionSite]:
        """The attention sites, in graph order.

        Raises:
            ValueError: if some attention module could not be read (a method reading attention sites
                would miss it); methods that do not read attention (a block cache) never ask.
        """
        if self.unreadable:
            raise ValueError(next(iter(self.unreadable.values())))
        return self.sites

    def children(self, path: str, name: str) -> list[str]:
        """Paths ``path.name.<i>`` that exist, by index: ``children("up_blocks.3", "resnets")``."""
        prefix = f"{path}.{name}." if path else f"{name}."
        found = {int(p[len(prefix):]) for p in self.modules if p.startswith(prefix) and p[len(prefix):].isdigit()}
        return [f"{prefix}{i}" for i in sorted(found)]

    def nodes_of(self, path: str) -> list[fx.Node]:
        """The nodes computed inside module ``path`` (its submodules included), in graph order."""
        return [n for n in self.graph_module.graph.nodes if n.op == "call_function"
                and any(_within(p, path) for p, _ in (n.meta.get("nn_module_stack") or {}).values())]

    def values_leaving(self, path: str) -> list[fx.Node]:
        """The nodes computed inside module ``path`` that are read outside it, in graph order."""
        inside = self.nodes_of(path)
        members = set(inside)
        return [n for n in inside if any(u not in members for u in n.users)]

    def output_of(self, path: str) -> fx.Node:
        """The one node computed inside module ``path`` that is read outside it.

        Raises:
            ValueError: if the module was not called, or more than one of its values leaves it.
        """
        leaving = self.values_leaving(path)
        if len(leaving) != 1:
            raise ValueError(f"module {path!r} has {len(leaving)} values read outside it "
                             f"({[n.name for n in leaving]}); expected exactly one")
        return leaving[0]


def _module_paths(gm: fx.GraphModule) -> dict[str, str]:
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        for path, module_type in (node.meta.get("nn_module_stack") or {}).values():
            out.setdefault(path, _type_name(module_type))
    return out


def analyze(gm: fx.GraphModule) -> Regions:
    """Find and tag the regions of a captured graph (see :func:`find_attention_sites`)."""
    unreadable: dict[str, str] = {}
    return Regions(gm, find_attention_sites(gm, unreadable=unreadable), _module_paths(gm), unreadable)
