"""ToCa as a tgate_fx method: schedule vs an independent re-derivation of the official scheduler, final latents vs an
eager oracle of the official rules (``oracle_toca.py``: block forwards on diffusers' blocks), composition with T-GATE,
graphs, compile counts, errors. Tiny PixArt-alpha/sigma (64 tokens, 2 blocks) and DiT (64 tokens, 2 blocks), fp32."""

import dataclasses

import pytest
import torch

import tgate_fx
from conftest import eager_denoiser, latents
from oracle import OracleDenoiser
from oracle_toca import OfficialScheduler, ToCaOracle
from tgate_fx import TGateConfig, ToCaConfig
from tgate_fx.methods.toca.config import fresh_count, fresh_ratio, official_step, step_kinds
from tgate_fx.tiny import tiny_pipeline

TOL = 1e-5


def dit_latents(pipe, steps, guidance_scale=4.0, labels=(1, 7), seed=0):
    """Final latents of a DiT generation (the input of the VAE decode)."""
    seen = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: (seen.append(z.clone()), decode(z, *a, **k))[1]
    try:
        pipe(list(labels), guidance_scale=guidance_scale, num_inference_steps=steps, output_type="pt",
             generator=torch.Generator().manual_seed(seed))
    finally:
        del pipe.vae.decode
    return seen[0]


def _oracle_kwargs(config: ToCaConfig) -> dict:
    c = config
    return dict(family=c.family, fresh_threshold=c.interval, fresh_ratio=c.ratio, ratio_scheduler=c.schedule,
                cache_type=c.score, soft_fresh_weight=c.cache_weight, bonus=(c.bonus_ratio, c.bonus_grid),
                compat=c.compat)


def _run(pipe, family, steps, call, tgate_gate=None):
    if family == "dit":
        return dit_latents(pipe, steps, **call)
    return latents(pipe, num_inference_steps=steps, **call)


def oracle_latents(pipe, family, config, steps, cfg, call, tgate=None):
    runtime = tgate_fx.get_runtime(pipe)
    denoiser = runtime.denoiser
    attr = "transformer"
    with eager_denoiser(pipe):
        oracle = ToCaOracle(denoiser, num_steps=steps, cfg=cfg, tgate_gate=tgate.gate_step if tgate else None,
                            **_oracle_kwargs(config))
        outer = None
        if tgate is not None:
            outer = OracleDenoiser(denoiser, cfg=cfg, gate_step=tgate.gate_step, sp_interval=tgate.sp_interval,
                                   fi_interval=tgate.fi_interval, warm_up=tgate.warm_up)
            object.__setattr__(pipe, attr, outer)
        try:
            return _run(pipe, family, steps, call), oracle
        finally:
            oracle.close()
            if outer is not None:
                outer.close()


# --- the schedule --------------------------------------------------------------------------------------------


def test_pixart_20_steps_n3_is_the_official_schedule():
    c = ToCaConfig().resolved("pixart")
    kinds = step_kinds(c, 20)
    assert [i for i, k in enumerate(kinds) if k == "full"] == [0, 6, 9, 12, 15, 18]
    assert [i for i, k in enumerate(kinds) if k == "mixed"] == [4]  # step 4: full in layer 0 only


SCHEDULES = [("pixart", {}, 20), ("pixart", {}, 50), ("pixart", {"interval": 5, "ratio": 0.1}, 30),
             ("pixart", {"compat": "clean"}, 20), ("pixart", {"ratio": 0.0}, 20),
             ("dit", {}, 50), ("dit", {"schedule": "ToCa-ddpm250"}, 250), ("dit", {"interval": 2}, 20),
             ("dit", {"ratio": 0.0, "interval": 4}, 50), ("dit", {"compat": "clean"}, 50)]


@pytest.mark.parametrize("family,settings,steps", SCHEDULES)
def test_schedule_and_k_equal_the_official_scheduler(family, settings, steps):
    """Every (step, layer) full or not, and k per (step, layer, module) at 1024 tokens (28 layers), as the
    official functions compute them (transcribed in oracle_toca.OfficialScheduler)."""
    c = ToCaConfig(**settings).resolved(family)
    official = OfficialScheduler(family, steps, fresh_threshold=c.interval, fresh_ratio=c.ratio,
                                 ratio_scheduler=c.schedule, compat=c.compat)
    kinds = step_kinds(c, steps)
    modules = ("cross", "mlp") if family == "pixart" else ("mlp",)
    for i in range(steps):
        official.set_call(i)
        fulls = [official.is_full(layer) for layer in range(28)]
        expected = "full" if all(fulls) else "partial" if not any(fulls) else "mixed"
        assert kinds[i] == expected, (i, fulls)
        assert fulls[1:] == [fulls[1]] * 27 and (expected != "mixed" or fulls[0])
        for layer in (0, 13, 27):
            for module in modules:
                ours = fresh_count(c, fresh_ratio(c, official_step(family, i, steps), steps, layer, module), 1024)
                theirs = int(official.ratio(layer, "cross-attn" if module == "cross" else module) * 1024)
                assert ours == theirs, (i, layer, module)


# --- exactness -----------------------------------------------------------------------------------------------

PIXART_CASES = [
    ("pixart_alpha", {}, 20, {}),
    ("pixart_alpha", {"interval": 4, "ratio": 0.2, "cache_weight": 0.5, "compat": "clean"}, 12, {}),
    ("pixart_alpha", {"interval": 2, "ratio": 0.5, "schedule": "constant", "bonus_ratio": 0.2, "bonus_grid": 2}, 10,
     {"guidance_scale": 1.0}),
    ("pixart_sigma", {}, 12, {}),
    ("pixart_sigma", {"ratio": 0.15}, 10, {"guidance_scale": 1.0}),
]
DIT_CASES = [
    ("dit", {}, 20, {}),
    ("dit", {"schedule": "ToCa-ddpm250", "ratio": 0.2}, 25, {}),
    ("dit", {"schedule": "constant", "ratio": 0.3, "interval": 4, "compat": "clean"}, 12, {"guidance_scale": 1.0}),
]


@pytest.mark.e2e
@pytest.mark.parametrize("family,settings,steps,call", PIXART_CASES + DIT_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(PIXART_CASES + DIT_CASES)])
def test_toca_equals_eager_oracle(family, settings, steps, call):
    pipe = tiny_pipeline(family)
    tgate_fx.optimize(pipe, toca=ToCaConfig(**settings))
    config = tgate_fx.get_runtime(pipe).method_config("toca")
    cfg = call.get("guidance_scale", 4.5) > 1
    expected, oracle = oracle_latents(pipe, "dit" if family == "dit" else "pixart", config, steps, cfg, call)
    partial = [entry for entry in oracle.log if entry[2] != "full"]
    assert partial and any(0 < k < 64 for *_, (_, ks) in partial for k in ks.values()), "no token was selected"
    got = _run(pipe, family, steps, call)
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, diff
    with eager_denoiser(pipe):
        plain = _run(pipe, family, steps, call)
    assert (plain - got).abs().max().item() > 1e-3  # the bound sees ToCa


RANDOM_CASES = [("pixart_alpha", {"score": "random"}, 12, {}),
                ("pixart_alpha", {"score": "random", "ratio": 0.5}, 8, {"guidance_scale": 1.0}),
                ("dit", {"score": "random"}, 12, {})]


@pytest.mark.e2e
@pytest.mark.parametrize("family,settings,steps,call", RANDOM_CASES, ids=[f"{c[0]}-{i}" for i, c in
                                                                          enumerate(RANDOM_CASES)])
def test_random_score_equals_eager_oracle_from_the_same_generator(family, settings, steps, call):
    """``score="random"`` (the ablation): the eager graphs draw their scores from torch's global generator where
    the oracle does (one ``rand(rows, N)`` per selection with k > 0, block order, cross-attention before MLP), so
    seeding it before each generation gives the oracle's latents; another seed selects other tokens."""
    pipe = tiny_pipeline(family)
    fam = "dit" if family == "dit" else "pixart"
    tgate_fx.optimize(pipe, toca=ToCaConfig(**settings))
    config = tgate_fx.get_runtime(pipe).method_config("toca")
    assert config.score == "random"
    cfg = call.get("guidance_scale", 4.5) > 1
    _run(pipe, family, steps, call)  # captures and builds the variants before the generator is seeded
    torch.manual_seed(11)
    got = _run(pipe, family, steps, call)
    torch.manual_seed(11)
    expected, oracle = oracle_latents(pipe, fam, config, steps, cfg, call)
    diff = (got - expected).abs().max().item()
    print(f"{family} {settings}: max |graphs - oracle| = {diff:.3g}")
    assert diff <= TOL, diff
    assert any(0 < k < 64 for *_, kind in oracle.log if kind != "full" for k in kind[1].values())
    torch.manual_seed(12)
    other = _run(pipe, family, steps, call)
    assert (other - got).abs().max().item() > 1e-3  # the draws choose the tokens
    assert torch.isfinite(other).all()


@pytest.mark.e2e
def test_mixed_step_runs_layer_0_full_only():
    pipe = tgate_fx.optimize(tiny_pipeline("pixart_alpha"), toca=ToCaConfig())
    config = tgate_fx.get_runtime(pipe).method_config("toca")
    _, oracle = oracle_latents(pipe, "pixart", config, 20, True, {})
    assert [(layer, kind if kind == "full" else "partial") for call, layer, kind in oracle.log if call == 4] == \
        [(0, "full"), (1, "partial")]
    plan = tgate_fx.get_runtime(pipe).plan(20, True)
    assert plan.steps[4].variant.name.startswith("toca_mixed")


# --- composition -----------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("gate,steps", [(4, 10), (7, 12)])
def test_toca_with_tgate_equals_composed_oracles(gate, steps):
    """T-GATE's gate (cross-attention cached, CFG dropped after it) with ToCa on self-attention and MLP: the T-GATE
    oracle's caching processors inside ToCa's oracle blocks."""
    pipe = tiny_pipeline("pixart_alpha")
    tgate = TGateConfig(gate_step=gate, sp_interval=1, fi_interval=1, warm_up=0)
    tgate_fx.optimize(pipe, tgate=tgate, toca=ToCaConfig())
    config = tgate_fx.get_runtime(pipe).method_config("toca")
    expected, oracle = oracle_latents(pipe, "pixart", config, steps, True, {}, tgate=tgate)
    got = latents(pipe, num_inference_steps=steps)
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, diff
    plan = tgate_fx.get_runtime(pipe).last_plan
    # full steps at the gate (their scores read by a later partial step: each full step's readers are its own)
    assert plan.steps[gate - 1].variant.name.startswith("gate+toca_full_")
    assert plan.steps[gate].variant.name.startswith("fi_record+toca_full_")
    assert any(s.variant.name.startswith("fi_record+toca_partial") for s in plan.steps)


@pytest.mark.e2e
def test_toca_with_tgate_reusing_self_attention_is_refused():
    # both methods would rewrite self-attention's output: the first call refuses, naming both, before any step runs
    pipe = tgate_fx.optimize(tiny_pipeline("pixart_alpha"), toca=ToCaConfig(),
                             tgate=TGateConfig(gate_step=5, sp_interval=2, fi_interval=1, warm_up=0))
    with pytest.raises(ValueError, match=r"methods 'tgate' and 'toca' cannot be composed: both rewrite node"):
        latents(pipe, num_inference_steps=8)


# --- graphs, compile, errors -----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_partial_graph_gathers_k_tokens_and_skips_self_attention():
    pipe = tgate_fx.optimize(tiny_pipeline("pixart_alpha"), toca=ToCaConfig())
    with tgate_fx.get_runtime(pipe).tracing() as trace:
        latents(pipe, num_inference_steps=20)
    aten = torch.ops.aten
    by_name = {v.name: v for _, _, v in trace}
    full = next(v for name, v in by_name.items() if name.startswith("toca_full_") and "unread" not in name)
    sdpa = lambda v: [n for n in v.graph_module.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert len(sdpa(full)) == 4
    plan = tgate_fx.get_runtime(pipe).last_plan
    step = next(s for s in plan.steps if s.variant.name.startswith("toca_partial") and s.step > 10)
    variant = by_name[step.variant.name]
    cores = sdpa(variant)
    assert len(cores) == 2  # cross-attention only, on k queries; self-attention read from the cache
    config = tgate_fx.get_runtime(pipe).method_config("toca")
    for layer, core in enumerate(cores):
        k = fresh_count(config, fresh_ratio(config, step.step, 20, layer, "cross"), 64)
        assert core.args[0].meta["val"].shape[2] == k < 64
    assert {k.slot for k in variant.reads} == {"attn", "cross", "mlp", "score", "count_cross", "count_mlp"}
    assert {k.slot for k in variant.records} == {"cross", "mlp", "score", "count_cross", "count_mlp"}


@pytest.mark.e2e
def test_each_variant_compiles_once_and_a_second_generation_compiles_nothing():
    from torch._dynamo.utils import counters

    pipe = tgate_fx.optimize(tiny_pipeline("pixart_alpha"), toca=ToCaConfig(), compile={"backend": "eager"})
    torch._dynamo.reset()
    counters.clear()
    first = latents(pipe, num_inference_steps=5)
    variants = {s.variant.name for s in tgate_fx.get_runtime(pipe).last_plan.steps}
    compiled = counters["stats"]["unique_graphs"]
    assert compiled == len(variants), (compiled, variants)
    second = latents(pipe, num_inference_steps=5)
    assert counters["stats"]["unique_graphs"] == compiled
    assert not counters["graph_break"]
    assert torch.equal(first, second)


@pytest.mark.e2e
def test_unsupported_denoiser_is_refused():
    with pytest.raises(TypeError, match="ToCa cannot apply to UNet2DConditionModel"):
        tgate_fx.optimize(tiny_pipeline("sd15"), toca=ToCaConfig())


def test_plan_without_family_says_how_to_get_one():
    with pytest.raises(ValueError, match="ToCaConfig has no family"):
        tgate_fx.Plan(10, ToCaConfig(), cfg=True)
    plan = tgate_fx.Plan(20, ToCaConfig(family="pixart"), cfg=True)
    assert plan.steps[4].variant.name.startswith("toca_mixed")


@pytest.mark.parametrize("kwargs,match", [
    ({"family": "sd"}, "family"), ({"interval": 0}, "interval"), ({"ratio": 1.5}, "ratio"),
    ({"schedule": "linear"}, "schedule"), ({"score": "entropy"}, "score"), ({"compat": "new"}, "compat"),
    ({"bonus_grid": 0}, "bonus_grid"),
])
def test_bad_settings_raise_naming_them(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ToCaConfig(**kwargs)


def test_official_defaults_per_family():
    assert ToCaConfig().resolved("pixart") == ToCaConfig("pixart", 3, 0.30, "ToCa", "attention", 0.25, 0.4, 4)
    assert ToCaConfig().resolved("dit") == ToCaConfig("dit", 3, 0.07, "ToCa-ddim50", "attention", 0.25, 0.6, 2)
    assert ToCaConfig(schedule="ToCa-ddpm250").resolved("dit").interval == 4
    assert dataclasses.asdict(ToCaConfig())["compat"] == "official"


# --- scores nothing reads --------------------------------------------------------------------------------------


def _maps_per_step(pipe, run):
    """Run ``run()`` and return, per step, the softmax nodes of its graph (the explicit attention maps) and the
    graph, as the runtime ran them."""
    with tgate_fx.get_runtime(pipe).tracing() as trace:
        got = run()
    softmax = (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)
    steps = [(sum(n.target in softmax for n in v.graph_module.graph.nodes), v) for _, _, v in trace]
    return got, steps


@pytest.mark.e2e
def test_a_score_nothing_reads_is_not_computed_and_results_are_unchanged():
    """DiT, 20 steps: the oracle's log says which full layer's score a later partial step reads (k > 0 before the
    layer's next full step); each graph has the map of exactly those layers (the first full step's readers of layer 0
    all have k = 0, the last full step has none), and the MACs of a graph without maps are the plain model's."""
    from tgate_fx.accounting.macs import count_macs

    pipe = tiny_pipeline("dit")
    tgate_fx.optimize(pipe, toca=ToCaConfig())
    config = tgate_fx.get_runtime(pipe).method_config("toca")
    expected, oracle = oracle_latents(pipe, "dit", config, 20, True, {})
    got, steps = _maps_per_step(pipe, lambda: dit_latents(pipe, 20))
    assert (got - expected).abs().max().item() <= TOL
    log = {(call, layer): kind for call, layer, kind in oracle.log}
    depth = 1 + max(layer for _, layer in log)

    def read(call: int, layer: int) -> bool:
        for later in range(call + 1, 20):
            kind = log[later, layer]
            if kind == "full":
                return False
            if any(k > 0 for k in kind[1].values()):
                return True
        return False

    wanted = [sum(log[i, layer] == "full" and read(i, layer) for layer in range(depth)) for i in range(20)]
    assert [maps for maps, _ in steps] == wanted
    # step 0: layer 0's readers (steps 1-3) all have k = 0; the last step is full and nothing follows it
    assert wanted[0] < depth and wanted[19] == 0 and max(wanted) == depth
    base = count_macs(tgate_fx.get_runtime(pipe).captures[0].capture.graph_module).total
    assert count_macs(steps[19][1].graph_module).total == base  # everything, and no map
    assert count_macs(steps[wanted.index(depth)][1].graph_module).total > base


@pytest.mark.e2e
def test_fora_computes_no_score():
    """``ratio=0`` (FORA): no step refreshes a token, so no graph forms a map; the latents equal the oracle's."""
    pipe = tiny_pipeline("pixart_alpha")
    tgate_fx.optimize(pipe, toca=ToCaConfig(ratio=0))
    config = tgate_fx.get_runtime(pipe).method_config("toca")
    expected, _ = oracle_latents(pipe, "pixart", config, 10, True, {})
    got, steps = _maps_per_step(pipe, lambda: latents(pipe, num_inference_steps=10))
    assert (got - expected).abs().max().item() <= TOL
    assert [maps for maps, _ in steps] == [0] * 10
    names = [p.variant.name for p in tgate_fx.get_runtime(pipe).last_plan.steps]
    assert "toca_full_unread" in names and not any(n.startswith("toca_full") and n != "toca_full_unread"
                                                    for n in names)
    assert not any("score" in str(k) for _, v in steps for k in v.records)
