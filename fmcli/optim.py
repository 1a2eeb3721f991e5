"""Optimizers (AdamW, Muon), the LR schedule and the EMA update: what a training step applies to weights."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .optim_muon import Muon

OPTIMIZERS = ("adamw", "muon")


def build_optimizer(model: nn.Module, optim_cfg, ns_dtype: str | None = None, extra: nn.Module | None = None) -> "CombinedOptimizer":
    """AdamW (decay on >=2-D weights only), or Muon for 2-D hidden matrices with AdamW for the rest; `extra`'s
    parameters (REPA's projector, trained beside the model) are AdamW's.

    Muon is fm's (fmcli.optim_muon): its Newton-Schulz runs in `ns_dtype` ("bf16" | "fp32"; the fast one
    comes from fmcli.hardware.matmul_dtype), None = bf16 as torch.optim.Muon."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named += [(f"extra.{n}", p) for n, p in (extra.named_parameters() if extra is not None else ()) if p.requires_grad]
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
            Muon(muon, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay, adjust_lr_fn="match_rms_adamw", ns_dtype=ns_dtype or "bf16")
        )
    return CombinedOptimizer(optimizers)


class CombinedOptimizer:
    """Several torch optimizers stepped, scheduled and checkpointed as one."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    @property
    def muon_ns_dtype(self) -> str | None:
        """Muon's Newton-Schulz dtype (restored from a checkpoint with the state), None without Muon."""
        groups = [g for o in self.optimizers if isinstance(o, Muon) for g in o.param_groups]
        return groups[0]["ns_dtype"] if groups else None

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


class LRSchedule:
    """The LR factor for LambdaLR: linear warmup from start_factor over warmup_frac of the steps, then cosine
    down to min_factor. Its length can change mid-run (train.budget_minutes refits it, a resume may set
    train.steps) without a jump in the LR: `retarget` keeps the LR at the current step, lets what is left of
    the warmup end at warmup_frac of the new length, and spreads what is left of the cosine over the new
    remaining steps. Its attributes are plain numbers, so LambdaLR's state_dict saves them and a resume
    continues the exact schedule."""

    def __init__(self, total_steps: int, warmup_frac: float, start_factor: float, min_factor: float):
        self.warmup_frac, self.start_factor, self.min_factor = warmup_frac, start_factor, min_factor
        self.plan(total_steps)

    def plan(self, total_steps: int) -> None:
        """The schedule as if it had been planned for `total_steps` from the start."""
        self.total_steps, self.warmup_steps = total_steps, int(round(self.warmup_frac * total_steps))
        self.anchor_step, self.anchor_progress = None, 0.0  # None: the cosine starts at the end of warmup
        # None: the warmup rises from start_factor at step 0; else from warmup_anchor_factor at this step (a retarget)
        self.warmup_anchor_step, self.warmup_anchor_factor = None, self.start_factor
        self.warmup_peak = 1.0  # where the warmup line ends: the peak, or the floor for an LR a retarget found below it

    def progress(self, step: int) -> float:
        """How far along the cosine `step` is, 0..1."""
        if self.anchor_step is None:  # the closed form's arithmetic: a schedule never retargeted matches it bit for bit
            return min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        left = max(1, self.total_steps - self.anchor_step)
        return min(1.0, self.anchor_progress + (1 - self.anchor_progress) * (step - self.anchor_step) / left)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            if self.warmup_anchor_step is None:
                return self.start_factor + (1 - self.start_factor) * step / self.warmup_steps
            s0, f0, peak = self.warmup_anchor_step, self.warmup_anchor_factor, self.warmup_peak
            return f0 + (peak - f0) * (step - s0) / (self.warmup_steps - s0)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def retarget(self, step: int, total_steps: int) -> None:
        """From `step` on, end the schedule at `total_steps`, the LR continuous at `step`."""
        if step == 0:
            self.plan(total_steps)
            return
        if step < self.warmup_steps:  # still warming up: the warmup's share of the new length decides
            factor, warmup = self(step), int(round(self.warmup_frac * total_steps))
            span = 1 - self.min_factor
            if step < warmup or factor <= self.min_factor:  # a straight line from here to the peak at the new warmup's end
                # (an LR still at or below the cosine's floor, as always with a constant LR after warmup, min_factor = 1,
                # has no cosine point to take over at: the line rises to the floor at the new end instead)
                self.warmup_anchor_step, self.warmup_anchor_factor = step, factor
                self.warmup_peak = 1.0 if step < warmup else self.min_factor
                # the cosine from the new warmup's end; past a line to the floor, the floor (progress 1: an extension stays there)
                self.anchor_step, self.anchor_progress = (None, 0.0) if step < warmup else (total_steps, 1.0)
                self.total_steps, self.warmup_steps = total_steps, warmup if step < warmup else total_steps
                return
            # The new length's warmup is already over: the cosine takes over here, at the point where its
            # value is the current LR, so the LR starts decaying now and reaches the floor at the new end.
            cos = max(-1.0, min(1.0, 2 * (factor - self.min_factor) / span - 1))
            self.warmup_steps, self.anchor_progress = step, math.acos(cos) / math.pi
        else:
            self.anchor_progress = self.progress(step)
        self.anchor_step, self.total_steps = step, total_steps


def build_schedulers(optimizer: CombinedOptimizer, optim_cfg, total_steps: int) -> tuple[LRSchedule, list]:
    """One LambdaLR per optimizer, all following one LRSchedule (checkpointed with the schedulers)."""
    schedule = LRSchedule(total_steps, optim_cfg.warmup_frac, optim_cfg.warmup_start_factor, optim_cfg.min_lr_factor)
    return schedule, [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in optimizer.optimizers]


def extension_note(step: int, ended_at: int, total_steps: int, optim_cfg) -> str | None:
    """One stderr line when a resume extends a run whose LR schedule had ended (`step` >= its length `ended_at`):
    `retarget` keeps the LR continuous, so every added step trains at the cosine's floor, min_lr_factor x lr (and
    at a floor of 0 changes no weight), where a fresh run of `total_steps` would warm up and decay over them all."""
    if step < ended_at or total_steps <= step or optim_cfg.min_lr_factor >= 1:
        return None
    floor = optim_cfg.min_lr_factor * optim_cfg.lr
    head = f"the run's LR schedule ended at step {ended_at}, so steps {step + 1}..{total_steps} train at its floor, optim.min_lr_factor x lr = {floor:.2e}"
    if floor == 0:
        return (f"warning: {head}: they change no weight (only the EMA moves on); to train on, start a new run from its weights "
                "with --set train.init_from=CHECKPOINT (a fresh optimizer and LR schedule)")
    return f"note: {head} (the LR stays continuous; a fresh run of {total_steps} steps would follow the whole schedule)"


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, in the EMA's fp32; called once per optimizer step."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - decay)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """With warmup, early EMA follows the weights closely: min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


EMA_INITIAL_SHARE_LIMIT = 0.05  # above this share of the initial weights at the end, the EMA is not the trained model


def ema_initial_share(steps: int, decay: float, warmup: bool) -> float:
    """The initial weights' share of the EMA after `steps` updates: the product of the per-step decays."""
    share = 1.0
    for step in range(steps):
        d = ema_decay_at(step, decay, warmup)
        if d == decay:  # the warmup curve only rises, so from here on every step decays by `decay`
            return share * decay ** (steps - step)
        share *= d
    return share


def ema_warning(train_cfg) -> str | None:
    """One stderr line when the run's EMA would still be mostly the initial network at its end: the zero-output
    one, or train.init_from's weights."""
    share = ema_initial_share(train_cfg.steps, train_cfg.ema_decay, train_cfg.ema_warmup)
    if share <= EMA_INITIAL_SHARE_LIMIT:
        return None
    fix = "set train.ema_warmup=true" if not train_cfg.ema_warmup else "lower train.ema_decay"
    # A run started from train.init_from's weights (a reflow student) starts its EMA there: not an untrained model.
    shown = f"mostly train.init_from's model ({train_cfg.init_from}), not what this run trains" if train_cfg.init_from else "an untrained model"
    return (
        f"warning: after {train_cfg.steps} steps the EMA (train.ema_decay={train_cfg.ema_decay}, "
        f"ema_warmup={str(train_cfg.ema_warmup).lower()}) is still {share:.0%} the initial weights, so EMA samples "
        f"and FID show {shown}; {fix} or train longer"
    )
