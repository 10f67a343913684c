"""An eager oracle of T-GATE's rule on joint attention, with forward hooks on the denoiser's own modules.

Independent of tgate_fx's graphs: it reads the rule, not the code.

For each double-stream block ``transformer_blocks.<i>`` whose attention has added keys/values:

* the *text keys* are the output of ``attn.norm_added_k`` where the block has it, else of
  ``attn.add_k_proj``; the *text values* the output of ``attn.add_v_proj``; the *text stream* the block's
  first output (``encoder_hidden_states``: FLUX, SD3 and Qwen-Image blocks return it first);
* at the gate step (``gate_step - 1``) each is recorded: the mean of the CFG halves, ``(uncond + cond) / 2``,
  on a CFG batch (unconditional half first) or over the two calls of a split-CFG step;
* after the gate each module's output is replaced by its record, and the unconditional branch is dropped
  (a CFG batch runs its conditional half; a split-CFG step's unconditional call returns the conditional
  call's prediction).

Self-attention (a block's image-only attention, SD3.5's ``attn2``) follows the reference T-GATE schedule
(``oracle.reference_schedule``): recorded on its steps, reused on the others, as the reference processors do.
The attention itself computes every query (the text rows are discarded by the cached text stream).
"""

from __future__ import annotations

import torch

from oracle import StandIn, reference_schedule
from tgate_fx.core.hook import bypassed


class JointTGateOracle(StandIn):
    """Stands in for ``pipe.transformer`` for ONE generation. ``cfg``: ``None`` (no guidance), ``"batch"``
    (a ``[uncond, cond]`` batch) or ``"split"`` (two calls a step, conditional first)."""

    def __init__(self, denoiser, *, cfg: str | None, gate_step: int, sp_interval: int = 5, fi_interval: int = 1,
                 warm_up: int = 2):
        super().__init__(denoiser)
        self.cfg = cfg
        self.settings = (gate_step, sp_interval, fi_interval, warm_up)
        self.calls = 0
        self.phase = "compute"
        self.sa = {"cache": False, "reuse": False}
        self.role = "cond"
        self.records: dict[str, torch.Tensor] = {}   # after the gate: name -> the recorded value
        self.pending: dict[str, torch.Tensor] = {}   # the gate step of a split-CFG step: the conditional call's
        self.self_cache: dict[tuple[str, str], torch.Tensor] = {}
        self.last = None
        self.handles = []
        modules = dict(denoiser.named_modules())
        for name, block in modules.items():
            attn = modules.get(f"{name}.attn")
            if not (name.startswith("transformer_blocks.") and name.count(".") == 1 and attn is not None
                    and getattr(attn, "added_kv_proj_dim", None) is not None):
                continue
            key = modules.get(f"{name}.attn.norm_added_k") or attn.add_k_proj
            self._gate(key, f"{name}:text_k")
            self._gate(attn.add_v_proj, f"{name}:text_v")
            self._gate(block, f"{name}:text_out", first=True)
            if f"{name}.attn2" in modules:
                self.handles.append(modules[f"{name}.attn2"].register_forward_hook(self._self_hook(f"{name}.attn2")))

    def close(self):
        for h in self.handles:
            h.remove()

    def _mean(self, name: str, out: torch.Tensor) -> torch.Tensor | None:
        if self.cfg == "batch":
            u, c = out.chunk(2)
            return (u + c) / 2
        if self.cfg == "split":
            if self.role == "cond":
                self.pending[name] = out
                return None
            return (out + self.pending.pop(name)) / 2
        return out

    def _gate(self, module, name: str, first: bool = False) -> None:
        def hook(mod, args, out):
            value = out[0] if first else out
            if value is None:
                return out
            if self.phase == "gate":
                mean = self._mean(name, value)
                if mean is not None:
                    self.records[name] = mean
            elif self.phase == "after":
                cached = self.records[name]
                return (cached, *out[1:]) if first else cached
            return out
        self.handles.append(module.register_forward_hook(hook))

    def _self_hook(self, name: str):
        def hook(mod, args, out):
            key = (name, self.role if self.cfg == "split" else "")
            if self.sa["reuse"] and key in self.self_cache:
                return self.self_cache[key]
            if self.sa["cache"]:
                if self.phase == "gate" and self.cfg is not None:
                    mean = self._mean("self:" + name, out)
                    if mean is not None:
                        self.self_cache = {k: v for k, v in self.self_cache.items() if k[0] != name}
                        for role in (("cond", "uncond") if self.cfg == "split" else ("",)):
                            self.self_cache[(name, role)] = mean
                else:
                    self.self_cache[key] = out
            return out
        return hook

    def forward(self, *args, **kwargs):
        per_step = 2 if self.cfg == "split" else 1
        step, call = divmod(self.calls, per_step)
        self.calls += 1
        gate_step = self.settings[0]
        self.role = "cond" if call == 0 else "uncond"
        self.phase = "gate" if step == gate_step - 1 else ("after" if step >= gate_step else "compute")
        _, self.sa, _ = reference_schedule(step, *self.settings)
        if self.phase == "after" and self.cfg == "split" and call == 1:
            return self.last
        if self.phase == "after" and self.cfg == "batch":
            def half(x):
                if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == batch:
                    return x[: batch // 2]
                if isinstance(x, dict):
                    return {k: half(v) for k, v in x.items()}
                if isinstance(x, (list, tuple)):
                    return type(x)(half(v) for v in x)
                return x
            sample = kwargs.get("hidden_states", args[0] if args else None)
            batch = sample.shape[0]
            with bypassed(self.denoiser):
                out = self.denoiser(*half(args), **half(kwargs))
            pred = out[0] if isinstance(out, tuple) else out.sample
            pred = torch.cat([pred, pred])
            return (pred,) if isinstance(out, tuple) else type(out)(sample=pred)
        with bypassed(self.denoiser):
            out = self.denoiser(*args, **kwargs)
        self.last = out
        return out


def run_joint_oracle(pipe, *, cfg: str | None, **settings_and_call):
    """``pipe(**call)`` once with :class:`JointTGateOracle` around ``pipe.transformer``."""
    keys = ("gate_step", "sp_interval", "fi_interval", "warm_up")
    settings = {k: settings_and_call.pop(k) for k in keys if k in settings_and_call}
    installed = pipe.transformer
    oracle = JointTGateOracle(installed, cfg=cfg, **settings)
    object.__setattr__(pipe, "transformer", oracle)
    try:
        with bypassed(installed):
            return pipe(**settings_and_call)
    finally:
        oracle.close()
        object.__setattr__(pipe, "transformer", installed)
