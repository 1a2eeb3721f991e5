"""The run: setup -> restore -> loop -> save, for a single process and for every DDP rank.

The step itself (randomness, coupling, loss, optimizer, EMA) is step.TrainingStep; this module owns what
happens around it: data, checkpoints, logs, sample grids, FID, signals.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import __version__
from . import distributed as D
from .budget import StepBudget, Work
from .checkpoint import load_checkpoint, save_atomic, save_checkpoint
from .config import Config, budget_fallback_config, config_to_dict, flip_warning, resolve, with_setting
from .console import RankLog
from .data.prepared import PreparedDataset, collate_batched, data_space
from .data.sampler import RankBatchSampler, batch_geometry, data_position
from .errors import RuntimeFailure, UsageError
from .fsutil import write_text_atomic
from .generate import SamplingNet, initial_noise, sample_batch
from .images import save_grid
from .runlog import append_metrics, environment_info, memory_mib, step_name, write_run_files
from .step import TrainingStep
from .tracking import NullTracker, make_tracker

clock = time.perf_counter  # train.budget_minutes' clock (tests replace it with a simulated machine)
CHECKPOINTS, SAMPLES, EVALUATION = 0, 1, 2  # the budget's kinds of periodic work (StepBudget.work)


class UseBudgetFallback(Exception):
    """The budget fits fewer than train.budget_fallback.min_steps of this recipe (a fresh run, nothing written yet)."""

    def __init__(self, steps: int):
        super().__init__(steps)
        self.steps = steps


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step taken in this invocation
    checkpoint: Path | None = None
    stopped_early: bool = False


def train(cfg: Config, run_dir: Path, *, resume_from: Path | None = None, stop_at_step: int | None = None, log=None, started_at: float | None = None) -> TrainResult:
    """Train (or resume) into `run_dir`. `stop_at_step` checkpoints and returns early at that step;
    `started_at` (time.time()) is when the command began, for train.budget_minutes (default: now)."""
    # train.budget_minutes counts from the command's start (data preparation, setup and compiling included)
    started = clock() - (max(0.0, time.time() - started_at) if started_at is not None else 0.0)
    ctx = D.setup(cfg.train.device)
    log = log or RankLog(ctx.is_main)
    try:
        trainer = Trainer(cfg, Path(run_dir), ctx, log, started)
        try:
            result = trainer.run(resume_from, stop_at_step)
        except UseBudgetFallback as too_few:  # raised before anything was written: start over, smaller
            fallback = cfg.train.budget_fallback
            log.info(
                f"budget: {too_few.steps} steps are under train.budget_fallback.min_steps={fallback.min_steps}; "
                f"training the preset's fallback instead: {' '.join(fallback.overrides)}"
            )
            trainer = Trainer(budget_fallback_config(cfg), Path(run_dir), ctx, log, started)
            trainer.fallback = {"from_steps": too_few.steps, "min_steps": fallback.min_steps, "overrides": fallback.overrides}
            result = trainer.run(resume_from, stop_at_step)
        D.barrier(ctx)  # rank 0 may still be writing samples: tear the group down together
        return result
    finally:
        D.cleanup()


def resolve_for_training(cfg: Config, dataset: PreparedDataset, device: torch.device):
    """(cfg with every dataset- and encoder-derived field filled, the run's TextConditioning or None)."""
    from .encoders import setup_training_encoders

    cfg = resolve(cfg, dataset.manifest)
    text, cfg = setup_training_encoders(cfg, dataset, device)
    return cfg, text


def numpy_rng_state() -> dict:
    """numpy's whole legacy RNG state (key, position, cached Gaussian) as weights_only-loadable values."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state) -> None:
    """Restore numpy_rng_state(); a bare key tensor (checkpoints before the full state was kept) restores the key only."""
    if isinstance(state, dict):
        np.random.set_state(("MT19937", state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["cached_gaussian"]))
    else:
        np.random.set_state(("MT19937", state.numpy().astype(np.uint32), *np.random.get_state()[2:]))


def check_coupling_data(cfg: Config, dataset: PreparedDataset) -> None:
    """flow.coupling = "pairs" trains on `fm reflow` pairs, and such pairs only with it."""
    if cfg.flow.coupling == "pairs" and not dataset.is_pairs:
        raise UsageError(f"flow.coupling='pairs' needs a reflow pairs dataset (`fm reflow --out DIR`), and {dataset.path} holds {dataset.manifest['kind']}")
    if dataset.is_pairs and cfg.flow.coupling != "pairs":
        raise UsageError(f"{dataset.path} holds reflow pairs: train on them with --set flow.coupling=pairs")
    if dataset.is_pairs and cfg.data.flip:
        raise UsageError("data.flip would separate reflow pairs (the flipped x1 is not the teacher's sample of x0): --set data.flip=false")


def init_weights(step_fn: TrainingStep, source: str) -> None:
    """Model and EMA from the (EMA) weights of a checkpoint, run or export directory; the architectures must match,
    except that a mean-flow model may start from a flow model: its end-time embedding keeps its zero-output
    initialisation, so it starts as the teacher (models/dit.py)."""
    from .checkpoint import resolve_checkpoint
    from .generate import load_weights

    state = load_weights(resolve_checkpoint(source))
    weights = state.get("ema") or state["model"]
    if step_fn.cfg.model.end_time and not any(k.startswith("interval_embed.") for k in weights):
        weights = {**weights, **{k: v for k, v in step_fn.model.state_dict().items() if k.startswith("interval_embed.")}}
    try:
        step_fn.model.load_state_dict(weights)
        step_fn.ema.load_state_dict(weights)
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        raise UsageError(f"train.init_from={source}: its model differs from this one ({lines[1].strip() if len(lines) > 1 else lines[0]}); use the teacher's model settings") from None




class Trainer:
    """One run on one rank. Everything is set up in __init__ (a bad setting fails before any work);
    `run` restores a checkpoint if asked, then loops."""

    def __init__(self, cfg: Config, run_dir: Path, ctx: D.DistContext, log, started: float):
        self.started = started  # on `clock`: when train.budget_minutes began (a fallback's trainer keeps it)
        self.fallback: dict | None = None  # train.budget_fallback, when this trainer is it
        self.run_dir, self.ctx, self.log = run_dir, ctx, log
        self.dataset = PreparedDataset(cfg.data.path, text=cfg.model.cross_attention)
        self.cfg, self.text = cfg, text = resolve_for_training(cfg, self.dataset, ctx.device)
        check_coupling_data(cfg, self.dataset)
        self._check_precision()
        self.cfg = cfg = self._resolve_hardware(cfg)  # train.precision / train.compile "auto" -> this machine's
        self.evaluator = self._make_evaluator()  # before any step: a bad eval.ref or missing weights fail now
        if (warning := flip_warning(cfg)) and ctx.is_main:
            self.log.info(warning)
        self.micro, self.accum = batch_geometry(cfg.train.global_batch_size, self._micro_setting(), ctx.world_size)
        if cfg.train.global_batch_size > len(self.dataset):
            raise UsageError(f"train.global_batch_size {cfg.train.global_batch_size} exceeds the dataset size {len(self.dataset)}")
        shape = tuple(self.dataset.manifest["shape"])
        self.step_fn = TrainingStep(cfg, ctx, micro=self.micro, accum=self.accum, shape=shape, text=text, ns_dtype=self.hardware["muon_ns_dtype"])
        # Sample grids and FID sample the EMA at the run's precision (eager: a grid is too small to repay compiling).
        self.ema_net = SamplingNet(self.step_fn.ema, cfg.train.precision, ctx.device)
        self.step = 0  # optimizer steps taken
        self.batches = 0  # global batches drawn; equals `step` unless non-finite steps were skipped
        self.stop_requested = False
        self.tracker = NullTracker()  # train.tracker (W&B / TensorBoard), rank 0, opened in run()
        self.vae = None  # loaded when a latent sample grid is first decoded
        self.ot_window: list[tuple[float, float]] = []  # (cost before, after) per coupled micro-batch, rank 0
        self.budget: StepBudget | None = None  # train.budget_minutes in a fresh run: refits train.steps as it goes
        self.overhead = 0.0  # seconds of periodic work (checkpoints, sample grids, evaluation) so far

    # The run reads top to bottom: restore or start, steps, save.
    def run(self, resume_from: Path | None, stop_at_step: int | None) -> TrainResult:
        if resume_from is not None:
            self._restore(resume_from)
        elif self.cfg.train.init_from:  # a resumed run's checkpoint already holds the weights
            init_weights(self.step_fn, self.cfg.train.init_from)
            self.log.info(f"initialised from {self.cfg.train.init_from}")
        self.hardware["muon_ns_dtype"] = self.step_fn.optimizer.muon_ns_dtype  # a resumed run keeps its saved one
        result = TrainResult(run_dir=self.run_dir, step=self.step)
        if self.step >= self.cfg.train.steps:
            self.log.info(f"the run is already at step {self.step} of train.steps={self.cfg.train.steps}; extend it with --set train.steps=N")
            result.checkpoint = resume_from
            return result
        self._wrap_step(fresh=resume_from is None)  # may raise UseBudgetFallback: nothing is written before it
        if self.ctx.is_main:
            self.tracker = make_tracker(self.cfg.train.tracker, self.run_dir, config=config_to_dict(self.cfg))
        if resume_from is None and self.ctx.is_main:
            env = {**environment_info(self.ctx.device, self.ctx.world_size), "hardware": self.hardware}
            write_run_files(self.run_dir, config_to_dict(self.cfg), env)
        D.barrier(self.ctx)
        old_handlers = self._install_signal_handlers()
        progress = self.log.progress(self.cfg.train.steps, self.step)
        loader = self._loader()
        try:
            self._loop(iter(loader), stop_at_step, result, progress)
        finally:
            progress(None, None)
            self.tracker.close()
            self._restore_signal_handlers(old_handlers)
            del loader
        result.step = self.step
        return result

    def _loop(self, batches, stop_at_step: int | None, result: TrainResult, progress) -> None:
        cfg = self.cfg
        window, window_start, nan_skips, done = [], time.perf_counter(), 0, self.step >= cfg.train.steps
        while not done:
            _injected_failure(self.ctx, self.step)
            out = self.step_fn(batches, self.batches, self.step)
            self.batches += 1
            if not math.isfinite(out.loss):
                nan_skips += 1
                self._on_non_finite(nan_skips)
                continue
            self.step += 1
            result.losses.append(out.loss)
            window.append(out.loss)
            if self.ctx.is_main:
                self.ot_window += out.ot_costs
            progress(self.step, out.loss)
            done = self.step >= self.cfg.train.steps
            if self.step % cfg.train.log_every == 0 or done:
                self._log_metrics(window, out, time.perf_counter() - window_start)
                window, window_start = [], time.perf_counter()
                if self.budget is not None and not done:
                    self._refit_budget(progress, out.loss)
                    done = self.step >= self.cfg.train.steps
            # A requested stop checkpoints before anything slow (samples, FID): under a launcher the
            # workers get only a grace period after the signal before they are killed.
            stop = D.any_rank(self.stop_requested, self.ctx) or self.step == stop_at_step
            if stop or done or self._every(cfg.train.checkpoint_every):
                result.checkpoint = self._timed(CHECKPOINTS, self._save_checkpoint)
            if stop and not done:
                result.stopped_early = True
                self.log.info(f"stopped at step {self.step}; continue with: fm resume {self.run_dir}")
                return
            if self._every(cfg.train.sample_every) or done:
                self._timed(SAMPLES, self._save_samples)
            if self._every(cfg.eval.every):
                self._timed(EVALUATION, self._evaluate)

    def _timed(self, kind: int, work):
        """Run one periodic `work`; under a budget its time is kept apart from the steps' pace and reserved for."""
        start = clock()
        out = work()
        if self.budget is not None:
            spent = clock() - start
            self.overhead += spent
            self.budget.record_work(kind, spent)
        return out

    def _every(self, k: int) -> bool:
        return bool(k) and self.step % k == 0

    def _on_non_finite(self, skips: int) -> None:
        if skips > self.cfg.train.max_nan_skips:
            raise RuntimeFailure(
                f"non-finite loss at step {self.step + 1}; stopping without saving "
                f"(the last checkpoint in {self.run_dir / 'checkpoints'} is intact)"
            )
        self.log.info(f"step {self.step + 1}: non-finite loss, step skipped ({skips}/{self.cfg.train.max_nan_skips})")

    # ------------------------------------------------------------------------------------------ setup

    def _check_precision(self) -> None:
        """On every rank, before rank 0 resolves "auto" for all of them."""
        from .hardware import check_precision

        check_precision(self.cfg.train.precision, self.ctx.device, "train.precision")

    def _resolve_hardware(self, cfg: Config) -> Config:
        """train.precision / train.compile "auto" -> what this machine does well; rank 0 decides for every rank.

        The resolved precision replaces "auto" in the config (config.json, checkpoint), so a resumed run keeps
        it on any machine; the decision, its reason and the probe's numbers go to env.json and the checkpoint.
        """
        from .hardware import choice_lines
        from .hardware import resolve_hardware

        ctx = self.ctx
        decision = resolve_hardware(cfg, ctx.device, tuple(self.dataset.manifest["shape"])) if ctx.is_main else None
        precision, compile_choice, ns_dtype = D.all_gather_objects(decision, ctx)[0]
        for line in choice_lines(precision, compile_choice):
            self.log.info(line)
        self.compile_choice = compile_choice
        self.hardware = {"precision": precision.record(), "compile": compile_choice.record(), "muon_ns_dtype": ns_dtype, "budget": None}
        resolved = with_setting(cfg, "train.precision", precision.precision)  # validated before config.json sees it
        self.cfg = resolved
        self._check_precision()  # an "auto" that resolved to fp16 on a CPU is refused like an explicit one
        return resolved

    def _wrap_step(self, fresh: bool) -> None:
        """DDP + torch.compile (proven on one forward/backward; eager after one warning if compiling fails),
        then train.budget_minutes for a fresh run."""
        example = collate_batched(self.dataset.__getitems__(list(range(self.micro))))
        compiled = self.step_fn.wrap(self.compile_choice.compile, example, log=self.log.info)
        if self.compile_choice.compile and not compiled:
            self.compile_choice.compile, self.compile_choice.fell_back = False, True
        self.hardware["compile"] = self.compile_choice.record()
        if fresh and self.cfg.train.budget_minutes is not None:
            self._fit_budget(example)

    def _fit_budget(self, example: dict) -> None:
        """train.budget_minutes: a fresh run lowers train.steps so that the run ends within the budget.

        First fit: the step time measured here, after compiling, by autotune.seconds_per_call (median on CPU,
        synchronised mean on CUDA) over 5 real training steps whose effect is then undone
        (_measure_step_seconds). Then every log interval refits the steps from the pace of the recent steps
        (_refit_budget; fmcli.budget.StepBudget), periodic work reserved for. Only lowers: a fast machine
        trains the preset's steps; a first fit under train.budget_fallback.min_steps raises UseBudgetFallback
        (train() starts over with the fallback's overrides). Each fit is written to the config and the
        checkpoint, so a resume continues that schedule (it never re-measures, refits or falls back).
        """
        cfg = self.cfg
        # Every rank measures (a DDP forward may broadcast buffers: a collective), rank 0's number is used.
        step_s = D.all_gather_objects(self._measure_step_seconds(example), self.ctx)[0]
        with torch.random.fork_rng(devices=[self.ctx.device] if self.ctx.device.type == "cuda" else []):  # the run's RNG untouched
            checkpoint_s, grid_s, eval_s = D.all_gather_objects(self._measure_work(), self.ctx)[0]
        work = [None] * 3
        work[CHECKPOINTS] = Work(cfg.train.checkpoint_every, at_end=True, seconds=checkpoint_s)
        work[SAMPLES] = Work(cfg.train.sample_every, at_end=True, seconds=grid_s)
        work[EVALUATION] = Work(cfg.eval.every if self.evaluator is not None else 0, seconds=eval_s)  # no eval.ref: no work
        self.budget = StepBudget(cfg.train.budget_minutes * 60, self.started, cfg.train.steps, tuple(work))
        steps = D.all_gather_objects(self.budget.first_fit(clock(), step_s), self.ctx)[0]
        self.hardware["budget"] = {"step_seconds": step_s, **self.budget.record(), "fallback": self.fallback}
        self.log.info(
            f"budget: {cfg.train.budget_minutes:g} min at {step_s:.3f} s/step (measured) -> {steps} steps"
            + (f" (of the preset's {cfg.train.steps}: this machine is slower than the preset was tuned on; refitted as the run goes)" if steps < cfg.train.steps else "")
        )
        if self._falls_back(steps):
            raise UseBudgetFallback(steps)
        self._logged_steps = steps
        if steps != cfg.train.steps:
            self._set_steps(steps)

    def _falls_back(self, steps: int) -> bool:
        """train.budget_fallback applies where the budget cut the steps under its min_steps, unless the run
        starts from weights (train.init_from) whose model a fallback that resizes it could not load."""
        fallback = self.cfg.train.budget_fallback
        if fallback is None or steps >= min(fallback.min_steps, self.cfg.train.steps):
            return False
        if self.cfg.train.init_from and any(item.startswith("model.") for item in fallback.overrides):
            self.log.info(f"budget: {steps} steps are under train.budget_fallback.min_steps={fallback.min_steps}, "
                          "but train.init_from fixes the model: training it as set")
            return False
        return True

    def _refit_budget(self, progress, loss: float) -> None:
        """At a log interval: rank 0 refits the steps from the recent pace, every rank follows."""
        fitted = self.budget.refit(self.step, clock(), self.overhead) if self.ctx.is_main else None
        fitted = D.all_gather_objects(fitted, self.ctx)[0]
        self.hardware["budget"].update(self.budget.record())
        if fitted == self.cfg.train.steps:
            return
        self._set_steps(fitted)
        progress(self.step, loss, fitted)
        if abs(fitted - self._logged_steps) >= 0.02 * self._logged_steps:  # a line per real change, not per jitter
            self.log.info(f"budget: {fitted} steps at the last {self.budget.pace_steps} steps' pace ({self.budget.pace:.3f} s/step)")
            self._logged_steps = fitted

    def _set_steps(self, steps: int) -> None:
        self.cfg = self.cfg.with_section("train", steps=steps)
        self.step_fn.set_total_steps(steps, at_step=self.step)

    def _measure_step_seconds(self, example: dict) -> float:
        """Seconds per real optimizer step (forward/backward of every micro batch, clipping, optimizer, EMA),
        timed on `example` and then undone: the trained state is restored bit for bit, so a run with a
        budget that does not cut its steps trains exactly as one without. (Timing forward/backward alone
        missed 10-25 % of the step and fitted runs that went over their budget.)"""
        import copy
        import itertools

        from .measure import seconds_per_call

        saved = copy.deepcopy(self.step_fn.state_dict())
        batches = itertools.repeat(example)
        try:
            # The first step after compiling pays one-off costs (optimizer state, allocator growth, lazy
            # kernels): untimed; then the median of 5 (a shared machine's speed varies minute to minute).
            self.step_fn(batches, 0, 0)
            return seconds_per_call(lambda: self.step_fn(batches, 0, 0), 5, self.ctx.device)
        finally:
            self.step_fn.load_state_dict(saved)

    def _measure_work(self) -> tuple[float, float, float | None]:
        """Seconds of one checkpoint, one sample grid and one evaluation (None without an evaluator), measured
        (grid, evaluation: estimated from a small measured part) before the first fit, so that the fit and
        the fallback decided from it never rest on a guess. Nothing is written to the run: the checkpoint
        goes to a temporary folder; the grid is sampled, not saved."""
        import tempfile

        start = clock()
        state = self._state()  # collective (RNG gather): every rank takes part
        if not self.ctx.is_main:
            return 0.0, 0.0, None  # rank 0's numbers are used
        with tempfile.TemporaryDirectory(prefix="fm-budget-") as tmp:
            save_atomic(state, Path(tmp) / "step.pt")
        checkpoint_s = clock() - start
        del state
        grid_s, images, per_image_s = self._measure_grid()
        eval_s = None
        if self.evaluator is not None:  # generation as the grid's per image, plus the features of the grid's images
            from .evaluate import to_rgb
            from .images import to_uint8

            start = clock()
            self.evaluator.extractor(to_rgb(torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()))
            features_s = (clock() - start) / len(images)
            eval_s = (per_image_s + features_s) * self.cfg.eval.num_samples / self.ctx.world_size
        return checkpoint_s, grid_s, eval_s

    def _measure_grid(self) -> tuple[float, torch.Tensor, float]:
        """(seconds of the sample grid, the images sampled to time it, seconds per image): the grid's own
        batch sampled with one solver step (after CFG-Zero*'s zero-init steps, which evaluate nothing),
        scaled to the network evaluations of the real grid (an adaptive solver: one image solved in full,
        scaled to the grid's count). One-off costs (a VAE's loading, lazy kernels) are counted in, on the
        side of an overestimate; a machine that slows down later is caught by the refits."""
        from .sampling import ADAPTIVE_SOLVERS, nfe_of

        sample_cfg, n = self.cfg.sample, self.cfg.sample.grid_size
        adaptive = sample_cfg.solver in ADAPTIVE_SOLVERS
        zero_init = sample_cfg.zero_init_steps if sample_cfg.guidance == "cfg-zero" else 0
        probe_cfg = sample_cfg if adaptive else sample_cfg.model_copy(update={"steps": min(sample_cfg.steps, zero_init + 1)})
        start = clock()
        x, nfe = self._grid(1 if adaptive else n, probe_cfg)
        seconds = clock() - start
        grid_s = seconds * n if adaptive else seconds * nfe_of(sample_cfg.solver, sample_cfg.steps) / max(1, nfe)
        return grid_s, x, grid_s / n

    def _micro_setting(self):
        """train.micro_batch_size, with "auto" answered by the autotune cache in the run directory (DDP
        ranks never tune: the launcher did, single-process, before starting them)."""
        if self.cfg.train.micro_batch_size != "auto":
            return self.cfg.train.micro_batch_size
        from .autotune import auto_micro_batch

        return auto_micro_batch(self.cfg, self.run_dir, self.ctx.device, self.ctx.world_size, log=self.log.info, ns_dtype=self.hardware["muon_ns_dtype"])

    def _make_evaluator(self):
        """The evaluator: the feature extractor on every rank (generation is sharded), reference features
        computed once on rank 0. FID (inception/tiny) against eval.ref, or the fidelity metrics (domain/dinov2)
        against eval.ref or the training data."""
        if not self.cfg.eval.every:
            return None
        fidelity = self.cfg.eval.features in ("domain", "dinov2")
        # Presets schedule evaluation (eval.every) but only the user knows the reference data: without one,
        # say so once and train on.
        if self.cfg.eval.ref is None and not fidelity:
            self.log.info(f"note: eval.every={self.cfg.eval.every} but eval.ref is unset, so no FID during training (--set eval.ref=DATA|STATS.npz, or eval.features=domain)")
            return None
        from .evaluate import refuse_training_eval

        refuse_training_eval(self.cfg, data_space(self.dataset.manifest))  # before any step, not at the first evaluation
        if fidelity:
            from .fidelity import TrainingFidelity

            return TrainingFidelity(self.cfg, self.cfg.data.path, self.ctx.device, log=self.log.info, with_reference=self.ctx.is_main)
        from .evaluate import TrainingEvaluator

        manifest = {**self.dataset.manifest, "kind": "pixels"}  # reflow pairs of a pixel model: samples are pixels
        return TrainingEvaluator(self.cfg, manifest, self.ctx.device, log=self.log.info, with_reference=self.ctx.is_main)

    # ------------------------------------------------------------------------------------------ data

    def _loader(self) -> DataLoader:
        epoch, index = self.data_position
        sampler = RankBatchSampler(len(self.dataset), self.cfg.train.global_batch_size, self.micro, self.accum, self.ctx, self.cfg.train.seed, epoch, index)
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
        return data_position(self.batches, len(self.dataset), self.cfg.train.global_batch_size)

    # ----------------------------------------------------------------------------------- checkpoints

    def _state(self) -> dict:
        rng = {
            "python": list(random.getstate()[1]),
            "numpy": numpy_rng_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.ctx.device) if self.ctx.device.type == "cuda" else None,
        }
        epoch, index = self.data_position
        return {
            "format": 1,
            **self.step_fn.state_dict(),
            "step": self.step,
            "data_position": {"epoch": epoch, "index": index, "batches": self.batches},
            "rng": D.all_gather_objects(rng, self.ctx),
            "world_size": self.ctx.world_size,
            "config": config_to_dict(self.cfg),
            "data_info": _data_info(self.dataset.manifest),
            "fm_version": __version__,
            "hardware": self.hardware,  # how train.precision / train.compile were resolved, the probe, the budget
        }

    def _save_checkpoint(self) -> Path:
        state = self._state()  # collective (RNG gather): every rank takes part
        path = self.run_dir / "checkpoints" / step_name(self.step, ".pt")
        D.barrier(self.ctx)
        if self.ctx.is_main:
            cfg = self.cfg.train
            path = save_checkpoint(state, self.run_dir / "checkpoints", self.step, cfg.keep_last, cfg.keep_every, log=self.log.info)
            self.log.info(f"checkpoint: {path}")
        D.barrier(self.ctx)
        return path

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.ctx.device)  # every rank loads it itself
        self.step_fn.load_state_dict(state)
        self.hardware["budget"] = (state.get("hardware") or {}).get("budget")  # the fitted steps are in the config
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
        set_numpy_rng_state(rng["numpy"])
        torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") is not None and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.ctx.device)

    # ---------------------------------------------------------------------------------------- outputs

    def _log_metrics(self, window: list[float], out, elapsed: float) -> None:
        if not self.ctx.is_main:
            return
        record = {
            "step": self.step,
            "loss": sum(window) / len(window),
            "lr": out.lr,
            "grad_norm": out.grad_norm,
            "img_per_s": len(window) * self.cfg.train.global_batch_size / max(elapsed, 1e-9),
            "mem_mib": memory_mib(self.ctx.device),
            "epoch": self.data_position[0],
        }
        if self.ot_window:  # mean squared distance per element, noise to data, this rank's micro-batches
            record["ot_cost_before"] = sum(b for b, _ in self.ot_window) / len(self.ot_window)
            record["ot_cost_after"] = sum(a for _, a in self.ot_window) / len(self.ot_window)
            self.ot_window = []
        append_metrics(self.run_dir, record)
        self.tracker.log(record, self.step)
        ot = f"  ot cost {record['ot_cost_before']:.3f} -> {record['ot_cost_after']:.3f}" if "ot_cost_after" in record else ""
        self.log.info(
            f"step {self.step}/{self.cfg.train.steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"grad {out.grad_norm:.3f}  {record['img_per_s']:.0f} img/s  mem {record['mem_mib']:.0f} MiB{ot}"
        )

    def _save_samples(self) -> None:
        if not self.ctx.is_main:
            return
        n, k = self.cfg.sample.grid_size, self.cfg.model.num_classes
        x, _ = self._grid(n, self.cfg.sample, prompts_to=self.run_dir / "samples" / step_name(self.step, ".txt"))
        if x is None:
            return
        path = save_grid(x, self.run_dir / "samples" / step_name(self.step, ".png"), nrow=k if k and n % k == 0 else None)
        self.tracker.log_image(path, self.step)
        self.log.info(f"samples: {path}")

    def _grid(self, n: int, sample_cfg, prompts_to: Path | None = None) -> tuple[torch.Tensor | None, int]:
        """(the first `n` grid images, decoded; None where latents have no VAE, the solver's NFE) from the EMA
        model; a text model's prompts (the first n training captions) are written to `prompts_to` if given."""
        k = self.cfg.model.num_classes
        labels = torch.arange(n, device=self.ctx.device) % k if k else None
        x0 = initial_noise(self.cfg.train.seed, range(n), tuple(self.dataset.manifest["shape"]), self.ctx.device)
        conditions = None
        if self.text is not None:
            from .encoders import grid_conditions

            conditions, prompts = grid_conditions(self.text, self.dataset, n, self.ctx.device)
            if prompts_to is not None:
                write_text_atomic(prompts_to, "".join(p + "\n" for p in prompts))
        result = sample_batch(
            self.ema_net, x0, labels, sample_cfg, sigma_min=self.cfg.flow.sigma_min, conditions=conditions,
            seed=self.cfg.train.seed, indices=range(n),  # euler-sde's noise, keyed like the initial noise
        )
        x = self._decode_latents(result.x) if data_space(self.dataset.manifest) == "latents" else result.x
        return x, result.nfe

    def _evaluate(self) -> None:
        """FID of the EMA model on eval.num_samples samples (sample indices sharded across ranks),
        appended to metrics.jsonl by rank 0."""
        if self.evaluator is None:
            return
        record = self.evaluator(self.ema_net, self.step, batch_size=self.micro, ctx=self.ctx)
        if not self.ctx.is_main:
            return
        append_metrics(self.run_dir, record)
        self.tracker.log(record, self.step)
        if "fid" in record:
            self.log.info(f"step {self.step}: FID {record['fid']:.4f} ({record['fid_num_samples']} samples, {record['fid_features']})")
        else:
            accuracy = f", accuracy {record['accuracy']:.3f}" if "accuracy" in record else ""
            self.log.info(
                f"step {self.step}: FD {record['fd']:.4f} (floor {record['fd_floor']:.4f}), precision {record['precision']:.3f}, "
                f"recall {record['recall']:.3f}, coverage {record['coverage']:.3f}{accuracy} ({record['eval_num_samples']} samples, {record['eval_features']} features)"
            )

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


def _injected_failure(ctx: D.DistContext, step: int) -> None:
    """Test hook: FM_TEST_FAIL_RANK=r [FM_TEST_FAIL_STEP=s] makes rank r fail at step s (checks no-hang exits)."""
    rank = os.environ.get("FM_TEST_FAIL_RANK")
    if rank is not None and int(rank) == ctx.rank and step == int(os.environ.get("FM_TEST_FAIL_STEP", "1")):
        raise RuntimeFailure(f"injected failure on rank {ctx.rank} at step {step}")


def _data_info(manifest: dict) -> dict:
    """What sampling needs to know about the training data; a student of reflow pairs samples its teacher's kind."""
    keys = ("kind", "shape", "num_classes", "class_names", "source", "image_size", "vae", "text_encoder")
    return {**{k: manifest.get(k) for k in keys}, "kind": data_space(manifest)}
