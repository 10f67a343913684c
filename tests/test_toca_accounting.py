"""ToCa's cost and memory accounting: the MACs of each partial graph equal the modules run on k rows (computed here
from the tiny PixArt's widths and the official k), and ``report`` shows one copy of each cached tensor."""

import pytest

import tgate_fx
from tgate_fx.tiny import tiny_pipeline
from conftest import latents
from tgate_fx import ToCaConfig
from tgate_fx.accounting.macs import count_macs
from tgate_fx.accounting.report import cache_memory
from tgate_fx.core.method import TRANSFORM
from tgate_fx.methods.toca.config import fresh_count, fresh_ratio

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end

STEPS = 8


@pytest.fixture(scope="module")
def toca_pipe():
    pipe = tgate_fx.optimize(tiny_pipeline("pixart_alpha"), toca=ToCaConfig())
    latents(pipe, num_inference_steps=STEPS)
    return pipe


def _option(step, layer: int):
    group = "tokens0" if layer == 0 else "tokens"
    return next(r.option for r in step.variant.rewrites if r.method == "toca" and r.group == group
                and r.action == TRANSFORM)


def test_partial_graph_macs_are_the_modules_on_k_rows(toca_pipe):
    runtime = tgate_fx.get_runtime(toca_pipe)
    config = runtime.method_config("toca")
    graphs = runtime.captures[0]
    cfg = runtime.denoiser.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    depth = cfg.num_layers
    batch, _, h, w = graphs.capture.signature.tensors[0][1]
    tokens = (h // cfg.patch_size) * (w // cfg.patch_size)
    text = graphs.capture.signature.tensors[1][1][1]
    base = count_macs(graphs.capture.graph_module).total
    seen, unread = set(), 0
    for step in runtime.last_plan.steps:
        variant = graphs.variant(step.variant)
        if variant.name in seen:
            continue
        seen.add(variant.name)
        expected = base
        for layer in range(depth):
            option = _option(step, layer)
            if option[0] == "full":  # everything, plus the explicit cross-attention map (Q K^T) of a score read
                _, _, _, n, readers = option  # later (a refresh of k > 0 tokens at one of the reader steps)
                k = lambda s, module: fresh_count(config, fresh_ratio(config, s, n, layer, module, depth), tokens)
                read = any(k(s, "cross") > 0 or k(s, "mlp") > 0 for s in readers)
                expected += batch * tokens * text * width if read else 0
                unread += not read
                continue
            _, s, n, *_ = option
            k_cross = fresh_count(config, fresh_ratio(config, s, n, layer, "cross", depth), tokens)
            k_mlp = fresh_count(config, fresh_ratio(config, s, n, layer, "mlp", depth), tokens)
            expected -= 4 * batch * tokens * width * width              # self-attention q, k, v, out: cached
            expected -= 2 * batch * (tokens - k_cross) * width * width  # cross-attention q, out on k rows
            expected -= 8 * batch * (tokens - k_mlp) * width * width    # MLP (x4) on k rows
            expected += batch * k_cross * text * width                  # the map of the refreshed rows
            if k_cross == 0:  # nothing attends to the text: its keys/values are not computed either
                expected -= 2 * batch * text * width * width
        assert count_macs(variant.graph_module).total == expected, variant.name
    assert any("partial" in name for name in seen) and any("mixed" in name for name in seen)
    # at 8 steps every full layer's score is read (test_toca.py checks graphs whose scores are not: no map, no MACs)
    assert unread == 0


def test_report_shows_one_copy_of_each_toca_cache(toca_pipe):
    runtime = tgate_fx.get_runtime(toca_pipe)
    graphs = runtime.captures[0]
    cfg = runtime.denoiser.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    batch, _, h, w = graphs.capture.signature.tensors[0][1]
    tokens = (h // cfg.patch_size) * (w // cfg.patch_size)
    # per block: attention, cross-attention and MLP outputs (B, N, C) float32; the "steps since fresh"
    # counters of cross-attention and MLP (B, N) int32; the score source (B/2, N) float32 (CFG halves share it)
    per_block = 3 * batch * tokens * width * 4 + 2 * batch * tokens * 4 + batch // 2 * tokens * 4
    size, count = cache_memory(graphs)["toca"]
    assert count == 6 * cfg.num_layers
    assert size == cfg.num_layers * per_block
    text = tgate_fx.report(toca_pipe)
    assert f"caches held between steps: toca {size / 2**20:.2f} MiB ({count} tensors)" in text
