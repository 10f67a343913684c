"""The passes ToCa uses, on a small captured block (a PixArt-style Transformer2DModel, 2 blocks): graph and numbers
against the eager modules."""

import pytest
import torch
from diffusers import Transformer2DModel
from torch._guards import detect_fake_mode

from tgate_fx.core.analysis import find_attention_sites
from tgate_fx.core.capture import capture_denoiser
from tgate_fx.core.variants import copy_graph_module
from tgate_fx.core.graph_passes import EliminateDeadCode, ExposeValues
from tgate_fx.passes import ComputeAttentionMap, RestrictToTokens, TokenRegion

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


@pytest.fixture(scope="module")
def captured():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    block = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                               cross_attention_dim=12, sample_size=8, patch_size=2, norm_type="ada_norm_single",
                               num_embeds_ada_norm=10, out_channels=4).eval()
    call = {"hidden_states": torch.randn(2, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(2, 5, 12, generator=g), "timestep": torch.tensor([3, 3]),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    capture = capture_denoiser(block, call)
    find_attention_sites(capture.graph_module)
    return block, call, capture


def _scope(gm, path):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and any(p == path or p.startswith(path + ".") for p, _ in n.meta["nn_module_stack"].values())]


def _run(gm, capture, call, **extra):
    inputs = {**capture.flat_inputs(call), **extra}
    with torch.no_grad():
        return gm(*(inputs[n.name] for n in gm.graph.nodes if n.op == "placeholder"))


def _eager_io(block, call, module):
    seen = {}
    handle = module.register_forward_hook(lambda m, a, kw, out: seen.update(args=a, kwargs=kw, out=out),
                                          with_kwargs=True)
    try:
        with torch.no_grad():
            block(**call, return_dict=False)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("module", ["attn2", "ff"])
def test_restrict_to_tokens_runs_the_module_on_the_chosen_rows(captured, module):
    block, call, capture = captured
    gm = copy_graph_module(capture.graph_module)
    path = f"transformer_blocks.1.{module}"
    nodes = _scope(gm, path)
    members = set(nodes)
    output = next(n for n in nodes if any(u not in members for u in n.users))
    first = next(n for n in nodes if path + ".to_q" in [p for p, _ in n.meta["nn_module_stack"].values()]) \
        if module == "attn2" else nodes[0]
    source = first.args[0]
    index_values = torch.tensor([[3, 0, 9, 15, 7], [1, 2, 14, 8, 5]])
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        index = gm.graph.placeholder("index")
    index.meta["val"] = detect_fake_mode([source.meta["val"]]).from_tensor(index_values, static_shapes=True)
    restrict = RestrictToTokens([TokenRegion(source, output, index)])
    restrict(gm)
    fresh = restrict.copies[0][output]
    ExposeValues([fresh])(gm)
    EliminateDeadCode()(gm)
    gm.recompile()
    gm.graph.lint()
    got = _run(gm, capture, call, index=index_values)[-1]
    seen = _eager_io(block, call, getattr(block.transformer_blocks[1], module))
    x = seen["args"][0] if seen["args"] else seen["kwargs"]["hidden_states"]
    rows = torch.gather(x, 1, index_values.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    with torch.no_grad():
        expected = getattr(block.transformer_blocks[1], module)(rows, **{k: v for k, v in seen["kwargs"].items()
                                                                         if k != "hidden_states"})
    assert got.shape == (2, 5, expected.shape[-1])
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    copies = [n for n in restrict.copies[0].values() if n.op == "call_function"]
    assert all("val" in n.meta and "nn_module_stack" in n.meta for n in copies)
    if module == "attn2":  # text keys/values are shared with the full module, not copied
        assert sum(1 for n in gm.graph.nodes if n.target is SDPA) == 4 + 1  # the copy, on 5 queries
        scopes = [p for n in copies for p, _ in n.meta["nn_module_stack"].values()]
        assert not any(p.endswith((".to_k", ".to_v")) for p in scopes)


def test_restrict_to_tokens_refuses_a_bad_index(captured):
    _, _, capture = captured
    gm = copy_graph_module(capture.graph_module)
    nodes = _scope(gm, "transformer_blocks.0.ff")
    source = nodes[0].args[0]
    with pytest.raises(ValueError, match="need a .B, N, C. source and a .B, k. index"):
        RestrictToTokens([TokenRegion(source, nodes[-1], source)])(gm)


def test_compute_attention_map_equals_the_official_formula(captured):
    block, call, capture = captured
    gm = copy_graph_module(capture.graph_module)
    cores = [n for n in gm.graph.nodes if n.target is SDPA]
    maps = ComputeAttentionMap(cores)
    maps(gm)
    ExposeValues(maps.maps)(gm)
    gm.recompile()
    outs = _run(gm, capture, call)[1:]
    assert [tuple(o.shape) for o in outs] == [(2, 16, 16), (2, 16, 5), (2, 16, 16), (2, 16, 5)]
    for out in outs:
        assert torch.allclose(out.sum(-1), torch.ones(2, 16), atol=1e-5)
    attn = block.transformer_blocks[0].attn2
    seen = _eager_io(block, call, attn)
    x, context = seen["args"][0], seen["kwargs"]["encoder_hidden_states"]
    with torch.no_grad():
        q = attn.to_q(x).view(2, -1, 2, 8).transpose(1, 2)
        k = attn.to_k(context).view(2, -1, 2, 8).transpose(1, 2)
        expected = ((q * (1.0 / 8 ** 0.5)) @ k.transpose(-2, -1)).softmax(-1).mean(1)
    assert torch.equal(outs[1], expected)


def _scores(capture, call, sites):
    """The graph of ``capture`` with ToCa's score ``sites`` (``(core index, rule, pairs, scale_logits)``) written,
    run on ``call``: (graph module, the scores in the order given)."""
    from tgate_fx.core.method import CacheKey
    from tgate_fx.core.variants import CacheIO
    from tgate_fx.passes import CacheTokens, ScoreSite

    gm = copy_graph_module(capture.graph_module)
    cores = [n for n in gm.graph.nodes if n.target is SDPA]
    io = CacheIO(gm.graph)
    CacheTokens(io, scores=[ScoreSite(cores[i], CacheKey("t", str(j), rule), rule, pairs, scale_logits=scaled)
                            for j, (i, rule, pairs, scaled) in enumerate(sites)])(gm)
    ExposeValues(list(io.writes.values()))(gm)
    EliminateDeadCode()(gm)
    gm.recompile()
    return gm, _run(gm, capture, call)[1:]


def _largest_map(gm) -> int:
    """Bytes of the largest value of an attention map ``gm`` forms: its logits (``q k^T``), probabilities
    (softmax), head mean."""
    vals = [n.meta["val"] for n in gm.graph.nodes if n.target in (aten.matmul.default, aten.softmax.int, aten.mean.dim)]
    return max(v.numel() * v.element_size() for v in vals)


def test_score_map_in_query_chunks_is_the_unchunked_score_up_to_rounding(captured, monkeypatch):
    """Forced small chunks (3 queries of the 16 self-attention queries, 9 of the cross-attention's): every rule's
    score within 1e-6 of the one-chunk score, the same top-k tokens, and no value of a map larger than the limit."""
    from tgate_fx.passes import TokenSelection, compute_attention_map
    from tgate_fx.passes.token_math import select_tokens

    block, call, capture = captured
    sites = [(0, "received", False, False), (0, "received_mean", False, True), (2, "received_mean", False, False),
             (1, "entropy", True, False), (3, "entropy_part", False, False)]
    whole_gm, whole = _scores(capture, call, sites)
    limit = 2 * 2 * 16 * 4 * 3  # B x H x Lk x float32 x 3 queries of self-attention
    assert _largest_map(whole_gm) == 2 * 2 * 16 * 16 * 4 > limit  # one map, unchunked
    monkeypatch.setattr(compute_attention_map, "MAP_CHUNK_BYTES", limit)
    chunked_gm, chunked = _scores(capture, call, sites)
    softmaxes = [n for n in chunked_gm.graph.nodes if n.target is aten.softmax.int]
    assert len(softmaxes) == 3 * 6 + 2 * 2  # self-attention 16 = 5 x 3 + 1 queries; cross 16 = 9 + 7
    assert _largest_map(chunked_gm) <= limit
    sel = TokenSelection(3, 0.25, False, False, False, 0.0, 1)
    for (_, rule, *_), a, b in zip(sites, whole, chunked):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-6, rule
        ranked = a.sort(-1, descending=True).values
        assert (ranked[:, 4] - ranked[:, 5]).abs().min().item() > 1e-4, rule  # no near-tie at the 5th token
        zeros = torch.zeros(a.shape, dtype=torch.int32)
        assert torch.equal(select_tokens(a, zeros, 5, sel), select_tokens(b, zeros, 5, sel)), rule


def test_query_chunks_are_at_most_max_map_chunks():
    """The chunks are unrolled in the graph: past MAX_MAP_CHUNKS they grow instead of multiplying
    (HunyuanVideo at 720p x 129 frames: 64 chunks of about 10.6 GB, not 637 of 1 GiB)."""
    import torch.fx as fx

    from tgate_fx.passes.compute_attention_map import MAP_CHUNK_BYTES, MAX_MAP_CHUNKS, query_chunks

    graph = fx.Graph()
    q, k = graph.placeholder("q"), graph.placeholder("k")
    tokens = 119_056
    q.meta["val"] = k.meta["val"] = torch.empty(1, 24, tokens, 128, dtype=torch.bfloat16, device="meta")
    core = graph.call_function(torch.ops.aten.scaled_dot_product_attention.default, (q, k, k))
    chunks = query_chunks(core)
    assert len(chunks) == MAX_MAP_CHUNKS and chunks[0][0] == 0 and chunks[-1][1] == tokens
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert len(query_chunks(core, limit=MAP_CHUNK_BYTES * 64)) < MAX_MAP_CHUNKS  # under the cap: the limit rules


def test_query_chunks_on_the_cpu_are_at_most_cpu_map_chunk_bytes():
    """On the CPU a map is formed in chunks of at most CPU_MAP_CHUNK_BYTES (its passes are memory-bound there);
    the same core on another device (meta here) keeps MAP_CHUNK_BYTES: FLUX.1-dev's 4608 joint tokens in fp32
    are 2 chunks of 1 GiB there, about 62 of 32 MiB on the CPU."""
    import torch.fx as fx

    from tgate_fx.passes.compute_attention_map import CPU_MAP_CHUNK_BYTES, MAX_MAP_CHUNKS, query_chunks

    def core_on(device):
        graph = fx.Graph()
        q, k = graph.placeholder("q"), graph.placeholder("k")
        q.meta["val"] = k.meta["val"] = torch.empty(1, 24, 4608, 128, device=device)
        return graph.call_function(torch.ops.aten.scaled_dot_product_attention.default, (q, k, k))

    row = 24 * 4608 * 4  # one query's map, all heads, fp32
    assert len(query_chunks(core_on("meta"))) == 2
    cpu = query_chunks(core_on("cpu"))
    assert max(stop - start for start, stop in cpu) * row <= CPU_MAP_CHUNK_BYTES
    assert len(cpu) == -(-4608 // (CPU_MAP_CHUNK_BYTES // row)) <= MAX_MAP_CHUNKS
    assert cpu[0][0] == 0 and cpu[-1][1] == 4608 and all(a[1] == b[0] for a, b in zip(cpu, cpu[1:]))
