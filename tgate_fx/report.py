"""Inspection: a readable account of what T-GATE rewrote in a pipeline."""

from __future__ import annotations

from typing import Any

from .analysis import AttentionSite
from .plan import Plan
from .runtime import CapturedGraphs, TGateDenoiser
from .variants import Variant

__all__ = ["report"]


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "-"


def _sites_table(sites: list[AttentionSite]) -> list[str]:
    rows = [("site", "role", "query", "keys/values", "value", "proj MACs")]
    rows += [(s.path, s.role, _shape(s.query_shape), _shape(s.kv_shape), _shape(s.value_shape), f"{s.macs:,}")
             for s in sites]
    return _table(rows)


def _variant_rows(graphs: CapturedGraphs) -> list[tuple[str, ...]]:
    rows = []
    total = len(graphs.sites)
    for v in graphs.variants.values():
        computed = total - len(v.reads)
        rows.append((v.name, str(v.node_count()), str(sum(1 for _ in v.graph_module.parameters())),
                     f"{computed}/{total}", _roles(graphs.sites, v.reads), _roles(graphs.sites, v.records),
                     ", ".join(v.input_names[: len(v.input_names) - len(v.reads)])))
    return rows


def _roles(sites: list[AttentionSite], paths: list[str]) -> str:
    if not paths:
        return "-"
    roles: dict[str, int] = {}
    by_path = {s.path: s.role for s in sites}
    for p in paths:
        roles[by_path[p]] = roles.get(by_path[p], 0) + 1
    return ", ".join(f"{n} {r}" for r, n in sorted(roles.items()))


def report(pipe: Any, num_inference_steps: int | None = None, *, cfg: bool | None = None) -> str:
    """Describe an optimized pipeline: its settings, attention sites, step plan and graph variants.

    Sites and variants appear once the pipeline has run (they are captured
    from real calls). The plan shown is that of the last generation, or the
    one for ``num_inference_steps`` (and ``cfg``, default on) when given.
    Each variant's ``GraphModule`` is reachable through
    ``tgate_fx.get_runtime(pipe).captures[i].variants``.
    """
    from .api import get_runtime

    runtime: TGateDenoiser = get_runtime(pipe)
    cfg_ = runtime.tgate_config
    lines = [f"tgate_fx: {type(runtime.denoiser).__name__} in {type(pipe).__name__}",
             f"settings: gate_step={cfg_.gate_step} sp_interval={cfg_.sp_interval} "
             f"fi_interval={cfg_.fi_interval} warm_up={cfg_.warm_up} lcm={cfg_.lcm}", ""]
    if num_inference_steps is not None:
        plan = Plan(num_inference_steps, cfg_, True if cfg is None else cfg)
    else:
        plan = runtime.last_plan
    if not runtime.captures:
        lines.append("no capture yet: the denoiser is captured at its first call")
    for i, graphs in enumerate(runtime.captures):
        cap = graphs.capture
        lines += [f"capture {i}: {cap.signature.describe()}",
                  f"  export {cap.seconds:.2f}s, {len(cap.graph_module.graph.nodes)} nodes, "
                  f"{len(graphs.sites)} attention sites", ""]
        lines += ["  " + line for line in _sites_table(graphs.sites)] + [""]
        if graphs.variants:
            header = ("variant", "ops", "params", "computed", "reused", "recorded", "inputs")
            lines += ["  " + line for line in _table([header] + _variant_rows(graphs))] + [""]
    lines.append(str(plan) if plan is not None else "no plan yet: pass num_inference_steps to see one")
    return "\n".join(lines)


def variant_code(variant: Variant) -> str:
    """The Python code of a variant's graph."""
    return variant.graph_module.code
