"""Where ToCa's time goes on the scaled FLUX of ``transformer_speed.py``: one generation under torch's profiler.

Builds the same scaled FLUX.1 (FLUX.1-dev's width, ``--double`` + ``--single`` blocks, ``--size`` px, 32 text
tokens), applies ``ToCaConfig()``, runs one untimed generation, then profiles one generation of ``--steps``
steps on one thread. Prints and writes ``benchmarks/results/profile_toca_flux_<tokens>.md``: the operators by
self time, and every matrix product by input shape with its throughput and its cost over a proportional share
of the full-step product of the same weight (1.0: it costs in proportion to its tokens, as a MAC-ideal assumes).

    python benchmarks/profile_toca.py [--size 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import defaultdict
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main(argv: list[str] | None = None) -> int:
    import transformer_speed

    import tgate_fx
    from tgate_fx import ToCaConfig
    from torch.profiler import ProfilerActivity, profile

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    build_args = argparse.Namespace(flux_double=args.double, flux_single=args.single, flux_size=args.size,
                                    flux_text=32, steps=args.steps)
    pipe, call, arch, _ = transformer_speed.build("flux", build_args)
    call = {**call, "num_inference_steps": args.steps, "output_type": "latent"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tgate_fx.optimize(pipe, toca=ToCaConfig())
    pipe(generator=torch.Generator().manual_seed(0), **call)  # captures, variants
    kinds = [s.variant.name for s in tgate_fx.get_runtime(pipe).last_plan.steps]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        pipe(generator=torch.Generator().manual_seed(0), **call)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        by_op[e.key] += e.self_cpu_time_total
    # addmm(bias [N], input [M, K], weight^T [K, N]): per weight (K, N), the full step's M and time per call
    products = []
    for e in events:
        if e.key != "aten::addmm" or len(e.input_shapes) < 3 or not e.input_shapes[1]:
            continue
        (m, k), (_, n) = e.input_shapes[1], e.input_shapes[2]
        products.append((k, n, m, e.count, e.self_cpu_time_total / e.count / 1e6))
    full = {}
    for k, n, m, _, t in products:
        if m > full.get((k, n), (0, 0))[0]:
            full[k, n] = (m, t)
    tokens = arch.image_tokens + arch.text_tokens
    lines = [f"# ToCa on the scaled FLUX, profiled: {arch.image_tokens} image + {arch.text_tokens} text tokens", "",
             f"`python benchmarks/profile_toca.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
             f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC), torch {torch.__version__}, 1 thread, fp32; "
             "the machine was shared with other jobs.", "",
             f"FLUX.1-dev width (24 x 128), {args.double} double + {args.single} single blocks, {args.size} px, "
             f"{args.steps} steps: {', '.join(kinds)}. Self CPU time of one generation: {total / 1e6:.2f} s.", "",
             "## Operators by self time", "", "| operator | self s | share |", "|---|---:|---:|"]
    for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"| `{op}` | {t / 1e6:.3f} | {100 * t / total:.1f} % |")
    lines += ["", "## Matrix products by shape", "",
              "cost / proportional: the time per call over (M / M_full) x the time per call of the same weight "
              "at its largest M in this generation (a full step's). M = 1 rows are the adaLN modulations and "
              "embeddings: the same on every step.", "",
              "| weight (K x N) | M (tokens) | calls | ms per call | GMAC/s | cost / proportional | total s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for k, n, m, count, t in sorted(products, key=lambda r: -r[3] * r[4]):
        m_full, t_full = full[k, n]
        ratio = t / (t_full * m / m_full)
        lines.append(f"| {k} x {n} | {m} | {count} | {t * 1e3:.1f} | {m * k * n / t / 1e9:.1f} | {ratio:.2f} | "
                     f"{count * t:.3f} |")
    out = os.path.join(os.path.dirname(__file__), "results", f"profile_toca_flux_{tokens}")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
