"""Solvers (fixed-step, multistep, SDE, adaptive), guidance, NFE counting, a step callback (pure torch, no I/O).

The model contract is `model(x, t, **cond) -> velocity` with t of shape [B] (docs/architecture.md section 4); a
mean-flow model also takes `t_end` [B] and returns the average velocity over [t, t_end] (fmcli/flow.py), which only
the `meanflow` solver uses: x_t_end = x_t + (t_end - t) u(x_t, t, t_end), one evaluation per step.
Every solver integrates from t = 0 (noise) to t = 1 (data) and reports the true number of network
evaluations (NFE): a guided evaluation (CFG's batched [cond; uncond] forward, or autoguidance's main +
guide pair) counts once. `on_step` sees the state after every solver step (previews, GIFs).

The solver and guidance names below are the only list of them: config.py and the CLI refer to these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .flow import shift_time

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B,...], t scalar tensor) -> v

FIXED_STEP_SOLVERS = ("euler", "midpoint", "heun", "rk4")  # one-step Runge-Kutta methods
MULTISTEP_SOLVERS = ("ab2",)
SDE_SOLVERS = ("euler-sde",)
ADAPTIVE_SOLVERS = ("dopri5",)
MEAN_FLOW_SOLVERS = ("meanflow",)  # jumps with a mean-flow model's average velocity; the only solver for one
SOLVERS = FIXED_STEP_SOLVERS + MULTISTEP_SOLVERS + SDE_SOLVERS + ADAPTIVE_SOLVERS + MEAN_FLOW_SOLVERS
SolverName = Literal[SOLVERS]  # type: ignore[valid-type]  (pydantic field type: the same names)

GUIDANCES = ("cfg", "cfg-zero", "auto")
MEAN_FLOW_GUIDANCES = ("cfg",)  # cfg-zero's zero-init and autoguidance's guide are defined for velocities
GuidanceName = Literal[GUIDANCES]  # type: ignore[valid-type]

_NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "ab2": 1, "euler-sde": 1, "meanflow": 1}
_START_UP_NFE = {"ab2": 1}  # ab2's first step is a Heun step: one evaluation more than its steps


@dataclass
class SampleResult:
    x: torch.Tensor
    nfe: int


@dataclass
class Step:
    """What `on_step` receives: the solver state after `index` steps (index 0 = the initial noise)."""

    index: int
    total: int  # steps planned; 0 for an adaptive solver (not known in advance)
    t: float  # flow time of x: 0 = noise, 1 = data
    x: torch.Tensor  # the state itself (clone it to keep it)
    nfe: int  # network evaluations so far


OnStep = Callable[[Step], None]


# ------------------------------------------------------------------------------------------- guidance


def optimized_scale(v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
    """CFG-Zero*'s per-sample s* = <v_cond, v_uncond> / ||v_uncond||^2 (the least-squares projection of
    v_cond on v_uncond), shaped to broadcast over v ([B, 1, ..., 1])."""
    flat_c, flat_u = v_cond.flatten(1), v_uncond.flatten(1)
    s = (flat_c * flat_u).sum(1) / (flat_u.pow(2).sum(1) + 1e-8)  # eps as in the paper's code
    return s.view(-1, *([1] * (v_cond.dim() - 1)))


# A float32 grid point meant to sit on a guidance interval's end lands an ulp or two off it (0.7 is 0.69999999):
# the interval is closed, so the ends are widened by far less than any grid step.
GRID_TOLERANCE = 1e-6


def guided_velocity(
    model: Callable[..., torch.Tensor],
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None = None,
    cfg: float = 1.0,
    interval: tuple[float, float] | None = None,
    *,
    guidance: str = "cfg",
    guide: Callable[..., torch.Tensor] | None = None,
) -> Velocity:
    """The guided velocity of weight w = `cfg`, on every channel.

    - `cfg`: v = v_uncond + w (v_cond - v_uncond), one batched forward of [cond; uncond].
    - `cfg-zero` (CFG-Zero*, Fan et al. 2025, arXiv:2503.18886): v = s* v_uncond + w (v_cond - s* v_uncond)
      with the per-sample optimised scale s* (`optimized_scale`); its zero-init of the first steps is the
      solver's `skip_steps` (see `solve`).
    - `auto` (autoguidance, Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself",
      arXiv:2406.02507): v = v_guide + w (v_main - v_guide), the guide being a smaller or less trained
      model of the same data, evaluated with the same conditioning.

    w == 1 is the main model alone (no second branch is evaluated), as is every t outside the optional
    guidance interval [t_lo, t_hi]; so is cfg/cfg-zero without `uncond` (an unconditional model).
    The returned function takes an optional end time (mean-flow models: `model(..., t_end=...)`); for them
    `cfg` combines the two average velocities the same way.
    """
    if guidance not in GUIDANCES:
        raise ValueError(f"unknown guidance {guidance!r}; choose one of {', '.join(GUIDANCES)}")
    if guidance == "auto" and guide is None:
        raise ValueError("autoguidance needs a guide model")
    use = cfg != 1.0 and (guide is not None if guidance == "auto" else uncond is not None)

    def velocity(x: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor | None = None) -> torch.Tensor:
        tb = t.reshape(()).expand(x.shape[0]).to(x.dtype)
        ends = {} if t_end is None else {"t_end": t_end.reshape(()).expand(x.shape[0]).to(x.dtype)}
        if not use or (interval is not None and not interval[0] - GRID_TOLERANCE <= float(t) <= interval[1] + GRID_TOLERANCE):
            return model(x, tb, **cond, **ends)
        if guidance == "auto":
            v_main, v_guide = model(x, tb, **cond), guide(x, tb, **cond)
            return v_guide + cfg * (v_main - v_guide)
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond} | {k: torch.cat([e, e]) for k, e in ends.items()}
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([tb, tb]), **both).chunk(2)
        if guidance == "cfg-zero":
            v_uncond = optimized_scale(v_cond, v_uncond) * v_uncond
        return v_uncond + cfg * (v_cond - v_uncond)

    return velocity


# -------------------------------------------------------------------------------------------- the SDE


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t, sigma_min: float = 0.0) -> torch.Tensor:
    """grad log p_t(x) from the marginal velocity, in closed form for x_t = a(t) x0 + t x1, a = 1 - (1 - sigma_min) t.

    With E0 = E[x0 | x_t = x], E1 = E[x1 | x_t = x]: x = a E0 + t E1 and v = E1 - (1 - sigma_min) E0, so
    E0 = x - t v (as a + (1 - sigma_min) t = 1); Tweedie for the Gaussian x_t | x1 gives score = -E0 / a.
    """
    a = 1 - (1 - sigma_min) * t
    return (t * v - x) / a


def sde_diffusion(t, noise: float):
    """g(t)^2 = 2 w(t) with w(t) = noise * (1 - t): SiT's "sigma" diffusion form (w_t = norm * sigma_t for
    the linear path; Ma et al. 2024, "SiT: Exploring Flow and Diffusion-based Generative Models with
    Scalable Interpolant Transformers", arXiv:2401.08740), with `noise` (--sde-noise) as SiT's
    diffusion_norm. Written with 1 - t, not sigma_t = 1 - (1 - sigma_min) t, so that g -> 0 at the data
    end even when sigma_min > 0."""
    return 2 * noise * (1 - t)


# ----------------------------------------------------------------------------------------------- solve


def solve(
    velocity: Velocity,
    x0: torch.Tensor,
    solver: str = "euler",
    steps: int = 50,
    *,
    shift: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    sigma_min: float = 0.0,
    sde_noise: float = 1.0,
    noise: Callable[[int], torch.Tensor] | None = None,
    skip_steps: int = 0,
    on_step: OnStep | None = None,
) -> SampleResult:
    """Integrate from noise x0 at t = 0 to t = 1 on the (optionally SD3-shifted) grid of `steps` steps.

    `skip_steps`: the velocity is taken to be zero on the first `skip_steps` grid steps (CFG-Zero*'s
    zero-init): x stays x0 and no network is evaluated; the adaptive solver starts at that grid time (the
    only use dopri5 makes of `steps`). It must be below `steps`, for every solver.
    `euler-sde` draws its noise for step i from `noise(i)` (shape of x0; default: a fixed-seed generator),
    so a caller can key it by sample index and step. `on_step(Step)` is called with the initial state and
    after every step (dopri5: every accepted step, then the result).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if skip_steps and skip_steps >= steps:  # the same rule for every solver (config.SampleConfig checks it first)
        raise ValueError(f"skip_steps ({skip_steps}) must be below steps ({steps}): the noise would be returned unchanged")
    counted = _CountingVelocity(velocity)
    grid = time_grid(steps, shift, device=x0.device, dtype=torch.float64 if x0.dtype == torch.float64 else torch.float32)
    report = _Reporter(on_step, counted, 0 if solver in ADAPTIVE_SOLVERS else steps)
    if solver in ADAPTIVE_SOLVERS:
        x = _solve_dopri5(counted, x0, float(grid[min(skip_steps, steps)]), rtol, atol, report)
    else:
        x = x0
        report(0, grid[0], x)
        for i in range(min(skip_steps, steps)):  # zero velocity: the state does not move
            report(i + 1, grid[i + 1], x)
        start = min(skip_steps, steps)
        if solver in FIXED_STEP_SOLVERS:
            x = _solve_one_step(counted, x, solver, grid, start, report)
        elif solver == "ab2":
            x = _solve_ab2(counted, x, grid, start, report)
        elif solver == "meanflow":
            x = _solve_mean_flow(counted, x, grid, start, report)
        else:
            x = _solve_euler_maruyama(counted, x, grid, start, sigma_min, sde_noise, noise, report)
    return SampleResult(x=x, nfe=counted.calls)


def check_solver_for_model(solver: str, guidance: str, mean_flow: bool) -> None:
    """ValueError where the sampler does not fit the model: a mean-flow model predicts average velocities, which
    only the `meanflow` solver uses (a Runge-Kutta, multistep, SDE or adaptive solver needs the instantaneous
    velocity), and only with `cfg` guidance; a flow model has no average velocity to jump with."""
    if mean_flow and solver not in MEAN_FLOW_SOLVERS:
        raise ValueError(f"this is a mean-flow model: it samples with --solver meanflow (average-velocity jumps, 1 NFE a step), not {solver}")
    if not mean_flow and solver in MEAN_FLOW_SOLVERS:
        raise ValueError(f"--solver {solver} needs a mean-flow model (flow.objective = 'meanflow'); this model predicts velocities: use euler, heun, ...")
    if mean_flow and guidance not in MEAN_FLOW_GUIDANCES:
        raise ValueError(f"--guidance {guidance} is defined for velocity models; a mean-flow model takes --guidance cfg")


def unused_settings(solver: str, guidance: str) -> dict[str, str]:
    """The sampling settings (config.SampleConfig names) that `solver` with `guidance` never reads, each with the
    solver or guidance that does: a user option of one of them would be accepted and do nothing. dopri5 reads
    `steps` only for cfg-zero's zero-init (the grid time it starts from, see `solve`)."""
    unused = {}
    if solver not in ADAPTIVE_SOLVERS:
        unused["rtol"] = unused["atol"] = "--solver dopri5"
    if solver in ADAPTIVE_SOLVERS and guidance != "cfg-zero":
        unused["steps"] = "a fixed-step solver, or cfg-zero's zero-init; dopri5 chooses its own steps: set its accuracy with --rtol/--atol"
    if solver not in SDE_SOLVERS:
        unused["sde_noise"] = "--solver euler-sde"
    if guidance != "cfg-zero":
        unused["zero_init_steps"] = "--guidance cfg-zero"
    return unused


def time_grid(steps: int, shift: float = 1.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """steps + 1 times from 0 to 1, optionally SD3-shifted (more resolution near the noise end)."""
    return shift_time(torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=dtype), shift)


def nfe_per_step(solver: str) -> int:
    """Network evaluations per step of a fixed-step, multistep or SDE solver (ab2: after its start-up)."""
    return _NFE_PER_STEP[solver]


def nfe_of(solver: str, steps: int) -> int:
    """Exact NFE of `steps` steps (no zero-init): per-step cost plus a start-up evaluation where there is one."""
    return nfe_per_step(solver) * steps + (_START_UP_NFE.get(solver, 0) if steps else 0)


def steps_for_nfe(solver: str, nfe: int) -> int:
    """The most steps whose NFE (`nfe_of`) does not exceed `nfe`; 0 when not even one step fits (heun,
    midpoint and ab2 need 2 NFE, rk4 4). ValueError for dopri5."""
    if solver in ADAPTIVE_SOLVERS:
        raise ValueError(f"{solver} chooses its own steps: drop --nfe and set its tolerances with --rtol/--atol instead")
    return max(0, (nfe - _START_UP_NFE.get(solver, 0)) // nfe_per_step(solver))


class _CountingVelocity:
    def __init__(self, velocity: Velocity):
        self.velocity = velocity
        self.calls = 0

    def __call__(self, x, t, *t_end):
        self.calls += 1
        return self.velocity(x, t, *t_end)


class _Reporter:
    def __init__(self, on_step: OnStep | None, counted: _CountingVelocity, total: int):
        self.on_step, self.counted, self.total = on_step, counted, total

    def __call__(self, index: int, t, x: torch.Tensor) -> None:
        if self.on_step is not None:
            self.on_step(Step(index=index, total=self.total, t=float(t), x=x, nfe=self.counted.calls))


def _solve_one_step(v: Velocity, x: torch.Tensor, solver: str, grid: torch.Tensor, start: int, report: _Reporter):
    for i in range(start, len(grid) - 1):
        t, t_next = grid[i], grid[i + 1]
        h = t_next - t
        if solver == "euler":
            x = x + h * v(x, t)
        elif solver == "midpoint":
            k1 = v(x, t)
            x = x + h * v(x + 0.5 * h * k1, t + 0.5 * h)
        elif solver == "heun":
            k1 = v(x, t)
            k2 = v(x + h * k1, t_next)
            x = x + 0.5 * h * (k1 + k2)
        else:  # rk4
            k1 = v(x, t)
            k2 = v(x + 0.5 * h * k1, t + 0.5 * h)
            k3 = v(x + 0.5 * h * k2, t + 0.5 * h)
            k4 = v(x + h * k3, t_next)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        report(i + 1, t_next, x)
    return x


def _solve_mean_flow(u, x: torch.Tensor, grid: torch.Tensor, start: int, report: _Reporter):
    """Jumps with the average velocity over each grid interval: x_t_end = x_t + (t_end - t) u(x_t, t, t_end),
    exact for an exact mean-flow model whatever the grid (one step: noise to data in one evaluation)."""
    for i in range(start, len(grid) - 1):
        t, t_end = grid[i], grid[i + 1]
        x = x + (t_end - t) * u(x, t, t_end)
        report(i + 1, t_end, x)
    return x


def _solve_ab2(v: Velocity, x: torch.Tensor, grid: torch.Tensor, start: int, report: _Reporter):
    """Two-step Adams-Bashforth with variable steps (Hairer, Norsett & Wanner, Solving ODEs I, III.5), one
    evaluation per step after a Heun start (second order from the first step on).

    Why AB2 in t rather than an exponential integrator (DPM-Solver++(2M), Lu et al. 2022): for this linear
    path the first-order exponential integrator (DDIM) is exactly Euler in t, so the flow's velocity has no
    stiff linear part for an exponential integrator to absorb, and the multistep correction can be made in
    t directly, valid for any velocity field (also the guided ones). Multistep reuse of past evaluations
    for diffusion sampling: PNDM (Liu et al. 2022), iPNDM (Zhang & Chen 2023, DEIS).
    """
    v_prev, h_prev = None, None
    for i in range(start, len(grid) - 1):
        t, t_next = grid[i], grid[i + 1]
        h = t_next - t
        v_now = v(x, t)
        if v_prev is None:  # Heun start-up step
            x = x + 0.5 * h * (v_now + v(x + h * v_now, t_next))
        else:
            r = h / h_prev
            x = x + h * ((1 + 0.5 * r) * v_now - 0.5 * r * v_prev)
        v_prev, h_prev = v_now, h
        report(i + 1, t_next, x)
    return x


def _solve_euler_maruyama(v: Velocity, x, grid, start: int, sigma_min: float, noise_scale: float, noise, report: _Reporter):
    """Euler-Maruyama for dx = [v + g^2/2 s(x, t)] dt + g dW (same marginals as the ODE, by Fokker-Planck),
    with s from `score_from_velocity` and g^2 from `sde_diffusion`. With g^2 = 2 noise (1 - t) the score
    term is noise (1 - t) / a(t) (t v - x): bounded, as (1 - t) / a(t) <= 1. The last step is a plain ODE
    (Euler) step, one of SiT's last-step choices: no noise, and no score term, which only balances it."""
    if noise is None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        noise = lambda i: torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)  # noqa: E731
    last = len(grid) - 2
    for i in range(start, last + 1):
        t, t_next = grid[i], grid[i + 1]
        h = t_next - t
        vel = v(x, t)
        if i == last:
            x = x + h * vel
        else:
            g2 = sde_diffusion(t, noise_scale)
            drift = vel + 0.5 * g2 * score_from_velocity(vel, x, t, sigma_min)
            x = x + h * drift + torch.sqrt(g2 * h) * noise(i).to(device=x.device, dtype=x.dtype)
        report(i + 1, t_next, x)
    return x


class _ReportingODE:
    """torchdiffeq's func: the velocity, plus its accepted-step callback (the state at each accepted step's start)."""

    def __init__(self, v: Velocity, report: _Reporter):
        self.v, self.report, self.accepted, self.reached = v, report, 0, None  # reached: the last accepted step's end

    def __call__(self, t, x):
        return self.v(x, t.to(x.dtype))

    def callback_accept_step(self, t0, y0, dt):
        if self.accepted:  # step 0's start is the initial state, already reported
            self.report(self.accepted, t0, y0)
        self.accepted += 1
        self.reached = float(t0 + dt)


def _solve_dopri5(v: Velocity, x0: torch.Tensor, t_start: float, rtol: float, atol: float, report: _Reporter):
    from torchdiffeq import odeint

    report(0, 0.0, x0)
    func = _ReportingODE(v, report)
    times = torch.tensor([t_start, 1.0], device=x0.device, dtype=torch.float64)
    # step_t: the step that would cross t = 1 is shortened to end there (as scipy's solve_ivp does), rather than
    # torchdiffeq's default of stepping past it and interpolating back: no step evaluates the network beyond the
    # data end, where it was never trained, and the result is a step's endpoint, not its less accurate dense output.
    land = {"step_t": times[-1:]}
    try:
        x = odeint(func, x0, times, rtol=rtol, atol=atol, method="dopri5", options=land)[-1] if t_start < 1.0 else x0
    except AssertionError as err:  # torchdiffeq's "underflow in dt": every step was rejected (a nan/inf velocity)
        what = str(err).split(":")[0]  # its non-finite-state message goes on to print the whole tensor
        if not what.startswith(("underflow in dt", "non-finite values")):
            raise
        reached = t_start if func.reached is None else func.reached
        raise FloatingPointError(f"dopri5 could not step past t = {reached:.3g} ({what}): the velocity is not finite beyond it, or too stiff "
                                 f"for rtol={rtol:g}, atol={atol:g}") from None  # fmt: skip
    report(max(func.accepted, 1), 1.0, x)
    return x

