"""MACs of FLUX.1-dev, FLUX.2-dev, Wan 2.1 T2V 1.3B and HunyuanVideo: the meta-device architectures against hand formulas.

Full-size captures take seconds each (``benchmarks/macs_transformers.py``
counts them); here the same published configs run at reduced depth and size on
the meta device (the real widths, 1-3 blocks, a few hundred tokens). The counts
are checked against hand formulas of the diffusers modules: the whole model
for FLUX and Wan, one double- and one single-stream block (the difference of
two depths) for HunyuanVideo. The FLUX formula at the full config then gives
the official ToCa baseline (flux-ToCa README: 3719.50 TFLOPs, FLUX.1-dev 1024 x
1024, 50 steps) without a full-size capture. Plans are checked by their
arithmetic: the block cache at FORA's interval (computing steps + skipping steps
that run the first block only) and T-GATE's joint rule after the gate (the
text stream's projections and MLP gone, the attention on image queries only).
"""

from dataclasses import replace

import pytest
import torch

from tgate_fx import tiny_extra
from tgate_fx.accounting.macs import count_macs, plan_macs
from tgate_fx.archs import Arch, ArchGraphs, get_arch
from tgate_fx.cli import macs as macs_cli
from tgate_fx.core.capture import capture_denoiser
from tgate_fx.core.captured import normalize_call, signature_of
from tgate_fx.core.plan import Plan
from tgate_fx.methods import BlockCacheConfig, TGateConfig, as_methods


def _reduced(name: str, **changes) -> Arch:
    """The published architecture ``name`` with config keys and sizes changed (depth, tokens)."""
    arch = get_arch(name)
    sizes = {k: changes.pop(k) for k in ("height", "width", "frames", "text_tokens") if k in changes}
    return replace(arch, config={**arch.config, **changes}, **sizes)


def _counts(arch: Arch, batch: int = 1) -> tuple[int, int]:
    """(Linear + Conv + matmul, the same + SDPA core) of one evaluation at ``batch``."""
    gm = ArchGraphs(arch, progress=lambda line: None)(batch).capture.graph_module
    return count_macs(gm).total, count_macs(gm, include_attention=True).total


# --- hand formulas (per evaluation; D = heads x head dim) --------------------------------------------------------

def _flux_block(n, t, d):
    """One FLUX double-stream block (FluxTransformerBlock): norm1 and norm1_context (D -> 6D, per sample),
    q/k/v and the output projection of each stream, each stream's GELU MLP (D -> 4D -> D); core over n + t."""
    return 12 * d * d + 12 * (n + t) * d * d, 2 * (n + t) ** 2 * d


def _flux_single(n, t, d):
    """One single-stream block (FluxSingleTransformerBlock): norm (D -> 3D, per sample), proj_mlp (D -> 4D),
    q/k/v over the joined tokens, proj_out (5D -> D)."""
    return 3 * d * d + 12 * (n + t) * d * d, 2 * (n + t) ** 2 * d


def flux_macs(c: dict, n: int, t: int, batch: int = 1) -> tuple[int, int]:
    d = c["num_attention_heads"] * c["attention_head_dim"]
    embed = 256 * d + d * d + c["pooled_projection_dim"] * d + d * d  # timestep and pooled-text embedders
    if c["guidance_embeds"]:
        embed += 256 * d + d * d
    linear = embed + t * c["joint_attention_dim"] * d + n * c["in_channels"] * d  # context and x embedders
    core = 0
    for count, block in ((c["num_layers"], _flux_block), (c["num_single_layers"], _flux_single)):
        lin, att = block(n, t, d)
        linear, core = linear + count * lin, core + count * att
    linear += 2 * d * d + n * d * (c["out_channels"] or c["in_channels"])  # norm_out (D -> 2D), proj_out
    return batch * linear, batch * (linear + core)


def flux2_macs(c: dict, n: int, t: int) -> tuple[int, int]:
    """Flux2Transformer2DModel: the time and guidance embedders (256 -> D -> D each), the modulations shared by
    all blocks (double-stream image and text D -> 6D, single-stream D -> 3D, per sample), the x and context
    embedders; per double-stream block each stream's q/k/v/out and SwiGLU MLP (D -> 2H, H -> D; H = mlp_ratio D);
    per single-stream block the fused to_qkv_mlp_proj (D -> 3D + 2H) and to_out (D + H -> D) over the joined
    tokens; norm_out (D -> 2D) and proj_out. Core: 2 (n + t)^2 D per block."""
    d = c["num_attention_heads"] * c["attention_head_dim"]
    h = int(c["mlp_ratio"] * d)
    linear = (2 if c["guidance_embeds"] else 1) * (256 * d + d * d) + 2 * 6 * d * d + 3 * d * d
    linear += n * c["in_channels"] * d + t * c["joint_attention_dim"] * d
    linear += c["num_layers"] * (4 * d * d + 3 * d * h) * (n + t)
    linear += c["num_single_layers"] * (3 * d * d + 2 * h * d + (d + h) * d) * (n + t)
    linear += 2 * d * d + n * d * (c["out_channels"] or c["in_channels"])
    return linear, linear + (c["num_layers"] + c["num_single_layers"]) * 2 * (n + t) ** 2 * d


def wan_macs(c: dict, frames: int, h: int, w: int, t: int, batch: int = 1) -> tuple[int, int]:
    """WanTransformer3DModel: the Conv3d patch embedding, the condition embedder (time: freq -> D -> D, then
    D -> 6D; text: text_dim -> D -> D per token), per block self-attention (4 projections), cross-attention
    (q and out on the video tokens, k and v on the text) and the FFN; proj_out to the patch's channels."""
    d, f = c["num_attention_heads"] * c["attention_head_dim"], c["ffn_dim"]
    pt, ph, pw = c["patch_size"]
    n = (frames // pt) * (h // ph) * (w // pw)
    linear = n * d * c["in_channels"] * pt * ph * pw
    linear += c["freq_dim"] * d + d * d + 6 * d * d + t * (c["text_dim"] * d + d * d)
    per_block = 4 * n * d * d + 2 * n * d * d + 2 * t * d * d + 2 * n * d * f
    core = 2 * n * n * d + 2 * n * t * d
    linear += c["num_layers"] * per_block + n * d * c["out_channels"] * pt * ph * pw
    return batch * linear, batch * (linear + c["num_layers"] * core)


# --- FLUX.1-dev --------------------------------------------------------------------------------------------------

SMALL_FLUX = dict(height=256, width=256, text_tokens=16)  # 256 image tokens (16 x 16 packed latents)


@pytest.mark.parametrize("depth", [(1, 1), (2, 1), (1, 2)])
def test_flux_dev_counts_match_the_hand_formula(depth):
    arch = _reduced("flux_dev", num_layers=depth[0], num_single_layers=depth[1], **SMALL_FLUX)
    assert arch.image_tokens == 256
    assert _counts(arch) == flux_macs(arch.config, 256, 16)


def test_flux_dev_formula_gives_the_official_toca_baseline():
    # flux-ToCa README (Shenyi-Z/ToCa at e84096ff): "original" 3719.50 TFLOPs, FLUX.1-dev 1024 x 1024, 50 steps,
    # calflops (2 FLOPs a MAC, the attention computed as explicit matmuls, so counted), 512 T5 tokens.
    arch = get_arch("flux_dev")
    assert (arch.height, arch.width, arch.text_tokens, arch.num_steps, arch.cfg) == (1024, 1024, 512, 28, False)
    linear, with_core = flux_macs(arch.config, arch.image_tokens, arch.text_tokens)
    assert arch.image_tokens == 4096
    assert abs(2 * 50 * with_core / 1e12 - 3719.50) < 0.5  # 3719.23: elementwise ops are not counted here
    assert 2 * 50 * linear / 1e12 < 3000  # without the core it is far off: the official count includes it


@pytest.mark.parametrize("depth", [(1, 1), (2, 1)])
def test_flux2_dev_counts_match_the_hand_formula(depth):
    arch = _reduced("flux2_dev", num_layers=depth[0], num_single_layers=depth[1], **SMALL_FLUX)
    assert arch.image_tokens == 256
    assert _counts(arch) == flux2_macs(arch.config, 256, 16)
    full = get_arch("flux2_dev")
    assert (full.image_tokens, full.text_tokens, full.num_steps, full.cfg) == (4096, 512, 50, False)
    assert full.make_call(1)["img_ids"].shape == (1, 4096, 4)


def test_zimage_counts_on_meta_equal_a_cpu_capture():
    # Z-Image's transformer loops over its per-sample lists (tgate_fx.core.conventions): the meta-device capture
    # of the published config at reduced width and depth counts what a capture of the same model on the CPU does.
    arch = _reduced("zimage_turbo", dim=256, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1,
                    height=256, width=256, text_tokens=32)
    assert arch.image_tokens == 256
    meta = _counts(arch, batch=2)
    torch.manual_seed(0)
    cpu = capture_denoiser(arch.build_denoiser("cpu"), arch.make_call(2, device="cpu")).graph_module
    assert meta == (count_macs(cpu).total, count_macs(cpu, include_attention=True).total)
    full = get_arch("zimage_turbo")
    assert (full.image_tokens, full.text_tokens, full.num_steps, full.cfg) == (4096, 128, 8, False)


def test_flux_block_cache_at_fora_interval_costs_the_first_block_on_skipped_steps():
    arch = _reduced("flux_dev", num_layers=2, num_single_layers=2, **SMALL_FLUX)
    graphs = ArchGraphs(arch, progress=lambda line: None)
    denoiser = arch.build_denoiser()
    plan = Plan(10, [m.bind(denoiser) for m in as_methods([BlockCacheConfig(fora_interval=3)])], cfg=False)
    result = plan_macs(graphs, plan, include_attention=True)
    full = flux_macs(arch.config, 256, 16)[1]
    block, single = (sum(b(256, 16, 3072)) for b in (_flux_block, _flux_single))
    computing = [0, 3, 6, 9]
    assert [s.macs for s in result.steps] == [full if s in computing else full - block - 2 * single
                                              for s in range(10)]
    assert result.baseline == 10 * full


def test_flux_tgate_joint_rule_drops_the_text_stream_after_the_gate():
    arch = _reduced("flux_dev", num_layers=2, num_single_layers=1, **SMALL_FLUX)
    graphs = ArchGraphs(arch, progress=lambda line: None)
    denoiser = arch.build_denoiser()
    gate = TGateConfig(gate_step=3, sp_interval=1, fi_interval=1, warm_up=0)
    plan = Plan(5, [m.bind(denoiser) for m in as_methods([gate])], cfg=False)
    linear, core = (plan_macs(graphs, plan, include_attention=a) for a in (False, True))
    n, t, d, j = 256, 16, 3072, 4096
    full_linear, full_core = flux_macs(arch.config, n, t)
    # Per double-stream block: norm1_context (6D^2), add_q/k/v and to_add_out (4 t D^2) and ff_context
    # (8 t D^2) are gone; the attention runs n queries over n + t keys. The context embedder is gone too (the
    # text stream comes from the cache).
    saved = 2 * (6 * d * d + 12 * t * d * d) + t * j * d
    saved_core = 2 * (2 * (n + t) ** 2 * d - 2 * n * (n + t) * d)
    assert [s.macs for s in linear.steps] == [full_linear] * 3 + [full_linear - saved] * 2
    assert [s.macs for s in core.steps] == [full_core] * 3 + [full_core - saved - saved_core] * 2


def test_flux_tgate_with_toca_is_refused_naming_both(capsys):
    parser = macs_cli.argparse.ArgumentParser()
    macs_cli.add_arguments(parser)
    args = parser.parse_args(["--arch", "flux_dev", "--gate-step", "10", "--toca"])
    with pytest.raises(ValueError, match="T-GATE.*ToCa"):
        Plan(28, macs_cli.plan_from_args(args, get_arch("flux_dev")).methods, cfg=False)


# --- Wan 2.1 T2V 1.3B --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [1, 2])
def test_wan_counts_match_the_hand_formula(layers):
    arch = _reduced("wan21_t2v_1_3b", num_layers=layers, height=64, width=96, frames=9, text_tokens=24)
    assert (arch.latent_frames, arch.image_tokens) == (3, 3 * 4 * 6)
    assert _counts(arch, batch=2) == wan_macs(arch.config, 3, 8, 12, 24, batch=2)


def test_wan_block_cache_skips_every_block_but_the_first():
    # Wan's rotary embedding fills an empty_like through slices (in-place copies); dead-code elimination must
    # drop those writes with their tensor, or each later block's q/k path (and so every block before it) stays.
    arch = _reduced("wan21_t2v_1_3b", num_layers=3, height=64, width=64, frames=5, text_tokens=16)
    graphs = ArchGraphs(arch, progress=lambda line: None)
    denoiser = arch.build_denoiser()
    plan = Plan(4, [m.bind(denoiser) for m in as_methods([BlockCacheConfig(fora_interval=2)])], cfg=True)
    result = plan_macs(graphs, plan)
    c = arch.config
    one = wan_macs({**c, "num_layers": 1}, 2, 8, 8, 16, batch=2)[0]
    zero = wan_macs({**c, "num_layers": 0}, 2, 8, 8, 16, batch=2)[0]
    full = wan_macs(c, 2, 8, 8, 16, batch=2)[0]
    assert [s.macs for s in result.steps] == [full, one, full, one]
    assert full - one == 2 * (one - zero)  # two of the three blocks skipped


# --- HunyuanVideo -------------------------------------------------------------------------------------------------

def test_hunyuanvideo_blocks_match_the_hand_formula():
    # Its double- and single-stream blocks have FLUX's shapes (24 x 128, MLP ratio 4); 2 latent frames of 4 x 4
    # patches (64 x 64 px, 5 frames) and 16 Llama tokens.
    sizes = dict(height=64, width=64, frames=5, text_tokens=16, num_refiner_layers=1)
    base = _counts(_reduced("hunyuanvideo", num_layers=1, num_single_layers=1, **sizes))
    double = _counts(_reduced("hunyuanvideo", num_layers=2, num_single_layers=1, **sizes))
    single = _counts(_reduced("hunyuanvideo", num_layers=1, num_single_layers=2, **sizes))
    n, t, d = 2 * 4 * 4, 16, 3072
    for counted, block in ((double, _flux_block), (single, _flux_single)):
        lin, att = block(n, t, d)
        assert (counted[0] - base[0], counted[1] - base[1]) == (lin, lin + att)


# --- the calls and the CLI ----------------------------------------------------------------------------------------

def _pipeline_call(pipe, call):
    denoiser = pipe.transformer
    seen = []
    handle = denoiser.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    try:
        pipe(num_inference_steps=1, output_type="latent", **call)
    finally:
        handle.remove()
    return normalize_call(denoiser, *seen[0])[0]


@pytest.mark.parametrize("family", ["flux", "flux2", "wan", "hunyuanvideo"])
def test_arch_call_has_the_structure_of_the_pipeline_call(family):
    # The call Arch.make_call builds is the one the pipeline makes: same inputs, shapes and dtypes.
    build = {"flux": tiny_extra.tiny_flux, "flux2": tiny_extra.tiny_flux2, "wan": tiny_extra.tiny_wan,
             "hunyuanvideo": tiny_extra.tiny_hunyuanvideo}
    pipe, call = build[family](0)
    real = _pipeline_call(pipe, call)
    scale = getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_scale_factor
    config = {k: v for k, v in dict(pipe.transformer.config).items() if not k.startswith("_")}
    arch = Arch(family, family, type(pipe.transformer).__name__, config, height=call["height"], width=call["width"],
                frames=call.get("num_frames", 1), text_tokens=call["prompt_embeds"].shape[1], vae_scale=scale,
                tgate=None)
    made = arch.make_call(1, device="cpu")
    signature = lambda c: [(name, shape, dtype) for name, shape, dtype, _ in signature_of(c).tensors]  # noqa: E731
    assert signature(made) == signature(real)


def test_arch_sizes_are_checked():
    flux = get_arch("flux_dev")
    with pytest.raises(ValueError, match="height=1000 is not a multiple of 16"):
        flux.with_size(1000, 1024)
    with pytest.raises(ValueError, match="frames=9 given for the image architecture 'flux_dev'"):
        flux.with_size(frames=9)
    with pytest.raises(ValueError, match="frames=80 is not 4 k \\+ 1"):
        get_arch("wan21_t2v_1_3b").with_size(frames=80)
    wan = get_arch("wan21_t2v_1_3b")
    assert (wan.latent_frames, wan.image_tokens, wan.cfg, wan.num_steps) == (21, 21 * 30 * 52, True, 50)
    hv = get_arch("hunyuanvideo")
    assert (hv.height, hv.width, hv.frames, hv.latent_frames, hv.image_tokens) == (720, 1280, 129, 33, 33 * 45 * 80)
    call = hv.make_call(1)
    assert call["hidden_states"].shape == (1, 16, 33, 90, 160) and call["encoder_attention_mask"].shape == (1, 256)
    assert all(t.device.type == "meta" for t in call.values() if isinstance(t, torch.Tensor))


def test_macs_cli_needs_a_method_where_no_tgate_setting_is_published(capsys):
    parser = macs_cli.argparse.ArgumentParser()
    macs_cli.add_arguments(parser)
    assert macs_cli.run(parser.parse_args(["--arch", "hunyuanvideo"])) == 2
    err = capsys.readouterr().err
    assert "no method is on for hunyuanvideo" in err and "--toca" in err and "--blockcache" in err
    assert macs_cli.run(parser.parse_args(["--arch", "wan21_t2v_1_3b", "--frames", "80", "--blockcache"])) == 2
    assert "frames=80 is not 4 k + 1" in capsys.readouterr().err
