"""fmcli.flow: path and target, time samplers, shift, minibatch couplings (against independent references)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from fmcli.flow import couple, interpolate, logit_normal_density, sample_times, shift_time

# ----------------------------------------------------------------------------------------------- path


def test_interpolate_matches_hand_computed_values():
    x0 = torch.tensor([[1.0, 2.0]])
    x1 = torch.tensor([[3.0, -1.0]])
    # sigma_min = 0.1, t = 0.25: a = 1 - 0.9 * 0.25 = 0.775
    xt, ut = interpolate(x0, x1, torch.tensor([0.25]), sigma_min=0.1)
    torch.testing.assert_close(xt, torch.tensor([[1.525, 1.3]]))
    torch.testing.assert_close(ut, torch.tensor([[2.1, -2.8]]))
    # Endpoints: pure noise at t = 0, data plus sigma_min noise at t = 1.
    xt0, _ = interpolate(x0, x1, torch.tensor([0.0]), sigma_min=0.1)
    xt1, _ = interpolate(x0, x1, torch.tensor([1.0]), sigma_min=0.1)
    torch.testing.assert_close(xt0, x0)
    torch.testing.assert_close(xt1, x1 + 0.1 * x0)


def test_target_is_the_time_derivative_of_the_path():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.rand(4, generator=g, dtype=torch.float64) * 0.9 + 0.05
    h = 1e-6
    for sigma_min in (0.0, 1e-5, 0.2):
        plus, ut = interpolate(x0, x1, t + h, sigma_min)
        minus, _ = interpolate(x0, x1, t - h, sigma_min)
        torch.testing.assert_close((plus - minus) / (2 * h), ut, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- time samplers


def test_uniform_times_follow_the_uniform_law():
    t = sample_times(20000, "uniform", generator=torch.Generator().manual_seed(1))
    assert stats.kstest(t.numpy(), "uniform").pvalue > 1e-3


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 0.7)])
def test_logit_normal_times_follow_their_density(mean, std):
    t = sample_times(20000, "logit_normal", logit_mean=mean, logit_std=std, generator=torch.Generator().manual_seed(2))
    # CDF of the logit-normal: Phi((logit(t) - mean) / std).
    cdf = lambda x: stats.norm.cdf((np.log(x) - np.log1p(-x) - mean) / std)  # noqa: E731
    assert stats.kstest(t.numpy().astype(np.float64), cdf).pvalue > 1e-3
    # The density helper (used elsewhere as a reference) integrates to one and matches scipy's normal pdf.
    grid = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    dens = logit_normal_density(grid, mean, std)
    assert abs(torch.trapezoid(dens, grid).item() - 1) < 1e-3
    ref = stats.norm.pdf((np.log(0.3 / 0.7) - mean) / std) / std / (0.3 * 0.7)
    assert logit_normal_density(torch.tensor([0.3], dtype=torch.float64), mean, std).item() == pytest.approx(ref, rel=1e-9)


def test_shift_matches_sd3_formula():
    # SD3 (Esser et al. 2024, eq. 23) shifts the noise level sigma (1 = noise): sigma' = s*sigma / (1 + (s-1)*sigma).
    # Our t is 1 - sigma.
    sigma = np.linspace(0, 1, 11)
    for s in (0.5, 1.0, 3.0):
        sd3 = s * sigma / (1 + (s - 1) * sigma)
        ours = shift_time(torch.tensor(1 - sigma, dtype=torch.float64), s).numpy()
        np.testing.assert_allclose(ours, 1 - sd3, atol=1e-12)
    assert shift_time(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.25)  # sigma 0.5 -> 0.75


def test_shifted_sampler_law_is_the_pushforward():
    shift = 3.0
    t = sample_times(20000, "uniform", shift=shift, generator=torch.Generator().manual_seed(3)).numpy().astype(np.float64)

    def cdf(x):  # P(t' <= x) = P(t <= g^-1(x)); with sigma = 1 - t, sigma = sigma' / (s - (s - 1) sigma')
        sp = 1 - x
        return 1 - sp / (shift - (shift - 1) * sp)

    assert stats.kstest(t, cdf).pvalue > 1e-3


def test_a_shifted_logit_normal_is_a_logit_normal_with_its_mean_moved():
    # logit(t') = logit(t) - log(s) for SD3's shift: so the shifted logit-normal(m, sd) is logit-normal(m - log s, sd)
    # (why flow.shift = 2 trains at the times of logit_mean = -0.69). Checked on the samples against scipy's normal.
    shift, mean, std = 2.0, 0.3, 0.9
    t = sample_times(20000, "logit_normal", logit_mean=mean, logit_std=std, shift=shift, generator=torch.Generator().manual_seed(5))
    logits = torch.logit(t.double()).numpy()
    assert stats.kstest(logits, stats.norm(mean - np.log(shift), std).cdf).pvalue > 1e-3
    assert stats.kstest(logits, stats.norm(mean, std).cdf).pvalue < 1e-6  # the test can tell the shift apart


# ---------------------------------------------------------------------------------------------- couplings


def _brute_force_cost(x0, x1):
    n = x0.shape[0]
    c = ((x1.reshape(n, 1, -1).double() - x0.reshape(1, n, -1).double()) ** 2).sum(-1)
    return min(sum(c[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(n)))


def _is_permutation_of(out, x0, perm):
    assert sorted(perm.tolist()) == list(range(x0.shape[0]))
    assert torch.equal(out, x0[perm])


@pytest.mark.parametrize("n,seed", [(3, 0), (5, 1), (6, 2), (7, 3)])
def test_ot_exact_equals_brute_force(n, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 2, 3, 3, generator=g)
    x1 = torch.randn(n, 2, 3, 3, generator=g) * 0.5 + 1.0
    out, st = couple(x0, x1, method="ot-exact")
    _is_permutation_of(out, x0, st.permutation)
    total = ((out.double() - x1.double()) ** 2).sum().item()
    assert total == pytest.approx(_brute_force_cost(x0, x1), rel=1e-6)
    d = x0[0].numel()
    assert st.cost_after == pytest.approx(total / (n * d), rel=1e-5)
    assert st.cost_before == pytest.approx(((x0 - x1) ** 2).mean().item(), rel=1e-6)
    assert st.cost_after <= st.cost_before + 1e-6


def test_independent_coupling_is_the_identity():
    x0, x1 = torch.randn(5, 4), torch.randn(5, 4)
    out, st = couple(x0, x1, method="independent")
    assert torch.equal(out, x0) and st.cost_before == st.cost_after
    assert st.permutation.tolist() == list(range(5))


@pytest.mark.parametrize("method", ["ot-exact", "ot-sinkhorn"])
def test_per_class_coupling_never_moves_a_label(method):
    g = torch.Generator().manual_seed(4)
    n = 40
    labels = torch.randint(0, 4, (n,), generator=g)
    labels[7] = 9  # a class with a single member keeps its own noise
    x0, x1 = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g) + labels[:, None].float()
    out, st = couple(x0, x1, labels, method=method, reg=0.01, iters=300)
    _is_permutation_of(out, x0, st.permutation)
    assert torch.equal(labels[st.permutation], labels)  # each noise came from a sample of the same class
    assert st.permutation[7] == 7
    # Within each class the exact coupling is optimal: compare with the per-class brute-force-free check
    # that no pair swap lowers the cost (2-opt optimality, necessary for the optimum).
    if method == "ot-exact":
        cost = lambda i, j: ((x1[i] - x0[st.permutation[j]]) ** 2).sum()  # noqa: E731
        for i, j in itertools.combinations(range(n), 2):
            if labels[i] == labels[j]:
                assert cost(i, i) + cost(j, j) <= cost(i, j) + cost(j, i) + 1e-5


def test_per_class_exact_equals_brute_force_per_class():
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 2, 1, 0])
    x0, x1 = torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g) + 2
    out, _ = couple(x0, x1, labels, method="ot-exact")
    total = ((out.double() - x1.double()) ** 2).sum().item()
    ref = sum(_brute_force_cost(x0[labels == c], x1[labels == c]) for c in (0, 1, 2))
    assert total == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("method,batches", [("ot-exact", 300), ("ot-sinkhorn", 100)])
def test_noise_paired_with_each_class_stays_standard_normal(method, batches, one_thread):
    """Sampling starts every class from N(0, I), so the noise OT pairs with class-c data must be N(0, I) too.
    Two classes at x = -4 and x = +4 in 2-D, batches of 16: within-class coupling keeps the mean of each
    class's noise at 0 and its variance at 1 (the closed form); a label-blind plan gives class c the noise
    nearest to it (mean about -/+0.7 in x, variance 0.5), which this test would see at > 20 standard errors."""
    g = torch.Generator().manual_seed(8)
    paired = {0: [], 1: []}
    for _ in range(batches):
        y = torch.randint(0, 2, (16,), generator=g)
        x1 = torch.randn(16, 2, generator=g) * 0.3 + torch.stack([(2 * y - 1) * 4.0, torch.zeros(16)], 1)
        out, _ = couple(torch.randn(16, 2, generator=g), x1, y, method=method)
        for c in (0, 1):
            paired[c].append(out[y == c])
    for z in map(torch.cat, paired.values()):
        se = 1 / len(z) ** 0.5
        assert z.mean(0).abs().max() < 4.5 * se, z.mean(0)
        assert (z.var(0) - 1).abs().max() < 4.5 * math.sqrt(2) * se, z.var(0)


@pytest.mark.parametrize("dim", [2, 32])
def test_sinkhorn_rounded_plan_is_a_near_optimal_permutation(dim):
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(96, dim, generator=g)
    x1 = torch.randn(96, dim, generator=g) * 0.5 + 1.0
    exact, st_exact = couple(x0, x1, method="ot-exact")
    out, st = couple(x0, x1, method="ot-sinkhorn", reg=0.005, iters=500)
    _is_permutation_of(out, x0, st.permutation)
    assert st.cost_after <= st_exact.cost_after * 1.03
    assert st.cost_after >= st_exact.cost_after * (1 - 1e-6)  # nothing beats the exact optimum
    assert st.cost_after < st.cost_before


def test_sinkhorn_plan_has_uniform_marginals():
    from fmcli.flow import pairwise_sq_dist, sinkhorn_log_plan

    g = torch.Generator().manual_seed(7)
    c = pairwise_sq_dist(torch.randn(20, 3, generator=g), torch.randn(20, 3, generator=g))
    plan = sinkhorn_log_plan(c, reg=0.05, iters=500).exp()
    torch.testing.assert_close(plan.sum(0), torch.full((20,), 1 / 20, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((20,), 1 / 20, dtype=torch.float64), atol=1e-6, rtol=0)


def test_coupling_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        couple(torch.zeros(3, 2), torch.zeros(4, 2), method="ot-exact")
    with pytest.raises(ValueError, match="unknown coupling"):
        couple(torch.zeros(3, 2), torch.zeros(3, 2), method="ot")
    assert math.isfinite(couple(torch.zeros(1, 2), torch.ones(1, 2), method="ot-exact")[1].cost_after)
