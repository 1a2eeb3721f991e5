"""train.budget_minutes: StepBudget's fit and refits against hand arithmetic and a simulated machine, and
the LR schedule that follows a refit (fmcli.optim.LRSchedule) against its closed form."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import QuietLog
from fmcli import budget as budget_mod
from fmcli.budget import FIRST_EVENT_SHARE, MARGIN_SHARE, StepBudget, Work
from fmcli.checkpoint import load_checkpoint, resolve_checkpoint
from fmcli.config import load_config, validate_config
from fmcli.optim import LRSchedule, build_schedulers
from fmcli.train import train


# torch on one thread for this module's tiny in-process models (conftest.one_thread): the same checks, faster.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_first_fit_leaves_room_for_the_final_checkpoint_and_periodic_work():
    b = StepBudget(seconds=100.0, started=0.0, requested_steps=10_000, work=(Work(0, at_end=True),))
    # 90 s left at 0.1 s/step, less the 1 % margin and the final event (2 % of the budget: never timed)
    assert b.first_fit(now=10.0, step_seconds=0.1) == int((90 - MARGIN_SHARE * 100 - FIRST_EVENT_SHARE * 100) / 0.1)
    b = StepBudget(seconds=100.0, started=0.0, requested_steps=10_000, work=(Work(200, at_end=True, seconds=3.0), Work(400, seconds=1.0)))
    # n steps bring a 3 s event every 200 steps and at the end, and a 1 s one every 400 (where both fall, both run)
    n = b.first_fit(now=10.0, step_seconds=0.1)
    left = 90.0 - MARGIN_SHARE * 100
    cost = lambda n: n * 0.1 + (len(range(200, n, 200)) + 1) * 3.0 + len(range(400, n + 1, 400)) * 1.0  # noqa: E731
    assert cost(n) <= left < cost(n + 1)
    b.record_work(0, 2.0)  # observed: replaces the estimate
    assert b.work[0].cost(100.0) == 2.0 and b.first_fit(now=10.0, step_seconds=0.1) > n


def test_the_budget_never_raises_the_requested_steps():
    assert StepBudget(100.0, 0.0, requested_steps=50).first_fit(now=0.0, step_seconds=1e-4) == 50


def simulate(pace_of, seconds=120.0, requested=100_000, log_every=50, first_estimate=None, period=500, event=1.5):
    """A run on a simulated machine whose step `s` takes pace_of(s) seconds and whose periodic work takes
    `event` seconds: the loop Trainer runs, with refits at log intervals. Returns (steps, end time, budget)."""
    b = StepBudget(seconds, started=0.0, requested_steps=requested, work=(Work(period, at_end=True),))
    now = 5.0  # setup and compiling
    total = b.first_fit(now, first_estimate or pace_of(0))
    step, overhead = 0, 0.0
    while step < total:
        now += pace_of(step)
        step += 1
        if step % log_every == 0 and step < total:
            total = b.refit(step, now, overhead)
        if step % period == 0 and step < total:
            now, overhead = now + event, overhead + event
            b.record_work(0, event)
    return step, now + event, b  # + the final checkpoint and sample grid


@pytest.mark.parametrize("case", ["steady", "slows down 1.5x", "speeds up", "first timing 25 % optimistic"])
def test_refits_end_the_run_within_the_budget_on_a_drifting_machine(case):
    paces = {
        "steady": lambda s: 0.1,
        "slows down 1.5x": lambda s: 0.1 if s < 300 else 0.15,
        "speeds up": lambda s: 0.15 if s < 300 else 0.1,
        "first timing 25 % optimistic": lambda s: 0.1,
    }
    first = 0.075 if "optimistic" in case else None
    steps, end, budget = simulate(paces[case], first_estimate=first)
    # within the budget, and not more than a few steps' worth short of it
    assert 120.0 - 3.0 <= end <= 120.0, (case, end, steps)
    assert budget.refits >= (0 if case == "steady" else 1)
    if case == "steady":  # the first fit was right: refits only ever confirm it (give or take one step)
        assert abs(steps - int((120 * (1 - MARGIN_SHARE) - 5 - 1.5 * (1 + (steps - 1) // 500)) / 0.1)) <= 2


@pytest.mark.parametrize("period, log_every, event", [(300, 100, 5.0), (500, 100, 3.0), (200, 100, 1.5)])
def test_a_refit_at_a_step_with_periodic_work_reserves_that_work(period, log_every, event):
    # The trainer refits at a log interval before that step's checkpoint / grid / evaluation: a refit that took
    # that work for done fitted steps for its time and, as the last refit of the run, ended it late (123.8 s of 120).
    for seconds in (100.0, 120.0, 150.0):
        steps, end, budget = simulate(lambda s: 0.1, seconds=seconds, log_every=log_every, period=period, event=event)
        assert end <= seconds, (seconds, steps, end)


def test_log_intervals_longer_than_the_pace_window_still_refit():
    steps, end, budget = simulate(lambda s: 0.01 if s < 3000 else 0.015, seconds=120.0, log_every=1500, period=10**9)
    assert budget.refits >= 1 and end <= 120.0


def test_a_start_of_run_timing_alone_overruns_where_refits_do_not():
    # The failure this module exists for: timed at 0.1 s/step, then 1.5x slower -> a fixed fit runs over.
    pace = lambda s: 0.1 if s < 300 else 0.15  # noqa: E731
    fixed = StepBudget(120.0, 0.0, 100_000, (Work(500, at_end=True),)).first_fit(5.0, 0.1)
    fixed_end = 5.0 + sum(pace(s) for s in range(fixed)) + 1.5 * (len(range(500, fixed, 500)) + 1)
    assert fixed_end > 130.0
    assert simulate(pace)[1] <= 120.0


# ------------------------------------------------------------------------------------------ schedule


def lr_factor(step: int, total: int, warmup_frac: float, start: float, lo: float) -> float:
    """The schedule's closed form (independent reference): linear warmup, then cosine to `lo`."""
    warmup = int(round(warmup_frac * total))
    if step < warmup:
        return start + (1 - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))


def test_an_unretargeted_schedule_is_lr_factor_exactly():
    s = LRSchedule(300, 0.05, 0.1, 0.1)
    assert [s(k) for k in range(320)] == [lr_factor(k, 300, 0.05, 0.1, 0.1) for k in range(320)]


@pytest.mark.parametrize("at, new_total", [(100, 200), (100, 600), (15, 150), (250, 260)])
def test_retarget_keeps_the_lr_continuous_and_ends_the_cosine_at_the_new_total(at, new_total):
    total, warmup, lo = 300, 15, 0.1
    s = LRSchedule(total, 0.05, 0.1, lo)
    before = s(at)
    s.retarget(at, new_total)
    assert s(at) == pytest.approx(before, rel=1e-12)
    # Closed form: the cosine's progress at `at` (p0), then linear in steps up to 1 at new_total.
    p0 = max(0.0, (at - warmup) / (total - warmup))
    start = max(at, warmup)
    for k in range(start, new_total + 5):
        p = min(1.0, p0 + (1 - p0) * (k - start) / (new_total - start))
        assert s(k) == pytest.approx(lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p)), rel=1e-12), k
    assert s(new_total) == pytest.approx(lo)


@pytest.mark.parametrize("at, new_total", [(5, 150), (5, 600), (1, 40)])
def test_a_retarget_during_warmup_warms_up_to_the_new_lengths_warmup_then_follows_its_schedule(at, new_total):
    s = LRSchedule(300, 0.05, 0.1, 0.1)  # warmup: 15 steps
    before = s(at)
    s.retarget(at, new_total)
    assert s(at) == pytest.approx(before, rel=1e-12)
    warmup = round(0.05 * new_total)
    rising = [s(k) for k in range(at, warmup + 1)]
    assert all(a < b for a, b in zip(rising, rising[1:])) and s(warmup) == 1.0
    # From the new warmup's end the schedule is the one planned for the new length from the start.
    assert [s(k) for k in range(warmup, new_total + 5)] == pytest.approx([lr_factor(k, new_total, 0.05, 0.1, 0.1) for k in range(warmup, new_total + 5)], rel=1e-12)


@pytest.mark.parametrize("total, at, new_total", [(200, 4, 9), (300, 10, 60), (300, 14, 250)])
def test_a_run_shortened_during_warmup_decays_from_the_current_lr_to_the_floor_at_its_new_end(total, at, new_total):
    """The new length's warmup (5 %) ends before `at`: the old code kept warming up to the old warmup's end,
    past the new end (fm resume --set train.steps=9 at step 4 of 200 trained its last step at 8.2x the start LR)."""
    s = LRSchedule(total, 0.05, 0.1, 0.1)
    before = s(at)
    assert at < round(0.05 * total) and round(0.05 * new_total) <= at
    s.retarget(at, new_total)
    assert s(at) == pytest.approx(before, rel=1e-12)
    after = [s(k) for k in range(at, new_total + 1)]
    assert all(a > b for a, b in zip(after, after[1:]))  # decaying from the retarget on
    assert s(new_total) == pytest.approx(0.1, rel=1e-12) and s(new_total + 3) == pytest.approx(0.1, rel=1e-12)


def test_a_constant_lr_schedule_shortened_during_warmup_still_reaches_its_peak_at_the_new_end():
    s = LRSchedule(40, 0.1, 0.1, 1.0)  # warmup 4 steps, then the LR stays at its peak (min_lr_factor = 1)
    before = s(2)
    s.retarget(2, 10)  # the new warmup (1 step) is over
    assert s(2) == pytest.approx(before, rel=1e-12) and s(10) == 1.0
    assert all(a < b for a, b in zip([s(k) for k in range(2, 11)], [s(k) for k in range(3, 11)]))


@pytest.mark.parametrize("at, new_total", [(6, 40), (1, 5), (4, 30)])
def test_a_run_shortened_during_warmup_below_the_floor_rises_to_the_floor_without_a_jump(at, new_total):
    """min_lr_factor above warmup_start_factor: the warmup's LR at `at` is under the cosine's floor and the new
    length's warmup (10 %) is over. The old code took the cosine over at its end, a jump up to the floor
    (0.37 -> 0.5 at step 6 of 200 refitted to 40); now a straight line from the current LR to the floor at the new end."""
    s = LRSchedule(200, 0.1, 0.1, 0.5)  # warmup: 20 steps, from 0.1 to 1, then the cosine down to 0.5
    before = 0.1 + 0.9 * at / 20  # the warmup's closed form at `at`
    assert s(at) == pytest.approx(before, rel=1e-12) and before < 0.5 and round(0.1 * new_total) <= at
    s.retarget(at, new_total)
    expected = [before + (0.5 - before) * (k - at) / (new_total - at) for k in range(at, new_total + 1)] + [0.5] * 3
    assert [s(k) for k in range(at, new_total + 4)] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("configured, fitted, factor", [(5, 1000, 0.1), (1000, 5, 1.0)])
def test_a_refit_before_the_first_step_sets_that_steps_lr_to_the_new_schedules(configured, fitted, factor):
    """train.steps=5 has no warmup (round(0.05 x 5) = 0), a fit of 1000 has 50 steps of it, from 0.1 x lr: the
    first step ran at the old schedule's LR (LambdaLR sets it at construction), 10x too high (and 10x too low the other way)."""
    from fmcli.distributed import DistContext
    from fmcli.step import TrainingStep

    cfg = load_config("debug", ["data.source='shapes'", "model.image_size=8", "model.in_channels=1", "model.num_classes=0",
                                "optim.name='muon'", f"train.steps={configured}", "train.global_batch_size=4"])
    step = TrainingStep(cfg, DistContext(), micro=4, accum=1, shape=(1, 8, 8))
    step.set_total_steps(fitted, at_step=0)
    assert [g["lr"] for g in step.optimizer.param_groups] == pytest.approx([factor * cfg.optim.lr] * len(step.optimizer.param_groups), rel=1e-12)


def test_a_retargeted_schedule_survives_the_scheduler_checkpoint():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    class One:
        optimizers = [opt]

    schedule, (sched,) = build_schedulers(One(), load_config("debug").optim, 300)
    for _ in range(120):
        opt.step()
        sched.step()
    schedule.retarget(120, 200)
    state = sched.state_dict()
    fresh_schedule, (fresh,) = build_schedulers(One(), load_config("debug").optim, 300)  # the config's length
    fresh.load_state_dict(state)
    assert [fresh_schedule(k) for k in range(120, 210)] == [schedule(k) for k in range(120, 210)]


# ------------------------------------------------------------------------------------ in the trainer


class SimulatedMachine(QuietLog):
    """Advances a fake clock by pace(step) per training step (through the progress callback the loop calls
    once per step); budget_mod.clock reads it."""

    def __init__(self, pace):
        self.now, self.pace, self.lines = 0.0, pace, []

    def info(self, message):
        self.lines.append(message)

    def progress(self, total, start):
        def update(step, loss, total=None):
            if step is not None and total is None:
                self.now += self.pace(step)

        return update


def cfg_for(data, *overrides):
    return load_config("debug", [f"data.path='{data}'", *overrides])


def test_the_trainer_refits_its_steps_when_the_machine_slows_down_and_a_resume_keeps_them(tmp_path, shapes16, monkeypatch):
    machine = SimulatedMachine(lambda step: 0.01 if step < 30 else 0.02)
    monkeypatch.setattr(budget_mod, "clock", lambda: machine.now)
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_step_seconds", lambda self, probes: 0.01)
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_work", lambda self, cfg, probes: (0.02, 0.03, None))  # checkpoint, grid, no eval
    overrides = ["train.steps=400", "train.budget_minutes=0.02", "train.log_every=1", "train.checkpoint_every=40",
                 "train.sample_every=0", "optim.warmup_frac=0.05"]
    result = train(cfg_for(shapes16, *overrides), tmp_path / "run", log=machine)
    state = load_checkpoint(resolve_checkpoint(tmp_path / "run"))
    budget = state["hardware"]["budget"]
    # each checkpoint (every 40, and the last) reserved at its measured 0.02 s, the final grid at 0.03 s
    first = max(n for n in range(1, 400) if n * 0.01 + (len(range(40, n, 40)) + 1) * 0.02 + 0.03 <= 1.2 * (1 - MARGIN_SHARE))
    assert f"-> {first} steps" in machine.lines[[i for i, line in enumerate(machine.lines) if "(measured)" in line][0]]
    assert budget["refits"] >= 1 and result.step == budget["steps"] == state["config"]["train"]["steps"]
    # env.json says what ran too: the last fit (it kept the first one, a run of more steps with no refits)
    env_budget = json.loads((tmp_path / "run" / "env.json").read_text())["hardware"]["budget"]
    assert (env_budget["steps"], env_budget["refits"]) == (result.step, budget["refits"])
    assert result.step < first - 20  # the slowdown cost steps
    assert machine.now <= 1.2  # the simulated run ended within its 1.2 s
    assert any("budget:" in line and "pace" in line for line in machine.lines)
    # The LR never jumps: per step it falls by no more than twice the final cosine's steepest slope (a
    # re-planned cosine would drop by ~30 % of the peak in one step at the refit).
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "lr" in json.loads(line)]
    warmup, peak, lo = round(0.05 * first), max(lrs), load_config("debug").optim.min_lr_factor
    steepest = (1 - lo) * peak * math.pi / 2 / (result.step - warmup)
    drops = [a - b for a, b in zip(lrs[warmup:], lrs[warmup + 1:])]
    assert min(drops) >= -1e-12 and max(drops) < 2 * steepest

    # A resume from the first checkpoint continues that checkpoint's schedule: no refits in it.
    ckpt = tmp_path / "run" / "checkpoints"
    first_ckpt = sorted(ckpt.glob("*.pt"))[0]
    saved = load_checkpoint(first_ckpt)
    machine.pace = lambda step: 1.0  # a very slow machine now: a refit would cut the run short
    resumed = train(validate_config(saved["config"]), tmp_path / "run", resume_from=first_ckpt, log=machine)
    assert resumed.step == saved["config"]["train"]["steps"]


# --------------------------------------------------------------------------------- budget fallback


FALLBACK = ["train.budget_fallback.min_steps=100", "train.budget_fallback.overrides=['model.hidden_size=16', 'optim.lr=3e-3']"]
WORK = (0.3, 0.5, None)  # seconds of a checkpoint and a sample grid, as if measured (the simulated clock stands still)


@pytest.mark.parametrize("step_seconds, falls_back", [(0.05, True), (0.001, False)])
def test_a_machine_too_slow_for_the_recipe_trains_the_fallback(tmp_path, shapes16, monkeypatch, step_seconds, falls_back):
    machine = SimulatedMachine(lambda step: step_seconds)
    monkeypatch.setattr(budget_mod, "clock", lambda: machine.now)
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_step_seconds", lambda self, probes: step_seconds)
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_work", lambda self, cfg, probes: WORK)
    cfg = cfg_for(shapes16, "train.steps=150", "train.budget_minutes=0.1", "train.log_every=50", *FALLBACK)
    assert cfg.model.hidden_size != 16
    result = train(cfg, tmp_path / "run", log=machine)
    state = load_checkpoint(resolve_checkpoint(tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    budget = state["hardware"]["budget"]
    if falls_back:  # 6 s at 0.05 s/step and 0.3 s per checkpoint (every 10): ~68 steps, under min_steps=100
        assert state["config"]["model"]["hidden_size"] == saved["model"]["hidden_size"] == 16
        assert state["config"]["optim"]["lr"] == 3e-3 and state["config"]["train"]["budget_fallback"] is None
        assert budget["fallback"]["from_steps"] < 100 and budget["fallback"]["overrides"] == ["model.hidden_size=16", "optim.lr=3e-3"]
        assert any("training the preset's fallback instead: model.hidden_size=16 optim.lr=3e-3" in line for line in machine.lines)
        assert machine.now <= 6.0 and result.step == budget["steps"]
    else:
        assert state["config"]["model"]["hidden_size"] == cfg.model.hidden_size and budget["fallback"] is None
        assert result.step == 150
    assert len(list((tmp_path / "run" / "checkpoints").glob("*.pt"))) >= 1


@pytest.mark.parametrize("repa, falls_back", [("domain", False), ("none", True)])
def test_a_repa_run_falls_back_under_its_own_threshold(tmp_path, shapes16, monkeypatch, repa, falls_back):
    """~68 steps fit: under min_steps (100) but over min_steps_with_repa (50), which applies only with REPA on."""
    machine = SimulatedMachine(lambda step: 0.05)
    monkeypatch.setattr(budget_mod, "clock", lambda: machine.now)
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_step_seconds", lambda self, probes: 0.05)
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_work", lambda self, cfg, probes: WORK)
    cfg = cfg_for(shapes16, "train.steps=150", "train.budget_minutes=0.1", "train.log_every=50", *FALLBACK,
                  "train.budget_fallback.min_steps_with_repa=50", f"repa.encoder={repa}", *(["repa.depth=1"] if repa == "domain" else []))
    train(cfg, tmp_path / "run", log=machine)
    budget = load_checkpoint(resolve_checkpoint(tmp_path / "run"))["hardware"]["budget"]
    assert (budget["fallback"] is not None) == falls_back
    if falls_back:
        assert budget["fallback"]["min_steps"] == 100
        assert any("under train.budget_fallback.min_steps=100" in line for line in machine.lines)


def test_the_fallback_rebuilds_the_step_not_the_evaluator(tmp_path, shapes16, monkeypatch):
    """A fallback changes what the config decides for the step (config, hardware choice, TrainingStep) and
    nothing else: the evaluator (eval.* and the data, which a fallback never sets) is built once."""
    import fmcli.train as train_mod

    machine = SimulatedMachine(lambda step: 0.05)
    monkeypatch.setattr(budget_mod, "clock", lambda: machine.now)
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_step_seconds", lambda self, probes: 0.05)
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_work", lambda self, cfg, probes: WORK)
    built = []
    make_evaluator = train_mod.make_evaluator
    monkeypatch.setattr(train_mod, "make_evaluator", lambda *a, **k: built.append(a[0]) or make_evaluator(*a, **k))
    cfg = cfg_for(shapes16, "train.steps=150", "train.budget_minutes=0.1", "train.log_every=50", "eval.every=1000", "eval.features='tiny'", *FALLBACK)
    train(cfg, tmp_path / "run", log=machine)
    assert load_checkpoint(resolve_checkpoint(tmp_path / "run"))["config"]["model"]["hidden_size"] == 16  # it fell back
    assert len(built) == 1
    assert sum("eval.ref is unset" in line for line in machine.lines) == 1


@pytest.mark.parametrize("overrides, message", [
    (["train.budget_fallback.min_steps=10", "train.budget_fallback.overrides=['data.count=5']"], "a fallback sets model.*"),
    (["train.budget_fallback.min_steps=10", "train.budget_fallback.overrides=['model.hidden_size=-3']"], "model.hidden_size"),
    (["train.budget_fallback.min_steps=10", "train.budget_fallback.overrides=['model.hiden=3']"], "unknown setting 'hiden'"),
    (["train.budget_fallback.overrides=['model.hidden_size=32']"], "min_steps: Field required"),
])
def test_a_bad_fallback_is_a_clear_config_error(overrides, message):
    from fmcli.errors import UsageError

    base = [] if any("budget_minutes" in o for o in overrides) else ["train.budget_minutes=5"]
    with pytest.raises(UsageError, match=message.replace("*", r"\*").replace(".", r"\.")):
        load_config("debug", [*base, *overrides])


def test_an_explicit_setting_wins_over_the_presets_fallback():
    assert load_config("quickstart").train.budget_fallback.overrides == ["model.hidden_size=64"]
    # the user's width (or a model size, which sets it) is never replaced by the fallback's
    assert load_config("quickstart", ["model.hidden_size=256"]).train.budget_fallback is None
    assert load_config("quickstart", ["model.size=DiT-S/4", "model.depth=2"]).train.budget_fallback is None
    # settings the fallback does not touch keep it; null switches it off
    assert load_config("quickstart", ["model.depth=2"]).train.budget_fallback is not None
    assert load_config("quickstart", ["train.budget_fallback=null"]).train.budget_fallback is None


def test_an_explicit_size_field_wins_over_a_fallback_that_names_a_model_size(tmp_path):
    # A fallback's model.size sets hidden_size, depth, heads and patch_size: the user's --set model.depth=3 was
    # kept beside it and silently replaced by DiT-S/4's depth 12 when the fallback trained.
    preset = tmp_path / "sized.toml"
    preset.write_text('base = "debug"\n[train]\nbudget_minutes = 5\n[train.budget_fallback]\nmin_steps = 100\noverrides = ["model.size=DiT-S/4"]\n')
    assert load_config(str(preset)).train.budget_fallback is not None
    for field in ("hidden_size=64", "depth=3", "heads=4", "patch_size=2"):
        assert load_config(str(preset), [f"model.{field}"]).train.budget_fallback is None, field
    # a setting no size names keeps the fallback
    assert load_config(str(preset), ["model.mlp_ratio=2"]).train.budget_fallback is not None


def test_no_fallback_where_the_budget_did_not_cut_the_steps_or_init_from_fixes_the_model(tmp_path, shapes16, monkeypatch, debug_run):
    machine = SimulatedMachine(lambda step: 0.05)
    monkeypatch.setattr(budget_mod, "clock", lambda: machine.now)
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_step_seconds", lambda self, probes: 0.05)
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_work", lambda self, cfg, probes: WORK)
    # 30 requested steps all fit (though under min_steps=100): nothing was cut, the recipe stays
    train(cfg_for(shapes16, "train.steps=30", "train.budget_minutes=0.1", *FALLBACK), tmp_path / "short", log=machine)
    assert load_checkpoint(resolve_checkpoint(tmp_path / "short"))["hardware"]["budget"]["fallback"] is None
    # cut under min_steps, but starting from a checkpoint's weights: a resized model could not load them
    cfg = cfg_for(shapes16, "train.steps=150", "train.budget_minutes=0.1", f"train.init_from='{debug_run}'", *FALLBACK)
    train(cfg, tmp_path / "init", log=machine)
    state = load_checkpoint(resolve_checkpoint(tmp_path / "init"))
    assert state["hardware"]["budget"]["fallback"] is None and state["config"]["model"]["hidden_size"] == cfg.model.hidden_size
    assert any("train.init_from fixes the model" in line for line in machine.lines)


# ------------------------------------------------------------------------------ the EMA under a budget


def ema_lines(lines):
    return [line for line in lines if "initial weights" in line]


def budget_on_a_fake_clock(monkeypatch, now, step_seconds):
    from fmcli import distributed as D
    from fmcli.budget import Probes, RunBudget

    monkeypatch.setattr(budget_mod, "clock", lambda: now[0])
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_step_seconds", lambda self, probes: step_seconds)
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_work", lambda self, cfg, probes: (0.0, 0.0, None))
    log = SimulatedMachine(lambda step: 0.0)
    return RunBudget(0.01, 0.0, D.DistContext(), log), Probes(None, None, None, None, None), log  # 0.6 s


EMA = ["train.ema_warmup=false", "train.ema_decay=0.95", "train.checkpoint_every=0", "train.sample_every=0"]


def test_a_budget_that_cuts_the_steps_below_what_the_ema_needs_warns_once(monkeypatch):
    """1000 steps leave a trained EMA (0.95^1000 of the initial weights); the 49 that fit the budget leave 8 %
    (the limit is 5 %, at 58 steps or fewer)."""
    from fmcli.optim import ema_warning

    now = [0.0]
    budget, probes, log = budget_on_a_fake_clock(monkeypatch, now, 0.012)
    cfg = load_config("debug", ["train.steps=1000", *EMA])
    assert ema_warning(cfg.train) is None  # the launcher said nothing about the requested steps
    steps = budget.start(cfg, probes)
    assert steps == 49
    assert ema_lines(log.lines) == [ema_warning(cfg.train.model_copy(update={"steps": steps}))]
    for step in (5, 10):  # refits that cut further say nothing new
        now[0] += 5 * 0.02
        steps = budget.at_log_interval(step, steps) or steps
    assert len(ema_lines(log.lines)) == 1
    # Requested steps that already leave the EMA untrained were warned about by the launcher: not again.
    budget, probes, log = budget_on_a_fake_clock(monkeypatch, [0.0], 0.012)
    assert budget.start(load_config("debug", ["train.steps=40", *EMA]), probes) == 40 and not ema_lines(log.lines)


def test_a_refit_that_newly_cuts_the_steps_below_what_the_ema_needs_warns_once(monkeypatch):
    now = [0.0]
    budget, probes, log = budget_on_a_fake_clock(monkeypatch, now, 0.005)
    cfg = load_config("debug", ["train.steps=1000", *EMA])
    steps = budget.start(cfg, probes)
    assert steps > 70 and not ema_lines(log.lines)  # 0.95^70 < 3 %: the first fit leaves a trained EMA
    for step in range(5, 40, 5):  # the machine slows down 4x
        now[0] += 5 * (0.005 if step <= 5 else 0.02)
        steps = budget.at_log_interval(step, steps) or steps
    assert steps <= 58 and len(ema_lines(log.lines)) == 1



def test_the_grid_estimate_prices_guided_evaluations_inside_a_guidance_interval(monkeypatch):
    """The budget timed its grid with one solver step at t = 0, which the quickstart's guidance interval [0.3, 1]
    leaves unguided: a batch of n rows priced every evaluation, though ~70 % of the real grid's run on 2n (CFG).
    On a clock charged per network row, the estimate must not fall below the real grid's cost."""
    from fmcli import distributed as D
    from fmcli.budget import Probes, RunBudget
    from fmcli.solvers import guided_velocity, time_grid

    now = [0.0]
    monkeypatch.setattr(budget_mod, "clock", lambda: now[0])

    def grid(n, sample_cfg):  # an Euler solve through fm's own guidance, with a network that costs 1 ms a row
        def net(x, t, y=None):
            now[0] += 1e-3 * x.shape[0]
            return torch.zeros_like(x)

        y = torch.zeros(n, dtype=torch.long)
        velocity = guided_velocity(net, {"y": y}, {"y": y + 1}, sample_cfg.cfg, sample_cfg.guidance_interval)
        x, ts = torch.zeros(n, 1), time_grid(sample_cfg.steps, sample_cfg.shift or 1.0)
        for k in range(sample_cfg.steps):
            x = x + (ts[k + 1] - ts[k]) * velocity(x, ts[k])
        return None, sample_cfg.steps

    cfg = load_config("quickstart")
    assert cfg.sample.guidance_interval == (0.3, 1.0) and cfg.sample.solver == "euler"
    budget = RunBudget(10, 0.0, D.DistContext(), QuietLog())
    probes = Probes(step_fn=None, example=None, state=lambda: {"w": torch.zeros(1)}, grid=grid, features=None)
    _, grid_s, _ = budget._measure_work(cfg, probes)
    now[0] = 0.0
    grid(cfg.sample.grid_size, cfg.sample)
    real_s = now[0]
    assert real_s < 2 * cfg.sample.grid_size * cfg.sample.steps * 1e-3  # the interval leaves some steps unguided
    assert real_s <= grid_s <= 2 * real_s, (grid_s, real_s)


@pytest.mark.parametrize("overrides", [[], ["train.budget_minutes=null"], ["model.hidden_size=24"], ["train.steps=5"]])
def test_a_fallback_typo_in_a_preset_is_reported_even_where_the_fallback_is_dropped(tmp_path, overrides):
    # Dropped (no budget, or a --set of a key it changes), the fallback was never checked: its misspelt key
    # waited for a machine slow enough to train it. Every one of these loads is refused, naming the key.
    from fmcli.errors import UsageError

    preset = tmp_path / "typo.toml"
    preset.write_text('base = "debug"\n[train]\nbudget_minutes = 5\n[train.budget_fallback]\nmin_steps = 100\n'
                      'overrides = ["model.hiden_size=16", "model.hidden_size=16", "train.steps=10"]\n')
    with pytest.raises(UsageError, match="train.budget_fallback.overrides: invalid config key 'model.hiden_size'"):
        load_config(str(preset), overrides)
    # the same preset spelt right loads, with the fallback kept or dropped as before
    preset.write_text(preset.read_text().replace('"model.hiden_size=16", ', ""))
    assert (load_config(str(preset), overrides).train.budget_fallback is None) == bool(overrides)
    assert load_config(str(preset), ["train.budget_fallback=null"]).train.budget_fallback is None


@pytest.mark.parametrize("solver", ["euler", "dopri5"])
def test_the_grid_estimate_does_not_scale_one_off_costs_by_the_nfe(monkeypatch, solver):
    """The first grid of a run pays one-off costs (a VAE's loading, lazy kernels: 3 s here, on a fake clock), later
    ones only their network evaluations (10 ms each). The budget's estimate of a grid priced its one-step probe, one-off
    costs included, times the NFE ratio: (3 + 0.01) x 50 = 150.5 s for a grid of 0.5 s (hand computation), a
    quarter of a 10-minute budget per grid. It is now the warm grid's cost, NFE x 10 ms."""
    from fmcli import distributed as D
    from fmcli.budget import Probes, RunBudget
    from fmcli.solvers import nfe_of

    now, calls = [0.0], []

    def grid(n, sample_cfg):
        calls.append(sample_cfg.solver)
        nfe = 20 if sample_cfg.solver == "dopri5" else sample_cfg.steps  # dopri5: 20 evaluations per image here
        now[0] += (3.0 if len(calls) == 1 else 0.0) + 0.01 * nfe * (n if sample_cfg.solver == "dopri5" else 1)
        return None, nfe

    monkeypatch.setattr(budget_mod, "clock", lambda: now[0])
    cfg = load_config("debug", [f"sample.solver={solver}", "sample.steps=50", "sample.grid_size=4"])
    budget = RunBudget(10, 0.0, D.DistContext(), QuietLog())
    probes = Probes(step_fn=None, example=None, state=lambda: {"w": torch.zeros(1)}, grid=grid, features=None)
    _, grid_s, _ = budget._measure_work(cfg, probes)
    warm = 0.01 * (20 * 4 if solver == "dopri5" else nfe_of("euler", 50))  # the run's grid: 0.8 s (dopri5), 0.5 s (euler)
    assert grid_s == pytest.approx(warm)
    assert calls[0] == "euler"  # an adaptive solver warms up on one Euler step, not a second full solve


def test_the_evaluation_estimate_does_not_scale_one_off_costs_by_the_sample_count(monkeypatch):
    """An evaluation: generation at the grid's per-image cost plus the features of each sample. The extractor's
    first call (lazy kernels at a new batch shape, 2 s on a fake clock) was priced per image of the grid (4) times
    eval.num_samples (1000): (2 + 0.04) / 4 x 1000 = 510 s of features reserved for 10 s (hand computation). Now the
    warm cost: per image 0.01 s of generation (one Euler step, 10 ms an image) + 0.01 s of features, x 1000 = 20 s."""
    from fmcli import distributed as D
    from fmcli.budget import Probes, RunBudget

    now, feature_calls = [0.0], []

    def grid(n, sample_cfg):
        now[0] += 0.01 * n * sample_cfg.steps
        return torch.zeros(n, 3, 8, 8), sample_cfg.steps

    def features(images):
        feature_calls.append(len(images))
        now[0] += (2.0 if len(feature_calls) == 1 else 0.0) + 0.01 * len(images)

    monkeypatch.setattr(budget_mod, "clock", lambda: now[0])
    cfg = load_config("debug", ["sample.solver=euler", "sample.steps=1", "sample.grid_size=4", "eval.num_samples=1000"])
    budget = RunBudget(10, 0.0, D.DistContext(), QuietLog())
    probes = Probes(step_fn=None, example=None, state=lambda: {"w": torch.zeros(1)}, grid=grid, features=features)
    _, grid_s, eval_s = budget._measure_work(cfg, probes)
    assert grid_s == pytest.approx(0.04) and eval_s == pytest.approx((0.01 + 0.01) * 1000)
