"""The step plan equals the reference T-GATE schedule for every setting."""

import itertools

import pytest

from oracle import reference_schedule
from tgate_fx import Plan, TGateConfig
from tgate_fx.plan import CROSS, SELF


def _flags_from_plan(step):
    def flags(role):
        return {"cache": role in step.variant.record, "reuse": role in step.variant.reuse}

    return flags(CROSS), flags(SELF), not step.variant.cfg_mean


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


def test_plan_equals_published_package_scheduler():
    tgate_utils = pytest.importorskip("tgate.tgate_utils")
    for steps, gate, sp, fi, warm in SETTINGS:
        plan = Plan(steps, TGateConfig(gate, sp, fi, warm), cfg=True)
        for cur, step in enumerate(plan.steps):
            ca, sa, keep = tgate_utils.tgate_scheduler(cur, gate, sp, fi, warm)
            assert _flags_from_plan(step) == (ca, sa, keep), (steps, gate, sp, fi, warm, cur)


def test_sdxl_defaults_example_from_reference_doc():
    plan = Plan(25, TGateConfig(gate_step=10, sp_interval=5, fi_interval=1, warm_up=2), cfg=True)
    assert [s.step for s in plan.steps if s.self_attn == "reuse"] == [3, 4, 6, 7, 8]
    assert plan.steps[9].variant.record == {SELF, CROSS} and plan.steps[9].variant.cfg_mean
    assert all(s.cross == "reuse" and s.self_attn == "record" and not s.cfg for s in plan.steps[10:])
    assert list(plan.variants) == ["sp_compute", "sp_record", "sp_reuse", "gate", "fi_record"]
    assert plan.reads(3) == ("self",) and plan.writes(9) == ("cross", "self")


def test_plan_prints_a_table():
    text = str(Plan(12, TGateConfig(gate_step=6, sp_interval=3, fi_interval=2, warm_up=1), cfg=True))
    lines = text.splitlines()
    assert lines[0].startswith("Plan(num_steps=12, gate_step=6")
    assert lines[1].split() == ["step", "phase", "variant", "CFG", "cross-attn", "self-attn", "reads", "writes"]
    assert len(lines) == 3 + 12
    assert "fi_reuse" in text and "(CFG mean)" in text


def test_gate_beyond_steps_is_rejected():
    with pytest.raises(ValueError, match="gate_step=11 is beyond the 10 denoising steps"):
        Plan(10, TGateConfig(gate_step=11), cfg=True)


def test_no_cfg_gate_records_full_tensor():
    plan = Plan(4, TGateConfig(gate_step=1, sp_interval=1, fi_interval=1, warm_up=0), cfg=False)
    assert plan.steps[0].variant.name == "gate" and not plan.steps[0].variant.cfg_mean
    assert plan.to_dict()["steps"][0]["cfg_mean"] is False
