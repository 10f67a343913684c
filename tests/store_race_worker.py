"""One process of tests/test_capture_store_race.py: generate with the shared store, then hammer its entry.

Prints one JSON line: how many times ``torch.export`` ran here, whether each capture came from the store,
a digest of the latents, and how many loads of the hammered entry failed while other processes rewrote it.
"""

import hashlib
import json
import os
import sys
import time

import torch

import tgate_fx
from tgate_fx.core.capture_store import default_store
from tgate_fx.tiny import tiny_pipeline


def main(start_at: float, rounds: int) -> None:
    torch.set_num_threads(1)
    exports = []
    real = torch.export.export
    torch.export.export = lambda *a, **k: exports.append(1) or real(*a, **k)
    pipe = tgate_fx.optimize(tiny_pipeline("sd15"), gate_step=2, sp_interval=1, fi_interval=1, warm_up=0)
    while time.time() < start_at:  # every process reaches the store at about the same moment
        time.sleep(0.005)
    out = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="latent",
               **pipe.tiny_call_kwargs, num_inference_steps=4).images
    runtime = tgate_fx.get_runtime(pipe)
    store = default_store()
    capture = runtime.captures[0].capture
    failed = 0
    # rewrite and read one entry while the other processes do the same: every read must be whole
    key = "race" + "0" * 60
    call = {name: torch.zeros(shape, dtype=dtype) for name, shape, dtype, _ in capture.signature.tensors}
    for _ in range(rounds):
        store.save(key, capture)
        if store.load(key, runtime.denoiser, call) is None:
            failed += 1
    print(json.dumps({"exports": len(exports), "from_store": [g.capture.from_store for g in runtime.captures],
                      "latents": hashlib.sha256(out.numpy().tobytes()).hexdigest(), "failed_loads": failed,
                      "rejected": store.rejected, "pid": os.getpid()}))


if __name__ == "__main__":
    main(float(sys.argv[1]), int(sys.argv[2]))
