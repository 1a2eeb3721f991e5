"""THE training step: coupling, path, conditioning dropout, autocast, backward, clip, optimizer step, EMA.

flow.objective = "meanflow" regresses the network u(x_t, t, t_end) on the MeanFlow target (fmcli/flow.py),
whose total derivative is a forward-mode JVP of the network (`mean_flow_target`).

`fm train` (train.py) and the batch-size autotuner (autotune.py) both run `TrainingStep`, so what is tuned
(speed, memory: EMA copy, optimizer state, OT coupling, text conditioning) is exactly what is trained.

Exactness by construction: every random draw of a step (noise, times, condition dropout, flips) comes
from a generator keyed by (step stream, seed, global batch index) over the whole global batch, of which
each rank and micro-batch takes its rows. So a resumed run, or a run split over more processes or
micro-batches, sees the same numbers as an uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

from . import distributed as D
from .config import Config
from .flow import couple, expand_time, flow_matching_loss, interpolate, mean_flow_loss, sample_time_pairs, sample_times
from .hardware import autocast
from .models import build_model
from .repa import AlignedNet, Alignment, Encoder, load_encoder
from .optim import build_optimizer, build_schedulers, ema_decay_at, update_ema
from .seeding import STREAMS, normal, torch_generator


@dataclass
class StepResult:
    loss: float  # mean flow-matching loss over the whole global batch (averaged across ranks); meanflow: the MSE to its target
    grad_norm: float  # before clipping; nan when the step was skipped (non-finite loss)
    lr: float  # the learning rate this step ran at
    ot_costs: list[tuple[float, float]] = field(default_factory=list)  # (before, after) per coupled micro-batch


def mean_flow_target(model: nn.Module, xt: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor, v: torch.Tensor, cond: dict) -> torch.Tensor:
    """The MeanFlow target v + (t_end - t) d/dt u(x_t, t, t_end) (fmcli/flow.py), detached, in v's dtype.

    d/dt u along the path is one forward-mode JVP of the network in (x, t), tangent (v, 1), t_end held
    fixed (tangent 0). Only rows with t_end > t need it: elsewhere the target is v, and those rows are
    skipped (at the paper's ratio, 75 % of the batch). `model` is the bare module, never the DDP wrapper (a
    forward outside DDP's reducer contributes no gradient there, and none is taken here). Forward-mode AD is
    not implemented for the flash SDPA kernels (CPU and CUDA), so attention inside the JVP only runs on
    PyTorch's math backend; every other forward keeps the fast one.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = torch.nonzero(t_end > t).flatten()
    if len(rows) == 0:
        return v.detach()
    sub = {k: c[rows] for k, c in cond.items()}

    def u(x, time):
        return model(x, time, t_end=t_end[rows], **sub)

    # torch loads its JVP decompositions at the first forward-mode call through `torch.jit.script`, whose own
    # deprecation FutureWarning (torch's business, not the user's) would be a stray line of the run: that one is hidden.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        _, du_dt = torch.func.jvp(u, (xt[rows], t[rows]), (v[rows], torch.ones_like(t[rows])))
    target = v.detach().clone()
    target[rows] = v[rows] + expand_time(t_end[rows] - t[rows], v) * du_dt.to(v.dtype)
    return target


class TrainingStep:
    """The trained state (model, fp32 EMA, optimizer, LR schedulers, grad scaler) and the step that changes it.

    `shape` is one data item's [C, H, W]; `text` is the run's encoders.TextConditioning (text models).
    Call `wrap()` once the state is final (after a checkpoint restore): it adds DDP and torch.compile.
    """

    def __init__(self, cfg: Config, ctx: D.DistContext, *, micro: int, accum: int, shape: tuple[int, ...], text=None, model: nn.Module | None = None, ns_dtype: str | None = None,
                 encoder: Encoder | None = None):
        self.cfg, self.ctx, self.micro, self.accum, self.shape, self.text = cfg, ctx, micro, accum, tuple(shape), text
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and every run
        self.model = (model if model is not None else build_model(cfg.model)).to(ctx.device)  # the bare module (mean_flow_target)
        self.ema = copy.deepcopy(self.model).float().requires_grad_(False).eval()
        # REPA (repa.encoder): a frozen encoder (`encoder`, default the run's own: repa.load_encoder) and a
        # projector trained beside the model; `forward_module` is what DDP wraps and compile compiles.
        self.align = None if cfg.repa.encoder != "domain" else Alignment(cfg, encoder if encoder is not None else load_encoder(cfg), ctx.device)
        self.forward_module = self.model if self.align is None else AlignedNet(self.model, self.align.projector, cfg.repa.depth)
        self.optimizer = build_optimizer(self.model, cfg.optim, ns_dtype=ns_dtype, extra=None if self.align is None else self.align.projector)
        self.schedule, self.schedulers = build_schedulers(self.optimizer, cfg.optim, cfg.train.steps)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.train.precision == "fp16" and ctx.device.type == "cuda")
        # What a step calls: `wrapped` is the model under DDP where several processes train (else the model
        # itself), `train_forward` that one compiled when wrap() compiles (else the same module).
        self.wrapped = self.train_forward = self.forward_module
        self.compile_warning: str | None = None  # set when torch.compile failed and the step runs eager

    def wrap(self, compile_model: bool, example: dict, log=lambda message: None) -> bool:
        """Add DDP, and torch.compile when `compile_model`; True if the step runs compiled.

        torch.compile is lazy: a missing C++ compiler or an unsupported op fails at the first forward or its
        backward. So that first call happens here, on `example` (a micro-batch as the loader yields it),
        without an optimizer step; if it fails the step runs eager after one warning line (`log`).
        """
        from .hardware import CompileChoice, compile_with_fallback

        if self.ctx.world_size > 1:
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.forward_module, device_ids=ids)
        warnings = []
        choice = CompileChoice(compile_model, bool(compile_model), "")
        self.train_forward = compile_with_fallback(self.wrapped, lambda f: self.warm_up(example, f), lambda m: warnings.append(m) or log(m), choice)
        if self.ctx.world_size > 1 and D.any_rank(choice.fell_back, self.ctx) and self.train_forward is not self.wrapped:
            self.train_forward, choice.compile = self.wrapped, False  # one rank could not compile: all run the same eager program
        self.compile_warning = (warnings or [None])[0]
        return choice.compile

    def warm_up(self, batch: dict, forward=None) -> None:
        """The compile warm-up: one forward/backward of a micro-batch at t = 0.5 through `forward` (default
        `train_forward`; no random stream, no optimizer step, gradients dropped), which makes a lazy
        torch.compile compile now (wrap)."""
        forward = self.train_forward if forward is None else forward  # not `or`: a compiled module has no truth value
        x = batch["x"].to(self.ctx.device)
        t = torch.full((x.shape[0],), 0.5, device=self.ctx.device)
        cond = self._condition(batch, torch.zeros(x.shape[0], dtype=torch.bool))
        if self.cfg.flow.objective == "meanflow":  # compile the call the step makes
            cond["t_end"] = t
        sync = self.wrapped.no_sync() if self.ctx.world_size > 1 else contextlib.nullcontext()
        with sync:
            with autocast(self.cfg.train.precision, self.ctx.device):
                out = forward(x, t, **cond)
            sum(o.float().square().mean() for o in (out if isinstance(out, tuple) else (out,))).backward()
        self.forward_module.zero_grad(set_to_none=True)

    def set_total_steps(self, steps: int, at_step: int = 0) -> Config:
        """A new run length from `at_step` on (train.budget_minutes), the LR continuous (LRSchedule.retarget).
        train.steps of this step's config is the run's length, the one copy; returns that new config, which
        the trainer holds as its own `cfg` (the same object, never a copy)."""
        self.cfg = self.cfg.with_section("train", steps=steps)
        self.schedule.retarget(at_step, steps)
        # The optimizers hold the LR of step `at_step` already (LambdaLR sets it one step ahead): the new schedule's.
        # A retarget keeps it continuous, except at step 0, where the new length may end or start the warmup (5 -> 1000 steps).
        for scheduler in self.schedulers:
            for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base * self.schedule(at_step)
        return self.cfg

    def state_dict(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
        }
        if self.align is not None:
            state["repa"] = {"projector": self.align.projector.state_dict(), "encoder_key": self.align.key}
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.align is not None:
            self.align.load_state_dict(state.get("repa"))
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        for s, sd in zip(self.schedulers, state["schedulers"], strict=True):
            s.load_state_dict(sd)
        if self.schedule.total_steps != self.cfg.train.steps:
            # A resume that sets train.steps: the rest of the schedule spreads over the new length from here,
            # as a budget refit does (re-planning from scratch would jump the LR, even back into warmup).
            self.schedule.retarget(self.schedulers[0].last_epoch, self.cfg.train.steps)
        self.scaler.load_state_dict(state["scaler"])

    def __call__(self, batches: Iterator[dict], batch_index: int, step: int) -> StepResult:
        """One optimizer step over `accum` micro-batches drawn from `batches`; `batch_index` keys the
        randomness (global batches drawn so far), `step` is the optimizer steps taken so far (EMA warmup)."""
        cfg, ctx = self.cfg, self.ctx
        draws = self._draws(batch_index)
        total, ot_costs = torch.zeros((), device=ctx.device), []
        amp = autocast(cfg.train.precision, ctx.device)
        for a in range(self.accum):
            batch = next(batches)
            rows = slice((a * ctx.world_size + ctx.rank) * self.micro, (a * ctx.world_size + ctx.rank + 1) * self.micro)
            x0, x1, t = self._pair(batch, draws, rows, ot_costs)
            xt, ut = interpolate(x0, x1, t, cfg.flow.sigma_min)
            cond = self._condition(batch, draws["drop"][rows])
            last = a == self.accum - 1
            sync = self.wrapped.no_sync() if ctx.world_size > 1 and not last else contextlib.nullcontext()
            with sync, amp:
                if self.align is not None:  # flow matching + REPA's term on the same forward
                    out, projected = self.train_forward(xt, t, **cond)
                    logged = flow_matching_loss(out, ut)
                    loss = logged + self.align.loss(projected, x1)
                elif draws["ends"] is None:
                    loss = logged = flow_matching_loss(self.train_forward(xt, t, **cond), ut)
                else:
                    loss, logged = self._mean_flow_loss(xt, t, draws["ends"][rows].to(ctx.device), ut, cond)
            self.scaler.scale(loss / self.accum).backward()
            total += logged.detach()
        mean_loss = D.all_reduce_mean(total / self.accum, ctx).item()
        lr = self.optimizer.param_groups[0]["lr"]
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(mean_loss, float("nan"), lr, ot_costs)
        # Unscale, clip, step every optimizer and scheduler; the gradient norm is logged before clipping.
        for o in self.optimizer.optimizers:
            self.scaler.unscale_(o)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.forward_module.parameters(), clip).item()
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            # A finite logged loss with non-finite gradients (a term the log leaves out, REPA's, or an overflow in the
            # backward): stepping would write NaN into every weight. Skipped like a non-finite loss (fp16's scaler
            # skips such steps itself and lowers its scale). The norm is all-reduced, so every rank skips alike.
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(float("nan"), grad_norm, lr, ot_costs)
        # fp16's GradScaler skips each optimizer whose own gradients overflowed and steps the others, but the clip above
        # spread the non-finite norm into every gradient (x 0, or x NaN without a clip): Muon's optimizer beside AdamW's
        # stepped on zeros or wrote NaN into its weights. An overflow skips every optimizer; the scaler lowers its scale
        # (update). Like torch.amp's recipe (and timm), the step still counts: schedule, EMA and step counter advance.
        if math.isfinite(grad_norm):
            for o in self.optimizer.optimizers:
                self.scaler.step(o)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped overflow step (above): torch warns of a schedule stepped alone, as intended
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
            for s in self.schedulers:
                s.step()
        update_ema(self.ema, self.model, ema_decay_at(step, cfg.train.ema_decay, cfg.train.ema_warmup))
        return StepResult(mean_loss, grad_norm, lr, ot_costs)

    # ----------------------------------------------------------------------------------------- parts

    def _draws(self, batch_index: int) -> dict:
        """The whole global batch's randomness, drawn identically on every rank; each takes its rows."""
        cfg, G = self.cfg, self.cfg.train.global_batch_size
        key = (STREAMS["step"], cfg.train.seed, batch_index)
        noise = None if cfg.flow.coupling == "pairs" else normal((G, *self.shape), *key)  # reflow pairs bring their own
        gen = torch_generator(*key)
        f = cfg.flow
        law = dict(logit_mean=f.logit_mean, logit_std=f.logit_std, shift=f.shift)
        if f.objective == "meanflow":  # intervals [t, t_end] (flow.sample_time_pairs)
            times, ends = sample_time_pairs(G, f.meanflow_ratio, f.time_sampler, generator=gen, **law)
        else:
            times, ends = sample_times(G, f.time_sampler, generator=gen, **law), None
        drop = torch.rand(G, generator=gen) < f.cond_dropout
        flip = torch.rand(G, generator=gen) < 0.5
        return {"noise": noise, "times": times, "ends": ends, "drop": drop, "flip": flip}

    def _pair(self, batch: dict, draws: dict, rows: slice, ot_costs: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise x0, data x1, time t) of one micro-batch, flipped and coupled as configured; with
        coupling "pairs" x0 is the noise stored with each x1 (`fm reflow`)."""
        cfg, dev = self.cfg, self.ctx.device
        x1 = batch["x"].to(dev, non_blocking=True)
        if cfg.data.flip:  # latents: the mirrored image's own latents (a VAE is not flip-equivariant); pixels flip exactly
            mirrored = batch["x_flip"].to(dev, non_blocking=True) if "x_flip" in batch else x1.flip(-1)
            x1 = torch.where(draws["flip"][rows].to(dev).view(-1, 1, 1, 1), mirrored, x1)
        t = draws["times"][rows].to(dev)
        if cfg.flow.coupling == "pairs":
            return batch["x0"].to(dev, non_blocking=True), x1, t
        x0 = draws["noise"][rows].to(dev)
        if cfg.flow.coupling != "independent":
            # Minibatch OT (flow.couple): re-pair this micro-batch's noise with its data, within each class
            # for class-conditional data, by the data's label also where condition dropout shows the network
            # the null class (docs/architecture.md: every class's noise stays N(0, I)). Under DDP each rank couples only its own micro-batch (no
            # cross-rank plan), so the coupling depends on micro-batch size and world size.
            labels = batch["y"].to(dev) if cfg.model.num_classes and "y" in batch else None
            x0, coupling = couple(x0, x1, labels, cfg.flow.coupling, reg=cfg.flow.sinkhorn_reg, iters=cfg.flow.sinkhorn_iters)
            ot_costs.append((coupling.cost_before, coupling.cost_after))
        return x0, x1, t

    def _mean_flow_loss(self, xt, t, t_end, v, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted loss, plain MSE) of the mean-flow prediction against its stop-gradient target. The
        prediction goes through `self.train_forward` (DDP, compiled), so its gradients are averaged across ranks as
        for flow matching; the JVP runs on the bare module outside DDP's reducer and carries no gradient."""
        target = mean_flow_target(self.model, xt, t, t_end, v, cond)
        prediction = self.train_forward(xt, t, t_end=t_end, **cond)
        return mean_flow_loss(prediction, target, self.cfg.flow.meanflow_power)

    def _condition(self, batch: dict, drop: torch.Tensor) -> dict:
        """Model keyword inputs; condition dropout is per sample (class -> the null class index,
        text -> the empty prompt's states and mask)."""
        if self.text is not None:
            return self.text.for_batch(batch, drop, self.ctx.device)
        if self.cfg.model.num_classes and "y" in batch:
            y = batch["y"].to(self.ctx.device)
            return {"y": torch.where(drop.to(y.device), torch.full_like(y, self.cfg.model.num_classes), y)}
        return {}
