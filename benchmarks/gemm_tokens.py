"""How a transformer's linear layers scale with the token count on this CPU: why a token-wise cache falls short
of its MAC-ideal when few tokens are recomputed.

ToCa's partial steps push the top-k tokens of each module through its weights (about 10-25 % of them), and
its MAC-ideal assumes a linear layer costs in proportion to its tokens. Below a few hundred tokens a CPU GEMM
is bound by reading the weights, not by the multiply-adds, so a layer on k tokens costs much more than k / N
of the layer on N. This script times ``nn.Linear`` at FLUX.1's widths (3072 -> 12288, the MLP's first
projection, and 3072 -> 3072, an attention projection) over a range of token counts, in fp32, at the
benchmarks' torch thread count, and prints each one's throughput and its cost relative to a proportional
share of the largest count. Writes ``benchmarks/results/gemm_tokens.{md,png}``.

    python benchmarks/gemm_tokens.py [--threads 1] [--tokens 4,8,16,32,64,128,256,512,1024,2048]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

SHAPES = {"mlp in (3072 -> 12288)": (3072, 12288), "attention proj (3072 -> 3072)": (3072, 3072)}


def time_linear(layer: torch.nn.Linear, tokens: int, repeats: int) -> float:
    x = torch.randn(1, tokens, layer.in_features)
    with torch.no_grad():
        layer(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", default="4,8,16,32,64,128,256,512,1024,2048",
                   type=lambda v: [int(t) for t in v.split(",")])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    for name, (fan_in, fan_out) in SHAPES.items():
        layer = torch.nn.Linear(fan_in, fan_out)
        results[name] = {n: time_linear(layer, n, args.repeats) for n in args.tokens}
        print(f"{name}: " + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in results[name].items()), flush=True)
    largest = max(args.tokens)
    lines = [f"# Linear layers vs token count on this CPU", "",
             f"`python benchmarks/gemm_tokens.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
             f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC); cpu {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} torch thread(s), fp32, median of "
             f"{args.repeats}; the machine was shared with other jobs.", "",
             f"cost / proportional = the layer's time on n tokens over n / {largest} of its time on {largest} "
             "tokens: 1.0 where it costs in proportion to its tokens, as a MAC-ideal assumes.", ""]
    for name, times in results.items():
        fan_in, fan_out = SHAPES[name]
        lines += [f"## {name}", "", "| tokens | ms | GMAC/s | cost / proportional |", "|---|---|---|---|"]
        for n, t in times.items():
            share = times[largest] * n / largest
            lines.append(f"| {n} | {t * 1e3:.2f} | {n * fan_in * fan_out / t / 1e9:.1f} | {t / share:.2f} |")
        lines.append("")
    out = os.path.join(os.path.dirname(__file__), "results", "gemm_tokens")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, times in results.items():
        fan_in, fan_out = SHAPES[name]
        ax.plot(list(times), [n * fan_in * fan_out / t / 1e9 for n, t in times.items()], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens through the layer")
    ax.set_ylabel("GMAC/s")
    ax.set_title(f"nn.Linear throughput vs tokens ({args.threads} thread, fp32)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
