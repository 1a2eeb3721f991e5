"""fmcli.sampling: solvers against a closed-form Gaussian flow and scipy, NFE counting, CFG, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from fmcli.sampling import FIXED_STEP_SOLVERS, SOLVERS, guided_velocity, solve

# Gaussian-to-Gaussian flow. With x0 ~ N(0, I), x1 ~ N(mu, s^2 I) independent and the path of DESIGN.md
# section 2, x_t = a(t) x0 + t x1 with a(t) = 1 - (1 - sigma_min) t, so x_t ~ N(t mu, sigma_t^2 I) with
# sigma_t^2 = a^2 + t^2 s^2. The marginal velocity E[u_t | x_t] (u_t = x1 - (1 - sigma_min) x0) is, by
# Gaussian conditioning, mu + Cov(u_t, x_t) / Var(x_t) (x - t mu) with Cov = -(1 - sigma_min) a + t s^2,
# i.e. v(x, t) = mu + (sigma_t' / sigma_t) (x - t mu), affine in x. The ODE's solution from x(0) = x0 is
# x(t) = t mu + sigma_t x0 (sigma_0 = 1), so the exact endpoint is mu + sqrt(sigma_min^2 + s^2) x0.
MU = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=torch.float64)
S = 0.3
SIGMA_MIN = 0.05
ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


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


@pytest.mark.parametrize("solver", FIXED_STEP_SOLVERS)
def test_fixed_step_solvers_converge_at_their_order(solver):
    x0 = _x0()
    exact = _exact_endpoint(x0)
    errors = []
    for n in (8, 16, 32):
        res = solve(_gauss_velocity, x0, solver, n)
        errors.append((res.x - exact).abs().max().item())
        assert res.nfe == n * {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}[solver]
    observed = [math.log2(errors[0] / errors[1]), math.log2(errors[1] / errors[2])]
    p = ORDERS[solver]
    # At least the method's order. The explicit midpoint rule superconverges (observed ~3) at the endpoint
    # of this particular linear field; the Riccati test below pins every method to exactly its order.
    assert all(p - 0.3 < o < p + 1.2 for o in observed), (solver, errors, observed)
    assert errors[-1] < {1: 0.1, 2: 2e-3, 4: 1e-6}[p]


@pytest.mark.parametrize("solver", FIXED_STEP_SOLVERS)
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


def test_trajectory_capture_times_and_states():
    x0 = _x0()
    res = solve(_gauss_velocity, x0, "rk4", 40, capture=5)
    assert [t for t, _ in res.trajectory] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    for t, xt in res.trajectory:  # exact solution x(t) = t mu + sigma_t x0
        sigma_t = math.sqrt((1 - (1 - SIGMA_MIN) * t) ** 2 + t**2 * S**2)
        torch.testing.assert_close(xt, t * MU + sigma_t * x0, atol=1e-6, rtol=0)
    res = solve(_gauss_velocity, x0, "dopri5", capture=3)
    assert [t for t, _ in res.trajectory] == pytest.approx([0.0, 0.5, 1.0])
    torch.testing.assert_close(res.trajectory[-1][1], res.x)


# ------------------------------------------------------------------------------------ NFE and guidance


class _CountingModel:
    """model(x, t, y) with a class- and channel-dependent output; counts calls and batch rows."""

    def __init__(self):
        self.calls, self.rows = 0, []

    def __call__(self, x, t, y=None):
        self.calls += 1
        self.rows.append(x.shape[0])
        assert t.shape == (x.shape[0],)
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


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_any_batch_size_gives_the_same_samples():
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
    sc = SampleConfig(solver="heun", steps=4, cfg=2.0)

    def run(batch_size):
        out = [r.x for _, _, r in iterate_samples(loaded, list(range(7)), seed=11, sample_cfg=sc, batch_size=batch_size, device=torch.device("cpu"))]
        return torch.cat(out)

    a, b, c = run(7), run(3), run(1)
    assert torch.equal(initial_noise(11, [4, 5], (3, 8, 8)), initial_noise(11, range(7), (3, 8, 8))[4:6])
    assert a.abs().max() > 0 and not torch.allclose(a, initial_noise(11, range(7), (3, 8, 8)))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)
    assert not torch.allclose(run(2)[:1], torch.cat([r.x for _, _, r in iterate_samples(loaded, [0], seed=12, sample_cfg=sc, batch_size=1, device=torch.device("cpu"))]))


def test_capture_with_a_shifted_grid_picks_the_nearest_times():
    from fmcli.sampling import time_grid

    x0 = _x0()
    res = solve(_gauss_velocity, x0, "euler", 64, shift=3.0, capture=5)
    grid = time_grid(64, 3.0, dtype=torch.float64)
    times = [t for t, _ in res.trajectory]
    assert len(times) == 5 and times[0] == 0.0 and times[-1] == 1.0
    for tau, t in zip([0.0, 0.25, 0.5, 0.75, 1.0], times):
        assert abs(t - tau) == pytest.approx((grid - tau).abs().min().item())
    assert len(solve(_gauss_velocity, x0, "euler", 2, capture=9).trajectory) == 3  # the grid has only 3 times
