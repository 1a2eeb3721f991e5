"""Optimizers (AdamW, Muon), the LR schedule and the EMA update: what a training step applies to weights."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

OPTIMIZERS = ("adamw", "muon")


def build_optimizer(model: nn.Module, optim_cfg) -> "CombinedOptimizer":
    """AdamW (decay on >=2-D weights only), or Muon for 2-D hidden matrices with AdamW for the rest."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adam_decay, adam_plain, muon = [], [], []
    for name, p in named:
        hidden_matrix = p.dim() == 2 and name.startswith("blocks.")
        if optim_cfg.name == "muon" and hidden_matrix:
            muon.append(p)
        elif p.dim() >= 2:
            adam_decay.append(p)
        else:
            adam_plain.append(p)
    kw = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    groups = [g for g in ({"params": adam_decay, "weight_decay": optim_cfg.weight_decay}, {"params": adam_plain, "weight_decay": 0.0}) if g["params"]]
    optimizers = [torch.optim.AdamW(groups, **kw)]
    if muon:
        # match_rms_adamw scales Muon's update to AdamW's RMS, so one lr serves both optimizers.
        optimizers.append(
            torch.optim.Muon(muon, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
        )
    return CombinedOptimizer(optimizers)


class CombinedOptimizer:
    """Several torch optimizers stepped, scheduled and checkpointed as one."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def lr_factor(step: int, total_steps: int, warmup_frac: float, start_factor: float, min_factor: float) -> float:
    """Linear warmup from start_factor over warmup_frac of the steps, then cosine down to min_factor."""
    warmup = int(round(warmup_frac * total_steps))
    if step < warmup:
        return start_factor + (1 - start_factor) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedulers(optimizer: CombinedOptimizer, optim_cfg, total_steps: int) -> list:
    """One LambdaLR per optimizer, all following lr_factor (checkpointed with the optimizer)."""

    def factor(s: int) -> float:
        return lr_factor(s, total_steps, optim_cfg.warmup_frac, optim_cfg.warmup_start_factor, optim_cfg.min_lr_factor)

    return [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimizer.optimizers]


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, in the EMA's fp32; called once per optimizer step."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - decay)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """With warmup, early EMA follows the weights closely: min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay
