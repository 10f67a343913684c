"""Run an exported bundle with onnxruntime, in place of a diffusers pipeline's denoiser.

:class:`OnnxDenoiser` is what :class:`~tgate_fx.core.runtime.DenoiserRuntime`
is for torch graphs, with ONNX Runtime sessions instead: it stands in for
``pipe.unet`` / ``pipe.transformer`` in an unmodified pipeline (there is no
torch module left to hook). On each call it

1. binds the arguments to the denoiser's ``forward`` parameters, as recorded
   in ``plan.json`` (:func:`tgate_fx.core.captured.normalize_call`);
2. asks a :class:`~tgate_fx.core.generation.GenerationTracker` for the step
   (the same accounting as the torch runtime: new generations, CFG
   detection), which it reads from the steps stored in ``plan.json``: it
   never derives a schedule; a generation of another length or CFG state
   than the exported one is refused;
3. keeps the unconditional half of a CFG batch where the stored step drops
   it, checks the call against the shapes the bundle was exported for, and
   runs the step's variant with the caches it reads;
4. keeps the caches it writes (as ``OrtValue``\\ s, on the session's device)
   and returns the prediction, twice where the unconditional half was
   dropped (:meth:`Step.finish`).

A plain bundle (no method) has one variant and no tracker: every call runs it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import types
from typing import Any

import numpy as np
import torch

from dataclasses import dataclass, field

from ..core.captured import normalize_call, signature_of, tensor_inputs
from ..core.conventions import convention_of
from ..core.generation import GenerationTracker, take_half
from .bundle import read_plan

__all__ = ["OnnxDenoiser"]


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("OnnxDenoiser needs onnxruntime: pip install onnxruntime "
                          "(or onnxruntime-gpu on a CUDA machine)") from e
    return onnxruntime


def _forward_signature(parameters: list) -> inspect.Signature:
    """The denoiser's ``forward`` signature, from its parameters as ``plan.json`` lists them."""
    params = []
    for entry in parameters:
        name, kind = entry[0], getattr(inspect.Parameter, entry[1])
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) or not params:
            params.append(inspect.Parameter(name, kind))  # the sample is always passed
        else:
            params.append(inspect.Parameter(name, kind, default=None))
    return inspect.Signature(params)


def _namespace(attributes: dict) -> dict[str, Any]:
    """``{"a.b.c": 1}`` -> ``{"a": namespace(b=namespace(c=1))}``."""
    root: dict[str, Any] = {}
    for path, value in attributes.items():
        parts = path.split(".")
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def build(d):
        return {k: types.SimpleNamespace(**build(v)) if isinstance(v, dict) else v for k, v in d.items()}

    return build(root)


@dataclass(frozen=True)
class _StoredStep:
    step: int
    variant: str
    capture: str
    cfg: bool
    drops_uncond: bool


@dataclass
class _StoredPlan:
    """The steps of ``plan.json``, shaped as the tracker reads a plan."""

    num_steps: int
    cfg: bool
    steps: list[_StoredStep] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict) -> "_StoredPlan":
        steps = [_StoredStep(s["step"], s["variant"], s["capture"], bool(s["cfg"]), bool(s["drops_uncond"]))
                 for s in data["steps"]]
        return cls(data["num_steps"], bool(data["cfg"]), steps)


def _describe(tensors: list[dict]) -> str:
    return ", ".join(f"{t['name']}: {list(t['shape'])} {t['dtype']}" for t in tensors)


def _numpy(t: torch.Tensor) -> np.ndarray:
    # Not np.ascontiguousarray: it turns a 0-d timestep into shape (1,), and
    # IO binding does not check shapes.
    return np.require(t.detach().cpu().numpy(), requirements="C")


class OnnxDenoiser:
    """A diffusers denoiser that runs an exported bundle's ONNX models.

    Build it with :meth:`from_dir` and put it in the pipeline with
    :meth:`install`. It offers what pipelines read from their denoiser:
    ``config``, ``dtype``, ``device`` and the attributes recorded at export
    (e.g. SD-XL's ``add_embedding.linear_1.in_features``), and
    ``_reset_stateful_cache``, which diffusers calls at the end of every
    pipeline call.

    Attributes:
        directory: The bundle.
        bundle: The parsed ``plan.json``.
        config: The denoiser's config (a diffusers ``FrozenDict``).
        dtype: The exported denoiser's dtype.
        device: Where it takes and returns tensors (the CPU: inputs go to
            onnxruntime as NumPy arrays; the sessions' provider decides where
            they run).
        providers: The onnxruntime execution providers of the sessions.

    Example::

        from tgate_fx.export import OnnxDenoiser
        OnnxDenoiser.from_dir("bundle").install(pipe)
        latents = pipe("a photo", num_inference_steps=25, output_type="latent").images
    """

    def __init__(self, directory: str, bundle: dict, sessions: dict, pipeline=None):
        from diffusers.configuration_utils import FrozenDict

        self.directory = directory
        self.bundle = bundle
        self._sessions = sessions
        den = bundle["denoiser"]
        self.attribute = den["attribute"]
        self.config = FrozenDict(den["config"])
        self.dtype = getattr(torch, den["dtype"])
        self.device = torch.device("cpu")
        self.providers = next(iter(sessions.values())).get_providers() if sessions else []
        for name, value in _namespace(den.get("attributes", {})).items():
            setattr(self, name, value)
        self._class_name = den["class"].rsplit(".", 1)[-1]
        self._forward = _forward_signature(den["forward_parameters"])
        self._sample_arg = den["sample_arg"]
        self._convention = convention_of(den["class"])  # per-sample lists in and out (see core.conventions)
        module, _, cls = den["output_class"].rpartition(".")
        self._output_class = getattr(importlib.import_module(module), cls)
        self.methods: dict[str, dict] = dict(bundle.get("methods") or {})
        self.stored_plan = _StoredPlan.from_json(bundle["plan"]) if self.methods else None
        self._cache_device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        self._tracker: GenerationTracker | None = None
        if pipeline is not None:
            self._attach(pipeline)

    # --- construction ----------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str, providers: list | None = None, *, pipeline=None,
                 session_options=None, verify: bool = True) -> "OnnxDenoiser":
        """Load a bundle written by :func:`tgate_fx.export.export_onnx`.

        Args:
            directory: The bundle directory.
            providers: onnxruntime execution providers, e.g.
                ``["CUDAExecutionProvider", "CPUExecutionProvider"]``; default CPU only.
            pipeline: The pipeline it will serve (or call :meth:`install` later).
            session_options: An ``onnxruntime.SessionOptions`` for every session.
            verify: Compare every file's SHA-256 with the export's (default;
                about 1 s per 2 GB): a file changed in place is refused.

        Raises:
            FileNotFoundError: a file the plan names is missing.
            ValueError: the plan and a model file disagree (names the file and both sides),
                or a file's bytes differ from the export's.
        """
        ort = _import_ort()
        bundle = read_plan(directory, verify=verify)
        providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        sessions = {}
        for cid, capture in bundle["captures"].items():
            for vname, variant in capture["variants"].items():
                path = os.path.join(directory, variant["file"])
                session = ort.InferenceSession(path, sess_options=session_options, providers=providers)
                _check_session(session, variant, path)
                sessions[cid, vname] = session
        return cls(directory, bundle, sessions, pipeline)

    def install(self, pipe):
        """Put this denoiser at ``pipe.unet`` / ``pipe.transformer`` (as exported); returns ``pipe``.

        The attribute is set without ``DiffusionPipeline.__setattr__``, which
        would record this class in the pipeline's config.
        """
        if not hasattr(pipe, self.attribute):
            raise TypeError(f"{type(pipe).__name__} has no {self.attribute!r}; this bundle was exported from a "
                            f"pipeline whose denoiser is pipe.{self.attribute} ({self._class_name})")
        object.__setattr__(pipe, self.attribute, self)
        self._attach(pipe)
        return pipe

    def _attach(self, pipe) -> None:
        if self.stored_plan is not None:
            self._tracker = GenerationTracker(self._plan_for, pipe, self._sample_arg)

    def _plan_for(self, num_steps: int, cfg: bool) -> _StoredPlan:
        """The stored plan, if this generation is the exported one."""
        plan = self.stored_plan
        if (num_steps, cfg) != (plan.num_steps, plan.cfg):
            raise ValueError(
                f"this generation ({num_steps} steps, CFG {'on' if cfg else 'off'}) is not the one the bundle "
                f"stores ({plan.num_steps} steps, CFG {'on' if plan.cfg else 'off'}); a bundle runs its exported "
                f"schedule step by step: export again with num_inference_steps={num_steps}"
                + ("" if cfg == plan.cfg else " and the guidance of this call"))
        return plan

    # --- what the pipeline calls besides forward -------------------------------
    def reset(self) -> None:
        """End the current generation and drop its caches."""
        if self._tracker is not None:
            self._tracker.reset()

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        self.reset()

    @property
    def last_plan(self):
        """The stored plan of the current or last generation (``None`` for a plain bundle)."""
        return self._tracker.last_plan if self._tracker is not None else None

    # --- the call --------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        call, return_dict = normalize_call(self._forward, args, kwargs, self._convention)
        if self.stored_plan is None:
            cid = self._capture_for(call, list(self.bundle["captures"]), "plain export")
            prediction = self._run(call, cid, "full", {}, "plain export")[0]
            return self._returned(prediction, return_dict)
        if self._tracker is None:
            raise RuntimeError("this OnnxDenoiser runs a cached schedule and counts steps from its pipeline; "
                               "attach it with OnnxDenoiser.from_dir(..., pipeline=pipe) or .install(pipe)")
        step = self._tracker.next_step(call)
        stored: _StoredStep = step.plan
        if stored.drops_uncond:
            call = take_half(call, self._sample_arg, self._class_name)
        where = f"step {stored.step} ({stored.variant})"
        self._capture_for(call, [stored.capture], where)
        prediction, written = self._run(call, stored.capture, stored.variant, step.caches, where)
        step.caches.update(written)
        out = step.finish(prediction, return_dict=False)[0]
        return self._returned(out, return_dict)

    def _returned(self, prediction: torch.Tensor, return_dict: bool):
        """What the exported denoiser's forward returns for the batched ``prediction``."""
        if self._convention is not None:
            prediction = self._convention.output(prediction)
        return self._output_class(sample=prediction) if return_dict else (prediction,)

    def _run(self, call: dict, cid: str, vname: str, caches: dict, where: str):
        """Run variant ``vname`` of capture ``cid`` on ``call``; returns (prediction, {cache key: written cache})."""
        capture = self.bundle["captures"][cid]
        variant = capture["variants"][vname]
        session = self._sessions[cid, vname]
        tensors = tensor_inputs(call)
        cache_inputs = {name: key for key, name in variant["reads"].items()}
        binding = session.io_binding()
        keep = []  # arrays bound by pointer must outlive the run
        for spec in variant["inputs"]:
            name = spec["name"]
            if name in cache_inputs:
                key = cache_inputs[name]
                if key not in caches:
                    raise RuntimeError(f"{where} reads the cache {key!r}, which no earlier step of this "
                                       "generation wrote; a generation must start at its first step")
                binding.bind_ortvalue_input(name, caches[key])
            else:
                array = _numpy(tensors[name])
                keep.append(array)
                binding.bind_cpu_input(name, array)
        written = {name: key for key, name in variant["writes"].items()}
        for spec in variant["outputs"]:
            device = self._cache_device if spec["name"] in written else "cpu"
            binding.bind_output(spec["name"], device)
        try:
            session.run_with_iobinding(binding)
        except Exception as e:
            raise RuntimeError(f"{where}: onnxruntime failed running {variant['file']}: {e}") from e
        values = binding.get_outputs()
        names = [o["name"] for o in variant["outputs"]]
        prediction = torch.from_numpy(values[0].numpy())
        sample = call[self._sample_arg]
        prediction = prediction.to(sample.device)
        return prediction, {written[n]: v for n, v in zip(names[1:], values[1:])}

    def _capture_for(self, call: dict, cids: list[str], where: str) -> str:
        """The capture among ``cids`` exported for this call's shapes; else an error naming both."""
        signature = signature_of(call)
        actual = [{"name": n, "shape": list(s), "dtype": str(d).replace("torch.", "")}
                  for n, s, d, _ in signature.tensors]
        constants = {k: v for k, v in signature.constants}
        for cid in cids:
            capture = self.bundle["captures"][cid]
            if actual == capture["inputs"] and constants == capture["constants"]:
                return cid
        capture = self.bundle["captures"][cids[0]]
        expected = capture["inputs"]
        if actual != expected:
            exp = {t["name"]: t for t in expected}
            act = {t["name"]: t for t in actual}
            diffs = [f"{n}: expected {list(exp[n]['shape'])} {exp[n]['dtype']}, got "
                     + (f"{list(act[n]['shape'])} {act[n]['dtype']}" if n in act else "nothing")
                     for n in exp if act.get(n) != exp[n]]
            diffs += [f"{n}: not an input of the exported denoiser" for n in act if n not in exp]
            c = self.bundle.get("call", {})
            raise ValueError(
                f"{where}: the denoiser call does not match the shapes the bundle was exported for "
                f"(height={c.get('height')}, width={c.get('width')}, batch_size={c.get('batch_size')}): "
                + "; ".join(diffs) + f". Expected {_describe(expected)}; got {_describe(actual)}"
            )
        raise ValueError(f"{where}: the denoiser call's non-tensor arguments {constants} differ from the "
                         f"exported ones {capture['constants']}; they are baked into the graphs")

    def __repr__(self) -> str:
        mode = ", ".join(f"{k}={v}" for k, v in self.methods.items()) or "plain"
        return (f"OnnxDenoiser({self.directory!r}, {self._class_name}, {mode}, {len(self._sessions)} sessions, "
                f"providers={self.providers})")


def _check_session(session, variant: dict, path: str) -> None:
    """The model's inputs and outputs must be those ``plan.json`` lists, with the same shapes."""
    def described(values) -> list:
        return [(v.name, list(v.shape)) for v in values]

    for kind, values in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        actual = described(values)
        expected = [(t["name"], list(t["shape"])) for t in variant[kind]]
        if actual != expected:
            raise ValueError(f"{path} does not match plan.json: its {kind} are {actual}, plan.json lists "
                             f"{expected}; the files come from different exports")
