"""fmcli.solvers: solvers against a closed-form Gaussian flow and scipy, the SDE, NFE counting, guidance, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from fmcli.solvers import FIXED_STEP_SOLVERS, GUIDANCES, SOLVERS, guided_velocity, nfe_of, score_from_velocity, solve, steps_for_nfe

# Gaussian-to-Gaussian flow. With x0 ~ N(0, I), x1 ~ N(mu, s^2 I) independent and the path of docs/architecture.md
# section 3, x_t = a(t) x0 + t x1 with a(t) = 1 - (1 - sigma_min) t, so x_t ~ N(t mu, sigma_t^2 I) with
# sigma_t^2 = a^2 + t^2 s^2. The marginal velocity E[u_t | x_t] (u_t = x1 - (1 - sigma_min) x0) is, by
# Gaussian conditioning, mu + Cov(u_t, x_t) / Var(x_t) (x - t mu) with Cov = -(1 - sigma_min) a + t s^2,
# i.e. v(x, t) = mu + (sigma_t' / sigma_t) (x - t mu), affine in x. The ODE's solution from x(0) = x0 is
# x(t) = t mu + sigma_t x0 (sigma_0 = 1), so the exact endpoint is mu + sqrt(sigma_min^2 + s^2) x0.
MU = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=torch.float64)
S = 0.3
SIGMA_MIN = 0.05
ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "ab2": 2}
ORDER_SOLVERS = FIXED_STEP_SOLVERS + ("ab2",)


def _gauss_velocity(x, t):
    t = torch.as_tensor(t, dtype=x.dtype)
    a, da = 1 - (1 - SIGMA_MIN) * t, -(1 - SIGMA_MIN)
    var = a**2 + t**2 * S**2
    return MU.to(x.dtype) + (a * da + t * S**2) / var * (x - t * MU.to(x.dtype))


def _exact_endpoint(x0):
    return MU + math.sqrt(SIGMA_MIN**2 + S**2) * x0


def _x0():
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_closed_form_field_is_the_marginal_of_the_path():
    """Monte Carlo check of the derivation: E[u_t | x_t] by regression on samples of the path."""
    g = torch.Generator().manual_seed(1)
    n, t = 400_000, 0.6
    x0 = torch.randn(n, 1, generator=g, dtype=torch.float64)
    x1 = MU[0] + S * torch.randn(n, 1, generator=g, dtype=torch.float64)
    xt = (1 - (1 - SIGMA_MIN) * t) * x0 + t * x1
    ut = x1 - (1 - SIGMA_MIN) * x0
    slope, intercept = np.polyfit(xt[:, 0].numpy(), ut[:, 0].numpy(), 1)
    v0 = _gauss_velocity(torch.zeros(4, dtype=torch.float64), t)[0].item()
    v1 = _gauss_velocity(torch.ones(4, dtype=torch.float64), t)[0].item()
    assert slope == pytest.approx(v1 - v0, abs=5e-3)
    assert intercept == pytest.approx(v0, abs=5e-3)


@pytest.mark.parametrize("solver", ORDER_SOLVERS)
def test_fixed_step_solvers_converge_at_their_order(solver):
    x0 = _x0()
    exact = _exact_endpoint(x0)
    errors = []
    for n in (8, 16, 32):
        res = solve(_gauss_velocity, x0, solver, n)
        errors.append((res.x - exact).abs().max().item())
        assert res.nfe == n * {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "ab2": 1}[solver] + (solver == "ab2")  # ab2: Heun start-up
    observed = [math.log2(errors[0] / errors[1]), math.log2(errors[1] / errors[2])]
    p = ORDERS[solver]
    # At least the method's order. The explicit midpoint rule superconverges (observed ~3) at the endpoint
    # of this particular linear field; the Riccati test below pins every method to exactly its order.
    assert all(p - 0.3 < o < p + 1.2 for o in observed), (solver, errors, observed)
    assert errors[-1] < {"ab2": 5e-3}.get(solver, {1: 0.1, 2: 2e-3, 4: 1e-6}[p])  # AB2: larger error constant (5/12 vs 1/12)


@pytest.mark.parametrize("solver", ORDER_SOLVERS)
def test_fixed_step_solvers_have_exactly_their_order_on_a_nonlinear_ode(solver):
    # dx/dt = -2 t x^2 has the solution x(t) = 1 / (t^2 + 1 / x0).
    x0 = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    exact = 1 / (1 + 1 / x0)
    errors = [(solve(lambda x, t: -2 * t * x**2, x0, solver, n).x - exact).abs().max().item() for n in (8, 16, 32)]
    observed = [math.log2(errors[0] / errors[1]), math.log2(errors[1] / errors[2])]
    p = ORDERS[solver]
    assert all(abs(o - p) < 0.3 for o in observed), (solver, errors, observed)


def test_dopri5_matches_scipy_rk45():
    x0 = _x0()
    ref = solve_ivp(
        lambda t, y: _gauss_velocity(torch.from_numpy(y).reshape(x0.shape), t).flatten().numpy(), (0.0, 1.0), x0.flatten().numpy(), method="RK45", rtol=1e-10, atol=1e-12
    ).y[:, -1]
    for dtype in (torch.float64, torch.float32):
        res = solve(_gauss_velocity, x0.to(dtype), "dopri5", rtol=1e-6, atol=1e-6)
        assert np.abs(res.x.double().flatten().numpy() - ref).max() < 1e-4
    assert np.abs(ref - _exact_endpoint(x0).flatten().numpy()).max() < 1e-7  # scipy agrees with the closed form


@pytest.mark.parametrize("tol", [1e-3, 1e-4, 1e-6])
def test_dopri5_never_evaluates_the_network_past_the_data_end(tol):
    """The model is trained on t in [0, 1]: like scipy's solve_ivp (which never steps past t_bound), dopri5's
    last step ends at t = 1 instead of stepping past it and interpolating back (torchdiffeq's default, which
    evaluated the network up to t = 1.8 here and was less accurate)."""
    x0 = _x0()
    seen = []

    def velocity(x, t):
        seen.append(float(t))
        return _gauss_velocity(x, t)

    res = solve(velocity, x0, "dopri5", rtol=tol, atol=tol)
    assert min(seen) == 0.0 and max(seen) <= 1.0, max(seen)
    assert max(seen) > 1.0 - 1e-12  # the last step ends on the data end itself (to rounding)
    assert (res.x - _exact_endpoint(x0)).abs().max() < 10 * tol


def test_dopri5_tolerances_matter():
    x0 = _x0()
    exact = _exact_endpoint(x0)
    loose = solve(_gauss_velocity, x0, "dopri5", rtol=1e-2, atol=1e-2)
    tight = solve(_gauss_velocity, x0, "dopri5", rtol=1e-8, atol=1e-8)
    assert tight.nfe > loose.nfe
    assert (tight.x - exact).abs().max() < (loose.x - exact).abs().max()


def test_shifted_grid_still_integrates_to_the_exact_endpoint():
    x0 = _x0()
    res = solve(_gauss_velocity, x0, "rk4", 32, shift=3.0)
    assert (res.x - _exact_endpoint(x0)).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shifted_grids_start_at_noise_and_end_at_data_exactly(dtype):
    # Every shifted grid must hit t = 0 and t = 1 exactly and rise strictly, with its times SD3's map of the
    # even grid (computed in exact rationals). Written as 1 - s', the map rounded t = 0 to -1.2e-7 for some
    # shifts, e.g. the "auto" shift of 4x32x32 latents: the network was then evaluated before the noise end.
    from fractions import Fraction

    from fmcli.config import resolution_shift
    from fmcli.solvers import time_grid

    shifts = [round(resolution_shift(d), 4) for d in (3 * 32 * 32, 4 * 32 * 32, 3 * 64 * 64)] + [k / 20 for k in range(1, 121)]
    for shift in shifts:
        grid = time_grid(10, shift, dtype=dtype)
        assert grid[0].item() == 0.0 and grid[-1].item() == 1.0, (shift, grid[0].item(), grid[-1].item())
        assert bool((grid[1:] > grid[:-1]).all()), shift
        q = Fraction(shift)
        exact = [1 - q * (1 - Fraction(i, 10)) / (1 + (q - 1) * (1 - Fraction(i, 10))) for i in range(11)]
        assert max(abs(float(e) - g) for e, g in zip(exact, grid.tolist())) < (1e-6 if dtype == torch.float32 else 1e-14), shift
    seen = []
    solve(lambda x, t: seen.append(float(t)) or _gauss_velocity(x, t), _x0().to(dtype), "dopri5", shift=2.2857, rtol=1e-3, atol=1e-3)
    assert min(seen) == 0.0


def test_multistep_keeps_its_order_on_a_shifted_grid():
    # Variable steps: AB2's weights depend on the step ratio; with fixed weights the order would drop to 1.
    x0 = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    exact = 1 / (1 + 1 / x0)
    errors = [(solve(lambda x, t: -2 * t * x**2, x0, "ab2", n, shift=3.0).x - exact).abs().max().item() for n in (16, 32, 64)]
    observed = [math.log2(errors[0] / errors[1]), math.log2(errors[1] / errors[2])]
    assert all(abs(o - 2) < 0.3 for o in observed), (errors, observed)


def test_on_step_sees_every_state_with_its_time_and_nfe():
    x0 = _x0()
    seen = []
    res = solve(_gauss_velocity, x0, "rk4", 4, on_step=lambda s: seen.append((s.index, s.total, s.t, s.x.clone(), s.nfe)))
    assert [s[0] for s in seen] == [0, 1, 2, 3, 4] and {s[1] for s in seen} == {4}
    assert [s[4] for s in seen] == [0, 4, 8, 12, 16] and res.nfe == 16
    for _, _, t, xt, _ in seen[:1] + seen[-1:]:
        assert t in (0.0, 1.0)
    torch.testing.assert_close(seen[0][3], x0, rtol=0, atol=0)
    torch.testing.assert_close(seen[-1][3], res.x, rtol=0, atol=0)
    fine = solve(_gauss_velocity, x0, "rk4", 40, on_step=lambda s: seen.append((s.t, s.x.clone())))
    for t, xt in seen[5:]:  # exact solution x(t) = t mu + sigma_t x0 at every reported time
        sigma_t = math.sqrt((1 - (1 - SIGMA_MIN) * t) ** 2 + t**2 * S**2)
        torch.testing.assert_close(xt, t * MU + sigma_t * x0, atol=1e-6, rtol=0)
    assert len(seen) == 5 + 41 and fine.nfe == 160


def test_dopri5_reports_accepted_steps_in_time_order():
    x0 = _x0()
    seen = []
    res = solve(_gauss_velocity, x0, "dopri5", rtol=1e-6, atol=1e-6, on_step=lambda s: seen.append((s.index, s.t, s.x.clone(), s.nfe, s.total)))
    assert [s[0] for s in seen] == list(range(len(seen))) and len(seen) > 3
    times = [s[1] for s in seen]
    assert times[0] == 0.0 and times[-1] == 1.0 and times == sorted(set(times))
    assert seen[-1][3] == res.nfe and {s[4] for s in seen} == {0}  # adaptive: total steps unknown
    for _, t, xt, _, _ in seen:  # the accepted states lie on the exact solution
        sigma_t = math.sqrt((1 - (1 - SIGMA_MIN) * t) ** 2 + t**2 * S**2)
        torch.testing.assert_close(xt, t * MU + sigma_t * x0, atol=1e-4, rtol=0)


def test_a_raising_callback_stops_the_solve():
    model = _CountingModel()
    v = guided_velocity(model, {}, None)

    def stop_at_two(step):
        if step.index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        solve(v, torch.zeros(1, 1, 2, 2), "heun", 10, on_step=stop_at_two)
    assert model.calls == 4  # two Heun steps, then nothing more


# -------------------------------------------------------------------------------------------- the SDE


@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.9, 0.99, 1.0])
def test_score_from_the_exact_velocity_is_the_analytic_gaussian_score(t):
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + MU
    sigma2 = (1 - (1 - SIGMA_MIN) * t) ** 2 + t**2 * S**2  # x_t ~ N(t mu, sigma_t^2 I)
    analytic = -(x - t * MU) / sigma2
    score = score_from_velocity(_gauss_velocity(x, t), x, torch.tensor(t, dtype=torch.float64), SIGMA_MIN)
    torch.testing.assert_close(score, analytic, atol=1e-6, rtol=0)


def _em_moments(steps: int, noise_scale: float = 1.0):
    """Exact mean and variance of the endpoint of the code's Euler-Maruyama run on the Gaussian flow.

    There the drift is affine in x, so the endpoint is x_N = A x0 + b + sum_i c_i xi_i (per coordinate)
    with x0, xi_i independent N(0, 1): mean b, variance A^2 + sum c_i^2. One solve reads A, b and every
    c_i off unit inputs, one row each: row 0 (x0 = 0, no noise) gives b, row 1 (x0 = 1) gives A + b, row
    2 + i (noise 1 at step i only) gives c_i + b. No Monte Carlo error.
    """
    rows = steps + 2
    x0 = torch.zeros(rows, 1, dtype=torch.float64)
    x0[1] = 1.0

    def unit_noise(i):
        xi = torch.zeros(rows, 1, dtype=torch.float64)
        xi[2 + i] = 1.0
        return xi

    mu, s = 1.5, 0.4
    field = _gauss_field(mu, s)
    out = solve(field, x0, "euler-sde", steps, sigma_min=SIGMA_MIN, sde_noise=noise_scale, noise=unit_noise).x[:, 0]
    b, a, c = out[0], out[1] - out[0], out[2:] - out[0]
    return b.item() - mu, (a**2 + (c**2).sum()).item() - (SIGMA_MIN**2 + s**2)


def _gauss_field(mu: float, s: float):
    def v(x, t):
        t = torch.as_tensor(t, dtype=x.dtype)
        a, da = 1 - (1 - SIGMA_MIN) * t, -(1 - SIGMA_MIN)
        return mu + (a * da + t * s**2) / (a**2 + t**2 * s**2) * (x - t * mu)

    return v


@pytest.mark.parametrize("noise_scale", [0.5, 1.0, 2.0])
def test_euler_maruyama_reaches_the_target_mean_and_variance(noise_scale):
    errors = [_em_moments(n, noise_scale) for n in (32, 128, 512)]
    var_errors = [abs(e[1]) for e in errors]
    for coarse, fine in zip(var_errors, var_errors[1:]):  # weak order 1: 4x the steps, about 4x smaller
        assert coarse / 6 < fine < coarse / 2.5, var_errors
    assert var_errors[-1] < 1e-3, var_errors
    # The mean follows Euler on the mean's own ODE, exact for this affine field (the score term vanishes there).
    assert max(abs(e[0]) for e in errors) < 1e-12


def test_the_sde_without_noise_is_euler_exactly():
    x0 = _x0()
    sde = solve(_gauss_velocity, x0, "euler-sde", 17, sigma_min=SIGMA_MIN, sde_noise=0.0, noise=lambda i: torch.randn(x0.shape, dtype=x0.dtype))
    assert torch.equal(sde.x, solve(_gauss_velocity, x0, "euler", 17).x) and sde.nfe == 17


def test_the_sde_draws_noise_per_step_and_its_last_step_is_noiseless():
    x0 = _x0()
    asked = []

    def noise(i):
        asked.append(i)
        return torch.randn(x0.shape, generator=torch.Generator().manual_seed(i), dtype=x0.dtype)

    a = solve(_gauss_velocity, x0, "euler-sde", 6, sigma_min=SIGMA_MIN, noise=noise)
    assert asked == [0, 1, 2, 3, 4]  # one draw per step, none for the last
    b = solve(_gauss_velocity, x0, "euler-sde", 6, sigma_min=SIGMA_MIN, noise=noise)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, solve(_gauss_velocity, x0, "euler", 6).x)



@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ab2_is_exact_for_a_velocity_linear_in_t_on_uneven_grids(shift):
    # Variable-step AB2 integrates the line through its last two velocities over the next step, and its Heun
    # start-up is exact for a line too, so for v(t) = 1 + 3 t the endpoint is x0 + 1 + 3/2 exactly, whatever
    # the grid. Constant-step coefficients (3/2, -1/2) on a shifted grid's uneven steps are not.
    x0 = _x0()
    out = solve(lambda x, t: torch.ones_like(x) * (1 + 3 * torch.as_tensor(t, dtype=x.dtype)), x0, "ab2", 7, shift=shift).x
    torch.testing.assert_close(out, x0 + 2.5, rtol=0, atol=1e-12)


@pytest.mark.parametrize("noise_scale", [0.5, 2.0])
def test_euler_maruyama_step_uses_the_documented_diffusion(noise_scale):
    # One noisy step by hand (the SiT form g^2 = 2 noise (1 - t)): from x = 0 with a zero field the drift and the
    # score vanish, so after the zero-init step (t = 0 -> 1/3) the step at t = 1/3 adds sqrt(g^2 h) z with
    # g^2 = 2 noise (2/3), h = 1/3; the last step (Euler, zero field) adds nothing. A diffusion of another
    # shape in t with the same marginals (e.g. 2 noise (1 - t)^2) gives another scale here.
    x0 = torch.zeros(3, 4, dtype=torch.float64)
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = solve(lambda x, t: torch.zeros_like(x), x0, "euler-sde", 3, sde_noise=noise_scale, noise=lambda i: z, skip_steps=1).x
    torch.testing.assert_close(out, math.sqrt(2 * noise_scale * (2 / 3) * (1 / 3)) * z, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------ NFE and guidance


class _CountingModel:
    """model(x, t, y) with a class- and channel-dependent output; counts calls and batch rows. It also takes a
    mean-flow model's end time (the meanflow solver), which must come batched like t."""

    def __init__(self):
        self.calls, self.rows = 0, []

    def __call__(self, x, t, y=None, t_end=None):
        self.calls += 1
        self.rows.append(x.shape[0])
        assert t.shape == (x.shape[0],)
        assert t_end is None or (t_end.shape == t.shape and bool((t_end > t).all()))
        scale = (y.float() + 1).view(-1, 1, 1, 1) if y is not None else 1.0
        channel = torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, 1, 1)
        return -0.5 * x * scale + channel * (1 + t.view(-1, 1, 1, 1))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_nfe_equals_model_calls(solver, cfg):
    model = _CountingModel()
    y = torch.tensor([0, 1, 2])
    v = guided_velocity(model, {"y": y}, {"y": torch.full_like(y, 3)}, cfg=cfg)
    x0 = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    res = solve(v, x0, solver, 6, rtol=1e-4, atol=1e-4)
    assert res.nfe == model.calls > 0
    if solver != "dopri5":
        assert res.nfe == nfe_of(solver, 6)
    # CFG is one batched forward of [cond; uncond]; w = 1 never runs the unconditional branch.
    assert set(model.rows) == ({6} if cfg != 1.0 else {3})


def _guidance_setup():
    model = _CountingModel()
    y = torch.tensor([1, 2])
    cond, uncond = {"y": y}, {"y": torch.full_like(y, 5)}
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(0.4)
    tb = t.expand(2)
    return model, cond, uncond, x, t, model(x, tb, **cond), model(x, tb, **uncond)


def test_cfg_weights_on_every_channel():
    model, cond, uncond, x, t, v_c, v_u = _guidance_setup()
    assert not torch.allclose(v_c, v_u)
    torch.testing.assert_close(guided_velocity(model, cond, uncond, cfg=1.0)(x, t), v_c, rtol=0, atol=0)
    torch.testing.assert_close(guided_velocity(model, cond, uncond, cfg=0.0)(x, t), v_u, rtol=0, atol=1e-6)
    w = 3.5
    guided = guided_velocity(model, cond, uncond, cfg=w)(x, t)
    torch.testing.assert_close(guided, v_u + w * (v_c - v_u), rtol=1e-6, atol=1e-6)
    for c in range(x.shape[1]):  # every channel is guided, not only some
        assert not torch.allclose(guided[:, c], v_c[:, c])


def test_guidance_interval_is_respected():
    model, cond, uncond, x, t, v_c, v_u = _guidance_setup()
    inside = guided_velocity(model, cond, uncond, cfg=4.0, interval=(0.3, 0.5))
    outside = guided_velocity(model, cond, uncond, cfg=4.0, interval=(0.5, 0.9))
    torch.testing.assert_close(inside(x, t), v_u + 4.0 * (v_c - v_u), rtol=1e-6, atol=1e-6)
    model.rows.clear()
    torch.testing.assert_close(outside(x, t), v_c, rtol=0, atol=0)
    assert model.rows == [2]  # outside the interval: conditional pass only


def test_interval_nfe_over_a_full_solve():
    model = _CountingModel()
    y = torch.tensor([0, 1])
    v = guided_velocity(model, {"y": y}, {"y": torch.full_like(y, 3)}, cfg=2.0, interval=(0.0, 0.5))
    res = solve(v, torch.zeros(2, 1, 2, 2), "euler", 10)
    assert res.nfe == model.calls == 10
    assert model.rows.count(4) == 6 and model.rows.count(2) == 4  # t = 0, 0.1, ..., 0.5 guided


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("interval", [(0.7, 1.0), (0.0, 0.6), (0.3, 0.3)])
def test_interval_ends_are_guided_in_any_dtype(interval, dtype):
    # The interval is closed: grid points on its ends are guided, though float32 rounds 0.7 to 0.69999999.
    from fractions import Fraction

    model = _CountingModel()
    y = torch.tensor([0, 1])
    v = guided_velocity(model, {"y": y}, {"y": torch.full_like(y, 3)}, cfg=2.0, interval=interval)
    solve(v, torch.zeros(2, 1, 2, 2, dtype=dtype), "euler", 10)
    lo, hi = (Fraction(str(e)) for e in interval)  # the exact grid i / 10, counted in rationals
    expected = sum(lo <= Fraction(i, 10) <= hi for i in range(10))
    assert model.rows.count(4) == expected and model.rows.count(2) == 10 - expected


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("solver", ["heun", "euler-sde"])
def test_same_seed_any_batch_size_gives_the_same_samples(solver):
    from fmcli.config import Config, SampleConfig
    from fmcli.generate import LoadedModel, initial_noise, iterate_samples
    from fmcli.models import build_model

    cfg = Config.model_validate({"model": {"hidden_size": 32, "depth": 2, "heads": 2, "patch_size": 4, "image_size": 8, "in_channels": 3, "num_classes": 3}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # adaLN-Zero starts at zero velocity; randomise so the test means something
        for p in model.parameters():
            p.normal_(0, 0.05)
    loaded = LoadedModel(model=model.eval(), config=cfg, info={}, step=0)
    sc = SampleConfig(solver=solver, steps=4, cfg=2.0)

    def run(batch_size):
        out = [r.x for _, _, r in iterate_samples(loaded, list(range(7)), seed=11, sample_cfg=sc, batch_size=batch_size, device=torch.device("cpu"))]
        return torch.cat(out)

    a, b, c = run(7), run(3), run(1)
    assert torch.equal(initial_noise(11, [4, 5], (3, 8, 8)), initial_noise(11, range(7), (3, 8, 8))[4:6])
    assert a.abs().max() > 0 and not torch.allclose(a, initial_noise(11, range(7), (3, 8, 8)))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)
    assert not torch.allclose(run(2)[:1], torch.cat([r.x for _, _, r in iterate_samples(loaded, [0], seed=12, sample_cfg=sc, batch_size=1, device=torch.device("cpu"))]))


def test_trajectory_recorder_picks_the_states_nearest_to_even_times():
    from fmcli.generate import TrajectoryRecorder, merge_trajectories
    from fmcli.solvers import time_grid

    x0 = _x0()
    rec = TrajectoryRecorder()
    res = solve(_gauss_velocity, x0, "euler", 64, shift=3.0, on_step=rec)
    frames = rec.take(5)
    grid = time_grid(64, 3.0, dtype=torch.float64)
    times = [t for t, _ in frames]
    assert len(times) == 5 and times[0] == 0.0 and times[-1] == 1.0
    for tau, t in zip([0.0, 0.25, 0.5, 0.75, 1.0], times):
        assert abs(t - tau) == pytest.approx((grid - tau).abs().min().item())
    torch.testing.assert_close(frames[-1][1], res.x, rtol=0, atol=0)
    assert rec.states == []  # taken: the next batch starts afresh
    solve(_gauss_velocity, x0[:3], "euler", 2, on_step=rec)
    first = rec.take(9)
    solve(_gauss_velocity, x0[3:], "euler", 2, on_step=rec)
    merged = merge_trajectories([first, rec.take(9)])
    assert [t for t, _ in merged] == [0.0, 0.5, 1.0]  # the grid has only 3 times: no repeated frames
    assert merged[0][1].shape == x0.shape and torch.equal(merged[0][1], x0)


# --------------------------------------------------------------------------------- guidance variants


def test_guidance_weight_one_is_the_main_model_for_every_method():
    model, cond, uncond, x, t, v_c, v_u = _guidance_setup()
    guide = _CountingModel()
    for guidance in GUIDANCES:
        model.rows.clear()
        v = guided_velocity(model, cond, uncond, cfg=1.0, guidance=guidance, guide=guide)(x, t)
        assert torch.equal(v, v_c) and model.rows == [2], guidance
    assert guide.calls == 0


def test_optimized_scale_is_the_least_squares_projection():
    from fmcli.solvers import optimized_scale

    g = torch.Generator().manual_seed(4)
    v_c, v_u = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    s = optimized_scale(v_c, v_u)
    assert s.shape == (3, 1, 1, 1)
    for k in range(3):  # argmin_s ||v_c - s v_u||^2 by numpy's least squares
        ref = np.linalg.lstsq(v_u[k].reshape(-1, 1).numpy(), v_c[k].reshape(-1).numpy(), rcond=None)[0][0]
        assert s[k].item() == pytest.approx(ref, rel=1e-6)


def test_cfg_zero_formula_and_with_its_scale_fixed_to_one_it_is_plain_cfg(monkeypatch):
    import fmcli.solvers as solvers

    model, cond, uncond, x, t, v_c, v_u = _guidance_setup()
    w = 3.0
    s = ((v_c * v_u).flatten(1).sum(1) / v_u.pow(2).flatten(1).sum(1)).view(-1, 1, 1, 1)
    zero = guided_velocity(model, cond, uncond, cfg=w, guidance="cfg-zero")(x, t)
    torch.testing.assert_close(zero, s * v_u + w * (v_c - s * v_u), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(zero, v_u + w * (v_c - v_u))
    monkeypatch.setattr(solvers, "optimized_scale", lambda vc, vu: torch.ones(vc.shape[0], 1, 1, 1))
    fixed = guided_velocity(model, cond, uncond, cfg=w, guidance="cfg-zero")(x, t)
    assert torch.equal(fixed, guided_velocity(model, cond, uncond, cfg=w, guidance="cfg")(x, t))


def test_autoguidance_formula_and_with_the_main_model_as_guide_it_is_the_main_model():
    model, cond, uncond, x, t, v_c, v_u = _guidance_setup()

    def guide(x, t, y=None):
        return 0.5 * model(x, t, y=y) + 1.0

    v_g = guide(x, t.expand(2), **cond)
    auto = guided_velocity(model, cond, None, cfg=2.5, guidance="auto", guide=guide)(x, t)
    torch.testing.assert_close(auto, v_g + 2.5 * (v_c - v_g), rtol=1e-6, atol=1e-6)
    same = guided_velocity(model, cond, uncond, cfg=2.5, guidance="auto", guide=model)(x, t)
    torch.testing.assert_close(same, v_c, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="guide"):
        guided_velocity(model, cond, uncond, cfg=2.0, guidance="auto")
    with pytest.raises(ValueError, match="unknown guidance"):
        guided_velocity(model, cond, uncond, cfg=2.0, guidance="pag")


def test_autoguidance_counts_one_evaluation_per_guided_step():
    model, guide = _CountingModel(), _CountingModel()
    y = torch.tensor([0, 1])
    v = guided_velocity(model, {"y": y}, None, cfg=2.0, guidance="auto", guide=guide, interval=(0.0, 0.45))
    res = solve(v, torch.zeros(2, 1, 2, 2), "euler", 10)
    assert res.nfe == model.calls == 10 and guide.calls == 5  # t = 0, ..., 0.4 guided


def test_zero_init_skips_the_first_steps_without_evaluating():
    model = _CountingModel()
    y = torch.tensor([0, 1])
    v = guided_velocity(model, {"y": y}, {"y": torch.full_like(y, 3)}, cfg=2.0, guidance="cfg-zero")
    x0 = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    seen = []
    res = solve(v, x0, "heun", 5, skip_steps=2, on_step=lambda s: seen.append((s.index, s.x.clone())))
    assert res.nfe == model.calls == 3 * 2 and [i for i, _ in seen] == [0, 1, 2, 3, 4, 5]
    assert torch.equal(seen[2][1], x0) and not torch.equal(seen[3][1], x0)
    # the same as starting an unskipped solve at the grid time of step 2
    model2 = _CountingModel()
    v2 = guided_velocity(model2, {"y": y}, {"y": torch.full_like(y, 3)}, cfg=2.0, guidance="cfg-zero")
    x, grid = x0, torch.linspace(0, 1, 6)
    for i in range(2, 5):
        h = grid[i + 1] - grid[i]
        k1 = v2(x, grid[i])
        x = x + 0.5 * h * (k1 + v2(x + h * k1, grid[i + 1]))
    torch.testing.assert_close(res.x, x, rtol=0, atol=0)
    late = solve(v, x0, "dopri5", 5, skip_steps=2, rtol=1e-4, atol=1e-4)
    assert late.nfe > 0 and not torch.equal(late.x, x0)


def test_steps_for_an_nfe_budget():
    for solver in ("euler", "euler-sde", "midpoint", "heun", "rk4", "ab2"):
        for nfe in (1, 2, 3, 4, 8, 16, 32):
            steps = steps_for_nfe(solver, nfe)
            assert nfe_of(solver, steps) <= nfe  # never over budget (0 steps: not even one fits)
            assert nfe_of(solver, steps + 1) > nfe  # the most steps within the budget
    assert steps_for_nfe("ab2", 8) == 7 and steps_for_nfe("heun", 8) == 4 and steps_for_nfe("rk4", 2) == 0
    with pytest.raises(ValueError, match="tolerances"):
        steps_for_nfe("dopri5", 8)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_dopri5_on_a_velocity_that_turns_non_finite_raises_floating_point_error(bad):
    # v = -x is finite (and trivially integrable: x(t) = x0 e^-t) for t < 0.5, then nan/inf: no step across
    # t = 0.5 can be accepted. torchdiffeq's "underflow in dt" AssertionError used to escape (the CLI printed
    # "AssertionError: underflow in dt 0.0"); it is a FloatingPointError naming dopri5 and the time it reached.
    def velocity(x, t):
        return -x if float(t) < 0.5 else torch.full_like(x, bad)

    with pytest.raises(FloatingPointError, match=r"dopri5 could not step past t = ") as err:
        solve(velocity, torch.ones(2, 3), "dopri5", rtol=1e-5, atol=1e-5)
    reached = float(str(err.value).split("t = ")[1].split(" ")[0])
    assert 0.3 < reached < 0.5  # the last accepted step ends before the velocity turns bad
