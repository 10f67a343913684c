"""Export the graph variants of a T-GATE plan to ONNX, with the plan beside them.

:func:`export_onnx` runs one generation of the pipeline at the requested
shapes with the torch runtime (:func:`tgate_fx.optimize`), which captures the
denoiser and builds exactly the variants the plan uses. It then writes each
of those variant graphs as an ONNX model, the weights once for all of them,
and ``plan.json`` (see :mod:`tgate_fx.export.bundle`). It consumes the plan
and the variants; it does not derive a schedule of its own.

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

from .. import __version__
from ..api import DENOISER_ATTRIBUTES, optimize
from ..capture import capture_denoiser, normalize_call, signature_of
from ..config import TGateConfig
from ..generation import output_class, take_unconditional_half
from ..passes import cache_input_name
from ..plan import Plan, VariantSpec
from ..runtime import CapturedGraphs, TGateDenoiser
from ..variants import Variant, build_variant, copy_graph_module
from .bundle import FORMAT, PLAN_FILE, VERSION, WEIGHTS_FILE, record_name
from .weights import WeightsWriter

__all__ = ["EXPORTERS", "export_onnx"]

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 18

# The variant of a plain (no T-GATE) export: every attention computed, no cache.
_FULL = VariantSpec("full")

# Attributes of the denoiser, besides ``config`` and ``dtype``, that the
# supported pipelines read (SD-XL: the size of the added-conditions embedding;
# SD: whether an IP-adapter projection exists).
_READ_ATTRIBUTES = ("add_embedding.linear_1.in_features", "encoder_hid_proj")


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
    for name in DENOISER_ATTRIBUTES:
        module = getattr(pipe, name, None)
        if isinstance(module, TGateDenoiser):
            return name, module.denoiser
        if isinstance(module, torch.nn.Module):
            return name, module
    raise TypeError(f"{type(pipe).__name__} has no denoiser module at pipe.{' or pipe.'.join(DENOISER_ATTRIBUTES)}")


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
        "sample_arg": next(iter(params)),
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


def _run_tgate(pipe, attribute: str, sample_arg: str, config: TGateConfig, call: dict):
    """One T-GATE generation; returns (plan, per-step (CapturedGraphs, Variant)).

    An optimized pipeline keeps its runtime, whose captures and variants are
    reused (they do not depend on the settings); its settings are put back
    after. Each step's capture is found as the runtime finds it: by the
    signature of the call, halved where the step drops the unconditional batch.
    """
    saved = getattr(pipe, attribute)
    previous = saved.tgate_config if isinstance(saved, TGateDenoiser) else None
    seen: list[tuple] = []

    def record(module, args, kwargs):
        full, _ = normalize_call(module.denoiser, args, kwargs)
        sample = full[sample_arg]
        seen.append((signature_of(full), signature_of(take_unconditional_half(full, sample.shape[0]))))

    try:
        optimize(pipe, config=config)
        runtime = getattr(pipe, attribute)
        runtime.reset()
        handle = runtime.register_forward_pre_hook(record, with_kwargs=True)
        try:
            pipe(**call)
        finally:
            handle.remove()
        plan = runtime.last_plan
        graphs = {g.capture.signature: g for g in runtime.captures}
    finally:
        if previous is not None and getattr(pipe, attribute) is saved:
            optimize(pipe, config=previous)
        else:
            object.__setattr__(pipe, attribute, saved)
    if plan is None or len(seen) != plan.num_steps:
        raise RuntimeError(f"the traced generation made {len(seen)} denoiser calls for a plan of "
                           f"{plan.num_steps if plan else '?'} steps; nothing consistent to export")
    steps = []
    for entry, (full, half) in zip(plan.steps, seen):
        signature = half if plan.cfg and not entry.cfg else full
        g = graphs[signature]
        steps.append((g, g.variants[entry.variant]))
    return plan, steps


def _run_plain(pipe, attribute: str, denoiser: torch.nn.Module, call: dict):
    """One plain generation; returns per-step (CapturedGraphs, Variant), one capture per call signature."""
    saved = getattr(pipe, attribute)
    recorder = _CallRecorder()
    handle = denoiser.register_forward_pre_hook(recorder, with_kwargs=True)
    try:
        object.__setattr__(pipe, attribute, denoiser)
        pipe(**call)
    finally:
        handle.remove()
        object.__setattr__(pipe, attribute, saved)
    if not recorder.order:
        raise RuntimeError(f"the pipeline never called its denoiser (pipe.{attribute}); nothing to export")
    graphs = {}
    for signature, recorded in recorder.calls.items():
        capture = capture_denoiser(denoiser, recorded)
        variant = build_variant(capture.graph_module, [], _FULL)
        graphs[signature] = (CapturedGraphs(capture, [], {_FULL: variant}), variant)
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
    return ["prediction"] + [record_name(site) for site in variant.records]


def _without_noop_squeezes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` (sharing its parameters) without squeezes of dimensions whose size is not 1.

    torch returns its input for those; ONNX ``Squeeze`` rejects them, and the
    dynamo exporter emits them as they are (PixArt's attention-mask handling
    squeezes a 64-wide dimension at these shapes). Shapes are static, so the
    no-ops are known here.
    """
    squeezes = (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims)
    gm = copy_graph_module(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in squeezes:
            continue
        shape = node.args[0].meta["val"].shape
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        if all(shape[d] != 1 for d in dims):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _export_graph(variant: Variant, exporter: str, opset: int, workdir: str):
    """``variant``'s graph as an ``onnx.ModelProto`` with its weights loaded."""
    onnx = _import_onnx()
    gm = _without_noop_squeezes(variant.graph_module)
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


def _trace(pipe, attribute: str, denoiser: torch.nn.Module, config: TGateConfig | None, call: dict):
    """Run the generation; returns the plan as JSON data and ``[(capture id, CapturedGraphs, {name: Variant})]``."""
    sample_arg = next(iter(inspect.signature(denoiser.forward).parameters))
    if config is not None:
        plan, per_step = _run_tgate(pipe, attribute, sample_arg, config, call)
        plan_steps = plan.to_dict()["steps"]
    else:
        per_step = _run_plain(pipe, attribute, denoiser, call)
        plan_steps = [{"step": i, "phase": "plain", "variant": _FULL.name, "reads": [], "writes": []}
                      for i in range(len(per_step))]
    # Captures in order of first use, each with the variants the plan runs on it.
    used: dict = {}
    for graphs, variant in per_step:
        used.setdefault(graphs.capture.signature, (graphs, {}))[1].setdefault(variant.name, variant)
    ids = dict(zip(used, _capture_ids(list(used), sample_arg)))
    plan_data = {
        "num_steps": len(plan_steps),
        "cfg": plan.cfg if config is not None else None,
        "config": config.to_dict() if config is not None else None,
        "steps": [{**entry, "capture": ids[g.capture.signature]} for entry, (g, _) in zip(plan_steps, per_step)],
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
                "reads": dict(variant.cache_inputs),
                "writes": {site: record_name(site) for site in variant.records},
                "spec": {"reuse": sorted(variant.spec.reuse), "record": sorted(variant.spec.record),
                         "cfg_mean": variant.spec.cfg_mean},
            }
            shapes = {t["name"]: t["shape"] for t in entry["variants"][variant.name]["inputs"]}
            shapes.update({t["name"]: t["shape"] for t in entry["variants"][variant.name]["outputs"]})
            for site in graphs.sites:
                for name in (cache_input_name(site.path), record_name(site.path)):
                    if name in shapes:
                        cache = caches.setdefault(site.path, {"role": site.role, "input": cache_input_name(site.path),
                                                              "output": record_name(site.path), "shapes": {}})
                        # Per model: pre-gate records are at the CFG batch, the gate's CFG mean at half.
                        cache["shapes"][file[: -len(".onnx")]] = shapes[name]
            say(f"[{k}/{len(jobs)}] {file}: {len(model.graph.node)} nodes, {refs} weight references, "
                f"{time.perf_counter() - t0:.1f} s")
            del model
    for path in written:
        onnx.checker.check_model(path)
    return captures_data, caches, weights.result, written


def export_onnx(
    pipe: Any,
    out_dir: str,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    num_inference_steps: int = 25,
    *,
    tgate: bool = True,
    gate_step: int = 10,
    sp_interval: int = 5,
    fi_interval: int = 1,
    warm_up: int = 2,
    config: TGateConfig | None = None,
    prompt: str = "a photo",
    exporter: str = "torchscript",
    opset: int = DEFAULT_OPSET,
    progress: bool | Callable[[str], None] | None = None,
    **call_kwargs,
) -> str:
    """Export a diffusers pipeline's denoiser as ONNX phase graphs plus their plan; returns ``out_dir``.

    The pipeline runs one generation (``output_type="latent"``) at the given
    shapes to capture its denoiser and build the plan's variants; it is left
    as it was. Each variant becomes ``<capture>_<variant>.onnx`` in
    ``out_dir``: pre-gate variants at the CFG batch (``2 * batch_size``),
    post-gate ones at ``batch_size``. Cache reads are inputs
    ``cache_<site>``, cache writes outputs ``record_<site>``; the first output
    is the prediction. All weights go to one ``weights.bin``, each tensor once.
    ``plan.json`` holds the schedule and everything a runtime needs (see
    :class:`~tgate_fx.export.OnnxDenoiser`).

    Args:
        pipe: A diffusers pipeline with a ``unet`` or ``transformer`` (optimized or not).
        out_dir: Directory to write; created if missing. Files of an earlier
            bundle there are replaced.
        height, width: Image size, as passed to the pipeline (``None``: its default).
        batch_size: Prompts per call.
        num_inference_steps: Steps of the exported schedule.
        tgate: ``False`` exports the plain denoiser: one variant, no caches.
        gate_step, sp_interval, fi_interval, warm_up: see :class:`~tgate_fx.TGateConfig`.
        config: A :class:`~tgate_fx.TGateConfig` instead of the individual settings.
        prompt: Prompt of the tracing generation (its content does not matter).
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
    if config is None:
        config = TGateConfig(gate_step, sp_interval, fi_interval, warm_up)
    elif not isinstance(config, TGateConfig):
        raise TypeError(f"config must be a TGateConfig, got {type(config).__name__}")
    if tgate:
        Plan(num_inference_steps, config, cfg=True)  # checks gate_step against the steps before any work
    for reserved in ("prompt", "output_type", "num_inference_steps", "generator"):
        if reserved in call_kwargs:
            raise ValueError(f"{reserved!r} is set by export_onnx itself; remove it from the call arguments")

    attribute, denoiser = _denoiser_of(pipe)
    call = dict(call_kwargs, prompt=[prompt] * batch_size, num_inference_steps=num_inference_steps,
                output_type="latent", generator=torch.Generator().manual_seed(0))
    if height is not None:
        call["height"] = height
    if width is not None:
        call["width"] = width

    os.makedirs(out_dir, exist_ok=True)
    _remove_previous_bundle(out_dir)
    start = time.perf_counter()
    say(f"tracing one {num_inference_steps}-step generation of {type(pipe).__name__} "
        f"({'T-GATE ' + repr(config) if tgate else 'plain'})")
    plan_data, captures = _trace(pipe, attribute, denoiser, config if tgate else None, call)
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
        "tgate": config.to_dict() if tgate else None,
        "plan": plan_data,
        "captures": captures_data,
        "caches": caches,
        "weights": {"file": WEIGHTS_FILE, "bytes": shared.bytes, "tensors": shared.tensors,
                    "references": shared.references},
    }
    with open(os.path.join(out_dir, PLAN_FILE), "w") as f:
        json.dump(plan_json, f, indent=1)
    total = sum(os.path.getsize(p) for p in written) + shared.bytes
    say(f"wrote {len(written)} models + {WEIGHTS_FILE} ({shared.bytes / 2**20:.1f} MiB, {shared.tensors} tensors) "
        f"to {out_dir} in {time.perf_counter() - start:.1f} s; bundle {total / 2**20:.1f} MiB vs denoiser weights "
        f"{plan_json['denoiser']['weight_bytes'] / 2**20:.1f} MiB")
    return out_dir
