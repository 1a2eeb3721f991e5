"""ODE solvers, classifier-free guidance and NFE counting (pure torch, no I/O).

The model contract is `model(x, t, **cond) -> velocity` with t of shape [B] (DESIGN.md section 3).
Every solver integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data) and reports the true number
of network evaluations (NFE): a CFG evaluation is one batched forward of [cond; uncond], counted once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .flow import shift_time

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B,...], t scalar tensor) -> v
FIXED_STEP_SOLVERS = ("euler", "midpoint", "heun", "rk4")
SOLVERS = FIXED_STEP_SOLVERS + ("dopri5",)


@dataclass
class SampleResult:
    x: torch.Tensor
    nfe: int
    trajectory: list[tuple[float, torch.Tensor]] = field(default_factory=list)  # (t, x_t) when captured


def guided_velocity(
    model: Callable[..., torch.Tensor],
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None = None,
    cfg: float = 1.0,
    interval: tuple[float, float] | None = None,
) -> Velocity:
    """v = v_uncond + w (v_cond - v_uncond) on every channel, from one batched forward pass.

    `cfg == 1` (or no `uncond`) skips the unconditional branch entirely; outside the optional guidance
    interval [t_lo, t_hi] the plain conditional velocity is used.
    """
    use_cfg = uncond is not None and cfg != 1.0

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = t.reshape(()).expand(x.shape[0]).to(x.dtype)
        guided = use_cfg and (interval is None or interval[0] <= float(t) <= interval[1])
        if not guided:
            return model(x, tb, **cond)
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([tb, tb]), **both).chunk(2)
        return v_uncond + cfg * (v_cond - v_uncond)

    return velocity


def time_grid(steps: int, shift: float = 1.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """steps + 1 times from 0 to 1, optionally SD3-shifted (more resolution near the noise end)."""
    return shift_time(torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=dtype), shift)


def solve(
    velocity: Velocity,
    x0: torch.Tensor,
    solver: str = "euler",
    steps: int = 50,
    *,
    shift: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    capture: int = 0,
) -> SampleResult:
    """Integrate from noise x0 at t=0 to t=1. `capture` > 1 records (t, x_t) at that many evenly spaced
    times (for fixed-step solvers: the grid times nearest to them, so fewer when the grid is coarser)."""
    counted = _CountingVelocity(velocity)
    if solver == "dopri5":
        x, traj = _solve_dopri5(counted, x0, rtol, atol, capture)
    elif solver in FIXED_STEP_SOLVERS:
        x, traj = _solve_fixed(counted, x0, solver, steps, shift, capture)
    else:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    return SampleResult(x=x, nfe=counted.calls, trajectory=traj)


def nfe_per_step(solver: str) -> int:
    return {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}[solver]


class _CountingVelocity:
    def __init__(self, velocity: Velocity):
        self.velocity = velocity
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return self.velocity(x, t)


def _solve_fixed(v: Velocity, x: torch.Tensor, solver: str, steps: int, shift: float, capture: int):
    grid = time_grid(steps, shift, device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    keep = _capture_indices(grid, capture)
    traj = [(0.0, x.clone())] if 0 in keep else []
    for i in range(steps):
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
        if i + 1 in keep:
            traj.append((float(t_next), x.clone()))
    return x, traj


def _capture_indices(grid: torch.Tensor, capture: int) -> set[int]:
    """Grid indices nearest to `capture` evenly spaced times in [0, 1] (fewer if the grid is coarser)."""
    if capture <= 1:
        return set()
    targets = torch.linspace(0.0, 1.0, capture, dtype=torch.float64)
    return {int(torch.argmin((grid.double().cpu() - tau).abs())) for tau in targets}


def _solve_dopri5(v: Velocity, x0: torch.Tensor, rtol: float, atol: float, capture: int):
    from torchdiffeq import odeint

    n_times = max(capture, 2)
    times = torch.linspace(0.0, 1.0, n_times, device=x0.device, dtype=torch.float64)
    xs = odeint(lambda t, x: v(x, t.to(x.dtype)), x0, times, rtol=rtol, atol=atol, method="dopri5")
    traj = [(float(times[i]), xs[i]) for i in range(n_times)] if capture > 1 else []
    return xs[-1], traj
