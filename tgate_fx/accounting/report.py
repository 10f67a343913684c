"""Report: a readable account of what the methods rewrote in an optimized pipeline."""

from __future__ import annotations

from typing import Any

from ..core.conventions import convention_of
from ..core.variants import CapturedGraphs
from ._format import roles_summary, sites_table, table
from .inspection import computed_sites

__all__ = ["cache_memory", "report"]


def cache_memory(graphs: CapturedGraphs) -> dict[str, tuple[int, int]]:
    """Per method, ``(bytes, tensors)`` of the caches its variants of ``graphs`` hold between steps.

    Read from the variants' cache inputs and records (their ``meta["val"]``
    shapes and dtypes): each cache key is one tensor held from the step that
    writes it to the step that reads it, counted once whatever the number of
    variants that read or write it.
    """
    held: dict = {}
    for v in graphs.variants.values():
        nodes = list(v.graph_module.graph.nodes)
        placeholders = {n.name: n for n in nodes if n.op == "placeholder"}
        output = next(n for n in nodes if n.op == "output").args[0]
        values = [(key, placeholders[name].meta["val"]) for key, name in v.cache_inputs.items()]
        values += list(zip(v.records, [n.meta["val"] for n in output[1:]]))
        for key, val in values:
            held[key] = max(held.get(key, 0), val.numel() * val.element_size())
    out: dict[str, tuple[int, int]] = {}
    for key, size in held.items():
        total, count = out.get(key.method, (0, 0))
        out[key.method] = (total + size, count + 1)
    return out


def _variant_rows(graphs: CapturedGraphs) -> list[tuple[str, ...]]:
    rows = []
    total = len(graphs.sites)
    for v in graphs.variants.values():
        rows.append((v.name, str(v.node_count()), str(sum(1 for _ in v.graph_module.parameters())),
                     f"{len(computed_sites(v))}/{total}", roles_summary(graphs.sites, v.reads),
                     roles_summary(graphs.sites, v.records),
                     ", ".join(n for n in v.input_names if not n.startswith("cache_"))))
    return rows


def _inert(method, runtime) -> str:
    """`` (rewrites nothing: why)`` for a method that rewrites nothing of the runtime's denoiser."""
    from ..core.meta import tag_key

    reason = method.inert_reason(runtime.denoiser)
    if reason is None and runtime.captures and not any(
            tag_key(method.name) in n.meta for g in runtime.captures for n in g.capture.graph_module.graph.nodes):
        reason = "no node of its captured graphs is tagged for it"
    return f" (rewrites nothing: {reason})" if reason else ""


def _why(message: str) -> str:
    """The reason of a refusal (``"X cannot apply to Y: <reason>. <advice>"``), without its advice."""
    reason = message.split(": ", 1)[-1]
    return reason.split(". ")[0].split("; ")[0].rstrip(".")


def _applicable(denoiser) -> str:
    """``T-GATE yes, DeepCache no (why)`` for every registered method."""
    from ..methods import METHODS

    parts = []
    for method_cls in METHODS.values():
        try:
            method_cls(method_cls.config_class()).bind(denoiser)
            parts.append(f"{method_cls.title} yes")
        except (TypeError, ValueError) as e:
            parts.append(f"{method_cls.title} no ({_why(str(e))})")
    return ", ".join(parts)


def report(pipe: Any, num_inference_steps: int | None = None, *, cfg: bool | None = None) -> str:
    """Describe an optimized pipeline: its methods, attention sites, step plan and graph variants.

    Sites and variants appear once the pipeline has run (they are captured
    from real calls). The plan shown is that of the last generation, or the
    one for ``num_inference_steps`` (and ``cfg``, default on) when given.
    Each variant's ``GraphModule`` is reachable through
    ``tgate_fx.get_runtime(pipe).captures[i].variants``.
    """
    from ..api import get_runtime

    runtime = get_runtime(pipe)
    lines = [f"tgate_fx: {type(runtime.denoiser).__name__} in {type(pipe).__name__}"]
    lines += [f"{m.title}: {m.describe()}" + _inert(m, runtime) for m in runtime.methods]
    lines += [f"methods that apply to {type(runtime.denoiser).__name__}: {_applicable(runtime.denoiser)}"]
    convention = convention_of(runtime.denoiser)
    if convention is not None:
        ragged = "".join(f"; {name}'s samples may differ in token count (zero-padded to the longest, one export "
                         "per combination of lengths)" for name in convention.ragged)
        lines.append(f"calls: {type(runtime.denoiser).__name__} takes {', '.join(convention.lists)} as lists of "
                     "per-sample tensors, served as one batch (" +
                     ", ".join(f"{a} as {b}" for a, b in convention.names) + ragged + "; otherwise equal-shaped "
                     "samples only, one export per batch size)")
    lines.append("")
    if num_inference_steps is not None:
        plan = runtime.plan(num_inference_steps, True if cfg is None else cfg)
    else:
        plan = runtime.last_plan
    if not runtime.captures:
        lines.append("no capture yet: the denoiser is captured at its first call")
    for i, graphs in enumerate(runtime.captures):
        cap = graphs.capture
        lines += [f"capture {i}: {cap.signature.describe()}",
                  f"  export {cap.seconds:.2f}s, {len(cap.graph_module.graph.nodes)} nodes, "
                  f"{len(graphs.sites)} attention sites", ""]
        lines += ["  " + line for line in sites_table(graphs.sites)] + [""]
        memory = cache_memory(graphs)
        if memory:
            lines += ["  caches held between steps: " + ", ".join(
                f"{m} {b / 2**20:.2f} MiB ({n} tensors)" for m, (b, n) in memory.items()), ""]
        if graphs.variants:
            header = ("variant", "ops", "params", "computed", "reused", "recorded", "inputs")
            lines += ["  " + line for line in table([header] + _variant_rows(graphs))] + [""]
    lines.append(str(plan) if plan is not None else "no plan yet: pass num_inference_steps to see one")
    return "\n".join(lines)
