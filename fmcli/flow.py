"""Probability paths, time samplers, minibatch couplings and the flow-matching loss (pure torch, no I/O).

Convention (docs/architecture.md section 3): t = 0 is noise x0 ~ N(0, I), t = 1 is data x1.
    x_t = (1 - (1 - sigma_min) t) x0 + t x1,      u_t = x1 - (1 - sigma_min) x0
sigma_min = 0 is rectified flow; sigma_min > 0 is the OT-CFM path of Lipman et al. (2023), eq. 20-23.

Mean flows (flow.objective = "meanflow"; Geng et al. 2025, "Mean Flows for One-step Generative Modeling",
arXiv:2505.13447), in this convention. The network u(z, t, t_end) predicts the average velocity of the ODE
dz/ds = v(z, s) over [t, t_end], t <= t_end, starting from z at time t (the interval ends where a sampler
jumps to):
    u(z_t, t, t_end) = 1 / (t_end - t) * integral_t^t_end v(z_s, s) ds,   so   z_t_end = z_t + (t_end - t) u.
Differentiating (t_end - t) u(z_t, t, t_end) = integral_t^t_end v ds in t, along the trajectory, gives the
MeanFlow identity
    u(z_t, t, t_end) = v(z_t, t) + (t_end - t) d/dt u(z_t, t, t_end),   d/dt = v . grad_z + partial_t,
whose total derivative is one Jacobian-vector product with tangent (v, 1, 0) on (z, t, t_end) (step.py).
(The paper runs time from data to noise: its (r, t) are fm's (1 - t_end, 1 - t), its u is -u here.)
With t_end = t the target is v itself: plain flow matching.

Data prediction (model.prediction = "data"; JiT, Li & He 2025, "Back to Basics: Let Denoising Generative
Models Denoise", arXiv:2511.13720): the network outputs the data x1_hat and the velocity follows from the
straight path through x_t that ends there, v = (x1_hat - x_t) / (1 - t) (`velocity_from_data`); the loss,
the solvers and guidance all keep working on that velocity. A clean image is an easier target for a small
network than the velocity, which carries the noise. A mean-flow model jumps along the same line:
z_t_end = z_t + (t_end - t) / (1 - t) (x1_hat - z_t), to x1_hat itself when t_end = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

COUPLINGS = ("independent", "ot-exact", "ot-sinkhorn", "pairs")  # pairs: the data comes paired (`fm reflow`): kept as is
TIME_SAMPLERS = ("uniform", "logit_normal", "zero")
OBJECTIVES = ("flow", "meanflow")  # meanflow: the network predicts the average velocity over [t, t_end]
MEANFLOW_WEIGHT_EPS = 1e-3  # c in the adaptive weight 1 / (mse + c)^p (the paper's value)


def expand_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample times [B] so they broadcast against a batch shaped like `like`."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


# 1 - t is clamped at this in `velocity_from_data` (JiT's t_eps): at the data end the division by 1 - t would
# blow up, and there the predicted data is already where the path ends.
DATA_PREDICTION_EPS = 0.05


def velocity_from_data(x1_hat: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: float = DATA_PREDICTION_EPS) -> torch.Tensor:
    """The velocity (x1_hat - x_t) / max(1 - t, eps) of the straight path from x_t to the predicted data
    x1_hat, in fp32 (a network's output under autocast is bf16; the division by a small 1 - t is not). Exact
    for sigma_min = 0; with sigma_min > 0 the path's velocity differs by O(sigma_min t / (1 - t))."""
    x1_hat = x1_hat.float()  # once: this runs in every forward of a data-predicting network
    return (x1_hat - xt.float()) / expand_time((1 - t.float()).clamp_min(eps), x1_hat)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma_min: float = 0.0):
    """Point on the path at time t and the target velocity: returns (x_t, u_t)."""
    tt = expand_time(t, x1)
    xt = (1 - (1 - sigma_min) * tt) * x0 + tt * x1
    ut = x1 - (1 - sigma_min) * x0
    return xt, ut


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3-style resolution shift in our t=0-is-noise convention: shift > 1 spends more time near noise.

    With s = 1 - t the noise level, SD3 uses s' = shift * s / (1 + (shift - 1) s); so t' = 1 - s', computed as
    t / (t + shift (1 - t)), the same map in a form that keeps t = 0 and t = 1 exactly (1 - s' rounded them an
    ulp off for some shifts: a grid that started at t = -1.2e-7).
    """
    if shift == 1.0:
        return t
    return t / (t + shift * (1 - t))


def sample_times(
    n: int,
    sampler: str = "uniform",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training times in [0, 1]: `uniform`, or `logit_normal` (sigmoid of N(mean, std)), then the shift;
    `zero`: t = 0 only, the one-step distillation of a reflowed model on its pairs (Liu et al. 2022, sec. 2.3).

    `logit_mean` is on fm's t, where t = 1 is data: a positive mean puts more training times near the
    data end. SD3 (Esser et al., 2024) parametrises by the noise level sigma = 1 - t, so its m corresponds
    to logit_mean = -m here (the logit of 1 - t is minus the logit of t).
    """
    if sampler == "zero":
        return torch.zeros(n, device=device)
    if sampler == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif sampler == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"unknown time sampler {sampler!r}")
    return shift_time(t, shift)


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE averaged over every element (docs/architecture.md section 3), computed in fp32."""
    return torch.mean((prediction.float() - target.float()) ** 2)


def sample_time_pairs(
    n: int, ratio: float, sampler: str = "uniform", *, generator: torch.Generator | None = None, **times
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-flow training intervals (t, t_end), t <= t_end: two draws of `sample_times(sampler, **times)`
    sorted, then t_end = t (plain flow matching) for all but a fraction `ratio` of the rows, as in MeanFlow
    (whose ablation found 25 % of intervals with r != t best for one-step sampling from scratch). As in its code,
    those rows keep the earlier (noisier) draw, so their t follows the smaller of two draws, not the sampler
    itself. Returns t and t_end, each [n]."""
    a = sample_times(n, sampler, generator=generator, **times)
    b = sample_times(n, sampler, generator=generator, **times)
    keep = torch.rand(n, generator=generator, device=a.device) < ratio
    t, t_end = torch.minimum(a, b), torch.maximum(a, b)
    return t, torch.where(keep, t_end, t)


def mean_flow_loss(prediction: torch.Tensor, target: torch.Tensor, power: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, plain MSE for the log): per sample m = mean squared error over its elements, weighted
    by the stop-gradient adaptive weight 1 / (m + c)^power (MeanFlow's adaptive loss weighting, c = MEANFLOW_WEIGHT_EPS), then
    averaged over the batch. power = 0 is `flow_matching_loss`. In fp32."""
    per_sample = ((prediction.float() - target.float()) ** 2).flatten(1).mean(1)
    weight = (per_sample.detach() + MEANFLOW_WEIGHT_EPS) ** -power if power else torch.ones_like(per_sample)
    return (weight * per_sample).mean(), per_sample.mean()


def logit_normal_density(t: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Density of the logit-normal distribution on (0, 1); used by tests as an independent reference."""
    logit = torch.log(t / (1 - t))
    return torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))


# ------------------------------------------------------------------------------------------ couplings


@dataclass
class CouplingStats:
    """Mean squared distance per element between paired noise and data, before and after coupling."""

    cost_before: float
    cost_after: float
    permutation: torch.Tensor  # x0_coupled = x0[permutation]


def couple(
    x0: torch.Tensor,
    x1: torch.Tensor,
    labels: torch.Tensor | None = None,
    method: str = "independent",
    *,
    reg: float = 0.05,
    iters: int = 100,
) -> tuple[torch.Tensor, CouplingStats]:
    """Re-pair a minibatch of noise with its data: returns (x0[perm], stats); x1 and labels keep their order.

    - `independent`: the identity pairing (the plain conditional flow matching of Lipman et al., 2023).
    - `ot-exact`: minibatch optimal transport, as in OT-CFM (Tong et al., 2023, "Improving and generalizing
      flow-based generative models with minibatch optimal transport", Alg. 2) and multisample flow
      matching (Pooladian et al., 2023, "Multisample Flow Matching: Straightening Flows with Minibatch
      Couplings", sec. 3.2): the permutation minimising the summed squared Euclidean distance between
      flattened noise and data, solved exactly by `scipy.optimize.linear_sum_assignment`. Every noise
      sample is used exactly once (torchcfm samples the plan with replacement; we do not).
    - `ot-sinkhorn`: the entropic plan (Cuturi, 2013) computed by log-domain Sinkhorn iterations with
      `reg` relative to the largest pairwise cost, rounded to a permutation greedily by plan mass
      (mutually best pairs first; no collisions, no sampling). Rounding by an assignment on -log(plan)
      would give back the exact OT permutation, since the dual potentials sum to a constant over any
      permutation; the greedy rounding is what keeps this O(n^2) per round for large batches.

    With `labels`, noise is coupled within each class only, so every label stays with its own data.
    """
    if x0.shape != x1.shape:
        raise ValueError(f"couple: noise {tuple(x0.shape)} and data {tuple(x1.shape)} differ in shape")
    if method not in COUPLINGS:
        raise ValueError(f"unknown coupling {method!r}; choose one of {', '.join(COUPLINGS)}")
    n = x0.shape[0]
    perm = torch.arange(n)
    if method not in ("independent", "pairs") and not (bool(torch.isfinite(x0).all()) and bool(torch.isfinite(x1).all())):
        # NaN costs would make the assignment meaningless (and used to stall the Sinkhorn rounding).
        raise FloatingPointError(f"coupling {method!r}: the batch holds non-finite values (NaN/inf) in the {'data' if not bool(torch.isfinite(x1).all()) else 'noise'}; check the dataset")
    if method not in ("independent", "pairs"):
        groups = [perm.clone()] if labels is None else [torch.nonzero(labels.cpu() == c).flatten() for c in torch.unique(labels.cpu())]
        for idx in groups:
            if len(idx) < 2:
                continue
            cost = pairwise_sq_dist(x1[idx.to(x1.device)], x0[idx.to(x0.device)])  # [data i, noise j]
            local = ot_exact_assignment(cost) if method == "ot-exact" else sinkhorn_assignment(cost, reg, iters)
            local = local.cpu()
            perm[idx] = idx[local]
    x0_coupled = x0[perm.to(x0.device)] if method != "independent" else x0
    before = torch.mean((x0.float() - x1.float()) ** 2).item()
    after = torch.mean((x0_coupled.float() - x1.float()) ** 2).item() if method != "independent" else before
    return x0_coupled, CouplingStats(cost_before=before, cost_after=after, permutation=perm)


def pairwise_sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, m] squared Euclidean distances between flattened rows of a and b, in float64."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return (torch.cdist(a, b) ** 2).clamp_min(0)


def ot_exact_assignment(cost: torch.Tensor) -> torch.Tensor:
    """perm with perm[i] = the noise index paired with data i, minimising sum_i cost[i, perm[i]]."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    perm = torch.empty(cost.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def sinkhorn_log_plan(cost: torch.Tensor, reg: float, iters: int) -> torch.Tensor:
    """log of the entropic OT plan between uniform marginals (log-domain Sinkhorn, stable for small reg)."""
    n, m = cost.shape
    if not bool(torch.isfinite(cost).all()):
        raise FloatingPointError("sinkhorn: the cost matrix holds non-finite values (NaN/inf in the batch)")
    c = cost.double() / cost.max().clamp_min(1e-12)
    kw = dict(dtype=torch.float64, device=cost.device)
    log_a = torch.full((n,), -math.log(n), **kw)
    log_b = torch.full((m,), -math.log(m), **kw)
    f = torch.zeros(n, **kw)
    g = torch.zeros(m, **kw)
    for _ in range(iters):
        f = reg * (log_a - torch.logsumexp((g[None, :] - c) / reg, dim=1))
        g = reg * (log_b - torch.logsumexp((f[:, None] - c) / reg, dim=0))
    return (f[:, None] + g[None, :] - c) / reg


def sinkhorn_assignment(cost: torch.Tensor, reg: float, iters: int) -> torch.Tensor:
    """Entropic plan rounded to a permutation: repeatedly pair rows and columns that are each other's best."""
    log_plan = sinkhorn_log_plan(cost, reg, iters)
    n = cost.shape[0]
    dev = log_plan.device
    perm = torch.full((n,), -1, dtype=torch.long, device=dev)
    free_rows = torch.ones(n, dtype=torch.bool, device=dev)
    free_cols = torch.ones(n, dtype=torch.bool, device=dev)
    neg_inf = torch.tensor(-math.inf, dtype=log_plan.dtype, device=dev)
    while bool(free_rows.any()):
        masked = torch.where(free_rows[:, None] & free_cols[None, :], log_plan, neg_inf)
        best_val, best_col = masked.max(dim=1)
        # For every column, the free row that values it most among the rows that chose it.
        col_best = torch.full((n,), -math.inf, dtype=log_plan.dtype, device=dev).scatter_reduce(
            0, best_col[free_rows], best_val[free_rows], reduce="amax"
        )
        rows = torch.nonzero(free_rows).flatten()
        winners = rows[best_val[rows] >= col_best[best_col[rows]]]
        if len(winners) == 0:  # no progress (only possible with NaN in the plan): pair what is left in order
            perm[free_rows] = torch.nonzero(free_cols).flatten()
            break
        # Exact ties within a column: keep its first row only.
        cols = best_col[winners]
        _, first = np.unique(cols.cpu().numpy(), return_index=True)
        first = torch.as_tensor(np.sort(first), device=dev)
        winners, cols = winners[first], cols[first]
        perm[winners] = cols
        free_rows[winners] = False
        free_cols[cols] = False
    return perm
