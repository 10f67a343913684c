"""Load test of tgate_fx.serve on a local Ray cluster (loopback only): latency, throughput, first-request cost.

    python benchmarks/serve_load.py [--clients 4] [--requests 24] [--time-limit 240] [--no-plot]

1. First-request cost of a replica (one replica, no warm-up, so its first
   request pays the capture): with the capture store empty (the replica
   exports) and with it written (the replica loads the entry). Each case is
   a fresh deployment on the same Ray cluster; the time is the first
   request's latency seen by the client.
2. Two replicas started together on an empty store, each warmed up at
   start: how many of them exported (the store's lock: only the first).
3. Load: two replicas (1 CPU and 1 torch thread each), ``--clients``
   concurrent clients sending ``--requests`` distinct requests in all
   (prompt and seed vary), for the baseline (``"methods": {}``) and for
   T-GATE. The run stops submitting at ``--time-limit`` seconds per method.
   p50/p95 latency per request and throughput (requests/s over the wall
   time of the phase); each request alone (``max_batch_size=1``), then
   batched (``--batch``: calls padded to that many rows), with the mean
   number of requests that shared a call (the ``x-batch`` header). Also a
   lone request's cost in this process, unpadded and padded.
4. Fault: the batched T-GATE load again, one of the two replicas killed
   (``ray.kill``) a third of the way in: how many requests were retried by
   the client, failed or mismatched, and how long until two replicas run.

Every response is compared byte for byte with the PNG of the same request
rendered alone in this process by a :class:`tgate_fx.serve.Text2Image` of
the deployment's batch size (one thread); a failed or mismatched request
is counted and reported. Batched responses are also compared with the
unpadded lone render (counted: another shape, not covered by the guarantee).

Writes ``benchmarks/results/serve_load.md``, ``.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, require_matplotlib  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STEPS = 20
TGATE = {"tgate": {"gate_step": 8, "sp_interval": 1, "fi_interval": 1, "warm_up": 0}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _info(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def _bodies(n: int, methods: dict) -> list[dict]:
    from tgate_fx.shapes.data import combinations

    captions = [c.caption for c in list(combinations())[::7][:n]]
    return [{"prompt": captions[i % len(captions)], "seed": i, "steps": STEPS, "guidance": 7.5, "methods": methods}
            for i in range(n)]


def _load(url, expected, bodies, args, generate, lone=None, kill=None) -> dict:
    """``expected``: each body's PNG alone on a deployment like the served one; ``lone``: alone on a
    max_batch_size=1 deployment (counted, not a failure); ``kill``: ``(seconds, function)`` run that long
    after the clients start (a replica killed under load)."""
    import threading

    import numpy as np

    generate(url, bodies[0])  # each replica's methods applied once before the clock starts
    generate(url, bodies[1])
    deadline = time.perf_counter() + args.time_limit

    def one(i):
        if time.perf_counter() > deadline:
            return i, None, None, "skipped", [], {}
        t = time.perf_counter()
        failures, headers = [], {}
        try:
            png = generate(url, bodies[i], retries=5 if kill else 2, wait=2.0 if kill else 1.0,
                           timeout=args.time_limit, failures=failures, headers=headers)
        except Exception as e:  # noqa: BLE001 - counted and reported
            return i, None, time.perf_counter() - t, f"{type(e).__name__}: {e}", failures, headers
        return i, png, time.perf_counter() - t, None, failures, headers

    killer = threading.Timer(kill[0], kill[1]) if kill else None
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        if killer:
            killer.start()
        answers = list(pool.map(one, range(len(bodies))))
    wall = time.perf_counter() - start
    if killer:
        killer.join()
    latencies, failed, mismatched, skipped, levels, shared, retried, other = [], [], 0, 0, 0, [], [], 0
    for i, png, latency, error, failures, headers in answers:
        if failures:
            retried.append(failures[0][:200])
        if error == "skipped":
            skipped += 1
        elif error is not None:
            failed.append(error)
        else:
            latencies.append(latency)
            shared.append(int(headers.get("x-batch", 1)))
            if png != expected[i]:
                mismatched += 1
                levels = max(levels, int(np.abs(_pixels(png) - _pixels(expected[i])).max()))
            if lone is not None and png != lone[i]:
                other += 1
    return {"requests": len(latencies), "failed": len(failed), "errors": failed[:3], "mismatched": mismatched,
            "max_level_difference": levels, "skipped": skipped, "wall_s": wall,
            "throughput": len(latencies) / wall, "p50_s": _percentile(latencies, 0.5),
            "p95_s": _percentile(latencies, 0.95), "latencies": latencies,
            "mean_shared": sum(shared) / max(len(shared), 1), "max_shared": max(shared, default=0),
            "retried": len(retried), "retry_reasons": retried[:3],
            "differs_from_unbatched": other if lone is not None else None}


def _pixels(png: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24, help="requests per method")
    parser.add_argument("--batch", type=int, default=4, help="max_batch_size of the batched load phase")
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds per method's load phase")
    parser.add_argument("--out", default=os.path.join(RESULTS, "serve_load"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    require_matplotlib(args.no_plot)

    import ray
    import torch
    from ray import serve

    from tgate_fx.serve import Text2Image, app, generate
    from tgate_fx.shapes import PIPELINE_PATH

    torch.set_num_threads(1)
    path = str(PIPELINE_PATH)
    work = tempfile.mkdtemp(prefix="serve_load_")
    reference = Text2Image(path, TGATE, store=os.path.join(work, "reference_store"))
    batched = Text2Image(path, TGATE, store=os.path.join(work, "reference_store"), batch_size=args.batch)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    results: dict = {"machine": machine(ray=ray.__version__), "steps": STEPS, "resolution": "32x32",
                     "pipeline": "the shipped shapes pipeline (tgate_fx.shapes.PIPELINE_PATH)", "tgate": TGATE,
                     "clients": args.clients, "requests": args.requests, "batch": args.batch,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "load_at_start": os.getloadavg()[0]}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # 1. first-request cost, store empty then written
        store = os.path.join(work, "store")
        first = {}
        body = _bodies(1, TGATE)[0]
        for case in ("cold", "warm"):
            start = time.perf_counter()
            serve.run(app(path, TGATE, num_replicas=1, store=store), route_prefix="/", name="first")
            started = time.perf_counter() - start
            start = time.perf_counter()
            png = generate(url, body)
            latency = time.perf_counter() - start
            start = time.perf_counter()
            generate(url, {**body, "seed": 1})
            second = time.perf_counter() - start
            info = _info(url)
            first[case] = {"replica_start_s": started, "first_request_s": latency, "second_request_s": second,
                           "exported": sum(not c["from_store"] for c in info["captures"]),
                           "matches": png == reference.render([reference.parse(body)])[0]}
            serve.delete("first")
            print(case, first[case], flush=True)
        results["first_request"] = first
        # 2. two replicas started together on an empty store
        store = os.path.join(work, "store_pair")
        start = time.perf_counter()
        serve.run(app(path, TGATE, num_replicas=2, store=store, warmup=[(32, 32, STEPS)]), route_prefix="/",
                  name="load")
        pair_start = time.perf_counter() - start
        seen: dict = {}
        for _ in range(40):
            info = _info(url)
            seen[info["replica"]] = info
            if len(seen) == 2:
                break
        results["pair_start"] = {"seconds": pair_start, "replicas": [
            {"warmup_s": i["warmup_seconds"], "exported": sum(not c["from_store"] for c in i["captures"])}
            for i in seen.values()]}
        print("pair", results["pair_start"], flush=True)
        # 3. load, baseline and T-GATE, on the two replicas (each request alone, then batched)
        load, alone, cost = {}, {}, {}
        for method, methods in (("baseline", {}), ("T-GATE", TGATE)):
            bodies = _bodies(args.requests, methods)
            alone[method, 1] = [reference.render([reference.parse(b)])[0] for b in bodies]
            alone[method, args.batch] = [batched.render([batched.parse(b)])[0] for b in bodies]
            for model in (reference, batched):  # what a lone request costs in one process, unpadded and padded
                start = time.perf_counter()
                for b in bodies[:4]:
                    model.render([model.parse(b)])
                cost[f"{method}, batch_size={model.batch_size}"] = (time.perf_counter() - start) / 4
        results["lone_cost_s"] = cost
        print("lone cost", cost, flush=True)
        for batch in (1, args.batch):
            if batch != 1:
                serve.delete("load")
                serve.run(app(path, TGATE, num_replicas=2, store=store, max_batch_size=batch,
                              warmup=[(32, 32, STEPS)]), route_prefix="/", name="load")
            for method, methods in (("baseline", {}), ("T-GATE", TGATE)):
                label = f"{method}, max_batch_size={batch}"
                load[label] = _load(url, alone[method, batch], _bodies(args.requests, methods), args, generate,
                                    lone=alone[method, 1] if batch != 1 else None)
                print(label, {k: v for k, v in load[label].items() if k != "latencies"}, flush=True)
        # 4. the same batched T-GATE load, one of the two replicas killed a third of the way in
        killed: dict = {}

        def replicas() -> dict:
            return {a["name"]: a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if "SERVE_REPLICA" in a["name"]}

        def kill():  # then poll until two replicas run again, one of them new: the replacement's time
            before = replicas()
            victim = sorted(before)[0]
            killed["replicas_before"] = len(before)
            start = time.perf_counter()
            ray.kill(ray.get_actor(victim, namespace=before[victim]), no_restart=True)
            while time.perf_counter() - start < 120:
                states = serve.status().applications["load"].deployments.values()
                if sum(d.replica_states.get("RUNNING", 0) for d in states) == 2 and set(replicas()) - set(before):
                    killed["replaced_after_s"] = time.perf_counter() - start
                    return
                time.sleep(0.25)

        wall = load[f"T-GATE, max_batch_size={args.batch}"]["wall_s"]
        label = f"T-GATE, max_batch_size={args.batch}, a replica killed under load"
        load[label] = _load(url, alone["T-GATE", args.batch], _bodies(args.requests, TGATE), args, generate,
                            lone=alone["T-GATE", 1], kill=(wall / 3, kill))
        load[label].update({k: killed.get(k) for k in ("replicas_before", "replaced_after_s")}, killed_at_s=wall / 3)
        print(label, {k: v for k, v in load[label].items() if k != "latencies"}, flush=True)
        results["load"] = load
    finally:
        serve.shutdown()
        ray.shutdown()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    _write_md(results, args.out + ".md")
    if not args.no_plot:
        _plot(results, args.out + ".png")
    print(open(args.out + ".md").read())


def _write_md(r: dict, path: str) -> None:
    m = r["machine"]
    lines = [f"# tgate_fx.serve under load ({r['date']})", "",
             f"`python benchmarks/serve_load.py --clients {r['clients']} --requests {r['requests']} "
             f"--batch {r['batch']}`. CPU: "
             f"{m['cpu']}, {m['cores']} cores shared with other work (load average {r['load_at_start']:.1f} at "
             f"start); torch {m['torch']}, diffusers {m['diffusers']}, ray {m['ray']}. A local Ray cluster "
             "(2 CPUs), HTTP on 127.0.0.1; each replica 1 CPU, 1 torch thread. Pipeline: "
             f"{r['pipeline']}, {r['resolution']}, {r['steps']} steps, guidance 7.5, T-GATE "
             f"{json.dumps(r['tgate']['tgate'])}.", "",
             f"## Load: two replicas, {r['clients']} concurrent clients", "",
             "| | requests | failed | retried | mismatched (max level difference) | differ from max_batch_size=1 "
             "| requests a call (mean, max) | p50 (s) | p95 (s) | throughput (req/s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, x in r["load"].items():
        other = "-" if x["differs_from_unbatched"] is None else x["differs_from_unbatched"]
        lines.append(f"| {label} | {x['requests']} | {x['failed']} | {x['retried']} | {x['mismatched']} "
                     f"({x['max_level_difference']}) | {other} | {x['mean_shared']:.2f}, {x['max_shared']} "
                     f"| {x['p50_s']:.3f} | {x['p95_s']:.3f} | {x['throughput']:.2f} |")
    lines.append("")
    for batch in (1, r["batch"]):
        b, t = r["load"][f"baseline, max_batch_size={batch}"], r["load"][f"T-GATE, max_batch_size={batch}"]
        lines.append(f"max_batch_size={batch}: T-GATE / baseline throughput {t['throughput'] / b['throughput']:.2f}x, "
                     f"p50 latency {b['p50_s'] / t['p50_s']:.2f}x lower; skipped (past the time limit): "
                     f"{b['skipped']}, {t['skipped']}.")
    for label, x in r["load"].items():
        if "killed" in label:
            lines.append(f"\nKilled under load: {x['replicas_before']} replicas running, one killed "
                         f"(`ray.kill`, no restart) {x['killed_at_s']:.1f} s after the clients started; Serve ran "
                         f"two again, one new, after {x['replaced_after_s'] and round(x['replaced_after_s'], 1)} s; "
                         f"{x['retried']} requests had a failed attempt and were retried by the client "
                         f"(`generate`, 5 retries 2 s apart), {x['failed']} failed, {x['mismatched']} mismatched. "
                         f"First failed attempts: {x['retry_reasons'][:2]}.")
    cost = r["lone_cost_s"]
    lines += ["", f"A lone request's cost, one process, one thread: "
              + "; ".join(f"{k} {v:.3f} s" for k, v in cost.items())
              + f" (with max_batch_size={r['batch']} a lone request is padded to {r['batch']} rows)."]
    lines += ["", "Mismatched: the response's PNG is not byte-identical to the same request rendered alone in "
              "the benchmark's process by a `Text2Image` of the deployment's batch size (`batch_size` = "
              "`max_batch_size`: padded to that many rows); the level difference is the largest of any pixel "
              "channel (0-255). Differ from max_batch_size=1: the batched response against the request rendered "
              "alone unpadded, counted, not a failure (the guarantee is for the same max_batch_size). Requests a "
              "call: the `x-batch` header, how many real requests shared the pipeline call.", "",
              "## First request of a replica (one replica, no warm-up: the first request captures)", "",
              "| store | replica start (s) | first request (s) | second request (s) | "
              "captures exported in the replica | first PNG = alone |", "|---|---|---|---|---|---|"]
    for case, x in r["first_request"].items():
        lines.append(f"| {case} ({'empty' if case == 'cold' else 'written by the cold replica'}) | "
                     f"{x['replica_start_s']:.2f} | {x['first_request_s']:.2f} | {x['second_request_s']:.2f} | "
                     f"{x['exported']} | {x['matches']} |")
    ps = r["pair_start"]
    lines += ["", f"Two replicas started together on an empty store (warm-up at start): ready in "
              f"{ps['seconds']:.1f} s; captures exported per replica {[x['exported'] for x in ps['replicas']]}, "
              f"warm-up seconds {[round(x['warmup_s'], 2) for x in ps['replicas']]} (the store's lock: the "
              "second waits for the first's entry and loads it).", "",
              "Captures: the CFG batch and the post-gate batch, both specialised from one probe export of the "
              "resolution (docs/capture-cache.md); 0 means both came from the store.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    labels = list(r["load"])
    ticks = [k.replace(", max_batch_size=", "\nbatch ").replace(", a replica killed under load", "\nkilled")
             for k in labels]
    axes[0].boxplot([r["load"][k]["latencies"] for k in labels], tick_labels=ticks, whis=(5, 95))
    axes[0].tick_params(axis="x", labelsize=7)
    axes[0].set_ylabel("latency per request (s)")
    axes[0].set_title(f"{r['clients']} clients, 2 replicas")
    axes[1].bar(range(len(labels)), [r["load"][k]["throughput"] for k in labels],
                color=["tab:orange" if "killed" in k else "grey" if k.startswith("baseline") else "tab:blue"
                       for k in labels])
    axes[1].set_xticks(range(len(labels)), ticks, fontsize=7)
    axes[1].set_ylabel("requests / s")
    axes[1].set_title("throughput")
    cases = list(r["first_request"])
    axes[2].bar(cases, [r["first_request"][c]["first_request_s"] for c in cases], color=["tab:red", "tab:green"])
    axes[2].set_ylabel("first request (s)")
    axes[2].set_title("first request: store empty vs written")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
