"""The ``node.meta`` keys tgate_fx writes on graph nodes, in one place.

A leaf module: it imports nothing of the package, so that every layer
(core, passes, methods, accounting) can read and write the same keys.

* :data:`TAG`: the attention analysis' region tag of a node,
  ``{"site": module path, "role": "self" | "cross" | ..., "value": True}`` on
  the node that is the site's output (see :mod:`tgate_fx.core.analysis`);
* :data:`ATTR_PATH`: on a ``get_attr`` node of a flat captured graph, the
  attribute's path in the denoiser (see :mod:`tgate_fx.core.captured`);
* :func:`tag_key`: the key under which a method tags the nodes it may
  rewrite (see :mod:`tgate_fx.core.method`).
"""

from __future__ import annotations

__all__ = ["ATTR_PATH", "TAG", "tag_key"]

TAG = "tgate_fx"
ATTR_PATH = "tgate_fx_attr_path"


def tag_key(method: str) -> str:
    """The ``node.meta`` key under which ``method`` tags nodes."""
    return f"tgate_fx.{method}"
