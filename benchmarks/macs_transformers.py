"""MACs of FLUX.1-dev, FLUX.2-dev, Z-Image-Turbo, Wan 2.1 T2V 1.3B and HunyuanVideo under ToCa, the block cache, T-GATE and their compositions.

Every figure is counted on the graphs (:func:`tgate_fx.plan_macs`): each
architecture is built on the ``meta`` device from its published config
(:mod:`tgate_fx.archs`: ``flux_dev``, ``flux2_dev``, ``zimage_turbo``, ``wan21_t2v_1_3b``,
``hunyuanvideo``),
exported at the batches its plan runs at, and every step's graph variant is
counted after its dead code is removed. Two counts per row: Linear + Conv +
matmuls + the SDPA core (Q K^T and A V; the count the official ToCa FLOPs
figures use: calflops over the whole model, attention included) and Linear +
Conv + matmuls alone (T-GATE's convention). Gathers, scatters and top-k are not
counted (no multiply-accumulates).

Settings:

* FLUX.1-dev 1024 x 1024 (4096 image tokens, 512 T5 tokens), guidance-distilled
  (one call a step, no CFG), 28 steps (FluxPipeline's default) and 50 steps
  (the official ToCa FLUX runs: ``flux-ToCa/src/sample.py --width 1024 --height
  1024 --num_steps 50``). ToCa: the defaults (``ToCaConfig()``: the official
  flux-ToCa ``cache_init``, N = 4, R = 0.1) and the README's other rows
  ToCa5-01, ToCa6-01 (N = 5, 6, R = 0.1) and FORA3 (``ratio=0``, N = 3: every
  block's attention and MLP reused on partial steps). T-GATE: the joint-attention
  rule with a gate at step 10 (chosen: no published T-GATE setting on FLUX;
  ``sp_interval = fi_interval = 1``, ``warm_up = 0``: the gate alone). Block
  cache: FORA's fixed interval (``BlockCacheConfig(fora_interval=3)``): a
  threshold decides at run time, so it cannot be counted on the graphs alone.
* FLUX.2-dev 1024 x 1024 (4096 image tokens, 512 Mistral 3 tokens), guidance
  embedded (one call a step), 50 steps (Flux2Pipeline's default). No official
  ToCa code exists for FLUX.2: ToCa runs FLUX's rules (``ToCaConfig()``), its
  parallel single-stream block's rule chosen (docs/toca.md). T-GATE: the
  joint-attention rule on the double-stream blocks, a gate at step 20 (chosen,
  40 % of the steps, as for Wan).
* Z-Image-Turbo 1024 x 1024 (4096 image tokens, a caption of 128 Qwen3 tokens:
  chosen), 8 steps, no guidance (its model card's setting). ToCa: FLUX's rules
  on its one sequence (chosen, docs/toca.md). T-GATE is refused there (no
  cross-attention; its row shows the reason).
* Wan 2.1 T2V 1.3B at 480p (832 x 480, 81 frames: 21 latent frames, 32760
  tokens; 512 UMT5 tokens), 50 steps, CFG (two denoiser calls a step: counted
  as the CFG batch of 2, the same MACs). T-GATE (cross-attention): a gate at
  step 20 (chosen, 40 % of the steps as SD's published 10 of 25; the gate alone).
  ToCa: the official Open-Sora rules (family ``"opensora"``: N = 3, R = 0.1; the
  cross-attention reused, the MLP refreshed on the top-k).
* HunyuanVideo at its pipeline's default size, 720p (1280 x 720, 129 frames: 33
  latent frames, 118800 tokens; 256 Llama tokens), 50 steps, guidance embedded
  (no CFG). T-GATE is refused there (its row shows the reason).

The official figures (Shenyi-Z/ToCa at e84096ff, README.md, "Awesome acceleration
results for the Latest Version of ToCa on FLUX"; FLUX.1-dev, 50 steps,
1024 x 1024): FLOPs 3719.50 T (original), 1320.07 T (FORA3, compression 2.82),
1263.22 T (ToCa4-01, 2.94), 1126.76 T (ToCa5-01, 3.30), 990.30 T (ToCa6-01,
3.76). Their "Speed Up" column (2.61x, 2.84x, 3.14x, 3.57x) is latency on a GPU,
not FLOPs.

Captures are timed without the on-disk capture store (``TGATE_FX_CAPTURE_CACHE=0``
unless set): the first capture of an architecture is one ``torch.export`` on the
meta device, each further batch size a specialisation of it.

Usage::

    python benchmarks/macs_transformers.py                 # all five, writes benchmarks/results/macs_transformers.md
    python benchmarks/macs_transformers.py --arch flux_dev --out /tmp/flux.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

os.environ.setdefault("TGATE_FX_CAPTURE_CACHE", "0")  # time the exports themselves, not a store's load

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine  # noqa: E402

from tgate_fx.accounting.macs import count_macs, format_macs, plan_macs  # noqa: E402
from tgate_fx.archs import ArchGraphs, get_arch  # noqa: E402
from tgate_fx.core.plan import Plan  # noqa: E402
from tgate_fx.methods import BlockCacheConfig, TGateConfig, ToCaConfig, as_methods  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# flux-ToCa README.md (Shenyi-Z/ToCa at e84096ffd85af4540a6a1f64e3334e428e1b7377): FLOPs in T and the FLOPs
# compression ratio, FLUX.1-dev, 50 steps, 1024 x 1024.
OFFICIAL_FLUX = {"original": (3719.50, 1.00), "FORA3": (1320.07, 2.82), "ToCa4-01": (1263.22, 2.94),
                 "ToCa5-01": (1126.76, 3.30), "ToCa6-01": (990.30, 3.76)}


def _gate(step: int) -> TGateConfig:
    return TGateConfig(gate_step=step, sp_interval=1, fi_interval=1, warm_up=0)


FORA3 = BlockCacheConfig(fora_interval=3)


@dataclass(frozen=True)
class Row:
    label: str
    steps: int
    methods: tuple
    official: str | None = None  # key of OFFICIAL_FLUX


ROWS = {
    "flux_dev": [
        Row("baseline", 28, ()),
        Row("ToCa defaults (N=4, R=0.1)", 28, (ToCaConfig(),)),
        Row("block cache, FORA interval 3", 28, (FORA3,)),
        Row("T-GATE joint rule, gate 10", 28, (_gate(10),)),
        Row("T-GATE gate 10 + block cache (3)", 28, (_gate(10), FORA3)),
        Row("ToCa defaults + block cache (3)", 28, (ToCaConfig(), FORA3)),
        Row("T-GATE gate 10 + ToCa", 28, (_gate(10), ToCaConfig())),
        Row("baseline", 50, (), "original"),
        Row("ToCa4-01 (the defaults)", 50, (ToCaConfig(interval=4, ratio=0.1),), "ToCa4-01"),
        Row("ToCa5-01", 50, (ToCaConfig(interval=5, ratio=0.1),), "ToCa5-01"),
        Row("ToCa6-01", 50, (ToCaConfig(interval=6, ratio=0.1),), "ToCa6-01"),
        Row("FORA3 as ToCa runs it (ratio 0, N=3)", 50, (ToCaConfig(interval=3, ratio=0.0),), "FORA3"),
        Row("block cache, FORA interval 3", 50, (FORA3,)),
        Row("ToCa4-01 + block cache (3)", 50, (ToCaConfig(interval=4, ratio=0.1), FORA3)),
    ],
    "flux2_dev": [
        Row("baseline", 50, ()),
        Row("ToCa defaults (FLUX rules, N=4, R=0.1)", 50, (ToCaConfig(),)),
        Row("block cache, FORA interval 3", 50, (FORA3,)),
        Row("ToCa defaults + block cache (3)", 50, (ToCaConfig(), FORA3)),
        Row("T-GATE joint rule, gate 20", 50, (_gate(20),)),
        Row("T-GATE gate 20 + block cache (3)", 50, (_gate(20), FORA3)),
    ],
    "zimage_turbo": [
        Row("baseline", 8, ()),
        Row("ToCa defaults (FLUX rules, N=4, R=0.1)", 8, (ToCaConfig(),)),
        Row("block cache, FORA interval 3", 8, (FORA3,)),
        Row("ToCa defaults + block cache (3)", 8, (ToCaConfig(), FORA3)),
        Row("T-GATE gate 4", 8, (_gate(4),)),
    ],
    "wan21_t2v_1_3b": [
        Row("baseline", 50, ()),
        Row("ToCa defaults (Open-Sora rules, N=3, R=0.1)", 50, (ToCaConfig(),)),
        Row("block cache, FORA interval 3", 50, (FORA3,)),
        Row("ToCa defaults + block cache (3)", 50, (ToCaConfig(), FORA3)),
        Row("T-GATE gate 20", 50, (_gate(20),)),
        Row("T-GATE gate 20 + block cache (3)", 50, (_gate(20), FORA3)),
        Row("T-GATE gate 20 + ToCa", 50, (_gate(20), ToCaConfig())),
    ],
    "hunyuanvideo": [
        Row("baseline", 50, ()),
        Row("ToCa defaults (N=4, R=0.1)", 50, (ToCaConfig(),)),
        Row("block cache, FORA interval 3", 50, (FORA3,)),
        Row("ToCa defaults + block cache (3)", 50, (ToCaConfig(), FORA3)),
        Row("T-GATE gate 20", 50, (_gate(20),)),
    ],
}


def _settings(methods) -> str:
    parts = []
    for m in methods:
        d = {k: v for k, v in m.config.to_dict().items() if v is not None}
        if m.name == "toca":
            d = {k: d[k] for k in ("family", "interval", "ratio", "schedule")}
        parts.append(f"{m.name}({', '.join(f'{k}={v}' for k, v in d.items())})")
    return " + ".join(parts) or "-"


def count_arch(name: str, log=print) -> tuple[list[dict], dict]:
    """Count every row of ``name``; returns the rows and the capture times."""
    arch = get_arch(name)
    times: dict[str, float] = {}
    lines: list[str] = []

    def progress(line: str) -> None:
        log(line)
        lines.append(line)

    graphs = ArchGraphs(arch, progress=progress)
    start = time.perf_counter()
    denoiser = arch.build_denoiser()
    times["build on meta"] = time.perf_counter() - start
    out, baselines = [], {}
    for row in ROWS[name]:
        entry = {"arch": arch, "row": row}
        start = time.perf_counter()
        try:
            methods = [m.bind(denoiser) for m in as_methods(list(row.methods))]
            if not methods:  # the baseline: the capture as exported, at the CFG batch where CFG runs, every step
                captured = graphs(2 if arch.cfg else 1)
                core = count_macs(captured.capture.graph_module, include_attention=True).total * row.steps
                linear = count_macs(captured.capture.graph_module).total * row.steps
                entry.update(settings="-", core=core, linear=linear, base_core=core, base_linear=linear, peak=1.0)
                baselines[row.steps] = (core, linear)
            else:
                plan = Plan(row.steps, methods, cfg=arch.cfg)
                core = plan_macs(graphs, plan, include_attention=True)
                linear = plan_macs(graphs, plan)
                entry.update(settings=_settings(methods), core=core.total, linear=linear.total,
                             base_core=core.baseline, base_linear=linear.baseline,
                             peak=max(st.macs for st in core.steps) / core.baseline_step.total)
        except (TypeError, ValueError) as e:
            entry.update(settings=_settings_safe(row.methods), refused=str(e))
        entry["seconds"] = time.perf_counter() - start
        log(f"{name} {row.label} ({row.steps} steps): "
            + (f"refused: {entry['refused']}" if "refused" in entry else
               f"{format_macs(entry['core'])} (+core), {format_macs(entry['linear'])} (linear), "
               f"{entry['base_core'] / entry['core']:.2f}x / {entry['base_linear'] / entry['linear']:.2f}x")
            + f", {entry['seconds']:.1f}s")
        out.append(entry)
    times.update(_capture_times(lines))
    return out, times


def _settings_safe(configs) -> str:
    return " + ".join(type(c).__name__ for c in configs)


def _capture_times(lines: list[str]) -> dict[str, float]:
    out, batch = {}, None
    for line in lines:
        if line.startswith("capturing"):
            batch = line.split(" at batch ")[1].split()[0]
        elif batch is not None and line.rstrip().endswith("s"):
            out[f"capture at batch {batch}"] = float(line.rstrip()[:-1].rsplit(", ", 1)[1])
            batch = None
    return out


def table(results: dict[str, list[dict]]) -> list[str]:
    rows = ["| model | setting | steps | MACs (+ SDPA core) | speed-up | MACs (no SDPA core) | speed-up | "
            "costliest step / baseline step (+ core) | official ToCa FLOPs (compression) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, entries in results.items():
        for e in entries:
            arch, row = e["arch"], e["row"]
            official = ""
            if row.official:
                flops, ratio = OFFICIAL_FLUX[row.official]
                official = f"{row.official}: {flops:.2f}T ({ratio:.2f}x)"
            if "refused" in e:
                reason = e["refused"].split(": ")[0].split(". ")[0]  # its first clause: the whole text is in the log
                rows.append(f"| {arch.name} | {row.label} | {row.steps} | refused: {reason} | | | | | {official} |")
                continue
            rows.append(f"| {arch.name} | {row.label} | {row.steps} | {format_macs(e['core'])} | "
                        f"{e['base_core'] / e['core']:.2f}x | {format_macs(e['linear'])} | "
                        f"{e['base_linear'] / e['linear']:.2f}x | {e['peak']:.3f} | {official} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", action="append", choices=list(ROWS), help="only these (repeatable; default all)")
    parser.add_argument("--out", default=str(RESULTS / "macs_transformers.md"), help="markdown file to write")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results, times = {}, {}
    for name in args.arch or list(ROWS):
        results[name], times[name] = count_arch(name, log=lambda line: print(line, file=sys.stderr, flush=True))
    rows = table(results)
    print("\n".join(rows))
    m = machine()
    lines = [
        "# MACs of FLUX.1-dev, FLUX.2-dev, Z-Image-Turbo, Wan 2.1 T2V 1.3B and HunyuanVideo: ToCa, block cache, "
        "T-GATE, compositions",
        "",
        f"Written by `python benchmarks/macs_transformers.py` on {datetime.now():%Y-%m-%d %H:%M}, in "
        f"{(time.perf_counter() - started) / 60:.1f} min ({m['cpu']}, {m['cores']} cores; torch {m['torch']}, "
        f"diffusers {m['diffusers']}). Settings and sources: the script's docstring.",
        "",
        "Counted on the graph variants of the full-size architectures, built on the meta device from their "
        "published configs (`tgate_fx/archs.py`). 1T = 1e12 multiply-accumulates for the whole generation; "
        "speed-up = baseline / with the method, at the same step count. The official ToCa column is FLOPs "
        "(2 per MAC, attention included) and the FLOPs compression ratio of the flux-ToCa README; compare it "
        "with the `+ SDPA core` columns. `no SDPA core`: Linear + Conv + explicit matmuls (T-GATE's calflops "
        "convention; ToCa's score map is an explicit matmul, so it is counted there too). `costliest step / "
        "baseline step`: the most expensive step of the plan against one baseline step (above 1: the method adds "
        "work on its full steps).",
        "",
        *(f"- {get_arch(n).describe()}; config: {get_arch(n).source}" for n in results),
        "",
        *rows,
        "",
        "## Time on this machine (meta device, no capture store)",
        "",
        "| model | step | seconds |",
        "|---|---|---|",
    ]
    for name, t in times.items():
        for k, v in t.items():
            lines.append(f"| {name} | {k} | {v:.1f} |")
        for e in results[name]:
            lines.append(f"| {name} | count {e['row'].label} ({e['row'].steps} steps) | {e['seconds']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
