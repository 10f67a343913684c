"""An eager oracle of ToDo, as the official processor behaves: an attention processor on self-attention.

It shares no code with tgate_fx. Transcribed from the official
``ImprovedTokenMerge`` (``merge.py``: ``compute_merge``, ``up_or_downsample``;
``utils.py``: ``hook_tome_model``):

* a forward pre-hook on the denoiser records the latent's ``(H, W)``;
* a self-attention call (no ``encoder_hidden_states``) with N tokens is at
  ``downsample = ceil(sqrt(H * W // N))`` (the official formula) on the grid
  ``(H // downsample, W // downsample)``; its factor is chosen by that level
  (``{1: factor, 2: factor_depth2}``, deeper: ``factor_deeper``) instead of
  the official channel-count rule (320 / 640), which only fits SD 1.x/2.x;
* keys and values are computed from ``up_or_downsample(hidden_states)``:
  reshape to ``(B, h, w, C)``, permute to ``(B, C, h, w)``, ``max_pool2d`` /
  ``avg_pool2d`` with kernel = stride = f, or ``F.interpolate(size=(h // f,
  w // f), mode=...)``, permute back and reshape; queries keep every token.

* with ``skip_timestep_zero`` (the official ``timestep_threshold_stop=0``),
  a call whose timestep ``t`` has ``t / 1000 > 0`` false downsamples nothing
  (the hook reads the timestep the denoiser receives, as ``hook_model`` does).

Not reproduced: the "similarity" merge mode (not the paper's method).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


def up_or_downsample(item, cur_w, cur_h, new_w, new_h, method):
    """``merge.py: up_or_downsample``, verbatim but for names."""
    batch_size = item.shape[0]
    item = item.reshape(batch_size, cur_h, cur_w, -1)
    item = item.permute(0, 3, 1, 2)
    df = cur_h // new_h
    if method in "max_pool":
        item = F.max_pool2d(item, kernel_size=df, stride=df, padding=0)
    elif method in "avg_pool":
        item = F.avg_pool2d(item, kernel_size=df, stride=df, padding=0)
    else:
        item = F.interpolate(item, size=(new_h, new_w), mode=method)
    item = item.permute(0, 2, 3, 1)
    item = item.reshape(batch_size, new_h * new_w, -1)
    return item


class ToDoState:
    def __init__(self, factors: tuple[int, int, int], mode: str, skip_timestep_zero: bool = False):
        self.factors = factors
        self.mode = mode
        self.skip_timestep_zero = skip_timestep_zero
        self.size = None
        self.timestep = None
        self.calls = []  # (tokens, key/value tokens) of each self-attention call


class ToDoProcessor(AttnProcessor2_0):
    """``AttnProcessor2_0`` whose self-attention keys/values come from the downsampled hidden states."""

    def __init__(self, state: ToDoState):
        super().__init__()
        self.state = state

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is None and hidden_states.ndim == 3:
            h0, w0 = self.state.size
            n = hidden_states.shape[1]
            downsample = int(math.ceil(math.sqrt(h0 * w0 // n)))
            f = self.state.factors[min(downsample, 3) - 1]
            if self.state.skip_timestep_zero and not self.state.timestep / 1000 > 0.0:
                f = 1
            cur_h, cur_w = h0 // downsample, w0 // downsample
            if f > 1:
                encoder_hidden_states = up_or_downsample(hidden_states, cur_w, cur_h, cur_w // f, cur_h // f,
                                                         self.state.mode)
            self.state.calls.append((n, n if f == 1 else encoder_hidden_states.shape[1]))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def self_attention_modules(denoiser):
    """``{name: module}`` of the self-attention modules (``attn1`` of each transformer block)."""
    return {name: m for name, m in denoiser.named_modules() if isinstance(m, Attention) and name.endswith("attn1")}


def install_todo(denoiser, factors=(2, 1, 1), mode="nearest", wrap=None, skip_timestep_zero=False):
    """Put ToDo processors on ``denoiser``'s self-attention; returns ``(state, undo)``.

    ``wrap``: if given, ``wrap(name, module, todo_processor)`` returns the
    processor to install (to compose with another oracle's processors).
    """
    state = ToDoState(tuple(factors), mode, skip_timestep_zero)
    mods = self_attention_modules(denoiser)
    before = {name: m.processor for name, m in mods.items()}
    for name, m in mods.items():
        todo = ToDoProcessor(state)
        m.set_processor(wrap(name, m, todo) if wrap else todo)

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        state.size = tuple(sample.shape[2:])
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        state.timestep = None if timestep is None else float(torch.as_tensor(timestep).flatten()[0])

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)

    def undo():
        handle.remove()
        for name, m in mods.items():
            m.set_processor(before[name])

    return state, undo


def install_todo_hooks(unet, factors=(2, 1, 1), mode="nearest", skip_timestep_zero=True):
    """ToDo as the official ``merge.py: ToDoPatch.hook_model`` applies it: forward pre-hooks; returns ``undo``.

    A pre-hook on the UNet records the latent's size and the timestep; pre-hooks
    on ``attn1.to_k`` and ``attn1.to_v`` of every ``BasicTransformerBlock``
    replace their input by ``up_or_downsample`` of it. It does not depend on
    which attention processor or patched ``forward`` calls the projections, so
    it composes with the published T-GATE (``tgate``) and DeepCache packages,
    whose own attention code calls ``attn.to_k(...)`` / ``attn.to_v(...)``.
    Level rule and factors as :class:`ToDoProcessor`.
    """
    state = ToDoState(tuple(factors), mode, skip_timestep_zero)

    def unet_hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        state.size = tuple(sample.shape[2:])
        state.timestep = float(torch.as_tensor(timestep).flatten()[0])

    def kv_hook(module, args):
        x = args[0]
        h0, w0 = state.size
        downsample = int(math.ceil(math.sqrt(h0 * w0 // x.shape[1])))
        f = state.factors[min(downsample, 3) - 1]
        if f == 1 or (state.skip_timestep_zero and not state.timestep / 1000 > 0.0):
            return None
        cur_h, cur_w = h0 // downsample, w0 // downsample
        return (up_or_downsample(x, cur_w, cur_h, cur_w // f, cur_h // f, state.mode), *args[1:])

    handles = [unet.register_forward_pre_hook(unet_hook, with_kwargs=True)]
    for module in unet.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            handles += [module.attn1.to_k.register_forward_pre_hook(kv_hook),
                        module.attn1.to_v.register_forward_pre_hook(kv_hook)]

    def undo():
        for handle in handles:
            handle.remove()

    return undo
