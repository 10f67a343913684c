"""Plain-text tables shared by the report and the inspect command."""

from __future__ import annotations

from ..core.analysis import AttentionSite


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns; the first row is the header, underlined."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def shape(dims) -> str:
    return "x".join(map(str, dims)) or "-"


def sites_table(sites: list[AttentionSite]) -> list[str]:
    rows = [("site", "role", "query", "keys/values", "value", "proj MACs")]
    rows += [(s.path, s.role, shape(s.query_shape), shape(s.kv_shape), shape(s.value_shape), f"{s.macs:,}")
             for s in sites]
    return table(rows)


def roles_summary(sites: list[AttentionSite], paths) -> str:
    """'7 cross, 7 self' for the attention sites among ``paths`` (site paths or cache keys); '-' for none.

    A cache key of a site that is not an attention site counts under its method (``'1 deepcache'``).
    """
    if not paths:
        return "-"
    by_path = {s.path: s.role for s in sites}
    counts: dict[str, int] = {}
    for p in paths:
        site, method = (p.site, p.method) if hasattr(p, "site") else (p, "other")
        label = by_path.get(site, method)
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
