"""Speed of ToCa, the block cache and T-GATE on a scaled FLUX.1 and a scaled Wan 2.1, beside diffusers'
FirstBlockCache and cache-dit's DBCache, in one run on this CPU; each tgate_fx method against its MAC-ideal.

Workloads (random seeded weights, ``prompt_embeds`` passed directly, ``output_type="latent"``, so the
VAE never runs):

* **FLUX**: ``FluxPipeline`` with a ``FluxTransformer2DModel`` of FLUX.1-dev's config (24 heads x 128 =
  3072 wide, T5 width 4096, guidance embedded) but ``--flux-double`` double- and ``--flux-single``
  single-stream blocks; ``--flux-size`` px (latents 2 x 2-packed: ``(size / 16)^2`` image tokens),
  ``--flux-text`` text tokens, no true CFG (one call a step, as FLUX.1-dev runs).
* **Wan**: ``WanPipeline`` with a ``WanTransformer3DModel`` of Wan 2.1 T2V 1.3B's config (12 heads x 128 =
  1536 wide, FFN 8960, UMT5 width 4096) but ``--wan-layers`` blocks; ``--wan-frames`` frames of
  ``--wan-size`` px (1 x 2 x 2 patches), ``--wan-text`` text tokens, CFG 5.0 (two calls a step, as
  WanPipeline runs it).

The sizes are small because the full-size token counts (FLUX.1-dev at 512 x 512 has 1024 image tokens)
take tens of seconds per step at this width on one CPU thread; the width (and so the cost per token of
each projection and MLP) is the real one.

Columns (one pipeline per model; each tgate_fx column has its own runtime, installed in turn, so its
captures and graph variants are made once, in the untimed warm-up round):

* ``baseline``: the pipeline as built.
* ``toca``: ``optimize(pipe, toca=ToCaConfig())`` (the family's official defaults).
* ``fora3``: ``BlockCacheConfig(fora_interval=3)``.
* ``bc0.1``: ``BlockCacheConfig(threshold=0.1)``.
* ``tgate``: ``TGateConfig(gate_step=G, sp_interval=1, fi_interval=1, warm_up=0)`` (the gate alone):
  on FLUX the joint-attention rule, on Wan cross-attention with split CFG (the unconditional call
  dropped after the gate).
* ``fora3+toca``, ``bc0.1+toca``: the compositions.
* ``fbc0.1``: diffusers' ``transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))``.
* ``dbcache0.1``: cache-dit ``enable_cache(pipe, cache_config=DBCacheConfig(Fn_compute_blocks=1,
  Bn_compute_blocks=0, residual_diff_threshold=0.1, max_warmup_steps=1, ...))`` (F1B0: the same rule
  as FirstBlockCache; cache-dit's defaults F8B0 and 8 warm-up steps would cache nothing on these few
  blocks and steps). cache-dit runs on its own pipeline around a copy of the same transformer (same
  weights), enabled once: ``cache_dit.disable_cache`` leaves the transformer's forward patched, and a
  baseline run after it failed inside diffusers' FirstBlockCache hook.

Timing: one untimed warm-up round over every column, then ``--rounds`` rounds, each running every
column once in a rotated order with a baseline run before every ``--baseline-every`` (2) columns
(``baseline, c1, c2, baseline, c3, c4, ..., baseline``); a column's time is the median of its rounds,
the baseline's the median of all its runs; the spread (min-max) is reported. ``torch.set_num_threads(1)``, ``OMP_WAIT_POLICY=PASSIVE``.

MAC-ideal: ``plan_macs`` of the same plan on the same architecture captured on the meta device (Linear
+ Conv + matmuls + the SDPA core; gathers, scatters and top-k not counted). A threshold column's steps
are counted with the choices (compute / skip) it actually took, per call (read from the runtime's
trace; Wan's two CFG calls averaged). The peers' skips are read from whether their last block's last
module ran; their MAC-equivalent is the tgate_fx block cache's count of the same skip pattern.

Usage::

    nohup python benchmarks/transformer_speed.py > /tmp/transformer_speed.log 2>&1 &
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import replace  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from common import machine  # noqa: E402

import tgate_fx  # noqa: E402
from tgate_fx import BlockCacheConfig, TGateConfig, ToCaConfig  # noqa: E402
from tgate_fx.accounting.macs import plan_macs  # noqa: E402
from tgate_fx.archs import ArchGraphs, get_arch  # noqa: E402
from tgate_fx.core.hook import install, uninstall  # noqa: E402
from tgate_fx.core.plan import Plan  # noqa: E402
from tgate_fx.methods import as_methods  # noqa: E402

RESULTS = HERE / "results"
FX_COLUMNS = ("toca", "fora3", "bc0.1", "tgate", "fora3+toca", "bc0.1+toca")
PEERS = ("fbc0.1", "dbcache0.1")


def _log(msg: str) -> None:
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {msg}", flush=True)


def fx_methods(column: str, gate: int) -> list:
    table = {"toca": [ToCaConfig()], "fora3": [BlockCacheConfig(fora_interval=3)],
             "bc0.1": [BlockCacheConfig(threshold=0.1)],
             "tgate": [TGateConfig(gate_step=gate, sp_interval=1, fi_interval=1, warm_up=0)],
             "fora3+toca": [BlockCacheConfig(fora_interval=3), ToCaConfig()],
             "bc0.1+toca": [BlockCacheConfig(threshold=0.1), ToCaConfig()]}
    return table[column]


def build(model: str, args):
    """The pipeline, its call, the meta-device Arch of the same config and size, and the module whose run
    tells that the last block ran."""
    from diffusers import (AutoencoderKL, AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           WanPipeline)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    if model == "flux":
        base = get_arch("flux_dev")
        config = {**base.config, "num_layers": args.flux_double, "num_single_layers": args.flux_single}
        arch = replace(base, name="flux_scaled", config=config, height=args.flux_size, width=args.flux_size,
                       text_tokens=args.flux_text, num_steps=args.steps)
        transformer = arch.build_denoiser("cpu")
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
                            latent_channels=16, norm_num_groups=1, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4).eval()
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                            tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
        call = dict(prompt_embeds=torch.randn(1, args.flux_text, 4096, generator=g),
                    pooled_prompt_embeds=torch.randn(1, 768, generator=g), height=args.flux_size,
                    width=args.flux_size, guidance_scale=3.5, max_sequence_length=args.flux_text)
        tail = transformer.single_transformer_blocks[-1].proj_out if args.flux_single else \
            transformer.transformer_blocks[-1].ff_context
    else:
        base = get_arch("wan21_t2v_1_3b")
        config = {**base.config, "num_layers": args.wan_layers}
        arch = replace(base, name="wan_scaled", config=config, height=args.wan_size, width=args.wan_size,
                       frames=args.wan_frames, text_tokens=args.wan_text, num_steps=args.steps)
        transformer = arch.build_denoiser("cpu")
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True]).eval()
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
        call = dict(prompt_embeds=torch.randn(1, args.wan_text, 4096, generator=g),
                    negative_prompt_embeds=torch.randn(1, args.wan_text, 4096, generator=g),
                    height=args.wan_size, width=args.wan_size, num_frames=args.wan_frames, guidance_scale=5.0,
                    max_sequence_length=args.wan_text)
        tail = transformer.blocks[-1].ffn
    pipe.set_progress_bar_config(disable=True)
    call.update(num_inference_steps=args.steps, output_type="latent")
    return pipe, call, arch, tail


class TailProbe:
    """Per transformer call: whether the last block's last module ran (False: the blocks were skipped)."""

    def __init__(self, transformer, tail):
        self.calls: list[bool] = []
        self.on = False
        transformer.register_forward_pre_hook(self._call)
        tail.register_forward_hook(self._tail)

    def _call(self, module, args):
        if self.on:
            self.calls.append(False)

    def _tail(self, module, args, out):
        if self.on and self.calls:
            self.calls[-1] = True


class Bench:
    def __init__(self, model: str, args):
        self.model, self.args = model, args
        self.gate = args.flux_gate if model == "flux" else args.wan_gate
        self.pipe, self.call, self.arch, tail = build(model, args)
        self.den = self.pipe.transformer
        self.probe = TailProbe(self.den, tail)
        # cache-dit patches the transformer's forward and leaves it patched after disable_cache (a baseline
        # run after it failed inside diffusers' FirstBlockCache hook): it gets its own pipeline, a copy of
        # the same transformer (same weights), enabled once and never disabled.
        peer = copy.deepcopy(self.den)
        self.peer_pipe = type(self.pipe)(**{**self.pipe.components, "transformer": peer})
        self.peer_pipe.set_progress_bar_config(disable=True)
        peer_tail = peer.single_transformer_blocks[-1].proj_out if model == "flux" and args.flux_single else \
            (peer.transformer_blocks[-1].ff_context if model == "flux" else peer.blocks[-1].ffn)
        self.peer_probe = TailProbe(peer, peer_tail)
        self.peer_on = False
        self.runtimes: dict[str, object] = {}
        self.active: str | None = None
        self.skips: dict[str, list] = {}  # column -> per call: True where it skipped the blocks
        self.refused: dict[str, str] = {}

    # --- switching columns ---------------------------------------------------------------------------
    def _off(self) -> None:
        if self.active in self.runtimes:
            uninstall(self.den)
        elif self.active == "fbc0.1":
            self.den.disable_cache()
        self.active = None

    def _on(self, column: str) -> None:
        if column == "baseline":
            pass
        elif column in FX_COLUMNS:
            if column in self.runtimes:
                install(self.den, self.runtimes[column])
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tgate_fx.optimize(self.pipe, methods=fx_methods(column, self.gate))
                self.runtimes[column] = tgate_fx.get_runtime(self.pipe)
        elif column == "fbc0.1":
            from diffusers import FirstBlockCacheConfig

            self.den.enable_cache(FirstBlockCacheConfig(threshold=0.1))
        elif column == "dbcache0.1" and not self.peer_on:
            import cache_dit
            from cache_dit import DBCacheConfig

            self.peer_on = True
            cache_dit.enable_cache(self.peer_pipe, cache_config=DBCacheConfig(
                Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.1, max_warmup_steps=1,
                num_inference_steps=self.args.steps))
        self.active = column

    def run(self, column: str, *, record: bool = False) -> float:
        self._off()
        self._on(column)
        pipe, probe = (self.peer_pipe, self.peer_probe) if column == "dbcache0.1" else (self.pipe, self.probe)
        probe.calls, probe.on = [], True
        trace_cm = self.runtimes[column].tracing() if record and column in self.runtimes else None
        trace = trace_cm.__enter__() if trace_cm is not None else None
        start = time.perf_counter()
        try:
            result = pipe(generator=torch.Generator().manual_seed(0), **self.call)
            out = result.frames if hasattr(result, "frames") else result.images
        finally:
            elapsed = time.perf_counter() - start
            if trace_cm is not None:
                trace_cm.__exit__(None, None, None)
            probe.on = False
        if not torch.isfinite(out).all():
            raise RuntimeError(f"{self.model} {column}: non-finite latents")
        if record:
            if trace is not None:
                self.skips[column] = self._trace_skips(trace)
            elif column in PEERS:
                self.skips[column] = [not ran for ran in probe.calls]
        return elapsed

    @staticmethod
    def _trace_skips(trace) -> list:
        """Per call (in call order): True where its variant was a block-cache skip."""
        # a choice call appends its head ("...~head"), then its alternative ("...~compute" / "...~skip")
        ends = [variant.name for _plan, _graphs, variant in trace if not variant.name.endswith("~head")]
        return ["~skip" in name for name in ends]

    # --- MACs -------------------------------------------------------------------------------------------
    def macs(self) -> dict:
        graphs = ArchGraphs(self.arch, progress=lambda m: _log("  " + m.strip()))
        cfg = self.model == "wan"
        split = cfg
        denoiser = self.arch.build_denoiser()
        out: dict[str, float] = {}
        base = None
        for column in (*FX_COLUMNS, *PEERS):
            if self.args.columns is not None and column not in self.args.columns:
                continue
            configs = fx_methods(column, self.gate) if column in FX_COLUMNS else [BlockCacheConfig(threshold=0.1)]
            try:
                methods = [m.bind(denoiser) for m in as_methods(configs)]
                plan = Plan(self.args.steps, methods, cfg=cfg, split=split)
                skips = self.skips.get(column)
                threshold = column in ("bc0.1", "bc0.1+toca", *PEERS)
                if threshold and skips is None:
                    raise ValueError("its skips were not recorded")
                if threshold:
                    per = 2 if split else 1
                    totals = []
                    for half in range(per):
                        pattern = {i // per: ("skip" if s else "compute") for i, s in enumerate(skips)
                                   if i % per == half}
                        totals.append(plan_macs(graphs, plan, include_attention=True, choices=pattern))
                    out[column] = sum(t.total for t in totals) / len(totals)
                    base = totals[0].baseline
                else:
                    counted = plan_macs(graphs, plan, include_attention=True)
                    out[column] = counted.total
                    base = counted.baseline
            except (TypeError, ValueError, RuntimeError) as e:
                out[column] = None
                self.refused.setdefault(column, f"MACs not counted: {e}")
        out["baseline"] = base
        return out


def median(xs):
    return statistics.median(xs) if xs else None


def bench_model(model: str, args) -> dict:
    _log(f"{model}: building")
    b = Bench(model, args)
    columns = ["baseline", *[c for c in (*FX_COLUMNS, *PEERS) if args.columns is None or c in args.columns]]
    times: dict[str, list[float]] = {c: [] for c in columns}
    warm: dict[str, float] = {}
    _log(f"{model}: warm-up round (captures, variants, skip records)")
    for c in columns:
        try:
            warm[c] = b.run(c, record=True)
            _log(f"  warm {c}: {warm[c]:.2f}s skips={b.skips.get(c)}")
        except Exception as e:  # a column that cannot run: say why, go on
            b.refused[c] = f"{type(e).__name__}: {e}"
            b._off()
            _log(f"  {c} FAILED: {b.refused[c][:400]}")
    live = [c for c in columns[1:] if c not in b.refused]
    for r in range(args.rounds):
        order = live[r % len(live):] + live[:r % len(live)]
        seq = []
        for i, c in enumerate(order):  # the baseline before every other column, and last
            seq += (["baseline"] if i % args.baseline_every == 0 else []) + [c]
        seq.append("baseline")
        for c in seq:
            times[c].append(b.run(c))
        _log(f"{model} round {r + 1}: " + ", ".join(f"{c} {times[c][-1]:.2f}" for c in live)
             + f"; baseline median {median(times['baseline']):.2f}")
    b._off()
    _log(f"{model}: counting MACs")
    macs = b.macs()
    res = {"model": model, "arch_config": {k: v for k, v in b.arch.config.items() if not k.startswith("_")},
           "height": b.arch.height, "width": b.arch.width, "frames": b.arch.frames,
           "image_tokens": b.arch.image_tokens, "text_tokens": b.arch.text_tokens, "steps": args.steps,
           "gate_step": b.gate, "calls_per_generation": len(b.skips.get("bc0.1") or []) or None,
           "times": times, "warmup": warm, "macs": macs, "skips": b.skips, "refused": b.refused}
    del b
    return res


def rows(res: dict) -> list[dict]:
    base_t = median(res["times"]["baseline"])
    base_m = res["macs"].get("baseline")
    out = []
    for c, ts in res["times"].items():
        if not ts:
            out.append({"column": c, "refused": res["refused"].get(c, "not run")})
            continue
        t = median(ts)
        speed = base_t / t
        m = res["macs"].get(c) if c != "baseline" else base_m
        ideal = base_m / m if (m and base_m) else None
        sk = res["skips"].get(c)
        out.append({"column": c, "median_s": t, "min_s": min(ts), "max_s": max(ts), "runs": len(ts),
                    "speedup": speed, "mac_ideal": ideal if c != "baseline" else 1.0,
                    "measured_over_ideal": speed / ideal if ideal else None,
                    "skipped_calls": (sum(sk), len(sk)) if sk is not None else None,
                    "note": res["refused"].get(c)})
    return out


TITLES = {"baseline": "baseline (diffusers)", "toca": "ToCa defaults", "fora3": "block cache, FORA 3",
          "bc0.1": "block cache, threshold 0.1", "tgate": "T-GATE (gate only)", "fora3+toca": "FORA 3 + ToCa",
          "bc0.1+toca": "threshold 0.1 + ToCa", "fbc0.1": "diffusers FirstBlockCache 0.1",
          "dbcache0.1": "cache-dit DBCache F1B0 0.1"}


def table(res: dict) -> list[str]:
    lines = ["| column | median s (min-max, runs) | speed-up | MAC-ideal | measured / ideal | skipped calls |",
             "|---|---|---|---|---|---|"]
    for r in rows(res):
        if "refused" in r:
            lines.append(f"| {TITLES[r['column']]} | did not run: {r['refused'][:300]} | | | | |")
            continue
        ideal = f"{r['mac_ideal']:.2f}x" if r["mac_ideal"] else "-"
        ratio = f"{r['measured_over_ideal']:.2f}" if r["measured_over_ideal"] else "-"
        sk = f"{r['skipped_calls'][0]} of {r['skipped_calls'][1]}" if r["skipped_calls"] else "-"
        peer = " (MAC-equivalent: tgate_fx's block cache with the same skips)" if r["column"] in PEERS else ""
        lines.append(f"| {TITLES[r['column']]} | {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}, "
                     f"{r['runs']}) | {r['speedup']:.2f}x | {ideal}{peer} | {ratio} | {sk} |")
    return lines


def describe(res: dict) -> str:
    c = res["arch_config"]
    if res["model"] == "flux":
        return (f"FLUX (FluxPipeline, FLUX.1-dev width {c['num_attention_heads']} x {c['attention_head_dim']}, "
                f"{c['num_layers']} double + {c['num_single_layers']} single blocks, random weights): "
                f"{res['height']} x {res['width']} px = {res['image_tokens']} image tokens, {res['text_tokens']} "
                f"text tokens, {res['steps']} steps, no true CFG (1 call a step), T-GATE gate {res['gate_step']}")
    return (f"Wan 2.1 (WanPipeline, Wan 1.3B width {c['num_attention_heads']} x {c['attention_head_dim']}, "
            f"FFN {c['ffn_dim']}, {c['num_layers']} blocks, random weights): {res['frames']} frames of "
            f"{res['height']} x {res['width']} px = {res['image_tokens']} video tokens, {res['text_tokens']} text "
            f"tokens, {res['steps']} steps, CFG 5.0 as two calls a step, T-GATE gate {res['gate_step']}")


def write(results: list[dict], argv: list[str], wall: float, name: str = "transformer_speed") -> None:
    RESULTS.mkdir(exist_ok=True)
    md = ["# Transformer speed: scaled FLUX and Wan 2.1 on this CPU", "",
          f"`python benchmarks/transformer_speed.py {' '.join(argv)}` "
          f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {wall / 60:.1f} min).", "",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in machine().items())
          + "; torch threads 1, OMP_WAIT_POLICY=PASSIVE; the machine was shared with other jobs.", "",
          "Speed-up = baseline median / column median (wall time of one whole generation, latent output). "
          "MAC-ideal = baseline MACs / column MACs (`plan_macs`, Linear + Conv + matmuls + SDPA core, the same "
          "plan on the same architecture on the meta device; threshold columns counted with the skips they "
          "took). Skipped calls: denoiser calls where the blocks after the first were skipped.", ""]
    for res in results:
        md += [f"## {res['model']}", "", describe(res), "", *table(res), ""]
        for c, why in res["refused"].items():
            md.append(f"- {TITLES[c]}: {why[:600]}")
        md.append("")
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"argv": argv, "machine": machine(), "wall_s": wall,
         "results": [{**r, "rows": rows(r)} for r in results]}, indent=1, default=str))
    try:
        plot(results, RESULTS / f"{name}.png")
    except ImportError as e:
        print(f"no plot: {e}")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results):
        rs = [r for r in rows(res) if "refused" not in r and r["column"] != "baseline"]
        x = range(len(rs))
        ax.bar([i - 0.2 for i in x], [r["speedup"] for r in rs], 0.4, label="measured")
        ax.bar([i + 0.2 for i in x], [r["mac_ideal"] or 0 for r in rs], 0.4, label="MAC-ideal")
        for i, r in enumerate(rs):
            ax.plot([i - 0.4, i], [r["max_s"] and median(res["times"]["baseline"]) / r["max_s"]] * 2, "k-", lw=0.5)
            ax.plot([i - 0.4, i], [median(res["times"]["baseline"]) / r["min_s"]] * 2, "k-", lw=0.5)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xticks(list(x), [TITLES[r["column"]].replace(", ", "\n").replace(" + ", "\n+ ") for r in rs],
                      fontsize=6, rotation=30)
        ax.set_ylabel("speed-up over baseline")
        ax.set_title(f"{res['model']}: {res['image_tokens']} image + {res['text_tokens']} text tokens, "
                     f"{res['steps']} steps", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="flux,wan")
    p.add_argument("--name", default="transformer_speed", help="results file stem in benchmarks/results")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline-every", type=int, default=2, help="a baseline run before every N-th column")
    p.add_argument("--columns", default=None, type=lambda v: tuple(v.split(",")),
                   help=f"a subset of the columns (comma-separated; default all: {','.join((*FX_COLUMNS, *PEERS))})")
    p.add_argument("--flux-double", type=int, default=2)
    p.add_argument("--flux-single", type=int, default=2)
    p.add_argument("--flux-size", type=int, default=128)
    p.add_argument("--flux-text", type=int, default=32)
    p.add_argument("--flux-gate", type=int, default=3)
    p.add_argument("--wan-layers", type=int, default=3)
    p.add_argument("--wan-size", type=int, default=96)
    p.add_argument("--wan-frames", type=int, default=9)
    p.add_argument("--wan-text", type=int, default=32)
    p.add_argument("--wan-gate", type=int, default=3)
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = []
    for model in args.models.split(","):
        results.append(bench_model(model, args))
        write(results, argv, time.perf_counter() - start, args.name)  # after each model: a partial result survives
        for line in table(results[-1]):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
