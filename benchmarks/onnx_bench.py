"""onnxruntime baseline vs onnxruntime T-GATE, on scaled-down SD-1.5 and PixArt-alpha architectures.

For each architecture, in one run of this script:

1. build a pipeline with random seeded weights: the published denoiser
   config (``tgate_fx.archs``) with its widths scaled down (what is scaled is
   printed and written to the results), small text encoder and VAE;
2. export two bundles with :func:`tgate_fx.export.export_onnx`: the plain
   denoiser (one variant) and T-GATE with the paper's settings for the family;
3. run each in the unmodified pipeline through :class:`~tgate_fx.export.OnnxDenoiser`
   on the CPU provider, 25 steps, ``output_type="latent"``: one warm-up
   generation each, then ``--runs`` generations of each, interleaved, and
   report the medians and their ratio; the time inside the denoiser is
   measured too;
4. check the T-GATE bundle against the torch T-GATE runtime (max |diff| of
   the final latents).

Usage::

    python benchmarks/onnx_bench.py            # both architectures, 5 runs each
    python benchmarks/onnx_bench.py --runs 7 --arch sd15

Writes ``benchmarks/results/onnx.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tgate_fx  # noqa: E402
from tgate_fx.archs import PIXART_ALPHA_TRANSFORMER, SD15_UNET, get_arch  # noqa: E402
from tgate_fx.export import OnnxDenoiser, export_onnx  # noqa: E402
from tgate_fx.tiny import make_tokenizer  # noqa: E402

STEPS = 25
PROMPT = "a photo of an astronaut riding a horse on the sea"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "onnx.md")


def _vae(latent_channels: int = 4):
    """4 blocks like the SD VAE (downsampling 8), 8-32 channels instead of 128-512."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(8, 16, 32, 32), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, layers_per_block=1,
    ).eval()


# --- the scaled architectures ------------------------------------------------------------
SD15_SCALED = {"block_out_channels": [64, 128, 256, 256], "cross_attention_dim": 128, "norm_num_groups": 32}
SD15_TEXT = {"hidden": 128, "layers": 2, "tokens": 77}
SD15_SIZE = 256

PIXART_SCALED = {"num_attention_heads": 4, "attention_head_dim": 48, "cross_attention_dim": 192,
                 "caption_channels": 64}
PIXART_TEXT = {"d_model": 64, "layers": 2, "tokens": 120}
PIXART_SIZE = 256


def build_sd15():
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = make_tokenizer(SD15_TEXT["tokens"])
    torch.manual_seed(2)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=SD15_TEXT["hidden"], intermediate_size=4 * SD15_TEXT["hidden"],
        num_hidden_layers=SD15_TEXT["layers"], num_attention_heads=4, max_position_embeddings=SD15_TEXT["tokens"],
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**SD15_UNET, **SD15_SCALED}).eval()
    _unit_output(unet.conv_out, 0.02)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe, {"height": SD15_SIZE, "width": SD15_SIZE, "guidance_scale": 7.5}


def build_pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tok = make_tokenizer(PIXART_TEXT["tokens"], style="t5")
    torch.manual_seed(2)
    text = T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=PIXART_TEXT["d_model"], d_ff=2 * PIXART_TEXT["d_model"], d_kv=16,
        num_layers=PIXART_TEXT["layers"], num_heads=4, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=0)).eval()
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel.from_config({**PIXART_ALPHA_TRANSFORMER, **PIXART_SCALED}).eval()
    _unit_output(transformer.proj_out, 0.02)
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=text, vae=_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    return pipe, {"height": PIXART_SIZE, "width": PIXART_SIZE, "guidance_scale": 4.5,
                  "use_resolution_binning": False, "clean_caption": False,
                  "max_sequence_length": PIXART_TEXT["tokens"]}


def _unit_output(layer, std: float) -> None:
    # Random weights give predictions in the hundreds; a small last layer keeps
    # the latents in a realistic range. It does not change the cost.
    with torch.no_grad():
        layer.weight.normal_(0.0, std)
        if layer.bias is not None:
            layer.bias.zero_()


ARCHS = {
    "sd15": ("SD-1.5 UNet (runwayml/stable-diffusion-v1-5 config)", build_sd15, "sd15",
             f"block_out_channels 320,640,1280,1280 -> {SD15_SCALED['block_out_channels']}; "
             f"cross_attention_dim 768 -> {SD15_SCALED['cross_attention_dim']}; everything else as published "
             "(4 down/up blocks, 2 layers per block, 8 heads, 16 transformer blocks). "
             f"Image {SD15_SIZE}x{SD15_SIZE} (latent {SD15_SIZE // 8}x{SD15_SIZE // 8}) instead of 512x512. "
             f"CLIP text encoder: {SD15_TEXT['layers']} layers, width {SD15_TEXT['hidden']}, "
             f"{SD15_TEXT['tokens']} tokens. VAE: 4 blocks of 8-32 channels (not timed: output_type=latent)."),
    "pixart": ("PixArt-alpha transformer (PixArt-XL-2-1024-MS config)", build_pixart, "pixart_alpha",
               f"heads 16 -> {PIXART_SCALED['num_attention_heads']}, head dim 72 -> "
               f"{PIXART_SCALED['attention_head_dim']} (width 1152 -> "
               f"{PIXART_SCALED['num_attention_heads'] * PIXART_SCALED['attention_head_dim']}); caption_channels "
               f"4096 -> {PIXART_SCALED['caption_channels']}; all 28 layers, patch 2, sample_size 128 (so the "
               f"resolution/aspect conditions run) as published. Image {PIXART_SIZE}x{PIXART_SIZE} (latent "
               f"{PIXART_SIZE // 8}x{PIXART_SIZE // 8}, {(PIXART_SIZE // 16) ** 2} tokens) instead of 1024x1024. "
               f"T5 text encoder: {PIXART_TEXT['layers']} layers, width {PIXART_TEXT['d_model']}, "
               f"{PIXART_TEXT['tokens']} tokens (as published)."),
}


class _Timed:
    """Wraps a denoiser to add up the time spent inside it."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _generate(pipe, call, seed: int = 0):
    return pipe(PROMPT, num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **call).images


def _size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def bench(key: str, runs: int, workdir: str) -> dict:
    title, build, arch_name, scaled = ARCHS[key]
    config = get_arch(arch_name).tgate
    print(f"\n== {title}, scaled: {scaled}", flush=True)
    pipe, call = build()
    pipe.set_progress_bar_config(disable=True)
    attribute = "unet" if hasattr(pipe, "unet") else "transformer"
    denoiser = getattr(pipe, attribute)
    weights = sum(t.numel() * t.element_size() for t in [*denoiser.parameters(), *denoiser.buffers()])
    print(f"   denoiser: {sum(p.numel() for p in denoiser.parameters()) / 1e6:.1f} M parameters, "
          f"{weights / 2**20:.1f} MiB", flush=True)
    export_call = dict(call)
    height, width = export_call.pop("height"), export_call.pop("width")
    dirs = {"baseline": os.path.join(workdir, f"{key}_plain"), "tgate": os.path.join(workdir, f"{key}_tgate")}
    for name, directory in dirs.items():
        print(f"-- export {name}", flush=True)
        export_onnx(pipe, directory, height, width, num_inference_steps=STEPS, tgate=(name == "tgate"),
                    config=config, progress=lambda msg: print(f"   {msg}", flush=True), **export_call)

    print("-- torch T-GATE reference generation", flush=True)
    tgate_fx.optimize(pipe, config=config)
    torch_latents = _generate(pipe, call)
    tgate_fx.restore(pipe)

    timed = {name: _Timed(OnnxDenoiser.from_dir(d, pipeline=pipe)) for name, d in dirs.items()}
    totals: dict[str, list[float]] = {name: [] for name in dirs}
    inside: dict[str, list[float]] = {name: [] for name in dirs}
    cpu: dict[str, list[float]] = {name: [] for name in dirs}
    outputs = {}
    print(f"-- onnxruntime: 1 warm-up + {runs} timed {STEPS}-step generations each, interleaved", flush=True)
    for i in range(runs + 1):
        for name, den in timed.items():
            object.__setattr__(pipe, attribute, den)
            den.seconds = 0.0
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[name] = _generate(pipe, call)
            total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if i > 0:
                totals[name].append(total)
                inside[name].append(den.seconds)
                cpu[name].append(total_cpu)
            print(f"   {'warm-up' if i == 0 else f'run {i}/{runs}'} {name:8s} {total:6.2f} s "
                  f"(denoiser {den.seconds:6.2f} s, process CPU {total_cpu:6.2f} s)", flush=True)
    object.__setattr__(pipe, attribute, denoiser)
    diff = (outputs["tgate"] - torch_latents).abs().max().item()
    return {
        "key": key, "title": title, "scaled": scaled, "config": config, "weights": weights,
        "params": sum(p.numel() for p in denoiser.parameters()),
        "sizes": {name: _size(d) for name, d in dirs.items()},
        "files": {name: len([f for f in os.listdir(d) if f.endswith(".onnx")]) for name, d in dirs.items()},
        "median": {name: statistics.median(v) for name, v in totals.items()},
        "inside": {name: statistics.median(v) for name, v in inside.items()},
        "cpu": {name: statistics.median(v) for name, v in cpu.items()},
        "runs": totals, "diff": diff, "scale": torch_latents.abs().max().item(),
        "tgate_vs_plain": (outputs["tgate"] - outputs["baseline"]).abs().max().item(),
    }


def _table(results: list[dict]) -> list[str]:
    rows = [("architecture", "baseline (s)", "T-GATE (s)", "speed-up", "denoiser speed-up", "CPU baseline (s)",
             "CPU T-GATE (s)", "CPU-time ratio")]
    for r in results:
        m, d, c = r["median"], r["inside"], r["cpu"]
        rows.append((r["key"], f"{m['baseline']:.2f}", f"{m['tgate']:.2f}", f"{m['baseline'] / m['tgate']:.2f}x",
                     f"{d['baseline'] / d['tgate']:.2f}x", f"{c['baseline']:.2f}", f"{c['tgate']:.2f}",
                     f"{c['baseline'] / c['tgate']:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return lines


def _markdown(results: list[dict], runs: int, load: tuple) -> str:
    import onnxruntime

    out = ["# onnxruntime: baseline vs T-GATE", "",
           f"Measured by `python benchmarks/onnx_bench.py --runs {runs}` on {platform.machine()} with "
           f"{os.cpu_count()} cores (shared: load average {load[0]:.1f} before, {load[1]:.1f} after), "
           f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider (default session options), "
           f"torch {torch.__version__}. Random weights; {STEPS} steps, `output_type=\"latent\"`. "
           f"Each time is the median of {runs} generations after one warm-up; baseline and T-GATE "
           "generations alternate, so both see the same load. Times are wall-clock medians; *denoiser "
           "speed-up* is the ratio of the medians of the time inside `OnnxDenoiser` calls (the rest of "
           "a generation is text encoding and the scheduler); *CPU* is the process CPU time (all threads, "
           "onnxruntime's spinning included), which other processes on a shared machine disturb less "
           "than wall time.", ""]
    out += _table(results)
    for r in results:
        c = r["config"]
        out += ["", f"## {r['key']}: {r['title']}", "",
                f"- Scaled: {r['scaled']}",
                f"- Denoiser: {r['params'] / 1e6:.1f} M parameters, {r['weights'] / 2**20:.1f} MiB of weights.",
                f"- T-GATE: gate_step={c.gate_step}, sp_interval={c.sp_interval}, fi_interval={c.fi_interval}, "
                f"warm_up={c.warm_up}.",
                f"- Bundles: baseline {r['files']['baseline']} model, {r['sizes']['baseline'] / 2**20:.1f} MiB; "
                f"T-GATE {r['files']['tgate']} models, {r['sizes']['tgate'] / 2**20:.1f} MiB "
                f"({r['sizes']['tgate'] / r['weights']:.3f} x the denoiser's weights).",
                f"- Wall time of each run (s): baseline {', '.join(f'{t:.2f}' for t in r['runs']['baseline'])}; "
                f"T-GATE {', '.join(f'{t:.2f}' for t in r['runs']['tgate'])}.",
                f"- ONNX T-GATE vs torch T-GATE final latents: max |diff| {r['diff']:.2e} "
                f"(max |latent| {r['scale']:.3g}); T-GATE vs baseline: {r['tgate_vs_plain']:.3g}."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed generations per variant (default 5, >= 5)")
    parser.add_argument("--arch", choices=[*ARCHS, "all"], default="all")
    parser.add_argument("--out", default=RESULTS, help="markdown results file")
    args = parser.parse_args(argv)
    if args.runs < 5:
        parser.error(f"--runs must be >= 5 for a median, got {args.runs}")
    keys = list(ARCHS) if args.arch == "all" else [args.arch]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tgate_fx_onnx_bench_") as workdir:
        results = [bench(k, args.runs, workdir) for k in keys]
    load_after = os.getloadavg()[0]
    print()
    print("\n".join(_table(results)))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(_markdown(results, args.runs, (load_before, load_after)))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
