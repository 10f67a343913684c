"""Analysis finds every attention module, with the right role and cached value."""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from conftest import record_calls
from tgate_fx.core.analysis import TAG, find_attention_sites
from tgate_fx.core.capture import capture_denoiser
from tgate_fx.core.captured import normalize_call
from tgate_fx.tiny import FAMILIES, tiny_pipeline

pytestmark = pytest.mark.e2e  # builds tiny pipelines and runs them end to end


def _capture(family):
    pipe = tiny_pipeline(family)
    denoiser, calls = record_calls(pipe, FAMILIES[family].denoiser, num_inference_steps=2)
    call, _ = normalize_call(denoiser, *calls[0])
    return denoiser, call, capture_denoiser(denoiser, call)


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl", "pixart_alpha"])
def test_sites_roles_and_values(family):
    denoiser, call, capture = _capture(family)
    sites = find_attention_sites(capture.graph_module)
    modules = {name: m for name, m in denoiser.named_modules() if isinstance(m, Attention)}
    assert sorted(s.path for s in sites) == sorted(modules)  # sites come in execution order
    for site in sites:
        assert site.role == ("cross" if modules[site.path].is_cross_attention else "self"), site.path
    nodes = {n.name: n for n in capture.graph_module.graph.nodes}
    for site in sites:
        value = nodes[site.value]
        assert value.meta[TAG] == {"site": site.path, "role": site.role, "value": True}
        innermost = list(value.meta["nn_module_stack"].values())[-1][0]
        assert innermost == site.path + ".to_out.1"
        assert all(nodes[n].meta[TAG]["site"] == site.path for n in site.nodes)

    # the tagged value is the eager to_out output, bit for bit
    seen = {}
    hooks = [modules[s.path].to_out[1].register_forward_hook(
        lambda m, a, out, path=s.path: seen.__setitem__(path, out)) for s in sites]
    try:
        with torch.no_grad():
            denoiser(**call, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    for site in sites:
        assert tuple(seen[site.path].shape) == site.value_shape


def test_site_costs():
    _, _, capture = _capture("sd15")
    site = find_attention_sites(capture.graph_module)[1]  # down_blocks.0 ... attn2, batch 2
    assert site.role == "cross" and site.query_shape == (2, 256, 32) and site.kv_shape == (2, 16, 32)
    # to_q and to_out on 2x256 tokens (32->32), to_k and to_v on 2x16 text tokens (32->32)
    assert site.macs == 2 * 256 * 32 * 32 * 2 + 2 * 16 * 32 * 32 * 2
    # QK^T and AV: batch*heads * L * S * (head_dim + head_dim), heads*head_dim = 32
    assert site.attention_macs == 2 * 256 * 16 * 32 * 2
