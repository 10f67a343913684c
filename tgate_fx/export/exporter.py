"""Export the graph variants of a plan (any methods, composed) to ONNX, with the plan beside them.

:func:`export_onnx` runs one generation of the pipeline at the requested
shapes with the torch runtime (:func:`tgate_fx.optimize`), which captures the
denoiser and builds exactly the variants the plan uses, and records which
capture and variant each step ran. It then writes each of those variant
graphs as an ONNX model, the weights once for all of them, and
``plan.json`` with the steps as they ran (see :mod:`tgate_fx.export.bundle`).
It consumes the plan and the variants; it does not derive a schedule of its own.

Exporter choice: the graphs are flat ATen graphs (``aten.linear``,
``aten.scaled_dot_product_attention``, ``aten.dropout`` with ``p=0``, ...).
Both of torch's ONNX exporters translate them, and the results agree with
the graphs to float rounding:

* ``"torchscript"`` (default): the exporter that ships inside torch. It needs
  nothing else and exports about twice as fast on these graphs.
* ``"dynamo"``: ``torch.onnx.export(..., dynamo=True)``, torch's default
  since 2.9. It needs the ``onnxscript`` package, which is not a dependency
  of tgate_fx; its graphs are a little cleaner (native ``Gelu`` from opset
  20, fewer shape computations).

Opset 18 by default: the lowest the dynamo exporter emits, it has native
``LayerNormalization`` (17) and is read by onnxruntime >= 1.14, whose CUDA
execution provider covers every operator these graphs use.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .._version import __version__
from ..api import _chosen_methods, optimize
from ..core.capture import capture_denoiser
from ..core.captured import normalize_call, signature_of
from ..core.conventions import convention_of, forward_parameters
from ..core.generation import output_class
from ..core.method import Method
from ..core.plan import Plan, VariantSpec
from ..core.hook import bypassed, installed_runtime, uninstall
from ..core.runtime import find_denoiser
from ..core.variants import CapturedGraphs, Resolved, Variant, build_variant
from ..methods import DeepCacheConfig, TGateConfig
from .lowering import lowered_for_onnx
from .bundle import FORMAT, PLAN_FILE, VERSION, WEIGHTS_FILE, file_digest
from .weights import WeightsWriter

__all__ = ["EXPORTERS", "export_onnx"]

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 18

# The variant of a plain export (no method): every attention computed, no cache.
_FULL = Resolved(VariantSpec("full"), (), ())

# Attributes of the denoiser, besides ``config`` and ``dtype``, that the
# supported pipelines read (SD-XL: the size of the added-conditions embedding;
# SD: whether an IP-adapter projection exists; Z-Image: its latent channels).
_READ_ATTRIBUTES = ("add_embedding.linear_1.in_features", "encoder_hid_proj", "in_channels")


def _say(progress) -> Callable[[str], None]:
    if progress is None or progress is False:
        return lambda msg: None
    if progress is True:
        return lambda msg: print(f"[tgate-fx export] {msg}", file=sys.stderr, flush=True)
    if callable(progress):
        return progress
    raise TypeError(f"progress must be None, a bool or a callable taking a str, got {type(progress).__name__}")


def _import_onnx():
    try:
        import onnx
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx package: pip install 'tgate-fx[onnx]'") from e
    return onnx


def _denoiser_of(pipe) -> tuple[str, torch.nn.Module]:
    found = find_denoiser(pipe)
    if found is None:
        raise TypeError(f"{type(pipe).__name__} has no denoiser module at pipe.unet or pipe.transformer")
    return found


def _prompt_rows(embeds, denoiser: torch.nn.Module) -> int | None:
    """The prompts of ``prompt_embeds``: a tensor's rows, or (pipelines of per-sample denoisers) a list's length."""
    if isinstance(embeds, torch.Tensor):
        return embeds.shape[0]
    if (convention_of(denoiser) is not None and isinstance(embeds, list)
            and all(isinstance(e, torch.Tensor) for e in embeds)):
        return len(embeds)
    return None


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tensor_info(name: str, shape, dtype) -> dict:
    return {"name": name, "shape": [int(d) for d in shape], "dtype": _dtype_name(dtype)}


def _attribute(module, path: str):
    obj = module
    for part in path.split("."):
        if not hasattr(obj, part):
            return False, None
        obj = getattr(obj, part)
    return True, obj


def _denoiser_metadata(attribute: str, denoiser: torch.nn.Module) -> dict:
    params = inspect.signature(denoiser.forward).parameters
    attributes = {}
    for path in _READ_ATTRIBUTES:
        found, value = _attribute(denoiser, path)
        if found and (value is None or isinstance(value, (int, float, str, bool))):
            attributes[path] = value
    out_cls = output_class(denoiser)
    return {
        "attribute": attribute,
        "class": f"{type(denoiser).__module__}.{type(denoiser).__qualname__}",
        "output_class": f"{out_cls.__module__}.{out_cls.__qualname__}",
        "forward_parameters": [[p.name, p.kind.name] for p in params.values()],
        "sample_arg": forward_parameters(denoiser)[0],
        "dtype": _dtype_name(denoiser.dtype),
        "config": json.loads(denoiser.to_json_string()),
        "attributes": attributes,
        "weight_bytes": sum(t.numel() * t.element_size() for t in [*denoiser.parameters(), *denoiser.buffers()]),
    }


def _json_value(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
        return list(value)
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype)}
    return repr(value)


class _CallRecorder:
    """Records the distinct denoiser calls (by input signature) of a plain generation, in step order."""

    def __init__(self):
        self.calls: dict = {}
        self.order: list = []

    def __call__(self, module, args, kwargs):
        call, _ = normalize_call(module, args, kwargs)
        signature = signature_of(call)
        if signature not in self.calls:
            self.calls[signature] = pytree.tree_map(
                lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, call)
        self.order.append(signature)


def _batch_of(signature, sample_arg: str) -> int:
    for name, shape, _, _ in signature.tensors:
        if name == sample_arg:
            return int(shape[0])
    raise RuntimeError(f"the capture has no {sample_arg!r} input: {signature.describe()}")


def _capture_ids(signatures: list, sample_arg: str) -> list[str]:
    ids = []
    for signature in signatures:
        cid = f"b{_batch_of(signature, sample_arg)}"
        base, k = cid, 1
        while cid in ids:
            k += 1
            cid = f"{base}_{k}"
        ids.append(cid)
    return ids


def _run_methods(pipe, attribute: str, methods: list[Method], call: dict):
    """One generation with ``methods``; returns (plan, per-step (StepPlan, CapturedGraphs, Variant)).

    An optimized pipeline keeps its runtime, whose captures and variants are
    reused (they do not depend on the settings); its methods are put back after.
    """
    module = find_denoiser(pipe)[1]
    installed = installed_runtime(module)
    previous = installed.methods if installed is not None else None
    try:
        optimize(pipe, methods=methods)
        runtime = installed_runtime(module)
        runtime.reset()
        with runtime.tracing() as trace:
            pipe(**call)
        plan = runtime.last_plan
    finally:
        if previous is not None:
            optimize(pipe, methods=previous)
        else:
            uninstall(module)
    if plan is not None and plan.chooses:
        chooser = plan.method(next(s.choice.method for s in plan.steps if s.choice is not None))
        raise ValueError(f"{chooser.title} chooses each step's graph at run time from the data (e.g. whether the "
                         "blocks after the first run); an ONNX bundle replays the steps of one traced generation "
                         "and cannot follow that choice. Export without it, or serve it with the torch runtime")
    if plan is not None and plan.split:
        raise ValueError("the pipeline runs CFG as two denoiser calls a step (split CFG: Wan, FLUX.2 [klein], "
                         "FLUX.1's true CFG); an ONNX bundle replays one call a step and does not export it. "
                         "Export without guidance, or serve it with the torch runtime")
    if plan is None or len(trace) != plan.num_steps:
        raise RuntimeError(f"the traced generation made {len(trace)} denoiser calls for a plan of "
                           f"{plan.num_steps if plan else '?'} steps; nothing consistent to export")
    return plan, trace


def _run_plain(pipe, attribute: str, denoiser: torch.nn.Module, call: dict):
    """One plain generation; returns per-step (CapturedGraphs, Variant), one capture per call signature."""
    recorder = _CallRecorder()
    handle = denoiser.register_forward_pre_hook(recorder, with_kwargs=True)
    try:
        with bypassed(denoiser):  # the module itself, not an installed runtime
            pipe(**call)
    finally:
        handle.remove()
    if not recorder.order:
        raise RuntimeError(f"the pipeline never called its denoiser (pipe.{attribute}); nothing to export")
    graphs = {}
    for signature, recorded in recorder.calls.items():
        capture = capture_denoiser(denoiser, recorded)
        variant = build_variant(capture.graph_module, _FULL)
        captured = CapturedGraphs.from_capture(capture)
        captured.variants[_FULL] = variant
        graphs[signature] = (captured, variant)
    return [graphs[signature] for signature in recorder.order]


def _example_inputs(variant: Variant) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for node in variant.graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta["val"]
        if val.dtype.is_floating_point:
            t = torch.randn(tuple(val.shape), generator=g, dtype=torch.float32).to(val.dtype)
        else:
            t = torch.ones(tuple(val.shape), dtype=val.dtype)
        out.append(t.to(val.device))
    return out


def _output_names(variant: Variant) -> list[str]:
    return ["prediction"] + [key.output_name() for key in variant.records]


def _export_graph(variant: Variant, exporter: str, opset: int, workdir: str):
    """``variant``'s graph as an ``onnx.ModelProto`` with its weights loaded."""
    onnx = _import_onnx()
    gm = lowered_for_onnx(variant.graph_module)
    inputs = tuple(_example_inputs(variant))
    path = os.path.join(workdir, "model.onnx")
    kwargs = dict(input_names=list(variant.input_names), output_names=_output_names(variant), opset_version=opset)
    # The copy's modules are containers made for it, so eval() touches nothing of the caller's.
    gm.eval()
    with torch.no_grad():
        if exporter == "torchscript":
            import warnings

            with warnings.catch_warnings():
                # The legacy exporter warns that it is legacy on every call.
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(gm, inputs, path, dynamo=False, do_constant_folding=True, **kwargs)
        else:
            try:
                import onnxscript  # noqa: F401
            except ImportError as e:
                raise ImportError("exporter='dynamo' needs the onnxscript package (pip install onnxscript); "
                                  "exporter='torchscript' needs nothing else") from e
            program = torch.onnx.export(gm, inputs, dynamo=True, external_data=True, verbose=False, **kwargs)
            program.save(path, external_data=True)
    model = onnx.load(path, load_external_data=True)
    _strip_debug_info(model.graph)
    return model


def _strip_debug_info(graph) -> None:
    # Per-node source locations and exporter metadata are as large as the
    # graph itself and are written once per variant; the bundle keeps graphs only.
    from onnx import AttributeProto

    for node in graph.node:
        node.doc_string = ""
        if hasattr(node, "metadata_props"):
            del node.metadata_props[:]
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                _strip_debug_info(attr.g)
    del graph.value_info[:]


def _io_info(values) -> list[dict]:
    from onnx.helper import tensor_dtype_to_np_dtype

    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": str(tensor_dtype_to_np_dtype(t.elem_type))})
    return out


def _remove_previous_bundle(out_dir: str) -> None:
    """Delete the files an earlier export listed in ``out_dir/plan.json`` (and nothing else)."""
    path = os.path.join(out_dir, PLAN_FILE)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return
    if old.get("format") != FORMAT:
        return
    files = [old.get("weights", {}).get("file")]
    files += [v.get("file") for c in old.get("captures", {}).values() for v in c.get("variants", {}).values()]
    for name in files:
        if name and os.path.basename(name) == name and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    os.remove(path)


def _check_io(model, variant: Variant, where: str) -> None:
    names = [i.name for i in model.graph.input]
    if names != list(variant.input_names):
        raise RuntimeError(f"{where}: the exporter wrote inputs {names}, the graph has {variant.input_names}")
    outs = [o.name for o in model.graph.output]
    if outs != _output_names(variant):
        raise RuntimeError(f"{where}: the exporter wrote outputs {outs}, expected {_output_names(variant)}")


def _trace(pipe, attribute: str, denoiser: torch.nn.Module, methods: list[Method], call: dict):
    """Run the generation; returns the plan as JSON data and ``[(capture id, CapturedGraphs, {name: Variant})]``."""
    sample_arg = forward_parameters(denoiser)[0]
    if methods:
        plan, trace = _run_methods(pipe, attribute, methods, call)
        per_step = [(g, v) for _, g, v in trace]
        plan_steps = [{"step": s.step, "phase": s.phase, "spec": s.variant.name, "cfg": s.cfg,
                       "drops_uncond": s.drops_uncond, "methods": {n: m.label for n, m in s.methods.items()}}
                      for s, _, _ in trace]
    else:
        per_step = _run_plain(pipe, attribute, denoiser, call)
        plan_steps = [{"step": i, "phase": "plain", "spec": "full", "cfg": None, "drops_uncond": False,
                       "methods": {}} for i in range(len(per_step))]
    # Captures in order of first use, each with the variants the plan runs on it.
    used: dict = {}
    for graphs, variant in per_step:
        used.setdefault(graphs.capture.signature, (graphs, {}))[1].setdefault(variant.name, variant)
    ids = dict(zip(used, _capture_ids(list(used), sample_arg)))
    plan_data = {
        "num_steps": len(plan_steps),
        "cfg": plan.cfg if methods else None,
        "methods": {m.name: m.config.to_dict() for m in methods},
        "steps": [{**entry, "variant": v.name, "capture": ids[g.capture.signature],
                   "reads": [str(k) for k in v.reads], "writes": [str(k) for k in v.records]}
                  for entry, (g, v) in zip(plan_steps, per_step)],
    }
    return plan_data, [(ids[sig], graphs, variants) for sig, (graphs, variants) in used.items()]


def _write_models(captures, out_dir: str, exporter: str, opset: int, say):
    """Export every variant, move the weights to the shared file; returns the plan's capture and cache entries."""
    onnx = _import_onnx()
    jobs = [(cid, graphs, variant) for cid, graphs, variants in captures for variant in variants.values()]
    captures_data: dict[str, dict] = {}
    caches: dict[str, dict] = {}
    written = []
    with WeightsWriter(os.path.join(out_dir, WEIGHTS_FILE)) as weights, \
            tempfile.TemporaryDirectory(prefix="tgate_fx_onnx_") as tmp:
        for k, (cid, graphs, variant) in enumerate(jobs, 1):
            t0 = time.perf_counter()
            file = f"{cid}_{variant.name}.onnx"
            workdir = os.path.join(tmp, str(k))
            os.makedirs(workdir)
            model = _export_graph(variant, exporter, opset, workdir)
            _check_io(model, variant, file)
            model.producer_name, model.producer_version = "tgate_fx", __version__
            refs = weights.add(model)
            path = os.path.join(out_dir, file)
            onnx.save(model, path)
            written.append(path)
            signature = graphs.capture.signature
            entry = captures_data.setdefault(cid, {
                "inputs": [_tensor_info(n, s, d) for n, s, d, _ in signature.tensors],
                "constants": dict(signature.constants),
                "variants": {},
            })
            entry["variants"][variant.name] = {
                "file": file,
                "inputs": _io_info(model.graph.input),
                "outputs": _io_info(model.graph.output),
                "reads": {str(k): k.input_name() for k in variant.reads},
                "writes": {str(k): k.output_name() for k in variant.records},
                "spec": {"name": variant.spec.name,
                         "rewrites": sorted([r.method, r.group, r.action, r.reduce] for r in variant.spec.rewrites),
                         "skipped": [[str(k), why] for k, why in variant.resolved.skipped]},
            }
            shapes = {t["name"]: t["shape"] for t in entry["variants"][variant.name]["inputs"]}
            shapes.update({t["name"]: t["shape"] for t in entry["variants"][variant.name]["outputs"]})
            roles = {s.path: s.role for s in graphs.sites}
            for key in [*variant.reads, *variant.records]:
                cache = caches.setdefault(str(key), {"method": key.method, "site": key.site, "slot": key.slot,
                                                     "role": roles.get(key.site), "input": key.input_name(),
                                                     "output": key.output_name(), "shapes": {}})
                # Per model: records before a batch change are at the CFG batch, a CFG mean at half.
                name = key.input_name() if key.input_name() in shapes else key.output_name()
                cache["shapes"][file[: -len(".onnx")]] = shapes[name]
            say(f"[{k}/{len(jobs)}] {file}: {len(model.graph.node)} nodes, {refs} weight references, "
                f"{time.perf_counter() - t0:.1f} s")
            del model
    for path in written:
        onnx.checker.check_model(path)
    for cid, entry in captures_data.items():
        for variant in entry["variants"].values():
            variant["sha256"] = file_digest(os.path.join(out_dir, variant["file"]))
    return captures_data, caches, weights.result, written


def export_onnx(
    pipe: Any,
    out_dir: str,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    num_inference_steps: int = 25,
    *,
    tgate: bool | TGateConfig = True,
    gate_step: int | None = None,
    sp_interval: int | None = None,
    fi_interval: int | None = None,
    warm_up: int | None = None,
    config: TGateConfig | None = None,
    deepcache: DeepCacheConfig | None = None,
    methods: Any = None,
    prompt: str = "a photo",
    exporter: str = "torchscript",
    opset: int = DEFAULT_OPSET,
    progress: bool | Callable[[str], None] | None = None,
    **call_kwargs,
) -> str:
    """Export a diffusers pipeline's denoiser as ONNX graph variants plus their plan; returns ``out_dir``.

    The pipeline runs one generation (``output_type="latent"``) at the given
    shapes to capture its denoiser and build the plan's variants; it is left
    as it was. Each variant becomes ``<capture>_<variant>.onnx`` in
    ``out_dir``: CFG steps at the CFG batch (``2 * batch_size``), steps that
    drop the unconditional half (after T-GATE's gate) at ``batch_size``.
    Cache reads are inputs ``cache_<method>_<site>_<slot>``, cache writes
    outputs ``record_<method>_<site>_<slot>``; the first output is the
    prediction. All weights go to one ``weights.bin``, each tensor once.
    ``plan.json`` holds the schedule and everything a runtime needs (see
    :class:`~tgate_fx.export.OnnxDenoiser`).

    Args:
        pipe: A diffusers pipeline with a ``unet`` or ``transformer`` (optimized or not).
        out_dir: Directory to write; created if missing. Files of an earlier
            bundle there are replaced.
        height, width: Image size, as passed to the pipeline (``None``: its default).
        batch_size: Prompts per call.
        num_inference_steps: Steps of the exported schedule.
        tgate: T-GATE: ``True`` (default; with the settings below, else its
            defaults), a :class:`~tgate_fx.TGateConfig`, or ``False``.
        gate_step, sp_interval, fi_interval, warm_up: see :class:`~tgate_fx.TGateConfig`.
        config: A :class:`~tgate_fx.TGateConfig` instead of the individual settings.
        deepcache: A :class:`~tgate_fx.DeepCacheConfig` (composes with T-GATE;
            pass ``tgate=False`` for DeepCache alone).
        methods: A list of method configs, instead of the keywords.
            ``tgate=False`` with no other method exports the plain
            denoiser: one variant, no caches.
        prompt: Prompt of the tracing generation (its content does not matter);
            not used when ``prompt_embeds`` is among the call arguments (then
            with ``batch_size`` rows, and ``negative_prompt_embeds`` for CFG).
        exporter: ``"torchscript"`` or ``"dynamo"`` (needs ``onnxscript``).
        opset: ONNX opset (>= 18 for ``"dynamo"``).
        progress: ``True`` prints progress to stderr; a callable receives each message.
        **call_kwargs: More pipeline arguments of the traced call, e.g.
            ``guidance_scale``, ``max_sequence_length`` (they fix shapes too).

    Example::

        from tgate_fx.export import export_onnx, OnnxDenoiser
        export_onnx(pipe, "sd15_onnx", height=512, width=512, num_inference_steps=25, progress=True)
        OnnxDenoiser.from_dir("sd15_onnx").install(pipe)
        image = pipe("a photo of a cat", num_inference_steps=25).images[0]
    """
    onnx = _import_onnx()
    say = _say(progress)
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < (18 if exporter == "dynamo" else 14):
        raise ValueError(f"opset must be an int >= {18 if exporter == 'dynamo' else 14} for exporter "
                         f"{exporter!r}, got {opset!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    chosen = _export_methods(tgate, dict(gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval,
                                          warm_up=warm_up), config, deepcache, methods)
    # refuses a denoiser a method cannot serve, and fills what derives from it (ToCa's family defaults)
    chosen = [method.bind(_denoiser_of(pipe)[1]) for method in chosen]
    if chosen:
        Plan(num_inference_steps, chosen, cfg=True)  # checks the settings against the steps before any work
    for reserved in ("prompt", "output_type", "num_inference_steps", "generator"):
        if reserved in call_kwargs:
            raise ValueError(f"{reserved!r} is set by export_onnx itself; remove it from the call arguments")

    attribute, denoiser = _denoiser_of(pipe)
    embeds = call_kwargs.get("prompt_embeds")
    if embeds is not None:
        # pipelines driven by embeddings (no tokenizer, prompt-weighting tools): no prompt at all
        if _prompt_rows(embeds, denoiser) != batch_size:
            lists = " (or a list of batch_size per-prompt tensors)" if convention_of(denoiser) else ""
            got = (f"{tuple(embeds.shape)}" if isinstance(embeds, torch.Tensor) else
                   f"a {type(embeds).__name__}" + (f" of {len(embeds)}" if isinstance(embeds, list) else ""))
            raise ValueError(f"prompt_embeds must be a tensor with batch_size ({batch_size}) rows{lists}, got {got}")
        call = dict(call_kwargs)
    elif "prompt" not in inspect.signature(pipe.__call__).parameters:
        call = dict(call_kwargs)  # class-conditioned pipelines (DiT): their labels come in call_kwargs
    else:
        call = dict(call_kwargs, prompt=[prompt] * batch_size)
    call.update(num_inference_steps=num_inference_steps, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    if height is not None:
        call["height"] = height
    if width is not None:
        call["width"] = width

    os.makedirs(out_dir, exist_ok=True)
    _remove_previous_bundle(out_dir)
    start = time.perf_counter()
    say(f"tracing one {num_inference_steps}-step generation of {type(pipe).__name__} "
        f"({', '.join(m.title + ' ' + m.describe() for m in chosen) or 'plain'})")
    plan_data, captures = _trace(pipe, attribute, denoiser, chosen, call)
    say(f"traced in {time.perf_counter() - start:.1f} s: "
        + ", ".join(f"{cid} ({', '.join(variants)})" for cid, _, variants in captures))
    captures_data, caches, shared, written = _write_models(captures, out_dir, exporter, opset, say)

    plan_json = {
        "format": FORMAT,
        "version": VERSION,
        "created_with": {"tgate_fx": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "exporter": exporter, "opset": opset},
        "denoiser": _denoiser_metadata(attribute, denoiser),
        "call": {"height": height, "width": width, "batch_size": batch_size,
                 "num_inference_steps": num_inference_steps,
                 **{k: _json_value(v) for k, v in call_kwargs.items()}},
        "methods": plan_data["methods"],
        "plan": plan_data,
        "captures": captures_data,
        "caches": caches,
        "weights": {"file": WEIGHTS_FILE, "bytes": shared.bytes, "tensors": shared.tensors,
                    "references": shared.references, "sha256": file_digest(shared.path)},
    }
    with open(os.path.join(out_dir, PLAN_FILE), "w") as f:
        json.dump(plan_json, f, indent=1)
    total = sum(os.path.getsize(p) for p in written) + shared.bytes
    say(f"wrote {len(written)} models + {WEIGHTS_FILE} ({shared.bytes / 2**20:.1f} MiB, {shared.tensors} tensors) "
        f"to {out_dir} in {time.perf_counter() - start:.1f} s; bundle {total / 2**20:.1f} MiB vs denoiser weights "
        f"{plan_json['denoiser']['weight_bytes'] / 2**20:.1f} MiB")
    return out_dir


def _export_methods(tgate, tgate_args: dict, config, deepcache, methods) -> list[Method]:
    """The methods of an export; ``[]`` for a plain one."""
    if methods is not None:
        return _chosen_methods({}, None, None, None, methods)
    if tgate is False:
        if any(v is not None for v in tgate_args.values()) or config is not None:
            raise TypeError("tgate=False, but T-GATE settings were given")
        return _chosen_methods({}, None, None, deepcache, None) if deepcache is not None else []
    if tgate is True:  # the default: T-GATE, with the settings given or its defaults
        given = config is not None or any(v is not None for v in tgate_args.values())
        tgate = None if given else TGateConfig()
    return _chosen_methods(tgate_args, config, tgate, deepcache, None)
