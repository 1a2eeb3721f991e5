"""Muon (momentum + Newton-Schulz orthogonalisation) whose matmuls run in a chosen dtype, batched by shape.

Why not `torch.optim.Muon`: it hard-codes bf16 for the Newton-Schulz iterations (`grad.bfloat16()` in
`torch/optim/_muon.py`, torch 2.14), which on a CPU without native bf16 (AVX2-only, e.g. Zen 3) is an
emulated GEMM ~500x slower than fp32 and made the quickstart step 5x slower than AdamW. This one follows
torch's update rule exactly (same defaults, Nesterov momentum, quintic coefficients, Frobenius-norm
scaling, `adjust_lr_fn`, decoupled weight decay) with `ns_dtype` = "bf16" | "fp32" (fmcli.hardware picks
the fast one) and one batched iteration per distinct matrix shape instead of one per matrix.

The dtype is a param-group hyperparameter, so it travels with `state_dict()`: a resumed run keeps it.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic (as torch.optim.Muon)
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate orthogonalisation U V^T of each matrix in g ([..., rows, cols]) by the quintic iteration.

    X <- X / ||X||_F, then `steps` times: A = X X^T, X <- a X + (b A + c A^2) X, computed on the wide
    orientation (rows <= cols) so that A is the small Gram matrix. Returns g's shape in `dtype`.
    """
    a, b, c = coefficients
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) if x.dim() == 3 else torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a) if x.dim() == 3 else torch.addmm(x, poly, x, beta=a)
    return x.mT if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-shape learning-rate scale (match_rms_adamw: 0.2 sqrt(max(A, B)), Moonshot)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return lr * math.sqrt(rows / cols)
    return lr


class Muon(torch.optim.Optimizer):
    """Muon for 2-D hidden matrices (everything else belongs to AdamW); see the module docstring."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        ns_dtype: str = "fp32",
    ):
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {', '.join(NS_DTYPES)}, not {ns_dtype!r}")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw", "spectral_unclamped"):
            raise ValueError(f"adjust_lr_fn {adjust_lr_fn!r} is not supported")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got one of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, lr = group["momentum"], group["lr"]
            by_shape = defaultdict(list)  # same-shape matrices are orthogonalised in one batched iteration
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                by_shape[tuple(p.shape)].append((p, update))
            for shape, items in by_shape.items():
                updates = torch.stack([u for _, u in items])
                ortho = newton_schulz(updates, group["ns_steps"], group["ns_coefficients"], group["eps"], NS_DTYPES[group["ns_dtype"]])
                step_lr = adjusted_lr(lr, group["adjust_lr_fn"], torch.Size(shape))
                for (p, _), o in zip(items, ortho):
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(o, alpha=-step_lr)
        return loss
