"""Probability paths, time samplers and the flow-matching loss (pure torch, no I/O).

Convention (DESIGN.md section 2): t = 0 is noise x0 ~ N(0, I), t = 1 is data x1.
    x_t = (1 - (1 - sigma_min) t) x0 + t x1,      u_t = x1 - (1 - sigma_min) x0
sigma_min = 0 is rectified flow; sigma_min > 0 is the OT-CFM path of Lipman et al. (2023), eq. 20-23.
"""

from __future__ import annotations

import math

import torch


def expand_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample times [B] so they broadcast against a batch shaped like `like`."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma_min: float = 0.0):
    """Point on the path at time t and the target velocity: returns (x_t, u_t)."""
    tt = expand_time(t, x1)
    xt = (1 - (1 - sigma_min) * tt) * x0 + tt * x1
    ut = x1 - (1 - sigma_min) * x0
    return xt, ut


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3-style resolution shift in our t=0-is-noise convention: shift > 1 spends more time near noise.

    With s = 1 - t the noise level, SD3 uses s' = shift * s / (1 + (shift - 1) s); so t' = 1 - s'.
    """
    if shift == 1.0:
        return t
    s = 1 - t
    return 1 - shift * s / (1 + (shift - 1) * s)


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
    """Training times in [0, 1]: `uniform`, or `logit_normal` (sigmoid of N(mean, std)), then the shift."""
    if sampler == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif sampler == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"unknown time sampler {sampler!r}")
    return shift_time(t, shift)


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE averaged over every element (DESIGN.md section 2), computed in fp32."""
    return torch.mean((prediction.float() - target.float()) ** 2)


def logit_normal_density(t: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Density of the logit-normal distribution on (0, 1); used by tests as an independent reference."""
    logit = torch.log(t / (1 - t))
    return torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
