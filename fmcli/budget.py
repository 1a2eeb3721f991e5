"""train.budget_minutes: how many steps fit the wall-clock budget, re-estimated as the run goes.

`RunBudget` is all of it for one run, called by the trainer at a few named points: `start` (the first fit
and the train.budget_fallback choice, in a fresh run's setup), `timed` (each checkpoint, sample grid and
evaluation), `at_log_interval` (a refit) and `snapshot` (what env.json and the checkpoint say). A machine's
pace drifts within a run, so a timing taken once at the start cannot keep a run inside its budget: the
steps are refitted at every log interval from the pace of the recent steps (docs/benchmarks.md, "Why the
budget refits"), the LR schedule following each refit without a jump (fmcli.optim.LRSchedule.retarget).
Periodic work (checkpoints, sample grids, evaluation) is timed apart from the steps and reserved for, each
kind on its own (`Work`), measured before the first fit so that the fit and the fallback decided from it
never rest on a guess; the run's end does a checkpoint and a sample grid whatever the periods, so they are
reserved at their measured cost.

`StepBudget` is the arithmetic: pure, on the times it is given (no clock, no I/O), so tests drive it with
made-up times. Tests replace `clock` with a simulated machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import distributed as D
from .optim import ema_warning

clock = time.perf_counter  # the budget's clock (tests replace it with a simulated machine)
CHECKPOINTS, SAMPLES, EVALUATION = 0, 1, 2  # the kinds of periodic work (StepBudget.work)

PACE_WINDOW_STEPS = 1000  # the pace is taken over about this many recent steps (and the last interval alone)
FIRST_EVENT_SHARE = 0.02  # work never timed (none given, none observed) is assumed to cost this share of the budget per event
MARGIN_SHARE = 0.01  # kept free for the pace's jitter between refits (a run that overshoots cannot give time back)


@dataclass
class Work:
    """One kind of periodic work: every `every` steps (0 = never), and at the run's last step if `at_end`."""

    every: int
    at_end: bool = False
    seconds: float | None = None  # one event's cost as estimated before the run (None: not timed)
    slowest: float | None = None  # the slowest event observed in the run; replaces the estimate once there

    def cost(self, budget_seconds: float) -> float:
        if self.slowest is not None:
            return self.slowest
        return self.seconds if self.seconds is not None else FIRST_EVENT_SHARE * budget_seconds

    def events(self, step: int, total: int) -> int:
        """Events after `step` up to the run's end at `total` (the last step's counted once)."""
        periodic = (total - 1) // self.every - step // self.every if self.every else 0
        return periodic + 1 if self.at_end else periodic + int(bool(self.every) and total % self.every == 0)


@dataclass
class StepBudget:
    seconds: float  # the whole budget
    started: float  # clock time the budget started (the trainer's setup, before compiling)
    requested_steps: int  # the preset's steps: the budget only ever lowers them
    work: tuple[Work, ...] = ()  # the periodic work: checkpoints, sample grids, evaluation
    steps: int = 0  # the current fit
    refits: int = 0  # how often the fit changed after the first one
    marks: list[tuple[int, float]] = field(default_factory=list)  # (step, step-only seconds since `started`)
    pace: float | None = None  # seconds per step over the last `pace_steps` steps (periodic work excluded)
    pace_steps: int = 0

    def first_fit(self, now: float, step_seconds: float) -> int:
        """The steps that fit from `now` at the measured `step_seconds`."""
        self.steps = self._fit(0, now, step_seconds)
        return self.steps

    def record_work(self, kind: int, seconds: float) -> None:
        """An event of work[kind] took `seconds`: it replaces the estimate, the slowest one counts."""
        w = self.work[kind]
        w.slowest = seconds if w.slowest is None else max(w.slowest, seconds)

    def refit(self, step: int, now: float, overhead: float) -> int:
        """At a log interval: `now` on the clock, `overhead` seconds spent on periodic work so far.
        Returns the (possibly new) total steps."""
        self.marks.append((step, now - self.started - overhead))
        # The oldest mark within the window, but never the newest itself: log intervals longer than the
        # window still refit from their last interval.
        first = next(i for i, m in enumerate(self.marks) if step - m[0] <= PACE_WINDOW_STEPS)
        del self.marks[: min(first, len(self.marks) - 2)]  # older marks never come back into the window
        base = self.marks[0]
        if base[0] == step:  # one mark: the first interval includes one-off costs after compiling
            return self.steps
        # The slower of the window's pace and the last interval's: a slowdown counts at once (a run that
        # overshoots has nothing to give back), a speed-up once the window has seen it.
        (s_prev, t_prev), (_, t_now) = self.marks[-2], self.marks[-1]
        self.pace = max((t_now - base[1]) / (step - base[0]), (t_now - t_prev) / (step - s_prev))
        self.pace_steps = step - base[0]
        # The trainer refits before the work of this very step (its checkpoint, grid, evaluation): still due.
        fitted = self._fit(step, now, self.pace, work_after=step - 1)
        if fitted != self.steps:
            self.steps, self.refits = fitted, self.refits + 1
        return self.steps

    def _fit(self, step: int, now: float, pace: float, work_after: int | None = None) -> int:
        """The most steps whose remaining ones, plus the periodic and final work they bring, end within the budget.
        The work still due is that of the steps after `work_after` (default `step`)."""
        left = self.started + (1 - MARGIN_SHARE) * self.seconds - now
        pace = max(pace, 1e-9)
        after = step if work_after is None else work_after
        fits = lambda n: (n - step) * pace + self.work_seconds(after, n) <= left  # noqa: E731
        lo, hi = step, step + int(max(0.0, left - self.work_seconds(after, step + 1)) / pace)  # work only grows with n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return max(step + 1, min(self.requested_steps, lo))

    def work_seconds(self, step: int, total: int) -> float:
        """Seconds of periodic work after `step` in a run that ends at `total`, its final work included."""
        return sum(w.events(step, total) * w.cost(self.seconds) for w in self.work)

    def record(self) -> dict:
        """What env.json / the checkpoint say about the budget."""
        return {"minutes": self.seconds / 60, "requested_steps": self.requested_steps, "steps": self.steps, "refits": self.refits,
                "pace_seconds": self.pace, "pace_steps": self.pace_steps,
                "work_seconds": {"every": [w.every for w in self.work], "seconds": [w.cost(self.seconds) for w in self.work]}}


@dataclass
class Probes:
    """What the budget times before its first fit, as callbacks into the run (budget.py knows no trainer)."""

    step_fn: object  # the TrainingStep: real steps on `example`, then undone (RunBudget._measure_step_seconds)
    example: dict  # one micro-batch as the loader yields it
    state: Callable[[], dict]  # the checkpoint's state; collective (the RNG gather): every rank calls it
    grid: Callable  # grid(n, sample_cfg) -> (the first n grid images or None, NFE), sampled from the EMA
    features: Callable | None  # the evaluator's features of grid images (None: no evaluation during training)


class RunBudget:
    """train.budget_minutes of one run on one rank: every rank measures and follows, rank 0's numbers count.

    Active only in a fresh run with a budget, after `start`; a resume continues the fitted schedule of its
    checkpoint (it never re-measures, refits or falls back) and keeps what the checkpoint said as its `snapshot`."""

    def __init__(self, minutes: float | None, started: float, ctx: D.DistContext, log):
        self.minutes, self.started, self.ctx, self.log = minutes, started, ctx, log
        self.fit: StepBudget | None = None  # the arithmetic, once started
        self.overhead = 0.0  # seconds of periodic work so far
        self.fallback: dict | None = None  # train.budget_fallback, once chosen
        self.logged_steps = 0  # the fit the last log line announced
        self.snapshot: dict | None = None  # hardware["budget"] of env.json and the checkpoint: as of the last fit (or the resumed checkpoint's)
        self.train_cfg = None  # cfg.train of the run being fitted (the fallback's, once chosen), for the EMA warning
        self.ema_warned = False  # the EMA warning was given (by the launcher for the requested steps, or for a fit)

    def start(self, cfg, probes: Probes) -> int | None:
        """A fresh run's first fit of cfg.train.steps: the steps to train, or None where the budget fits fewer
        than train.budget_fallback.min_steps (the caller builds budget_fallback_config's step and starts again).
        Without a budget: cfg.train.steps. Only lowers: a fast machine trains the preset's steps."""
        if self.minutes is None:
            return cfg.train.steps
        if self.train_cfg is None:  # the launcher warned about the requested steps' EMA already (launch.run_training)
            self.ema_warned = ema_warning(cfg.train) is not None
        self.train_cfg = cfg.train
        # Every rank measures (a DDP forward may broadcast buffers: a collective), rank 0's number is used.
        step_s = D.all_gather_objects(self._measure_step_seconds(probes), self.ctx)[0]
        with torch.random.fork_rng(devices=[self.ctx.device] if self.ctx.device.type == "cuda" else []):  # the run's RNG untouched
            checkpoint_s, grid_s, eval_s = D.all_gather_objects(self._measure_work(cfg, probes), self.ctx)[0]
        work = [None] * 3
        work[CHECKPOINTS] = Work(cfg.train.checkpoint_every, at_end=True, seconds=checkpoint_s)
        work[SAMPLES] = Work(cfg.train.sample_every, at_end=True, seconds=grid_s)
        work[EVALUATION] = Work(cfg.eval.every if probes.features is not None else 0, seconds=eval_s)  # no eval.ref: no work
        self.fit = StepBudget(self.minutes * 60, self.started, cfg.train.steps, tuple(work))
        steps = D.all_gather_objects(self.fit.first_fit(clock(), step_s), self.ctx)[0]
        self.snapshot = {"step_seconds": step_s, **self.fit.record(), "fallback": self.fallback}
        self.log.info(
            f"budget: {self.minutes:g} min at {step_s:.3f} s/step (measured) -> {steps} steps"
            + (f" (of the preset's {cfg.train.steps}: this machine is slower than the preset was tuned on; refitted as the run goes)" if steps < cfg.train.steps else "")
        )
        # train.budget_fallback applies where the budget cut the steps under its min_steps, unless the run starts
        # from weights (train.init_from) whose model a fallback that resizes it could not load.
        fallback = cfg.train.budget_fallback
        threshold = fallback.threshold(cfg) if fallback is not None else None
        name = "min_steps_with_repa" if fallback is not None and threshold != fallback.min_steps else "min_steps"
        if fallback is not None and steps < min(threshold, cfg.train.steps):
            if cfg.train.init_from and any(item.startswith("model.") for item in fallback.overrides):
                self.log.info(f"budget: {steps} steps are under train.budget_fallback.{name}={threshold}, "
                              "but train.init_from fixes the model: training it as set")
            else:
                self.log.info(
                    f"budget: {steps} steps are under train.budget_fallback.{name}={threshold}; "
                    f"training the preset's fallback instead: {' '.join(fallback.overrides)}"
                )
                self.fallback = {"from_steps": steps, "min_steps": threshold, "overrides": fallback.overrides}
                return None
        self.logged_steps = steps
        self._warn_ema(steps)
        return steps

    def timed(self, kind: int, work: Callable):
        """Run one periodic `work`; under a budget its time is kept apart from the steps' pace and reserved for."""
        start = clock()
        out = work()
        if self.fit is not None:
            spent = clock() - start
            self.overhead += spent
            self.fit.record_work(kind, spent)
        return out

    def at_log_interval(self, step: int, steps: int) -> int | None:
        """Rank 0 refits the run's `steps` from the recent pace, every rank follows: the new steps, or None."""
        if self.fit is None:
            return None
        fitted = self.fit.refit(step, clock(), self.overhead) if self.ctx.rank == 0 else None
        fitted = D.all_gather_objects(fitted, self.ctx)[0]
        self.snapshot.update(self.fit.record())
        if fitted == steps:
            return None
        self._warn_ema(fitted)
        if abs(fitted - self.logged_steps) >= 0.02 * self.logged_steps:  # a line per real change, not per jitter
            self.log.info(f"budget: {fitted} steps at the last {self.fit.pace_steps} steps' pace ({self.fit.pace:.3f} s/step)")
            self.logged_steps = fitted
        return fitted

    def _warn_ema(self, steps: int) -> None:
        """Once: the EMA warning where the budget cut the steps so far that the EMA stays mostly the initial network."""
        if self.ema_warned:
            return
        if warning := ema_warning(self.train_cfg.model_copy(update={"steps": steps})):
            self.log.info(warning)
            self.ema_warned = True

    def restore(self, record: dict | None) -> None:
        """A resumed run: its checkpoint's record (the fitted steps are in its config)."""
        self.snapshot = record

    # ------------------------------------------------------------------------------------ measuring

    def _measure_step_seconds(self, probes: Probes) -> float:
        """Seconds per real optimizer step (forward/backward of every micro batch, clipping, optimizer, EMA),
        timed on `probes.example` and then undone: the trained state is restored bit for bit, so a run with a
        budget that does not cut its steps trains exactly as one without. Timing forward/backward alone
        misses the optimizer and EMA, and fitted runs that went over their budget."""
        import copy
        import itertools

        from .measure import seconds_per_call

        step_fn = probes.step_fn
        saved = copy.deepcopy(step_fn.state_dict())
        batches = itertools.repeat(probes.example)
        try:
            # The first step after compiling pays one-off costs (optimizer state, allocator growth, lazy
            # kernels): untimed; then the median of 5 (a shared machine's speed varies minute to minute).
            step_fn(batches, 0, 0)
            return seconds_per_call(lambda: step_fn(batches, 0, 0), 5, self.ctx.device)
        finally:
            step_fn.load_state_dict(saved)

    def _measure_work(self, cfg, probes: Probes) -> tuple[float, float, float | None]:
        """Seconds of one checkpoint, one sample grid and one evaluation (None without one), measured (grid,
        evaluation: estimated from a small measured part) before the first fit. Nothing is written to the
        run: the checkpoint goes to a temporary folder; the grid is sampled, not saved."""
        import tempfile

        from .checkpoint import save_atomic
        from .solvers import ADAPTIVE_SOLVERS, nfe_of

        start = clock()
        state = probes.state()  # collective (RNG gather): every rank takes part
        if self.ctx.rank != 0:
            return 0.0, 0.0, None  # rank 0's numbers are used
        with tempfile.TemporaryDirectory(prefix="fm-budget-") as tmp:
            save_atomic(state, Path(tmp) / "step.pt")
        checkpoint_s = clock() - start
        del state
        # The sample grid: its own batch sampled with one solver step (after CFG-Zero*'s zero-init steps, which
        # evaluate nothing), scaled to the network evaluations of the real grid (an adaptive solver: one image
        # solved in full, scaled to the grid's count). First an untimed warm-up of the same batch (an adaptive
        # solver's: one Euler step): one-off costs (a VAE's loading, lazy kernels), which the run's grids never pay
        # again, would otherwise be scaled by the NFE (x50 at 50 steps); a machine that slows down later is caught by the refits.
        sample, n = cfg.sample, cfg.sample.grid_size
        adaptive = sample.solver in ADAPTIVE_SOLVERS
        zero_init = sample.zero_init_steps if sample.guidance == "cfg-zero" else 0
        # The probe's one step sits at t = 0, which a guidance interval may leave unguided (the quickstart's [0.3, 1]):
        # it is guided here, so the estimate prices every evaluation at the guided batch, never below the real grid.
        one_step = {"steps": min(sample.steps, zero_init + 1), "guidance_interval": None}
        probe_cfg = sample if adaptive else sample.model_copy(update=one_step)
        probes.grid(1 if adaptive else n, sample.model_copy(update={**one_step, "solver": "euler"}) if adaptive else probe_cfg)
        start = clock()
        images, nfe = probes.grid(1 if adaptive else n, probe_cfg)
        seconds = clock() - start
        grid_s = seconds * n if adaptive else seconds * nfe_of(sample.solver, sample.steps) / max(1, nfe)
        per_image_s = grid_s / n
        eval_s = None
        if probes.features is not None:  # generation as the grid's per image, plus the features of the grid's images
            probes.features(images)  # untimed warm-up, as the grid's: one-off costs scaled by num_samples / n otherwise
            start = clock()
            probes.features(images)
            features_s = (clock() - start) / len(images)
            eval_s = (per_image_s + features_s) * cfg.eval.num_samples / self.ctx.world_size
        return checkpoint_s, grid_s, eval_s
