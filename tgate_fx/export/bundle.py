"""The bundle an ONNX export writes, and how a runtime reads it back.

A bundle is a directory::

    plan.json                 schedule, variants, I/O names and shapes, settings, denoiser config
    weights.bin               every weight tensor once, shared by all the models below
    b2_sp_compute.onnx        one model per (capture, variant) that the plan runs;
    b2_gate.onnx              "b2" = the capture at denoiser batch 2 (the CFG batch),
    b1_fi_reuse.onnx          "b1" = batch 1 (after T-GATE's gate), ...

``plan.json`` lists every step as it ran: its capture, its variant, whether
it drops the unconditional half, and the caches it reads and writes (cache
keys ``method:site:slot``). A runtime follows these steps; it never derives a
schedule. Version 2 (methods composed); version 1 bundles (T-GATE only)
must be exported again.

This module owns the file names, the format tag and the checks that a
``plan.json`` is complete and agrees with the files next to it. It needs only
the standard library.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

__all__ = ["FORMAT", "PLAN_FILE", "VERSION", "WEIGHTS_FILE", "file_digest", "read_plan"]

FORMAT = "tgate_fx.onnx"
VERSION = 2
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "weights.bin"


def _require(data: dict, key: str, where: str) -> Any:
    if key not in data:
        raise ValueError(f"{where} has no {key!r} entry; it was not written by tgate_fx.export.export_onnx "
                         f"(format {FORMAT!r} version {VERSION})")
    return data[key]


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes, as hex (read in 16 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def read_plan(directory: str, *, verify: bool = True) -> dict:
    """Read and check ``directory/plan.json``.

    Checks that every file it names exists, that every step names a variant
    of a capture it describes, and that each variant's cache reads and writes
    name its inputs and outputs. With ``verify`` (the default) every file's
    SHA-256 is compared with the one ``plan.json`` records (``"sha256"``
    entries): a file changed in place, even at the same size, is refused
    (about 1 s per 2 GB). The ONNX files themselves are compared with the
    plan by the runtime, which opens them.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: naming the entry that is missing or inconsistent, or the
            file whose bytes differ from the export's.
    """
    path = os.path.join(directory, PLAN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {directory!r} is not an ONNX bundle written by "
                                "tgate_fx.export.export_onnx (or `tgate-fx export`)")
    with open(path) as f:
        plan = json.load(f)
    if plan.get("format") == FORMAT and plan.get("version") == 1:
        raise ValueError(f"{path} is a version-1 bundle (T-GATE only, schedule recomputed at run time); this "
                         f"tgate_fx reads version {VERSION}, which stores every step: export it again "
                         "with tgate_fx.export.export_onnx or `tgate-fx export`")
    if plan.get("format") != FORMAT or plan.get("version") != VERSION:
        raise ValueError(f"{path} has format {plan.get('format')!r} version {plan.get('version')!r}; "
                         f"this tgate_fx reads format {FORMAT!r} version {VERSION}")
    for key in ("denoiser", "plan", "captures", "weights"):
        _require(plan, key, path)
    weights = os.path.join(directory, _require(plan["weights"], "file", f"{path} 'weights'"))
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file {weights} named in {path} not found")
    size, expected = os.path.getsize(weights), plan["weights"].get("bytes")
    if expected is not None and size != expected:
        raise ValueError(f"weights file {weights} has {size} bytes, {path} says {expected}: "
                         "the bundle's files come from different exports")
    if verify:
        _verify(weights, plan["weights"], path)
    for cid, capture in plan["captures"].items():
        for vname, variant in _require(capture, "variants", f"capture {cid!r}").items():
            where = f"variant {vname!r} of capture {cid!r} in {path}"
            file = os.path.join(directory, _require(variant, "file", where))
            if not os.path.isfile(file):
                raise FileNotFoundError(f"model file {file} of {where} not found")
            if verify:
                _verify(file, variant, path)
            inputs = {t["name"] for t in _require(variant, "inputs", where)}
            outputs = {t["name"] for t in _require(variant, "outputs", where)}
            bad = [n for n in _require(variant, "reads", where).values() if n not in inputs]
            bad += [n for n in _require(variant, "writes", where).values() if n not in outputs]
            if bad:
                raise ValueError(f"{where}: cache names {bad} are not among its inputs {sorted(inputs)} "
                                 f"or outputs {sorted(outputs)}")
    if plan.get("methods") != plan["plan"].get("methods"):
        raise ValueError(f"{path}: the methods {plan.get('methods')} differ from those its plan was made with "
                         f"{plan['plan'].get('methods')}")
    written: set[str] = set()
    for step in _require(plan["plan"], "steps", path):
        cid, vname = step.get("capture"), step.get("variant")
        if cid not in plan["captures"] or vname not in plan["captures"][cid]["variants"]:
            raise ValueError(f"step {step.get('step')} of {path} runs variant {vname!r} of capture {cid!r}, "
                             f"which the bundle does not describe (captures: "
                             f"{ {c: sorted(v['variants']) for c, v in plan['captures'].items()} })")
        variant = plan["captures"][cid]["variants"][vname]
        if sorted(step.get("reads", [])) != sorted(variant["reads"]) or \
                sorted(step.get("writes", [])) != sorted(variant["writes"]):
            raise ValueError(f"step {step.get('step')} of {path}: its reads/writes differ from variant {vname!r}'s")
        unwritten = [k for k in variant["reads"] if k not in written]
        if unwritten:
            raise ValueError(f"step {step.get('step')} of {path} reads caches {unwritten} that no earlier step writes")
        written.update(variant["writes"])
    return plan


def _verify(file: str, entry: dict, plan_path: str) -> None:
    expected = _require(entry, "sha256", f"the entry of {os.path.basename(file)} in {plan_path}")
    if file_digest(file) != expected:
        raise ValueError(f"{file} does not hold the bytes it was exported with (SHA-256 differs from the one in "
                         f"{plan_path}): it was changed or corrupted; export the bundle again")
