"""The step plan: T-GATE equals the reference schedule for every setting; DeepCache's schedule; composition."""

import itertools

import pytest

from oracle import reference_schedule
from tgate_fx import DeepCacheConfig, Plan, TGateConfig
from tgate_fx.methods.tgate import CROSS, SELF


def _flags_from_plan(step):
    tgate = step.methods["tgate"]

    def flags(group):
        actions = {r.action for r in tgate.rewrites if r.group == group}
        return {"cache": "record" in actions, "reuse": "reuse" in actions}

    mean = any(r.reduce == "cfg_mean" for r in tgate.rewrites)
    return flags(CROSS), flags(SELF), not mean


SETTINGS = [
    (steps, gate, sp, fi, warm)
    for steps, gate, sp, fi, warm in itertools.product(
        (1, 2, 4, 10, 25, 50), (1, 2, 3, 10, 15, 25, 50), (1, 2, 3, 5), (1, 2, 3), (0, 1, 2, 5)
    )
    if gate <= steps
]


@pytest.mark.parametrize("cfg", [True, False])
def test_plan_equals_reference_schedule(cfg):
    for steps, gate, sp, fi, warm in SETTINGS:
        plan = Plan(steps, TGateConfig(gate, sp, fi, warm), cfg=cfg)
        for cur, step in enumerate(plan.steps):
            ca, sa, keep_shape = reference_schedule(cur, gate, sp, fi, warm)
            got_ca, got_sa, got_keep = _flags_from_plan(step)
            where = f"steps={steps} gate={gate} sp={sp} fi={fi} warm_up={warm} cur={cur}"
            assert (got_ca, got_sa) == (ca, sa), where
            # keep_shape=False at the gate means "mean of CFG halves"; without CFG (lcm) the full tensor.
            assert got_keep == (keep_shape or not cfg), where
            assert step.cfg == (cfg and cur < gate), where
            assert step.drops_uncond == (cfg and cur >= gate), where


def test_plan_equals_published_package_scheduler():
    tgate_utils = pytest.importorskip("tgate.tgate_utils")
    for steps, gate, sp, fi, warm in SETTINGS:
        plan = Plan(steps, TGateConfig(gate, sp, fi, warm), cfg=True)
        for cur, step in enumerate(plan.steps):
            ca, sa, keep = tgate_utils.tgate_scheduler(cur, gate, sp, fi, warm)
            assert _flags_from_plan(step) == (ca, sa, keep), (steps, gate, sp, fi, warm, cur)


def test_sdxl_defaults_example_from_reference_doc():
    plan = Plan(25, TGateConfig(gate_step=10, sp_interval=5, fi_interval=1, warm_up=2), cfg=True)
    columns = [dict(s.methods["tgate"].columns) for s in plan.steps]
    assert [s.step for s, c in zip(plan.steps, columns) if c["self-attn"] == "reuse"] == [3, 4, 6, 7, 8]
    assert _flags_from_plan(plan.steps[9])[2] is False  # the gate records the CFG mean
    assert plan.writes(9) == ("tgate:cross", "tgate:self") and plan.reads(3) == ("tgate:self",)
    assert all(c == {"cross-attn": "reuse", "self-attn": "record"} and not s.cfg
               for s, c in zip(plan.steps[10:], columns[10:]))
    assert list(plan.variants) == ["sp_compute", "sp_record", "sp_reuse", "gate", "fi_record"]


def test_plan_prints_a_table():
    text = str(Plan(12, TGateConfig(gate_step=6, sp_interval=3, fi_interval=2, warm_up=1), cfg=True))
    lines = text.splitlines()
    assert lines[0].startswith("Plan(num_steps=12, gate_step=6")
    assert lines[1].split() == ["step", "phase", "variant", "CFG", "cross-attn", "self-attn", "reads", "writes"]
    assert len(lines) == 3 + 12
    assert "fi_reuse" in text and "cross,self (CFG mean)" in text


def test_gate_beyond_steps_is_rejected():
    with pytest.raises(ValueError, match="gate_step=11 is beyond the 10 denoising steps"):
        Plan(10, TGateConfig(gate_step=11), cfg=True)


def test_no_cfg_gate_records_full_tensor():
    plan = Plan(4, TGateConfig(gate_step=1, sp_interval=1, fi_interval=1, warm_up=0), cfg=False)
    assert plan.steps[0].variant.name == "gate" and _flags_from_plan(plan.steps[0])[2] is True
    assert all(r[3] is None for r in plan.to_dict()["steps"][0]["rewrites"])
    assert not any(s.drops_uncond for s in plan.steps)


def _deepcache_full_steps(plan):
    return [s.step for s in plan.steps if s.methods["deepcache"].label == "dc_full"]


@pytest.mark.parametrize("interval,steps", [(1, 5), (2, 9), (3, 25), (5, 12)])
def test_deepcache_alone_is_uniform(interval, steps):
    # DeepCacheSDHelper, uniform mode: full where (step - first step) % cache_interval == 0.
    plan = Plan(steps, DeepCacheConfig(cache_interval=interval), cfg=True)
    assert _deepcache_full_steps(plan) == list(range(0, steps, interval))
    assert not any(s.drops_uncond for s in plan.steps)
    assert plan.reads(1) == (() if interval == 1 else ("deepcache:entry",))


def test_tgate_deepcache_restarts_deepcache_at_the_gate_as_the_reference():
    # tgate/SD_DeepCache.py disables and re-enables the helper at steps gate-1 and gate:
    # both are full steps, and the count starts again from each.
    plan = Plan(25, [TGateConfig(10, 1, 1, 0), DeepCacheConfig(3, 0)], cfg=True)
    assert _deepcache_full_steps(plan) == [0, 3, 6, 9, 10, 13, 16, 19, 22]
    assert plan.steps[9].variant.name == "gate+dc_full" and plan.steps[11].variant.name == "fi_record+dc_partial"
    text = str(plan)
    assert text.splitlines()[1].split() == ["step", "phase", "variant", "CFG", "cross-attn", "self-attn",
                                            "deepcache", "reads", "writes"]
    assert "(CFG mean: tgate)" in text


def test_methods_compose_in_a_fixed_order_and_only_once():
    a = Plan(6, [DeepCacheConfig(2), TGateConfig(3, 1, 1, 0)], cfg=True)
    b = Plan(6, [TGateConfig(3, 1, 1, 0), DeepCacheConfig(2)], cfg=True)
    assert a == b and [m.name for m in a.methods] == ["tgate", "deepcache"]
    with pytest.raises(ValueError, match="once"):
        Plan(6, [TGateConfig(), TGateConfig()], cfg=True)
    with pytest.raises(TypeError, match="method config"):
        Plan(6, ["tgate"], cfg=True)


@pytest.mark.parametrize("kwargs,error", [
    (dict(cache_interval=0), ValueError), (dict(cache_branch_id=-1), ValueError),
    (dict(cache_interval=2.0), TypeError), (dict(skip_mode="non-uniform"), ValueError)])
def test_bad_deepcache_settings_are_named(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        DeepCacheConfig(**kwargs)
