"""train.budget_minutes: how many steps fit the wall-clock budget, re-estimated as the run goes.

A start-of-run timing alone is not enough: on a shared 2-core machine identical runs measured 0.10-0.13
s/step before their first step, and the pace then drifted by up to 1.5x within a run, so runs ended a
minute early or late. StepBudget starts from that timing and then refits the step count at every log
interval from the pace of the recent steps. Periodic work (checkpoints, sample grids, evaluation) is timed
apart from the steps and reserved for, each kind on its own (`Work`): before the first fit the trainer
times one checkpoint and a small sample grid (scaled to the real one) and estimates one evaluation, so the
first fit (and the fallback decided from it) never rests on a guess; from then on each kind costs what its
slowest event so far cost. The run's end does a checkpoint and a sample grid whatever the periods: a 100-
image grid once took 3 of a budget's 10 minutes, so it is reserved at its measured cost.
The LR schedule follows each refit without a jump (fmcli.optim.LRSchedule.retarget).

Pure arithmetic on the times it is given (no clock, no I/O), so tests drive it with made-up times.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        fitted = self._fit(step, now, self.pace)
        if fitted != self.steps:
            self.steps, self.refits = fitted, self.refits + 1
        return self.steps

    def _fit(self, step: int, now: float, pace: float) -> int:
        """The most steps whose remaining ones, plus the periodic and final work they bring, end within the budget."""
        left = self.started + (1 - MARGIN_SHARE) * self.seconds - now
        pace = max(pace, 1e-9)
        fits = lambda n: (n - step) * pace + self.work_seconds(step, n) <= left  # noqa: E731
        lo, hi = step, step + int(max(0.0, left - self.work_seconds(step, step + 1)) / pace)  # work only grows with n
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
