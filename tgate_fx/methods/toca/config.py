"""ToCa settings, validated once, and the official schedule arithmetic (which steps are full, how many tokens are fresh)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

import torch

from .._checks import check_int

__all__ = ["FAMILIES", "SCHEDULES", "ToCaConfig", "fresh_count", "fresh_ratio", "refresh_count", "step_kinds",
           "step_weighted"]

# Literal annotations: the CLI offers their values as the flags' choices.
Family = Literal["pixart", "dit", "flux", "opensora"]
Schedule = Literal["ToCa", "ToCa-ddim50", "ToCa-ddpm250", "ToCa-flux", "ToCa-opensora", "constant"]
Score = Literal["attention", "random"]
Compat = Literal["official", "clean"]
FAMILIES, SCHEDULES, SCORES, COMPAT = (get_args(t) for t in (Family, Schedule, Score, Compat))

# Official defaults per family: (interval N, fresh ratio R, ratio schedule, bonus ratio, bonus grid).
_DEFAULTS = {
    "pixart": (3, 0.30, "ToCa", 0.4, 4),
    "dit": (3, 0.07, "ToCa-ddim50", 0.6, 2),
    "flux": (4, 0.10, "ToCa-flux", 0.0, 1),  # flux-ToCa's cache_init (mode "ToCa"): no spatial bonus
    # Open-Sora's inference defaults (fresh_threshold 3, fresh_ratio 0.1); its bonus call is commented out
    "opensora": (3, 0.10, "ToCa-opensora", 0.0, 1),
}
# Each family's own ratio schedule (the others fit none but theirs; "constant" fits every family).
_OWN_SCHEDULES = {"flux": "ToCa-flux", "opensora": "ToCa-opensora"}
# Open-Sora's "ToCa" ratio schedule: module_weight 1.5, module_time_weight 0.33; every other weight is 0.
_OPENSORA_WEIGHTS = (1.5, 0.33)
# flux-ToCa's "ToCa" ratio schedule: (step_weight, layer_weight, stream_weight); the double stream's factor is
# 1 - stream_weight, the single stream's 1 + stream_weight.
_FLUX_WEIGHTS = (0.0, 0.5, 0.6)
# The official weights of each ratio schedule: (step_weight, layer_weight, module_weight, module_time_weight,
# the module whose factor is reduced).
_WEIGHTS = {
    "ToCa": (-0.9, 0.6, 1.0, 0.6, "cross"),
    "ToCa-ddim50": (2.0, -0.2, 2.5, 0.6, "attn"),
    "ToCa-ddpm250": (0.4, 0.8, 2.5, 0.6, "attn"),
}


@dataclass(frozen=True)
class ToCaConfig:
    """ToCa (ICLR 2025, token-wise feature caching) with the names and defaults of the official code.

    Every ``None`` field takes the official default of the denoiser's family
    when :func:`tgate_fx.optimize` installs the method (PixArt-alpha/sigma:
    ``"pixart"``; DiT: ``"dit"``; FLUX.1, FLUX.1 Kontext, Chroma: ``"flux"``);
    :meth:`resolved` does it by hand.

    Attributes:
        family: ``"pixart"`` (PixArt-alpha/sigma: the cross-attention map scores tokens, cross-attention
            and MLP are refreshed on partial steps, steps counted 0..S-1) or ``"dit"`` (DiT: the
            self-attention map scores, only the MLP is refreshed, steps counted down S-1..0 as the
            official DiT code does) or ``"flux"`` (the official FLUX code: the self-attention map scores
            the tokens; the double-stream blocks reuse the attention and refresh the image and the text
            MLP, each stream with its own scores and k; the single-stream blocks refresh the MLP branch
            and the output projection over text and image tokens, with the attention from the cache;
            one step kind for every layer) or ``"opensora"`` (the official Open-Sora code, on LTX-Video's and
            Wan 2.1's blocks: self-attention, cross-attention and MLP each on its own cycle; the cross-attention map's
            entropy scores the tokens, the two CFG halves sharing one selection, also when they run as two
            calls a step (Wan: each call's half of the score is averaged across the calls); a partial step reuses both
            attentions and refreshes the MLP on the top-k tokens); ``None``: from the denoiser.
        interval: The full-step interval N (``fresh_threshold``): full when ``s % T == 0`` with
            ``T = round(N / sf)`` (PixArt, DiT); FLUX: full at steps 0, 1, 2 (step 0 only with
            ``ratio=0``) and then every N-th step (``cal_type``'s counter); Open-Sora: all modules full at
            steps 0, 1, 2, then self-attention and MLP every N steps, cross-attention every 2N (the official
            constant cycles 3 and 6; ``interval=1`` computes everything), N also dividing the staleness
            term. Default 3 (PixArt; DiT with DDIM-50; Open-Sora), 4 for ``"ToCa-ddpm250"`` and FLUX.
        ratio: The fresh ratio R: about ``R * N_tokens`` tokens are recomputed per module on a
            partial step, scaled by the schedule. Default 0.30 (PixArt), 0.07 (DiT), 0.10 (FLUX). ``0``
            is FORA (caches only; the official interval then has no step weighting and no DiT window).
        schedule: The ratio schedule: ``"ToCa"`` (PixArt), ``"ToCa-ddim50"`` (DiT default),
            ``"ToCa-ddpm250"`` (DiT with DDPM-250), ``"ToCa-opensora"`` (Open-Sora: ``R * 1.495`` for the
            MLP, ``R * -0.005``, i.e. none, for cross-attention), ``"ToCa-flux"`` (FLUX, the official FLUX code's
            ``"ToCa"``: ``R * (1.5 - layer / 27) * (0.4 double | 1.6 single)``, layers counted per
            stream) or ``"constant"`` (R everywhere).
        score: ``"attention"`` (the published score: PixArt the entropy of the cross-attention map,
            both CFG halves sharing one selection; DiT the attention each token receives) or
            ``"random"`` (the ablation: uniform random scores, shared by both CFG halves; schedule and k
            as with ``"attention"``). The graphs draw them (``aten.rand``, one ``(rows, N)`` draw per
            selection with k > 0, block by block, cross-attention before MLP); in the eager runtime from
            torch's global generator, so ``torch.manual_seed`` before a generation repeats it (the
            pipeline's ``generator`` does not reach these draws), and the test oracle draws the same
            numbers (equal latents). Other backends (torch.compile's inductor, ONNX Runtime's
            ``RandomUniform``) draw with their own generators: another uniform selection, not eager's.
        cache_weight: Weight of the cache-frequency score (``soft_fresh_weight``): ``+ w * c / N``
            for a token stale for c partial steps. Default 0.25.
        bonus_ratio: Spatial bonus: in each ``bonus_grid`` x ``bonus_grid`` cell of the token grid the
            best token's score gains ``bonus_ratio`` times itself. Default 0.4 (PixArt), 0.6 (DiT), 0
            (FLUX: none).
        bonus_grid: Cell side of the spatial bonus. Default 4 (PixArt), 2 (DiT), 1 (FLUX, unused).
        compat: ``"official"`` keeps three quirks of the official code: the layer factor divides by
            the constant 27 whatever the depth; k is ``int(float32(r) * N_tokens)`` in float32; and
            the interval T is updated inside full blocks, so that in a step where layer 0 is full
            (tested with the previous T) the later layers test the new T and may be partial
            ("mixed" steps, e.g. step 4 of PixArt at 20 steps, N = 3). ``"clean"``: divide by
            depth - 1, compute k in float64, and decide each step for all layers with the T of the
            previous full step.
    """

    family: Family | None = None
    interval: int | None = None
    ratio: float | None = None
    schedule: Schedule | None = None
    score: Score = "attention"
    cache_weight: float = 0.25
    bonus_ratio: float | None = None
    bonus_grid: int | None = None
    compat: Compat = "official"

    def __post_init__(self) -> None:
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES} or None (from the denoiser), got {self.family!r}")
        if self.interval is not None:
            check_int("interval", self.interval, 1)
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))
                                       or not 0 <= self.ratio <= 1):
            raise ValueError(f"ratio must be a number in [0, 1], got {self.ratio!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if isinstance(self.cache_weight, bool) or not isinstance(self.cache_weight, (int, float)):
            raise ValueError(f"cache_weight must be a number, got {self.cache_weight!r}")
        if self.bonus_ratio is not None and (isinstance(self.bonus_ratio, bool)
                                             or not isinstance(self.bonus_ratio, (int, float))):
            raise ValueError(f"bonus_ratio must be a number, got {self.bonus_ratio!r}")
        if self.bonus_grid is not None:
            check_int("bonus_grid", self.bonus_grid, 1)
        if self.compat not in COMPAT:
            raise ValueError(f"compat must be one of {COMPAT}, got {self.compat!r}")

    def resolved(self, family: str | None = None) -> "ToCaConfig":
        """This config with every ``None`` filled with the official default of ``family`` (or of :attr:`family`)."""
        family = family if self.family is None else self.family
        if family not in FAMILIES:
            raise ValueError(f"ToCa needs a family ({FAMILIES}) to fill its defaults, got {family!r}")
        interval, ratio, schedule, bonus, grid = _DEFAULTS[family]
        schedule = self.schedule or schedule
        own = _OWN_SCHEDULES.get(family)
        fits = schedule == "constant" or (schedule == own if own else schedule not in _OWN_SCHEDULES.values())
        if not fits:
            allowed = (own, "constant") if own else tuple(x for x in SCHEDULES if x not in _OWN_SCHEDULES.values())
            raise ValueError(f"ToCa schedule {schedule!r} does not fit family {family!r}; use one of {allowed}")
        if self.interval is None and schedule == "ToCa-ddpm250":
            interval = 4
        return replace(self, family=family, interval=self.interval or interval,
                       ratio=ratio if self.ratio is None else self.ratio, schedule=schedule,
                       bonus_ratio=bonus if self.bonus_ratio is None else self.bonus_ratio,
                       bonus_grid=grid if self.bonus_grid is None else self.bonus_grid)

    @property
    def is_resolved(self) -> bool:
        return None not in (self.family, self.interval, self.ratio, self.schedule, self.bonus_ratio, self.bonus_grid)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def official_step(family: str, i: int, num_steps: int) -> int:
    """The step index the official code hands its schedulers: PixArt and FLUX count up (i), DiT counts down
    (S-1-i)."""
    return num_steps - 1 - i if family == "dit" else i


def _interval(c: ToCaConfig, s: int, num_steps: int):
    """``force_scheduler``: the interval set by a full block at official step ``s``."""
    weight = 0.0 if c.ratio == 0 else (0.2 if c.family == "pixart" else 0.4)
    if c.family == "pixart":
        factor = torch.tensor(1 - weight + 2 * weight * s / num_steps)
    else:
        factor = torch.tensor(1 + weight - 2 * weight * s / num_steps)
    threshold = torch.round(c.interval / factor)
    if c.family == "dit" and c.ratio != 0 and s in range(int(num_steps * 0.2), int(num_steps * 0.4)):
        threshold = 2
    return threshold


def _is_full(c: ToCaConfig, s: int, num_steps: int, threshold) -> bool:
    first = s == (0 if c.family == "pixart" else num_steps - 1)
    return bool(first or (s % threshold == 0))


def step_kinds(c: ToCaConfig, num_steps: int, barriers: frozenset[int] = frozenset()) -> list[str]:
    """``"full"``, ``"partial"`` or ``"mixed"`` (layer 0 full, the others partial) for each step.

    Follows ``global_force_fresh`` / ``cal_type`` and ``force_scheduler``: layer 0 tests the
    interval of the previous full block; a full block sets it anew (PixArt: every full block;
    DiT: layer 0's), so the later layers of a step test the new one. Steps in ``barriers``
    are full. ``compat="clean"``: every layer of a step tests the previous full step's interval.
    """
    if c.family == "flux":
        return _flux_step_kinds(c, num_steps, barriers)
    if c.family == "opensora":
        return _opensora_step_kinds(c, num_steps, barriers)
    kinds, threshold = [], None
    for i in range(num_steps):
        s = official_step(c.family, i, num_steps)
        new = _interval(c, s, num_steps)
        if i in barriers:
            kinds.append("full")
            threshold = new
            continue
        first_full = _is_full(c, s, num_steps, threshold)
        if not first_full:
            kinds.append("partial")
            continue
        threshold = new
        if c.compat == "clean" or _is_full(c, s, num_steps, threshold):
            kinds.append("full")
        else:
            kinds.append("mixed")
    return kinds


def _flux_step_kinds(c: ToCaConfig, num_steps: int, barriers: frozenset[int]) -> list[str]:
    """flux-ToCa's ``cal_type``: full at the first steps (0, 1, 2; only 0 with ``ratio=0``) and when the
    counter of partial steps since the last full step reaches ``T - 1``, ``T = round(N / 1)`` (its
    ``force_scheduler`` has no step weight). Steps in ``barriers`` are full and reset the counter."""
    threshold = int(torch.round(torch.tensor(c.interval / 1.0)))
    kinds, counter = [], 0
    for i in range(num_steps):
        first = i == 0 if c.ratio == 0 else i <= 2
        if first or i in barriers or counter == threshold - 1:
            kinds.append("full")
            counter = 0
        else:
            kinds.append("partial")
            counter += 1
    return kinds


def cross_interval(c: ToCaConfig) -> int:
    """Open-Sora: the cross-attention's cycle, twice the interval (the official constants are 3 for
    self-attention and MLP, 6 for cross-attention; tied to ``interval`` here, so that ``interval=1`` computes
    everything)."""
    return 1 if c.interval == 1 else 2 * c.interval


def _opensora_step_kinds(c: ToCaConfig, num_steps: int, barriers: frozenset[int]) -> list[str]:
    """Open-Sora's ``global_force_fresh`` with its per-module cycles: every module is full at steps 0, 1, 2;
    then self-attention and MLP every ``interval`` steps, cross-attention every :func:`cross_interval` steps.
    ``"full"``: every module; ``"cross_cached"``: self-attention and MLP full, cross-attention (and the score) from
    the cache; ``"partial"``: the MLP refreshed on the top-k tokens, the rest from the cache. Steps in
    ``barriers`` are full."""
    kinds = []
    for i in range(num_steps):
        if i <= 2 or i in barriers or i % cross_interval(c) == 0:
            kinds.append("full")
        elif i % c.interval == 0:
            kinds.append("cross_cached")
        else:
            kinds.append("partial")
    return kinds


def step_weighted(c: ToCaConfig) -> bool:
    """Whether the fresh ratio depends on the step (else every partial step has the same k: one graph)."""
    return c.schedule not in ("constant", "ToCa-flux", "ToCa-opensora")


def fresh_ratio(c: ToCaConfig, s: int, num_steps: int, layer: int, module: str, depth: int = 28) -> float:
    """``fresh_ratio_scheduler`` at official step ``s``, clamped to [0, 1] (float32 where ``compat="official"``).

    ``module``: ``"cross"`` or ``"mlp"`` (FLUX: ``"double"`` or ``"single"``, the block's stream; ``s`` is
    unused). ``depth`` is used only with ``compat="clean"``.
    """
    if c.schedule == "constant":
        ratio = c.ratio
    elif c.schedule == "ToCa-opensora":  # R * lf * sf * mf * tf with lf = sf = tf = 1
        mw, mtw = _OPENSORA_WEIGHTS
        ratio = c.ratio * ((1 - (1 - mtw) * mw) if module == "cross" else (1 + mtw * mw))
    elif c.schedule == "ToCa-flux":
        sw, lw, stw = _FLUX_WEIGHTS
        last = 27 if c.compat == "official" else max(depth - 1, 1)
        step_factor = 1 - sw  # + 2 * sw * s / num_steps, with sw = 0
        layer_factor = 1 + lw - 2 * lw * layer / last
        stream_factor = (1 - stw) if module == "double" else (1 + stw)
        ratio = c.ratio * layer_factor * step_factor * stream_factor
    else:
        sw, lw, mw, mtw, reduced = _WEIGHTS[c.schedule]
        last = 27 if c.compat == "official" else max(depth - 1, 1)
        step_factor = 1 - sw + 2 * sw * s / num_steps if c.schedule == "ToCa" else 1 + sw - 2 * sw * s / num_steps
        layer_factor = 1 + lw - 2 * lw * layer / last
        module_factor = (1 - (1 - mtw) * mw) if module == reduced else (1 + mtw * mw)
        ratio = c.ratio * layer_factor * step_factor * module_factor
    if c.compat == "official":
        return float(torch.clamp(torch.tensor(ratio), min=0, max=1))
    return min(max(ratio, 0.0), 1.0)


def fresh_count(c: ToCaConfig, ratio: float, tokens: int) -> int:
    """k: ``int(float32(r) * N)`` (official, in float32) or ``int(r * N)`` (clean)."""
    if c.compat == "official":
        return int(torch.tensor(ratio, dtype=torch.float32) * tokens)
    return int(ratio * tokens)


def refresh_count(c: ToCaConfig, tag: dict, step, num_steps: int, tokens: int) -> int:
    """k of the tagged refresh ``tag`` (a ``*_tokens`` node over ``tokens`` tokens) at official step ``step``:
    the one count both the refresh and the choice of the scores a full step computes read."""
    if c.family == "flux":
        return fresh_count(c, fresh_ratio(c, None, num_steps, tag["layer"], tag["stream"], tag["depth"]), tokens)
    module = {"cross_tokens": "cross", "mlp_tokens": "mlp"}[tag["slot"]]
    if module == "cross" and c.family == "opensora":
        return 0  # Open-Sora reads its cross-attention from the cache on partial steps
    return fresh_count(c, fresh_ratio(c, step, num_steps, tag["layer"], module, tag["depth"]), tokens)
