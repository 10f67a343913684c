"""Call conventions: denoisers whose ``forward`` does not take one batched tensor per input.

The engine reads a denoiser call as diffusers' transformers make it: the
latents as one tensor whose first dimension is the batch (``hidden_states``),
the timestep (``timestep``) and the text (``encoder_hidden_states``) batched
alike. A denoiser that takes its batch as *lists of per-sample tensors*
(Z-Image's ``ZImageTransformer2DModel(x, t, cap_feats)``) is presented to the
engine in that form by a :class:`PerSampleLists` convention:

* :meth:`~PerSampleLists.batched` turns a bound call into the engine's form:
  each list argument stacked along a new first dimension, and renamed (``x``
  -> ``hidden_states``, ``t`` -> ``timestep``, ``cap_feats`` ->
  ``encoder_hidden_states``). The tensors of a :attr:`~PerSampleLists.ragged`
  list (captions) may differ in their first dimension, the token count: they
  are zero-padded to the longest, and the call gains the samples' lengths as
  a tuple of ints (``encoder_hidden_states_lengths``). Being no tensor, the
  tuple is a constant of the call's signature
  (:func:`~tgate_fx.core.captured.signature_of`): each combination of lengths
  gets its own capture, the export specialised to those ints. Tensors that
  differ in any other way (feature sizes, image sizes) raise ``ValueError``
  naming the shapes;
* :meth:`~PerSampleLists.forward_of` is the forward the capture traces (and
  the eager checks run): it takes the engine's form, unbinds each stacked
  input into the list the denoiser's own forward takes (each padded sample
  cut back to its length), calls it, and stacks its list output, so the
  graph's prediction is one batched tensor;
* :meth:`~PerSampleLists.output` gives the caller back what the denoiser
  returns, the list of per-sample predictions.

Such a denoiser's forward loops over its batch in Python, so its trace is
unrolled per sample: :attr:`~PerSampleLists.unrolled_batch` tells
:mod:`~tgate_fx.core.rebatch` to export each batch size rather than derive it
from a probe trace. :meth:`~PerSampleLists.prepare` fills the caches a
forward builds lazily on its first call (Z-Image's rotary table), so that a
trace reads them instead of storing traced values on the module. The
conventions are known by the denoiser's class (:func:`convention_of`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PerSampleLists", "convention_of", "forward_parameters"]


@dataclass(frozen=True)
class PerSampleLists:
    """The convention of a denoiser that takes lists of per-sample tensors (see the module docstring).

    Attributes:
        names: ``(its forward's argument, the engine's name for it)`` for each renamed argument.
        lists: The forward arguments passed as one tensor per sample.
        ragged: The lists whose tensors may differ in their first dimension (a token count); see
            :meth:`batched`.
        output_list: Whether its prediction is a list of per-sample tensors.
        unrolled_batch: Whether its forward loops over the batch in Python (each batch size is then
            exported on its own, see :mod:`~tgate_fx.core.rebatch`).
        warm: ``warm(module)`` fills the caches its forward builds lazily on its first call, eagerly
            (``None``: it builds none).
    """

    names: tuple[tuple[str, str], ...]
    lists: tuple[str, ...]
    ragged: tuple[str, ...] = ()
    output_list: bool = True
    unrolled_batch: bool = True
    warm: Callable[[torch.nn.Module], None] | None = None

    def engine_name(self, name: str) -> str:
        return dict(self.names).get(name, name)

    def own_name(self, name: str) -> str:
        return {v: k for k, v in self.names}.get(name, name)

    def lengths_name(self, name: str) -> str:
        """The engine's name for the per-sample lengths of the ragged list ``name`` (its forward's name)."""
        return self.engine_name(name) + "_lengths"

    def batched(self, call: dict[str, Any]) -> dict[str, Any]:
        """A bound call of the denoiser's forward in the engine's form (stacked lists, engine names; a ragged
        list's lengths under :meth:`lengths_name` where its samples differ in length)."""
        out = {}
        for name, value in call.items():
            if name in self.lists and value is not None:
                out[self.engine_name(name)], lengths = _stacked(name, value, name in self.ragged)
                if lengths is not None:
                    out[self.lengths_name(name)] = lengths
            else:
                out[self.engine_name(name)] = value
        return out

    def own_call(self, call: dict[str, Any]) -> dict[str, Any]:
        """A call in the engine's form as the denoiser's own forward takes it (per-sample lists, each cut back
        to its length, its names)."""
        lengths = {self.lengths_name(n) for n in self.ragged}
        out = {}
        for name, value in call.items():
            if name in lengths:
                continue
            own = self.own_name(name)
            if own in self.lists and isinstance(value, torch.Tensor):
                samples = list(value.unbind(0))
                cut = call.get(self.lengths_name(own)) if own in self.ragged else None
                if cut is not None:
                    if len(cut) != len(samples):
                        raise ValueError(f"{self.lengths_name(own)} gives {len(cut)} lengths for "
                                         f"{len(samples)} samples of {name}")
                    samples = [s[:n] for s, n in zip(samples, cut)]
                value = samples
            out[own] = value
        return out

    def output(self, prediction: torch.Tensor) -> Any:
        """The denoiser's prediction as its forward returns it, from the graph's batched one."""
        return list(prediction.unbind(0)) if self.output_list else prediction

    def forward_of(self, module: torch.nn.Module, forward) -> Any:
        """A forward that takes the engine's form of a call and runs ``forward`` (``module``'s own) on it."""
        own = inspect.signature(type(module).forward)
        params = [p.replace(name=self.engine_name(p.name)) for p in list(own.parameters.values())[1:]]
        extra = [inspect.Parameter(self.lengths_name(n), inspect.Parameter.KEYWORD_ONLY, default=None)
                 for n in self.ragged]
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        params[at:at] = extra

        def batched_forward(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            out = forward(**self.own_call(dict(bound.arguments)))
            first = out[0] if isinstance(out, tuple) else out.sample
            if isinstance(first, (list, tuple)):
                first = torch.stack(list(first))
            return (first,) if isinstance(out, tuple) else type(out)(sample=first)

        signature = inspect.Signature(params)
        batched_forward.__signature__ = signature
        return batched_forward

    def prepare(self, module: torch.nn.Module) -> None:
        """Fill the caches the forward builds on its first call, eagerly (before a trace reads them)."""
        if self.warm is not None:
            self.warm(module)


def _stacked(name: str, value: Any, ragged: bool) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """``value`` (one tensor per sample) as one batch, and the samples' lengths where a ragged list's differ
    (the batch then zero-padded to the longest); ``None`` where they do not."""
    if isinstance(value, torch.Tensor):
        return value, None
    if not (isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value)):
        raise TypeError(f"{name} must be a non-empty list of tensors (one per sample), got {type(value).__name__}")
    shapes = [tuple(v.shape) for v in value]
    if len(set(shapes)) == 1:
        return torch.stack(list(value)), None
    if ragged and all(len(s) >= 1 and s[1:] == shapes[0][1:] for s in shapes):
        return torch.nn.utils.rnn.pad_sequence(list(value), batch_first=True), tuple(s[0] for s in shapes)
    accepted = "they may differ in their first dimension (the token count) only" if ragged else \
        "give every sample the same shape"
    raise ValueError(f"tgate_fx serves {name} as one batch, and its per-sample tensors differ in shape "
                     f"({shapes}); {accepted}, or tgate_fx.restore(pipe)")


def _rotary_table(module: torch.nn.Module) -> None:
    """Z-Image's ``RopeEmbedder`` builds its table (a plain attribute) at its first call: under a trace that
    would store traced values on the module."""
    rope = module.rope_embedder
    if rope.freqs_cis is None:
        device = next(module.parameters()).device
        rope.freqs_cis = [f.to(device) for f in rope.precompute_freqs_cis(rope.axes_dims, rope.axes_lens,
                                                                         theta=rope.theta)]


# By denoiser class name: the convention of each denoiser that does not take batched tensors.
_CONVENTIONS = {
    "ZImageTransformer2DModel": PerSampleLists(
        names=(("x", "hidden_states"), ("t", "timestep"), ("cap_feats", "encoder_hidden_states")),
        lists=("x", "cap_feats"), ragged=("cap_feats",), warm=_rotary_table),
}


def convention_of(denoiser: Any) -> PerSampleLists | None:
    """The call convention of ``denoiser`` (a module, its class or its class name), ``None`` for a batched one."""
    if isinstance(denoiser, str):
        return _CONVENTIONS.get(denoiser.rpartition(".")[2])
    cls = denoiser if isinstance(denoiser, type) else type(denoiser)
    return _CONVENTIONS.get(cls.__name__)


def forward_parameters(denoiser: Any) -> list[str]:
    """The names of the denoiser's forward arguments as the engine reads them (``self`` left out)."""
    cls = denoiser if isinstance(denoiser, type) else type(denoiser)
    names = list(inspect.signature(cls.forward).parameters)[1:]
    convention = convention_of(cls)
    return [convention.engine_name(n) for n in names] if convention is not None else names
