"""tgate_fx.serve: requests validated with the reason, batched requests get exactly their lone picture, and (with
ray installed) the Ray Serve deployment over loopback: answers, 4xx, a killed replica replaced."""

import concurrent.futures
import json
import os
import socket
import threading
import time
import urllib.error

import pytest
import torch

from tgate_fx.serve import BadRequest, Text2Image, generate
from tgate_fx.shapes import PIPELINE_PATH

pytestmark = pytest.mark.e2e  # loads the shipped shapes pipeline and renders with it

PROMPTS = ["a red circle in the top left on a blue background",
           "a yellow triangle in the centre on a black background",
           "a blue square in the bottom right on a white background"]
TGATE = {"tgate": {"gate_step": 3, "sp_interval": 1, "fi_interval": 1, "warm_up": 0}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return Text2Image(str(PIPELINE_PATH), TGATE, store=str(tmp_path_factory.mktemp("store")))


@pytest.mark.parametrize("body,reason", [
    ({"prompt": "x", "methods": {"tgat": {}}}, "unknown method 'tgat'"),
    ({"prompt": "x", "height": 30}, "height 30 is not divisible by the VAE factor 4"),
    ({"prompt": "x", "steps": 0}, "steps must be >= 1, got 0"),
    ({"prompt": "x", "steps": "5"}, "steps must be an integer, got '5'"),
    ({"prompt": ""}, "prompt must be a non-empty string"),
    ({"prompt": "x", "sed": 1}, "unknown fields \\['sed'\\]"),
    ({"prompt": "x", "methods": {"tgate": {"gate_step": -1}}}, "bad tgate settings"),
    ({"prompt": "x", "height": 4096, "width": 4096}, "exceeds the deployment's max_pixels"),
])
def test_a_bad_request_is_refused_with_the_reason(model, body, reason):
    with pytest.raises(BadRequest, match=reason):
        model.parse(body)


def _pixels(png: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    return Text2Image(str(PIPELINE_PATH), TGATE, store=str(tmp_path_factory.mktemp("batched_store")), batch_size=4)


@pytest.mark.parametrize("methods", [None, {}, {"deepcache": {"cache_interval": 2, "cache_branch_id": 0}},
                                     {"todo": {}}], ids=["tgate", "baseline", "deepcache", "todo"])
def test_a_batched_request_gets_exactly_the_bits_it_gets_alone(batched, methods):
    # batch_size=4: the three requests share one call (padded with a copy of the first), each in another
    # place than alone (where it is padded with copies of itself); one shape, so the same bits. Unpadded,
    # the latents differ in the last bits (the kernels block their sums by the batch size).
    requests = [batched.parse({"prompt": p, "seed": i, "steps": 6, "methods": methods}) for i, p in enumerate(PROMPTS)]
    together = requests[::-1]
    assert batched.plan(together) == [[0, 1, 2]]
    alone = [batched.render([r], output="latent")[0] for r in requests]
    assert all(not torch.equal(alone[0], x) for x in alone[1:])  # different pictures: the comparison can fail
    for a, b in zip(alone, batched.render(together, output="latent")[::-1]):
        assert torch.equal(a, b)
    assert batched.render(together)[::-1] == [batched.render([r])[0] for r in requests]  # the PNG bytes


def test_requests_that_differ_in_more_than_prompt_and_seed_never_share_a_call(batched):
    base = {"prompt": PROMPTS[0], "steps": 6}
    bodies = [base, {**base, "seed": 1, "prompt": PROMPTS[1]}, {**base, "steps": 7}, {**base, "guidance": 3.0},
              {**base, "height": 16}, {**base, "methods": {}}, {**base, "negative_prompt": "blurry"},
              {**base, "methods": {"toca": {}}}, {**base, "methods": {"toca": {}}}, {**base, "seed": 2},
              {**base, "seed": 3}, {**base, "seed": 4}]
    plan = batched.plan([batched.parse(b) for b in bodies])
    assert plan == [[0, 1, 9, 10], [11], [2], [3], [4], [5], [6], [7], [8]]  # at most batch_size=4 a call


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        Text2Image(str(PIPELINE_PATH), TGATE, batch_size=0)


def test_a_replica_rebuilds_a_corrupt_store_entry_instead_of_serving_it(tmp_path):
    store = tmp_path / "store"
    body = {"prompt": PROMPTS[2], "seed": 5, "steps": 6}
    first = Text2Image(str(PIPELINE_PATH), TGATE, store=str(store))
    expected = first.render([first.parse(body)])[0]
    entries = [p for p in store.rglob("*.capture")]
    assert len(entries) == 1
    raw = bytearray(entries[0].read_bytes())
    raw[-100:-50] = bytes(50)  # same size, other bytes: the payload's checksum fails
    entries[0].write_bytes(bytes(raw))
    second = Text2Image(str(PIPELINE_PATH), TGATE, store=str(store))  # a new replica on the same store
    assert second.render([second.parse(body)])[0] == expected
    assert not any(c["from_store"] for c in second.captures())  # exported again, not served from the entry
    third = Text2Image(str(PIPELINE_PATH), TGATE, store=str(store))
    assert third.render([third.parse(body)])[0] == expected
    assert all(c["from_store"] for c in third.captures())  # the rebuilt entry is whole


def test_methods_that_choose_from_the_whole_batch_run_alone(model):
    r = model.parse({"prompt": PROMPTS[0], "methods": {"blockcache": {"threshold": 0.05}}})
    assert not r.batchable


def test_an_onnx_bundle_is_served_at_its_shapes_only(model, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'tgate-fx[onnx]')")
    from tgate_fx.export import export_onnx

    export_onnx(model.pipe, str(tmp_path / "bundle"), height=32, width=32, num_inference_steps=6,
                **TGATE["tgate"])
    served = Text2Image(str(PIPELINE_PATH), store=None, onnx=str(tmp_path / "bundle"))
    body = {"prompt": PROMPTS[0], "seed": 4}  # the bundle's shapes and steps by default
    torch_png = model.render([model.parse({**body, "steps": 6})])[0]
    assert abs(_pixels(served.render([served.parse(body)])[0]) - _pixels(torch_png)).max() <= 1
    with pytest.raises(BadRequest, match="differs from the ONNX bundle's"):
        served.parse({**body, "steps": 7})
    with pytest.raises(BadRequest, match="cannot choose methods"):
        served.parse({**body, "methods": {}})


# --- the Ray Serve deployment ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'tgate-fx[serve]')")
    from ray import serve

    from tgate_fx.serve import app

    port = _free_port()
    store = str(tmp_path_factory.mktemp("served_store"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # max_batch_size=4 as the `batched` reference; a generous wait, so concurrent requests meet in a call
        serve.run(app(str(PIPELINE_PATH), TGATE, num_replicas=1, max_batch_size=4, batch_wait_timeout_s=0.5,
                      store=store, warmup=[(32, 32)]), route_prefix="/")
        yield f"http://127.0.0.1:{port}/", store
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(url, body) -> tuple[bytes, int]:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read(), int(response.headers["x-batch"])


def test_the_deployment_serves_each_request_its_lone_picture_batched_or_not(served, batched):
    url, _ = served
    bodies = [{"prompt": p, "seed": i, "steps": 6} for i, p in enumerate(PROMPTS)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # concurrent: @serve.batch groups them
        answers = list(pool.map(lambda b: _post(url, b), bodies))
    assert max(shared for _, shared in answers) > 1  # some did share a call
    assert [png for png, _ in answers] == [batched.render([batched.parse(b)])[0] for b in bodies]


def test_a_bad_request_gets_a_400_with_the_reason_and_the_replica_keeps_serving(served, batched):
    url, _ = served
    for body, reason in [({"prompt": "x", "methods": {"nope": {}}}, "unknown method 'nope'"),
                         ({"prompt": "x", "width": 33}, "not divisible by the VAE factor 4"),
                         ({"prompt": "x", "steps": 0}, "steps must be >= 1"),
                         ({"prompt": "x", "steps": 2}, "gate_step=3 is beyond the 2 denoising steps")]:
        with pytest.raises(urllib.error.HTTPError) as info:
            generate(url, body)
        assert info.value.code == 400 and reason in json.loads(info.value.read())["error"]
    body = {"prompt": PROMPTS[0], "seed": 7, "steps": 4}
    assert generate(url, body) == batched.render([batched.parse(body)])[0]


def _replica_pid(url) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())["replica"]


def test_a_replica_killed_during_a_request_is_replaced_and_the_request_retried(served, batched):
    import ray

    url, _ = served
    body = {"prompt": PROMPTS[1], "seed": 3, "steps": 200}
    start = time.perf_counter()
    expected = batched.render([batched.parse(body)])[0]
    alone = time.perf_counter() - start
    before = _replica_pid(url)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
    assert len(replicas) == 1
    replica = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    killed = []
    killer = threading.Timer(alone / 3, lambda: (ray.kill(replica, no_restart=True), killed.append(1)))
    failures = []
    killer.start()
    try:
        answer = generate(url, body, retries=30, wait=2.0, failures=failures)
    finally:
        killer.join()
    assert killed and failures  # the first attempt died with its replica
    assert answer == expected  # the retry, on the replacement, rendered the same picture
    assert _replica_pid(url) != before
