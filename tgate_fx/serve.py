"""Serving an optimized pipeline over HTTP with Ray Serve (``pip install "tgate-fx[serve]"``).

Two layers:

* :class:`Text2Image`: the pipeline of one replica, without Ray. It loads a
  diffusers pipeline from a local path, applies :func:`tgate_fx.optimize`
  with the deployment's methods, validates requests (:meth:`Text2Image.parse`
  raises :class:`BadRequest` naming the value) and renders them to PNG bytes,
  several compatible requests in one pipeline call (:meth:`Text2Image.render`).
* :func:`deployment` / :func:`app`: a Ray Serve deployment around it. A
  request is a JSON ``POST``; the answer is ``image/png``, or a JSON error:
  400 for a bad request (the replica keeps serving): the checks of
  :meth:`Text2Image.parse`, and the settings a method refuses for the call
  (a ``gate_step`` beyond the steps); 500 for any other failure.
  Concurrent requests can be grouped by ``@serve.batch`` (``max_batch_size``).

A request::

    {"prompt": "a red circle in the top left on a blue background",
     "height": 32, "width": 32, "steps": 20, "seed": 0, "guidance": 7.5,
     "methods": {"tgate": {"gate_step": 8}}}

``methods`` absent: the deployment's methods. ``{}``: the baseline (the
pipeline's own denoiser, no method). Each entry names a method
(:data:`METHODS`) and its settings (the fields of its config class).

Captures: every replica reads and writes the capture store at ``store`` (a
path every replica sees, e.g. a shared volume; see docs/capture-cache.md).
The store's lock lets the first replica export a resolution and the others
load its entry, so only the first replica ever runs ``torch.export``.
``warmup`` renders one request per resolution listed at start, so the
replica loads its captures before it takes traffic.

Batching (``max_batch_size > 1``, off by default): concurrent requests that
differ only in prompt, negative prompt and seed (one :attr:`Request.group`:
same resolution, steps, guidance and methods), under methods whose schedule
does not depend on the batch (:data:`BATCHABLE`: T-GATE, DeepCache, ToDo,
and the baseline), are grouped by ``@serve.batch`` into one pipeline call
with one generator per request, so each starts from the noise it gets alone.
ToCa and block cache pick what to recompute from the whole batch: their
requests always run alone, unpadded.

The call always has ``max_batch_size`` rows (CFG doubles them): a group of
fewer requests is padded with copies of its first request, whose pictures
are dropped. The guarantee: a request's PNG (and its final latents) is
bit-identical to the one the same request gets alone from a deployment of
the same ``max_batch_size`` (and torch threads), whatever the other requests
of its call and its place among them. Why the padding: the CPU kernels
block their sums by the call's shape, so a 4-row call and a 1-row call give
a request latents that differ in the last bits (measured up to 1.8e-5 on the
shapes pipeline), and a pixel at a rounding boundary then comes out one
level apart; at one fixed shape, each row's bits depend on its own inputs
only (measured: 0.0 difference for the baseline, T-GATE, DeepCache and ToDo,
in order and reversed, tests/test_serve.py). It is *not* the PNG of a
``max_batch_size=1`` deployment, which can differ from it by one level. The
cost: a lone request pays for a full batch (benchmarks/results/serve_load.md).
With the default ``max_batch_size=1`` every request runs alone, unpadded.

Run it (loopback)::

    python -m tgate_fx.serve PATH --methods '{"tgate": {"gate_step": 8}}' --replicas 2 --store /shared/captures
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import threading
import time
from typing import Any

__all__ = ["BATCHABLE", "METHODS", "BadRequest", "Request", "Text2Image", "app", "deployment", "generate", "main"]


def _methods() -> dict[str, type]:
    from .methods import BlockCacheConfig, DeepCacheConfig, TGateConfig, ToCaConfig, ToDoConfig

    return {"tgate": TGateConfig, "deepcache": DeepCacheConfig, "todo": ToDoConfig, "toca": ToCaConfig,
            "blockcache": BlockCacheConfig}


#: The method names a request may give, each with its config class's fields as settings.
METHODS = ("tgate", "deepcache", "todo", "toca", "blockcache")
#: Methods whose schedule is the same for every batch size: their requests may share a pipeline call.
BATCHABLE = frozenset({"tgate", "deepcache", "todo"})


class BadRequest(ValueError):
    """A request the deployment refuses (HTTP 400); the message names the value."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One validated request. ``methods``: ``((name, ((setting, value), ...)), ...)``, sorted; empty: baseline."""

    prompt: str
    negative_prompt: str | None
    height: int
    width: int
    steps: int
    seed: int
    guidance: float
    methods: tuple

    @property
    def group(self) -> tuple:
        """What requests sharing one pipeline call must agree on (all but the prompts and the seed)."""
        return (self.height, self.width, self.steps, self.guidance, self.methods, self.negative_prompt is None)

    onnx: bool = False

    @property
    def batchable(self) -> bool:
        return not self.onnx and all(name in BATCHABLE for name, _ in self.methods)

    def body(self) -> dict:
        """The JSON body that asks for this request."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "height": self.height,
                "width": self.width, "steps": self.steps, "seed": self.seed, "guidance": self.guidance,
                "methods": {name: dict(settings) for name, settings in self.methods}}


_FIELDS = {"prompt", "negative_prompt", "height", "width", "steps", "seed", "guidance", "methods"}


class Text2Image:
    """The optimized pipeline of one replica (no Ray needed).

    Args:
        path: A directory written by ``save_pretrained`` (``model_index.json`` in it).
        methods: The deployment's methods, ``{"tgate": {"gate_step": 8}, ...}``; ``{}`` for the baseline.
            Requests without ``methods`` get these.
        store: The capture store's directory (shared by the replicas); ``None``: the environment's
            (``TGATE_FX_CACHE_DIR``, see docs/capture-cache.md).
        threads: torch's intra-op threads in this replica.
        max_pixels, max_steps: Bounds on a request (larger ones are refused with a 400).
        onnx: A bundle directory written by :func:`tgate_fx.export.export_onnx`: the denoiser runs in
            onnxruntime (``providers``, default CPU) instead of torch, and requests are held to the
            bundle's height, width and steps (defaults) and cannot choose methods (the bundle's are
            fixed at export). ``methods`` must then be ``None``.
        warmup: ``[(height, width), ...]`` or ``[(height, width, steps), ...]`` rendered once at start
            (20 steps unless given, with the deployment's methods), so the captures are loaded (or
            exported) before the first request.
        batch_size: The rows of every pipeline call of batchable requests (:attr:`Request.batchable`):
            up to this many requests of one group share a call, and a call with fewer is padded with
            copies of its first request, so a request's picture is bit-identical alone or with others
            (for this ``batch_size``; see the module docstring). 1: every request runs alone, unpadded.
    """

    def __init__(self, path: str, methods: dict | None = None, store: str | None = None, threads: int = 1,
                 max_pixels: int = 1024 * 1024, max_steps: int = 200, warmup: list | None = None,
                 dtype: str = "float32", device: str = "cpu", onnx: str | None = None,
                 providers: list | None = None, batch_size: int = 1):
        import torch
        from diffusers import DiffusionPipeline

        from .core.capture_store import DEFAULT, CaptureStore

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.store = CaptureStore(str(store)) if store is not None else DEFAULT
        torch.set_num_threads(int(threads))
        if not os.path.isfile(os.path.join(str(path), "model_index.json")):
            raise FileNotFoundError(f"no diffusers pipeline at {path} (model_index.json missing)")
        start = time.perf_counter()
        self.pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=getattr(torch, dtype)).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device = device
        self.max_pixels, self.max_steps = int(max_pixels), int(max_steps)
        self.vae_factor = int(getattr(self.pipe, "vae_scale_factor", 8))
        denoiser = getattr(self.pipe, "unet", None) or getattr(self.pipe, "transformer", None)
        size = getattr(denoiser.config, "sample_size", 64)
        size = size[0] if isinstance(size, (list, tuple)) else size
        self.default_size = int(size) * self.vae_factor
        self._applied: tuple | None = None
        self.bundle: dict | None = None
        if onnx is not None:
            from .export import OnnxDenoiser

            if methods is not None:
                raise ValueError(f"methods={methods!r} with onnx={onnx!r}: a bundle's methods are fixed at export")
            runner = OnnxDenoiser.from_dir(str(onnx), providers=providers)
            runner.install(self.pipe)
            call = runner.bundle["call"]
            self.bundle = {"directory": str(onnx), "height": call.get("height") or self.default_size,
                           "width": call.get("width") or self.default_size, "steps": call["num_inference_steps"],
                           "methods": runner.bundle["methods"]}
            self.default_methods = ()
        else:
            self.default_methods = self._methods(methods if methods is not None else {"tgate": {}})
        self._lock = threading.Lock()  # one pipeline call at a time: the runtime's methods are per pipeline
        self.load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for height, width, *steps in warmup or []:
            self.render([self.parse({"prompt": "warm up", "height": height, "width": width,
                                     "steps": steps[0] if steps else 20})])
        self.warmup_seconds = time.perf_counter() - start

    def captures(self) -> list[dict]:
        """The runtime's captures: ``from_store`` (loaded, not exported) and their seconds."""
        from .api import get_runtime

        try:
            runtime = get_runtime(self.pipe)
        except (TypeError, ValueError):  # never optimized (the baseline only)
            return []
        return [{"from_store": bool(g.capture.from_store), "seconds": round(g.capture.seconds, 4)}
                for g in runtime.captures]

    # --- requests ------------------------------------------------------------------
    def _methods(self, given: Any) -> tuple:
        if not isinstance(given, dict):
            raise BadRequest(f"methods must be an object of method name to settings, got {given!r}")
        classes = _methods()
        out = []
        for name, settings in given.items():
            if name not in classes:
                raise BadRequest(f"unknown method {name!r}; known: {', '.join(METHODS)}")
            settings = {} if settings in (None, True) else settings
            if not isinstance(settings, dict):
                raise BadRequest(f"settings of {name} must be an object, got {settings!r}")
            try:
                classes[name](**settings)
            except (TypeError, ValueError) as e:
                raise BadRequest(f"bad {name} settings {settings}: {e}") from None
            out.append((name, tuple(sorted(settings.items()))))
        return tuple(sorted(out))

    def parse(self, body: Any) -> Request:
        """A validated :class:`Request` from a JSON body; :class:`BadRequest` names what is wrong."""
        if not isinstance(body, dict):
            raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - _FIELDS)
        if unknown:
            raise BadRequest(f"unknown fields {unknown}; known: {sorted(_FIELDS)}")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest(f"prompt must be a non-empty string, got {prompt!r}")
        negative = body.get("negative_prompt")
        if negative is not None and not isinstance(negative, str):
            raise BadRequest(f"negative_prompt must be a string, got {negative!r}")

        def integer(name, default, low):
            value = body.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f"{name} must be an integer, got {value!r}")
            if value < low:
                raise BadRequest(f"{name} must be >= {low}, got {value}")
            return value

        fixed = self.bundle or {}
        height = integer("height", fixed.get("height", self.default_size), 1)
        width = integer("width", fixed.get("width", self.default_size), 1)
        for name, value in (("height", height), ("width", width)):
            if value % self.vae_factor:
                raise BadRequest(f"{name} {value} is not divisible by the VAE factor {self.vae_factor}")
        if height * width > self.max_pixels:
            raise BadRequest(f"{height}x{width} exceeds the deployment's max_pixels {self.max_pixels}")
        steps = integer("steps", fixed.get("steps", 20), 1)
        if self.bundle is not None:
            asked = {"height": height, "width": width, "steps": steps}
            if any(asked[k] != self.bundle[k] for k in asked):
                raise BadRequest(f"{asked} differs from the ONNX bundle's "
                                 f"{ {k: self.bundle[k] for k in asked} } (a bundle serves the shapes and steps it "
                                 "was exported for)")
            if body.get("methods") is not None:
                raise BadRequest(f"this deployment serves the ONNX bundle {self.bundle['directory']} with the methods "
                                 f"{self.bundle['methods']} fixed at export; a request cannot choose methods")
        if steps > self.max_steps:
            raise BadRequest(f"steps {steps} exceeds the deployment's max_steps {self.max_steps}")
        seed = integer("seed", 0, 0)
        guidance = body.get("guidance", 7.5)
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance != guidance:
            raise BadRequest(f"guidance must be a number, got {guidance!r}")
        methods = self.default_methods if body.get("methods") is None else self._methods(body["methods"])
        return Request(prompt, negative, height, width, steps, seed, float(guidance), methods, self.bundle is not None)

    # --- rendering -----------------------------------------------------------------
    def _apply(self, methods: tuple) -> None:
        from .api import get_runtime, optimize

        if self.bundle is None and methods and methods != self._applied:
            classes = _methods()
            optimize(self.pipe, methods=[classes[name](**dict(s)) for name, s in methods])
            get_runtime(self.pipe).capture_store = self.store  # the replica's store, for every capture
            self._applied = methods

    def plan(self, requests: list[Request]) -> list[list[int]]:
        """The pipeline calls that render ``requests``, each a list of indices into it: batchable requests
        of one :attr:`Request.group` share calls of at most :attr:`batch_size`, in order; the others run
        alone."""
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            key = request.group if request.batchable and self.batch_size > 1 else ("alone", i)
            groups.setdefault(key, []).append(i)
        return [g[k:k + self.batch_size] for g in groups.values() for k in range(0, len(g), self.batch_size)]

    def render(self, requests: list[Request], output: str = "png") -> list:
        """Each request's picture, in order: PNG bytes (``output="png"``) or the final latents before the
        VAE (``"latent"``, one ``(C, h, w)`` tensor each). The calls are :meth:`plan`'s; a call of batchable
        requests always runs at :attr:`batch_size` rows (padded with copies of its first request, whose
        pictures are dropped), so a request gets the same bits alone or with others."""
        if output not in ("png", "latent"):
            raise ValueError(f"output must be 'png' or 'latent', got {output!r}")
        out: dict[int, Any] = {}
        for indices in self.plan(requests):
            for i, picture in zip(indices, self._call([requests[i] for i in indices], output)):
                out[i] = picture
        return [out[i] for i in range(len(requests))]

    def _call(self, requests: list[Request], output: str) -> list:
        import contextlib

        import torch

        from .api import get_runtime
        from .core.hook import bypassed

        first = requests[0]
        rows = list(requests)
        if first.batchable:  # the fixed shape: a row's bits depend on the call's shape, not on the other rows
            rows += [first] * (self.batch_size - len(rows))
        with self._lock:
            self._apply(first.methods)
            baseline = self.bundle is None and not first.methods and self._applied is not None
            context = bypassed(get_runtime(self.pipe).denoiser) if baseline else contextlib.nullcontext()
            kwargs = {}
            if first.negative_prompt is not None:
                kwargs["negative_prompt"] = [r.negative_prompt for r in rows]
            with context, torch.inference_mode():
                images = self.pipe([r.prompt for r in rows], height=first.height, width=first.width,
                                   num_inference_steps=first.steps, guidance_scale=first.guidance,
                                   generator=[torch.Generator().manual_seed(r.seed) for r in rows],
                                   output_type="latent" if output == "latent" else "pil", **kwargs).images
        if output == "latent":
            return [images[i].clone() for i in range(len(requests))]
        return [_png(image) for image in images[:len(requests)]]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- Ray Serve ---------------------------------------------------------------------------
def deployment(max_batch_size: int = 1, batch_wait_timeout_s: float = 0.05, **options):
    """The Ray Serve deployment class (``options``: ``serve.deployment``'s, e.g. ``num_replicas``,
    ``ray_actor_options``). Bind it with :class:`Text2Image`'s arguments, or use :func:`app`.

    ``max_batch_size``: requests grouped by ``@serve.batch``, and the replica's :attr:`Text2Image.batch_size`
    (every call of batchable requests runs at this many rows, padded). A request's PNG is bit-identical to
    the one it gets alone from a deployment of the same ``max_batch_size`` (see the module docstring). Each
    answer's ``x-batch`` header says how many requests shared its call."""
    from ray import serve
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, Response

    options.setdefault("ray_actor_options", {"num_cpus": 1})
    options.setdefault("max_ongoing_requests", max(4, 2 * max_batch_size))
    options.setdefault("health_check_period_s", 2)
    options.setdefault("health_check_timeout_s", 30)

    @serve.deployment(**options)
    class TGateFX:
        def __init__(self, *args, **kwargs):
            if kwargs.setdefault("batch_size", max_batch_size) != max_batch_size:
                raise ValueError(f"batch_size={kwargs['batch_size']} differs from max_batch_size={max_batch_size}")
            self.model = Text2Image(*args, **kwargs)
            self.replica = f"{os.getpid()}"
            self.ready_at = time.time()

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def _render(self, requests: list[Request]) -> list:
            try:
                pngs = await asyncio.to_thread(self.model.render, requests)
                shared = {i: len(call) for call in self.model.plan(requests) for i in call}
                return [(png, shared[i]) for i, png in enumerate(pngs)]
            except (TypeError, ValueError) as e:  # settings the methods refuse for this call (gate_step > steps)
                return [BadRequest(str(e))] * len(requests)
            except Exception as e:  # noqa: BLE001 - each request gets the failure as its answer
                return [e] * len(requests)

        async def __call__(self, http: HTTPRequest):
            if http.method == "GET":  # what this replica is: its process, start-up costs and captures
                return JSONResponse({"replica": self.replica, "load_seconds": self.model.load_seconds,
                                     "warmup_seconds": self.model.warmup_seconds, "ready_at": self.ready_at,
                                     "captures": self.model.captures()})
            try:
                body = json.loads(await http.body())
                request = self.model.parse(body)
            except (BadRequest, ValueError) as e:  # json.JSONDecodeError is a ValueError
                return JSONResponse({"error": str(e), "replica": self.replica}, status_code=400)
            start = time.perf_counter()
            result = await self._render(request)
            if isinstance(result, BadRequest):
                return JSONResponse({"error": str(result), "replica": self.replica}, status_code=400)
            if isinstance(result, Exception):
                return JSONResponse({"error": f"{type(result).__name__}: {result}", "replica": self.replica},
                                    status_code=500)
            png, shared = result
            return Response(png, media_type="image/png",
                            headers={"x-replica": self.replica, "x-seconds": f"{time.perf_counter() - start:.4f}",
                                     "x-batch": str(shared)})

    return TGateFX


def app(path: str, methods: dict | None = None, num_replicas: int = 1, max_batch_size: int = 1,
        batch_wait_timeout_s: float = 0.05, **model_options):
    """The bound application: ``serve.run(app(PATH, {"tgate": {}}), route_prefix="/")``."""
    return deployment(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                      num_replicas=num_replicas).bind(str(path), methods, **model_options)


def generate(url: str, body: dict, retries: int = 3, timeout: float = 120.0, wait: float = 1.0,
             failures: list | None = None, headers: dict | None = None):
    """POST ``body`` to ``url``; the PNG bytes, or an ``HTTPError`` / ``RuntimeError`` naming the failure.
    ``failures``: gets each failed attempt's reason; ``headers``: gets the answer's headers, lower case (``x-replica``,
    ``x-batch``: how many requests shared its pipeline call).

    A 4xx is final (the request is wrong). A 5xx or a broken connection (a replica that died with the
    request) is retried ``retries`` times, ``wait`` seconds apart: a request is fully given by its body
    and seed, so a retry renders the same picture (batched or not, see the module docstring).
    """
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode()
    last = None
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if headers is not None:
                    headers.update((k.lower(), v) for k, v in response.headers.items())
                return response.read()
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise
            last = f"HTTP {e.code}: {e.read()[:500]!r}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = f"{type(e).__name__}: {e}"
        if failures is not None:
            failures.append(last)
        if attempt < retries:
            time.sleep(wait)
    raise RuntimeError(f"{url}: failed after {retries + 1} attempts, last: {last}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tgate_fx.serve", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="a diffusers pipeline directory (save_pretrained)")
    parser.add_argument("--methods", default='{"tgate": {}}', help="JSON: the deployment's methods")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--store", default=None, help="capture store directory shared by the replicas")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--max-batch-size", type=int, default=1,
                        help="group concurrent requests into calls of this many rows, padded (bit-identical to "
                             "a lone request on the same max batch size; a lone request pays for a full batch)")
    parser.add_argument("--onnx", default=None, help="serve this ONNX bundle (export_onnx) instead of --methods")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    args = parser.parse_args(argv)
    import ray
    from ray import serve

    ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    methods = None if args.onnx else json.loads(args.methods)
    serve.run(app(args.path, methods, args.replicas, args.max_batch_size, store=args.store, threads=args.threads,
                  onnx=args.onnx), route_prefix="/")
    print(f"serving {args.path} at http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
