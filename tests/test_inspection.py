"""Inspection of rewritten graphs: meta-device variants are the runtime's variants, reported and compared."""

import argparse

import pytest
import torch

import tgate_fx
from tgate_fx import archs
from tgate_fx.cli import inspect as inspect_cli
from tgate_fx.methods import TGateConfig
from tgate_fx.accounting.inspection import NodeKey, diff_variants, inspect_arch, inspect_pipeline
from tgate_fx.core.plan import Plan
from tgate_fx.tiny import tiny_pipeline

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

# Every variant of the reference schedule appears: 0 sp_compute, 1-2 sp_record, 3 sp_reuse, 4 gate,
# 5 and 7 fi_reuse, 6 fi_record.
CONFIG = TGateConfig(gate_step=5, sp_interval=2, fi_interval=2, warm_up=1)
STEPS = 8
SETTINGS = ["--steps", "8", "--gate-step", "5", "--sp-interval", "2", "--fi-interval", "2", "--warm-up", "1"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd15")


@pytest.fixture(scope="module")
def report(pipe):
    return inspect_pipeline(pipe, Plan(STEPS, CONFIG, cfg=True))


@pytest.fixture(scope="module")
def runtime_variants(pipe):
    """The variants the runtime builds while running a real generation with the same plan."""
    tgate_fx.optimize(pipe, config=CONFIG)
    try:
        pipe("a red circle", num_inference_steps=STEPS, output_type="latent",
             generator=torch.Generator().manual_seed(0), **pipe.tiny_call_kwargs)
        runtime = tgate_fx.get_runtime(pipe)
        return {variant.name: variant for graphs in runtime.captures for variant in graphs.variants.values()}
    finally:
        tgate_fx.restore(pipe)


def test_meta_variants_are_the_runtime_variants(report, runtime_variants):
    assert set(report.variants) == set(runtime_variants) == {
        "sp_compute", "sp_record", "sp_reuse", "gate", "fi_reuse", "fi_record"}
    for name, real in runtime_variants.items():
        meta = report.variant(name)
        assert meta.node_count() == real.node_count(), name
        assert meta.input_names == real.input_names and meta.reads == real.reads and meta.records == real.records
        d = diff_variants(meta, real)
        assert d.only_a == d.only_b == (), name


def test_variant_table_counts_sites_by_action(report):
    sites = {s.path: s.role for s in report.sites}
    assert sorted(sites.values()).count("self") == 7 and sorted(sites.values()).count("cross") == 7
    by_role = lambda paths: sorted(sites[getattr(p, "site", p)] for p in paths)  # noqa: E731
    v = report.variants
    assert v["sp_compute"].reused == v["sp_compute"].recorded == () and len(v["sp_compute"].computed) == 14
    assert by_role(v["sp_reuse"].reused) == ["self"] * 7 and by_role(v["sp_reuse"].computed) == ["cross"] * 7
    assert by_role(v["gate"].recorded) == ["cross"] * 7 + ["self"] * 7 and v["gate"].batch == 2
    assert by_role(v["fi_record"].reused) == ["cross"] * 7 and by_role(v["fi_record"].recorded) == ["self"] * 7
    assert len(v["fi_reuse"].reused) == 14 and v["fi_reuse"].computed == () and v["fi_reuse"].batch == 1
    assert v["fi_reuse"].steps == (5, 7) and v["sp_record"].steps == (1, 2)
    # A variant that reuses every site spends its MACs outside them only.
    assert set(v["fi_reuse"].macs.by_role) == {"outside"}
    ops = {name: info.variant.node_count() for name, info in v.items()}
    assert ops["fi_reuse"] < ops["fi_record"] < ops["sp_compute"] == ops["sp_record"]

    text = str(report)
    for expected in ("site", "proj MACs", "Plan(num_steps=8, gate_step=5", "fi_reuse", "7 cross, 7 self",
                     "sample: [2, 4, 16, 16]", "saved"):
        assert expected in text


def test_diff_names_the_removed_attention_and_the_cache_inputs(report):
    d = report.diff("sp_compute", "fi_reuse")
    sites = {s.path for s in report.sites}
    removed_linears = [k for k in d.only_a if k.target == "linear"]
    assert len(removed_linears) == 4 * 14 and {k.module for k in removed_linears} == sites
    assert all(k.target == "placeholder" for k in d.only_b)
    assert {k.module for k in d.only_b} == sites and len(d.only_b) == 14
    # The text input is dropped too once nothing reads it.
    assert NodeKey("encoder_hidden_states", "placeholder", "") in d.only_a
    # Recording adds outputs, not nodes; the CFG mean of the gate adds chunk/add/div per site.
    record = report.diff("sp_compute", "sp_record")
    assert record.only_a == record.only_b == ()
    gate = report.diff("sp_record", "gate")
    assert gate.only_a == () and sorted({k.target for k in gate.only_b}) == ["add", "chunk", "div", "getitem"]
    text = d.format(verbose=True)
    assert text.startswith(f"sp_compute (batch 2) vs fi_reuse (batch 1): {len(d.only_a)} nodes only in")
    assert "scaled_dot_product_attention" in text and "cache_" in text


def test_graph_code_is_python_of_the_variant(report):
    code = report.graph_code("fi_reuse")
    compile(code, "<fi_reuse>", "exec")
    assert "cache_" in code and "scaled_dot_product_attention" not in code
    assert "cache_" not in report.graph_code("sp_compute")
    with pytest.raises(ValueError, match="sp_compute, sp_record"):
        report.variant("fi_sometimes")


def test_inspect_small_meta_arch():
    arch = archs.get_arch("sd15").with_size(256, 256)
    plan = Plan(4, TGateConfig(gate_step=2, sp_interval=1, fi_interval=2, warm_up=0), cfg=False)
    report = inspect_arch(arch, plan)
    assert report.capture.graph_module.graph.find_nodes(op="placeholder")[0].meta["val"].device.type == "meta"
    assert len(report.sites) == 32 and list(report.variants) == ["sp_record", "gate", "fi_record", "fi_reuse"]
    assert all(v.batch == 1 for v in report.variants.values())
    assert report.variants["fi_reuse"].macs.total < report.variants["fi_record"].macs.total < (
        report.variants["gate"].macs.total)
    assert "runwayml/stable-diffusion-v1-5" in str(report)


def _run(argv):
    parser = argparse.ArgumentParser()
    inspect_cli.add_arguments(parser)
    return inspect_cli.run(parser.parse_args(argv))


def test_inspect_cli_tiny_model(capsys):
    assert _run(["--model", "tiny-sd", "--steps", "3", "--gate-step", "2", "--warm-up", "0"]) == 0
    out = capsys.readouterr().out
    assert "StableDiffusionPipeline: UNet2DConditionModel, 32x32" in out and "tiny-sd" in out
    assert "proj MACs" in out and "Plan(num_steps=3, gate_step=2, sp_interval=5" in out
    for variant in ("sp_record", "gate", "fi_record"):
        assert f"\n{variant} " in out
    assert _run(["--model", "tiny-nope"]) == 2
    assert "tiny-sd" in capsys.readouterr().err


def test_inspect_cli_graph_and_diff(monkeypatch, capsys, pipe, report):
    # Reuse the module's pipeline, and one set of captures for both runs: the CLI path is the same.
    original, cache = archs.ArchGraphs, {}
    monkeypatch.setattr(inspect_cli, "load_model", lambda spec: (pipe, {}))
    monkeypatch.setattr(archs, "ArchGraphs", lambda arch, progress=None: cache.setdefault(
        arch.name, original(arch, progress=lambda line: None)))

    assert _run(["--model", "tiny-sd", "--graph", "fi_record"] + SETTINGS) == 0
    code = capsys.readouterr().out
    assert code.strip() == report.graph_code("fi_record").strip()

    assert _run(["--model", "tiny-sd", "--diff", "sp_compute", "fi_reuse", "--verbose"] + SETTINGS) == 0
    out = capsys.readouterr().out
    assert out.strip() == report.diff("sp_compute", "fi_reuse").format(verbose=True).strip()

    assert _run(["--model", "tiny-sd", "--graph", "fi_sometimes"] + SETTINGS) == 2
    assert "fi_sometimes" in capsys.readouterr().err
