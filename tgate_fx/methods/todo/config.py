"""ToDo settings, validated once."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ...passes.downsample_key_values import MODES
from .._checks import check_int

__all__ = ["AUTO_TOKENS", "MODES", "ToDoConfig", "auto_factor"]

# "auto" keeps about this many key/value tokens at depth 1: the official demo's
# choices (1024^2 px -> 2, 1536^2 -> 3, 2048^2 -> 4 on SD 1.5, latent 128^2..256^2)
# all leave a 64 x 64 grid.
AUTO_TOKENS = 64 * 64


def auto_factor(latent_tokens: int) -> int:
    """The depth-1 factor ``"auto"`` picks for a latent of ``latent_tokens`` (= H * W) tokens.

    ``max(1, round(sqrt(latent_tokens / 4096)))`` (Python's round, half to
    even): SD 1.5 at 512^2 px (64^2 latent) -> 1, 768^2 -> 2, 1024^2 -> 2,
    1536^2 -> 3, 2048^2 -> 4.
    """
    return max(1, round(math.sqrt(latent_tokens / AUTO_TOKENS)))


@dataclass(frozen=True)
class ToDoConfig:
    """ToDo (arXiv 2402.13573): self-attention keys/values downsampled on their token grid.

    The *depth* of a self-attention site is how many times its token grid is
    reduced from the latent: ``d = round(sqrt(H * W / N))`` for a latent of
    H x W and N tokens at the site. SD 1.x/2.x: the first level is depth 1,
    the next depth 2, then 4 (and 8 in the mid block). SD-XL has no
    attention at its first level: its attention starts at depth 2. PixArt's
    patch embedding (patch size 2) puts every block at depth 2.

    Attributes:
        factor: Downsampling factor per side at depth 1 (N tokens -> N / factor^2
            keys and values), or ``"auto"``: chosen from the latent's token count
            so that about 64 x 64 keys/values remain, as the official demo picks
            it (SD 1.5: 1024^2 px -> 2, 1536^2 -> 3, 2048^2 -> 4; 512^2 -> 1).
            The official default is 2.
        factor_depth2: The factor at depth 2 (the official default is 1: none).
            Set it for SD-XL and PixArt, whose first self-attention sits there.
        factor_deeper: The factor at depth 3 and deeper (default 1: none).
        mode: How tokens are downsampled: ``"nearest"`` (the paper's demo),
            ``"nearest-exact"`` (the official code's default), ``"avg_pool"`` or
            ``"max_pool"`` (kernel = stride = factor). The grid of every site
            with a factor > 1 must be divisible by its factor; otherwise
            ``optimize``'s first call raises ``ValueError`` naming the site.
        skip_timestep_zero: Do not downsample at a step whose timestep is 0 (or
            below), as the official processor does (it downsamples while
            ``timestep / 1000 > timestep_threshold_stop``, which is 0 in its demo).
            Such a step runs the full-attention graph (a second variant, label
            ``todo_off``). The runtime reads each generation's timesteps from the
            pipeline (the ``timesteps`` its ``__call__`` iterates over, else the
            scheduler's); where they are unknown (a ``Plan`` made without
            ``timesteps=``, e.g. ``tgate-fx macs``, or a scheduler whose timesteps
            do not match the step count) ToDo assumes no step has timestep 0 and
            downsamples every step. An ONNX bundle stores the steps of the
            generation it traced and runs them as stored. Only schedules ending
            at timestep 0 differ (Euler/Euler-ancestral/Heun/LMS with
            ``timestep_spacing="linspace"``; DDIM/PNDM/DDPM with ``"leading"`` and
            ``steps_offset=0``); the shipped SD 1.5/2.1/SD-XL (``steps_offset=1``)
            and PixArt (DPM-Solver) configs never produce it. Default ``True``,
            as the official code; ``False`` downsamples every step.
    """

    factor: int | str = 2
    factor_depth2: int = 1
    factor_deeper: int = 1
    mode: str = "nearest"
    skip_timestep_zero: bool = True

    def __post_init__(self) -> None:
        if self.factor != "auto":
            if isinstance(self.factor, str):
                raise ValueError(f"factor must be an int >= 1 or 'auto', got {self.factor!r}")
            check_int("factor", self.factor, 1)
        check_int("factor_depth2", self.factor_depth2, 1)
        check_int("factor_deeper", self.factor_deeper, 1)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.skip_timestep_zero, bool):
            raise ValueError(f"skip_timestep_zero must be True or False, got {self.skip_timestep_zero!r}")

    def setting(self, depth: int) -> int | str:
        """The configured factor (an int, or ``"auto"`` at depth 1) for a site at ``depth``."""
        return self.factor if depth <= 1 else self.factor_depth2 if depth == 2 else self.factor_deeper

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
