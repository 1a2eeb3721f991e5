"""The training loop: one code path for a single process and for every DDP rank.

Exactness by construction: the data order is a seeded permutation per epoch, and every random draw of a
step (noise, times, condition dropout, flips) comes from a generator seeded by (seed, step) over the whole
global batch, of which each rank and micro-batch takes its rows. So a resumed run, or a run split over
more processes or micro-batches, sees the same numbers as an uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import random
import resource
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from . import __version__
from . import distributed as D
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, config_to_dict
from .data.prepared import PreparedDataset, collate_batched, data_space
from .errors import RuntimeFailure, UsageError
from .flow import couple, flow_matching_loss, interpolate, sample_times
from .generate import initial_noise, sample_batch
from .images import save_grid
from .models import build_model
from .seeding import normal, torch_generator
from .tracking import NullTracker, make_tracker


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step taken in this invocation
    checkpoint: Path | None = None
    stopped_early: bool = False


# ---------------------------------------------------------------------------------------------- public


def train(
    cfg: Config,
    run_dir: Path,
    *,
    resume_from: Path | None = None,
    stop_at_step: int | None = None,
    log=None,
) -> TrainResult:
    """Train (or resume) into `run_dir`. `stop_at_step` checkpoints and returns early at that step."""
    ctx = D.setup(cfg.train.device)
    try:
        result = _Trainer(cfg, run_dir, ctx, log or _stderr_log(ctx)).run(resume_from, stop_at_step)
        D.barrier(ctx)  # rank 0 may still be writing samples: tear the group down together
        return result
    finally:
        D.cleanup()


def check_coupling_data(cfg: Config, dataset: PreparedDataset) -> None:
    """flow.coupling = "pairs" trains on `fm reflow` pairs, and such pairs only with it."""
    if cfg.flow.coupling == "pairs" and not dataset.is_pairs:
        raise UsageError(f"flow.coupling='pairs' needs a reflow pairs dataset (`fm reflow --out DIR`), and {dataset.path} holds {dataset.manifest['kind']}")
    if dataset.is_pairs and cfg.flow.coupling != "pairs":
        raise UsageError(f"{dataset.path} holds reflow pairs: train on them with --set flow.coupling=pairs")
    if dataset.is_pairs and cfg.data.flip:
        raise UsageError("data.flip would separate reflow pairs (the flipped x1 is not the teacher's sample of x0): --set data.flip=false")


def init_weights(model: nn.Module, source: str) -> None:
    """Load the (EMA) weights of a checkpoint, run or export directory into `model`; the architectures must match."""
    from .checkpoint import resolve_checkpoint
    from .generate import load_weights

    state = load_weights(resolve_checkpoint(source))
    weights = state.get("ema") or state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise UsageError(f"train.init_from={source}: its model differs from this one ({first[1].strip() if len(first) > 1 else first[0]}); use the teacher's model settings") from None


def resolve_data_fields(cfg: Config, manifest: dict) -> Config:
    """Fill model.image_size / in_channels / num_classes from the dataset; refuse contradictions."""
    c, h, w = manifest["shape"]
    # A text model (model.cross_attention) is conditioned on captions only, whatever labels the data has.
    num_classes = 0 if cfg.model.cross_attention else int(manifest.get("num_classes") or 0)
    facts = {"image_size": h, "in_channels": c, "num_classes": num_classes}
    update = {}
    for key, value in facts.items():
        current = getattr(cfg.model, key)
        if current is None:
            update[key] = value
        elif current != value:
            raise UsageError(f"model.{key}={current} does not match the dataset ({value}); remove the setting or fix the data")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=update)}) if update else cfg


def lr_factor(step: int, total_steps: int, warmup_frac: float, start_factor: float, min_factor: float) -> float:
    """Linear warmup from start_factor over warmup_frac of the steps, then cosine down to min_factor."""
    warmup = int(round(warmup_frac * total_steps))
    if step < warmup:
        return start_factor + (1 - start_factor) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, in the EMA's fp32; called once per optimizer step."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - decay)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """With warmup, early EMA follows the weights closely: min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 GEMMs several times faster than fp32 (why CPU presets may pick bf16)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


_STEP_STREAM, _EPOCH_STREAM = 2, 3  # key prefixes: independent streams from one user seed


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch_generator(_EPOCH_STREAM, seed, epoch))


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


# ------------------------------------------------------------------------------------------- trainer


class _Trainer:
    def __init__(self, cfg: Config, run_dir: Path, ctx: D.DistContext, log):
        self.cfg, self.run_dir, self.ctx, self.log = cfg, Path(run_dir), ctx, log
        self.stop_requested = False
        self.ot_window: list[tuple[float, float]] = []  # (cost before, after) per coupled micro-batch
        self.tracker = NullTracker()  # train.tracker (W&B / TensorBoard) on rank 0, set up in run()

    # The loop reads top to bottom: setup, restore, steps, save.
    def run(self, resume_from: Path | None, stop_at_step: int | None) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        self.dataset = PreparedDataset(cfg.data.path, text=cfg.model.cross_attention)
        cfg = self.cfg = resolve_data_fields(cfg, self.dataset.manifest)
        check_coupling_data(cfg, self.dataset)
        cfg = self.cfg = self._setup_encoders(cfg)
        self.evaluator = self._make_evaluator()  # before any step: a bad eval.ref or missing weights fail now
        if cfg.train.precision == "fp16" and ctx.device.type != "cuda":
            raise UsageError("train.precision=fp16 needs a CUDA device (loss scaling); use bf16 or fp32 on CPU")
        if cfg.train.precision == "bf16" and ctx.device.type == "cpu" and not cpu_has_native_bf16():
            self.log.info("warning: this CPU has no native bf16 (AVX512-BF16 / AMX), so bf16 autocast may be slower than fp32 here; --set train.precision=fp32")
        micro_setting = cfg.train.micro_batch_size
        if micro_setting == "auto":  # the autotune result cached in the run directory (DDP ranks never tune)
            from .bench import auto_micro_batch

            micro_setting = auto_micro_batch(cfg, self.run_dir, ctx.device, ctx.world_size, log=self.log.info)
        micro, accum = batch_geometry(cfg.train.global_batch_size, micro_setting, ctx.world_size)
        self.micro, self.accum = micro, accum
        if cfg.train.global_batch_size > len(self.dataset):
            raise UsageError(f"train.global_batch_size {cfg.train.global_batch_size} exceeds the dataset size {len(self.dataset)}")

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and every run
        model = build_model(cfg.model)
        if cfg.train.init_from and resume_from is None:  # a resumed run's checkpoint already holds the weights
            init_weights(model, cfg.train.init_from)
            self.log.info(f"initialised from {cfg.train.init_from}")
        model = model.to(ctx.device)
        self.ema = copy.deepcopy(model).float().requires_grad_(False).eval()
        self.model = model
        self.optimizer = build_optimizer(model, cfg.optim)
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, cfg.train.steps, cfg.optim.warmup_frac, cfg.optim.warmup_start_factor, cfg.optim.min_lr_factor))
            for o in self.optimizer.optimizers
        ]
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.train.precision == "fp16" and ctx.device.type == "cuda")
        # `batches` counts global batches drawn; it equals `step` unless non-finite steps were skipped.
        self.step, self.batches = 0, 0

        if resume_from is not None:
            self._restore(resume_from)
        elif ctx.is_main:
            self._write_run_files()
        if ctx.is_main:
            self.tracker = make_tracker(cfg.train.tracker, self.run_dir, config=config_to_dict(cfg))
        D.barrier(ctx)

        ddp_model = model
        if ctx.distributed:
            ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.forward_model = torch.compile(ddp_model) if cfg.train.compile else ddp_model
        return self._loop(stop_at_step)

    def _loop(self, stop_at_step):
        cfg, ctx = self.cfg, self.ctx
        result = TrainResult(run_dir=self.run_dir, step=self.step)
        loader = self._loader()
        batches = iter(loader)
        window, window_start, nan_skips = [], time.perf_counter(), 0
        old_handlers = self._install_signal_handlers()
        progress = self.log.progress(cfg.train.steps, self.step)
        try:
            while self.step < cfg.train.steps:
                _injected_failure(ctx, self.step)
                loss, grad_norm = self._optimizer_step(batches)
                if not math.isfinite(loss):
                    nan_skips += 1
                    if nan_skips > cfg.train.max_nan_skips:
                        raise RuntimeFailure(
                            f"non-finite loss at step {self.step + 1}; stopping without saving "
                            f"(the last checkpoint in {self.run_dir / 'checkpoints'} is intact)"
                        )
                    self.log.info(f"step {self.step + 1}: non-finite loss, step skipped ({nan_skips}/{cfg.train.max_nan_skips})")
                    continue
                self.step += 1
                result.losses.append(loss)
                window.append(loss)
                progress(self.step, loss)
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    elapsed = time.perf_counter() - window_start
                    self._log_metrics(window, grad_norm, elapsed)
                    window, window_start = [], time.perf_counter()
                # A requested stop checkpoints before anything slow (samples, FID): under a launcher the
                # workers get only a grace period after the signal before they are killed.
                stop_now = D.any_rank(self.stop_requested, ctx) or self.step == stop_at_step
                if stop_now or (cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0):
                    result.checkpoint = self._save_checkpoint()
                if stop_now and self.step < cfg.train.steps:
                    result.stopped_early = True
                    self.log.info(f"stopped at step {self.step}; continue with: fm resume {self.run_dir}")
                    break
                if cfg.train.sample_every and self.step % cfg.train.sample_every == 0:
                    self._save_samples()
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self._evaluate()
            else:
                if result.checkpoint is None or not result.checkpoint.name.endswith(f"{self.step:07d}.pt"):
                    result.checkpoint = self._save_checkpoint()
                if not cfg.train.sample_every or self.step % cfg.train.sample_every:
                    self._save_samples()
        finally:
            progress(None, None)
            self.tracker.close()
            self._restore_signal_handlers(old_handlers)
            del batches, loader
        result.step = self.step
        return result

    # ------------------------------------------------------------------------------ one optimizer step

    def _optimizer_step(self, batches) -> tuple[float, float]:
        cfg, ctx = self.cfg, self.ctx
        model = self.forward_model
        key = (_STEP_STREAM, cfg.train.seed, self.batches)
        self.batches += 1
        G = cfg.train.global_batch_size
        shape = tuple(self.dataset.manifest["shape"])
        # The whole global batch's randomness, drawn identically on every rank; each takes its rows.
        # Reflow pairs bring their own noise (x0 stored with each x1).
        pairs = cfg.flow.coupling == "pairs"
        noise = None if pairs else normal((G, *shape), *key)
        gen = torch_generator(*key)
        times = sample_times(G, cfg.flow.time_sampler, logit_mean=cfg.flow.logit_mean, logit_std=cfg.flow.logit_std, shift=cfg.flow.shift, generator=gen)
        drop = torch.rand(G, generator=gen) < cfg.flow.cond_dropout
        flip = torch.rand(G, generator=gen) < 0.5
        total = torch.zeros((), device=ctx.device)
        autocast = self._autocast()
        for a in range(self.accum):
            batch = next(batches)
            rows = slice((a * ctx.world_size + ctx.rank) * self.micro, (a * ctx.world_size + ctx.rank + 1) * self.micro)
            x1 = batch["x"].to(ctx.device, non_blocking=True)
            if cfg.data.flip:
                x1 = torch.where(flip[rows].to(ctx.device).view(-1, 1, 1, 1), x1.flip(-1), x1)
            x0 = batch["x0"].to(ctx.device, non_blocking=True) if pairs else noise[rows].to(ctx.device)
            t = times[rows].to(ctx.device)
            if cfg.flow.coupling not in ("independent", "pairs"):
                # Minibatch OT (flow.couple): re-pair this micro-batch's noise with its data, within each
                # class for class-conditional data. Under DDP each rank couples only its own micro-batch
                # (no cross-rank plan), so the coupling depends on micro-batch size and world size.
                labels = batch["y"].to(ctx.device) if cfg.model.num_classes and "y" in batch else None
                x0, coupling = couple(x0, x1, labels, cfg.flow.coupling, reg=cfg.flow.sinkhorn_reg, iters=cfg.flow.sinkhorn_iters)
                if ctx.is_main:
                    self.ot_window.append((coupling.cost_before, coupling.cost_after))
            xt, ut = interpolate(x0, x1, t, cfg.flow.sigma_min)
            cond = self._condition(batch, drop[rows])
            sync = contextlib.nullcontext() if (a == self.accum - 1 or not ctx.distributed) else model.no_sync()
            with sync, autocast:
                loss = flow_matching_loss(model(xt, t, **cond), ut)
            self.scaler.scale(loss / self.accum).backward()
            total += loss.detach()
        mean_loss = D.all_reduce_mean(total / self.accum, ctx).item()
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            return mean_loss, float("nan")
        for o in self.optimizer.optimizers:
            self.scaler.unscale_(o)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
        for o in self.optimizer.optimizers:
            self.scaler.step(o)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_used = self.optimizer.param_groups[0]["lr"]
        for s in self.schedulers:
            s.step()
        update_ema(self.ema, self.model, ema_decay_at(self.step, cfg.train.ema_decay, cfg.train.ema_warmup))
        return mean_loss, grad_norm

    def _setup_encoders(self, cfg: Config) -> Config:
        """Text conditioning (cached states or a frozen encoder) and the recorded encoder paths."""
        from .encoders import setup_training_encoders

        self.text, cfg = setup_training_encoders(cfg, self.dataset, self.ctx.device)
        self.vae = None  # loaded when a sample grid is first decoded
        return cfg

    def _condition(self, batch: dict, drop: torch.Tensor) -> dict:
        """Model keyword inputs; condition dropout is per sample (class -> the null class index,
        text -> the empty prompt's states and mask)."""
        if self.text is not None:
            return self.text.for_batch(batch, drop, self.ctx.device)
        if self.cfg.model.num_classes and "y" in batch:
            y = batch["y"].to(self.ctx.device)
            return {"y": torch.where(drop.to(y.device), torch.full_like(y, self.cfg.model.num_classes), y)}
        return {}

    def _autocast(self):
        precision, dev = self.cfg.train.precision, self.ctx.device.type
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(dev, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)

    # ------------------------------------------------------------------------------------------ data

    def _loader(self) -> DataLoader:
        epoch, index = self.data_position
        sampler = RankBatchSampler(len(self.dataset), self.cfg.train.global_batch_size, self.micro, self.accum, self.ctx, self.cfg.train.seed, epoch, index)
        self.sampler = sampler
        workers = self.cfg.data.num_workers
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate_batched,
            pin_memory=self.ctx.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=2 if workers else None,
        )

    @property
    def data_position(self) -> tuple[int, int]:
        """(epoch, index into the epoch's permutation) after `self.batches` global batches (drop-last epochs)."""
        per_epoch = len(self.dataset) // self.cfg.train.global_batch_size
        epoch, k = divmod(self.batches, per_epoch)
        return epoch, k * self.cfg.train.global_batch_size

    # ----------------------------------------------------------------------------------- checkpoints

    def _state(self) -> dict:
        rng = {
            "python": list(random.getstate()[1]),
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.ctx.device) if self.ctx.device.type == "cuda" else None,
        }
        all_rng = D.all_gather_objects(rng, self.ctx)
        epoch, index = self.data_position
        return {
            "format": 1,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "data_position": {"epoch": epoch, "index": index, "batches": self.batches},
            "rng": all_rng,
            "world_size": self.ctx.world_size,
            "config": config_to_dict(self.cfg),
            "data_info": _data_info(self.dataset.manifest),
            "fm_version": __version__,
        }

    def _save_checkpoint(self) -> Path:
        state = self._state()  # collective (RNG gather): every rank takes part
        path = None
        D.barrier(self.ctx)
        if self.ctx.is_main:
            path = save_checkpoint(state, self.run_dir / "checkpoints", self.step, self.cfg.train.keep_last, self.cfg.train.keep_every, log=self.log.info)
            self.log.info(f"checkpoint: {path}")
        D.barrier(self.ctx)
        return path or self.run_dir / "checkpoints" / f"step-{self.step:07d}.pt"

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.ctx.device)  # every rank loads it itself
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        for s, sd in zip(self.schedulers, state["schedulers"], strict=True):
            s.load_state_dict(sd)
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.batches = int(state["data_position"]["batches"])
        saved = (state["data_position"]["epoch"], state["data_position"]["index"])
        if saved != self.data_position:
            raise RuntimeFailure(f"{path}: data position {saved} does not match this dataset; was it re-prepared with another size?")
        rngs = state.get("rng") or []
        if len(rngs) == self.ctx.world_size:
            self._set_rng(rngs[self.ctx.rank])
        self.log.info(f"resumed from {path} at step {self.step}")

    def _set_rng(self, rng: dict) -> None:
        random.setstate((3, tuple(rng["python"]), None))
        np_state = np.random.get_state()
        np.random.set_state((np_state[0], rng["numpy"].numpy().astype(np.uint32), *np_state[2:]))
        torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") is not None and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.ctx.device)

    # ---------------------------------------------------------------------------------------- outputs

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2) + "\n")
        (self.run_dir / "env.json").write_text(json.dumps(environment_info(self.ctx), indent=2) + "\n")

    def _log_metrics(self, window: list[float], grad_norm: float, elapsed: float) -> None:
        if not self.ctx.is_main:
            return
        images = len(window) * self.cfg.train.global_batch_size
        record = {
            "step": self.step,
            "loss": sum(window) / len(window),
            "lr": self.lr_used,
            "grad_norm": grad_norm,
            "img_per_s": images / max(elapsed, 1e-9),
            "mem_mib": memory_mib(self.ctx.device),
            "epoch": self.data_position[0],
        }
        if self.ot_window:  # mean squared distance per element, noise to data, this rank's micro-batches
            record["ot_cost_before"] = sum(b for b, _ in self.ot_window) / len(self.ot_window)
            record["ot_cost_after"] = sum(a for _, a in self.ot_window) / len(self.ot_window)
            self.ot_window = []
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.tracker.log(record, self.step)
        self.log.info(
            f"step {self.step}/{self.cfg.train.steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"grad {grad_norm:.3f}  {record['img_per_s']:.0f} img/s  mem {record['mem_mib']:.0f} MiB"
            + (f"  ot cost {record['ot_cost_before']:.3f} -> {record['ot_cost_after']:.3f}" if "ot_cost_after" in record else "")
        )

    def _save_samples(self) -> None:
        if not self.ctx.is_main:
            return
        n = self.cfg.sample.grid_size
        k = self.cfg.model.num_classes
        labels = torch.arange(n, device=self.ctx.device) % k if k else None
        x0 = initial_noise(self.cfg.train.seed, range(n), tuple(self.dataset.manifest["shape"]), self.ctx.device)
        conditions = None
        if self.text is not None:  # the first n training captions (their text is saved next to the grid)
            from .encoders import grid_conditions

            conditions, prompts = grid_conditions(self.text, self.dataset, n, self.ctx.device)
            out = self.run_dir / "samples" / f"step-{self.step:07d}.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(p + "\n" for p in prompts))
        x = sample_batch(self.ema, x0, labels, self.cfg.sample, shift=self.cfg.flow.shift, conditions=conditions).x
        if data_space(self.dataset.manifest) == "latents":
            x = self._decode_latents(x)
            if x is None:
                return
        path = save_grid(x, self.run_dir / "samples" / f"step-{self.step:07d}.png", nrow=k if k and n % k == 0 else None)
        self.tracker.log_image(path, self.step)
        self.log.info(f"samples: {path}")

    def _make_evaluator(self):
        """FID evaluator: the feature extractor on every rank (generation is sharded), reference statistics
        computed once on rank 0."""
        if not self.cfg.eval.every:
            return None
        # Presets schedule evaluation (eval.every) but only the user knows the reference data: without one,
        # or for latent data (FID in training needs VAE decoding, not built yet), say so once and train on.
        if self.cfg.eval.ref is None:
            self.log.info(f"note: eval.every={self.cfg.eval.every} but eval.ref is unset, so no FID during training (--set eval.ref=DATA|STATS.npz)")
            return None
        # Refused here, before any step, rather than failing at the first evaluation and losing the work.
        if data_space(self.dataset.manifest) != "pixels":
            raise UsageError("eval.ref is set, but FID during training of latent-space models is not available; unset eval.ref (or eval.every=0) and use `fm fid --ckpt` after training")
        if self.cfg.model.cross_attention:
            raise UsageError("eval.ref is set, but FID during training of text-conditioned models is not available; unset eval.ref (or eval.every=0) and use `fm fid --ckpt` after training")
        from .evaluate import TrainingEvaluator

        manifest = {**self.dataset.manifest, "kind": "pixels"}  # reflow pairs of a pixel model: samples are pixels
        return TrainingEvaluator(self.cfg, manifest, self.ctx.device, log=self.log.info, with_reference=self.ctx.is_main)

    def _evaluate(self) -> None:
        """FID of the EMA model on eval.num_samples samples (sample indices sharded across ranks),
        appended to metrics.jsonl by rank 0."""
        if self.evaluator is None:
            return
        record = self.evaluator(self.ema, self.step, batch_size=self.micro, ctx=self.ctx)
        if not self.ctx.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.tracker.log(record, self.step)
        self.log.info(f"step {self.step}: FID {record['fid']:.4f} ({record['fid_num_samples']} samples, {record['fid_features']})")

    def _decode_latents(self, x: torch.Tensor) -> torch.Tensor | None:
        from .encoders import FrozenVAE

        if self.vae is None:
            if not self.cfg.encoders.vae:
                self.log.info("sample grid skipped: latents need a VAE to decode (set encoders.vae or FM_VAE)")
                return None
            self.vae = FrozenVAE(self.cfg.encoders.vae, self.ctx.device, self.cfg.encoders.vae_precision)
        return self.vae.decode(x)

    # ---------------------------------------------------------------------------------------- signals

    def _install_signal_handlers(self):
        def request_stop(signum, frame):
            if self.stop_requested:  # a second Ctrl-C means: stop now
                raise KeyboardInterrupt
            self.stop_requested = True
            self.log.info(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint")

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass
        return old

    @staticmethod
    def _restore_signal_handlers(old):
        for sig, handler in old.items():
            signal.signal(sig, handler)


class RankBatchSampler:
    """Yields this rank's micro-batches of dataset indices, forever, from an (epoch, index) position.

    Each optimizer step takes the next `global_batch` indices of the epoch's seeded permutation (an epoch
    that cannot fill a whole global batch ends early); micro-batch a of rank r is rows
    [(a*W + r)*micro, (a*W + r + 1)*micro) of that global batch.
    """

    def __init__(self, n, global_batch, micro, accum, ctx, seed, epoch, index):
        self.n, self.global_batch, self.micro, self.accum = n, global_batch, micro, accum
        self.world, self.rank, self.seed = ctx.world_size, ctx.rank, seed
        self.epoch, self.index = epoch, index

    def __iter__(self):
        epoch, index = self.epoch, self.index
        perm = epoch_permutation(self.n, self.seed, epoch)
        while True:
            if index + self.global_batch > self.n:
                epoch, index = epoch + 1, 0
                perm = epoch_permutation(self.n, self.seed, epoch)
            batch = perm[index : index + self.global_batch]
            for a in range(self.accum):
                start = (a * self.world + self.rank) * self.micro
                yield batch[start : start + self.micro].tolist()
            index += self.global_batch


def batch_geometry(global_batch: int, micro_batch, world: int) -> tuple[int, int]:
    """(micro batch, accumulation steps); global = micro x accumulation x world size, exactly."""
    if micro_batch == "auto":
        raise UsageError("train.micro_batch_size='auto' needs `fm bench` results; set a number for now")
    micro = micro_batch or global_batch // world
    if micro <= 0 or global_batch % (micro * world):
        raise UsageError(
            f"train.global_batch_size {global_batch} is not divisible by micro_batch_size {micro} x world size {world}; "
            f"choose sizes with global = micro x accumulation x processes"
        )
    return micro, global_batch // (micro * world)


def memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def environment_info(ctx: D.DistContext) -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "fm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "cuda": torch.version.cuda,
        "world_size": ctx.world_size,
        "cpu_threads": torch.get_num_threads(),
        "git_sha": sha,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _injected_failure(ctx: D.DistContext, step: int) -> None:
    """Test hook: FM_TEST_FAIL_RANK=r [FM_TEST_FAIL_STEP=s] makes rank r fail at step s (checks no-hang exits)."""
    rank = os.environ.get("FM_TEST_FAIL_RANK")
    if rank is not None and int(rank) == ctx.rank and step == int(os.environ.get("FM_TEST_FAIL_STEP", "1")):
        raise RuntimeFailure(f"injected failure on rank {ctx.rank} at step {step}")


def _data_info(manifest: dict) -> dict:
    """What sampling needs to know about the training data; a student of reflow pairs samples its teacher's kind."""
    keys = ("kind", "shape", "num_classes", "class_names", "source", "image_size", "vae", "text_encoder")
    return {**{k: manifest.get(k) for k in keys}, "kind": data_space(manifest)}


class _stderr_log:
    """Rank-0 logging and a rich progress bar on stderr (stdout stays free for results)."""

    def __init__(self, ctx: D.DistContext):
        from rich.console import Console

        self.ctx = ctx
        self.console = Console(stderr=True)

    def info(self, message: str) -> None:
        if self.ctx.is_main:
            self.console.print(message, highlight=False, markup=False)

    def progress(self, total: int, start: int):
        if not self.ctx.is_main or not self.console.is_terminal:
            return lambda step, loss: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=self.console, transient=True)
        task = bar.add_task("train", total=total, completed=start, loss="-")
        bar.start()

        def update(step, loss):
            if step is None:
                bar.stop()
            else:
                bar.update(task, completed=step, loss=f"{loss:.4f}")

        return update
