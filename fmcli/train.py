"""The run: setup -> restore -> loop -> save, for a single process and for every DDP rank.

The step itself (randomness, coupling, loss, optimizer, EMA) is step.TrainingStep; the wall-clock budget
is budget.RunBudget; the checkpoint's contents are checkpoint.training_state. This module owns what happens
around them: data, the order of setup, logs, sample grids, evaluation, signals.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import distributed as D
from . import budget as B
from .budget import CHECKPOINTS, EVALUATION, SAMPLES, Probes, RunBudget
from .checkpoint import fork_step, load_checkpoint, restore_rng, restore_training, save_checkpoint, set_aside_branch, training_state
from .config import Config, budget_fallback_config, config_to_dict, flip_warning, resolve_for_training, with_setting
from .console import RankLog
from .data.dataset import PreparedDataset, collate_batched, data_space
from .data.sampler import RankBatchSampler, batch_geometry, data_position
from .errors import RuntimeFailure, UsageError
from .fsutil import write_text_atomic
from .generate import SamplingNet, initial_noise, sample_batch
from .images import save_grid
from .optim import extension_note
from .runlog import (append_metrics, evaluated_at, memory_mib, metrics_end, run_dir_lock, set_aside_metrics, set_aside_samples, step_name,
                     write_config, write_env_hardware, write_run_files)
from .repa import load_encoder
from .step import TrainingStep
from .tracking import NullTracker, make_tracker


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step taken in this invocation
    checkpoint: Path | None = None
    stopped_early: bool = False


@dataclass
class HardwareRecord:
    """How train.precision / train.compile were resolved (hardware.PrecisionChoice / CompileChoice: the setting,
    the choice, its reason, the probe's numbers; build_step) and Muon's Newton-Schulz dtype, for env.json
    and the checkpoint."""

    precision: object  # hardware.PrecisionChoice
    compile: object  # hardware.CompileChoice; `fell_back` once compiling failed at the first call
    muon_ns_dtype: str | None

    def record(self, budget: dict | None) -> dict:
        """`hardware` of env.json and the checkpoint, with the budget's record (RunBudget.snapshot)."""
        return {"precision": self.precision.record(), "compile": self.compile.record(), "muon_ns_dtype": self.muon_ns_dtype, "budget": budget}


def train(cfg: Config, run_dir: Path, *, resume_from: Path | None = None, stop_at_step: int | None = None, log=None, started_at: float | None = None) -> TrainResult:
    """Train (or resume) into `run_dir`. `stop_at_step` checkpoints and returns early at that step;
    `started_at` (time.time()) is when the command began, for train.budget_minutes (default: now)."""
    # The budget counts from the command's start (data preparation, setup and compiling count), on its clock.
    started = B.clock() - (max(0.0, time.time() - started_at) if started_at is not None else 0.0)
    ctx = D.setup(cfg.train.device)
    log = log or RankLog(ctx.rank == 0)
    try:
        result = Trainer(cfg, Path(run_dir), ctx, log, started, resume_from, stop_at_step).run(stop_at_step)
        D.barrier(ctx)  # rank 0 may still be writing samples: tear the group down together
        D.report_clean_exit(ctx)
        return result
    finally:
        D.cleanup()


def check_stop_at_step(step: int, stop_at_step: int | None, source) -> None:
    """Refuse a --stop-at-step that a run resumed at `step` has already passed: it would train on to the end."""
    if stop_at_step is not None and stop_at_step <= step:
        raise UsageError(f"--stop-at-step {stop_at_step} is not after step {step}, where {source} resumes; pick a later step or leave it out")


def check_coupled_micro_batch(cfg: Config, state: dict, micro: int, world: int, path: Path) -> None:
    """Minibatch OT (flow.coupling ot-*) couples each rank's micro-batch, so a resume whose micro batch differs from the
    checkpoint's (another process count with train.micro_batch_size unset, or "auto" tuned to another size) would train
    another coupling from here on: refused. Checkpoints before the micro batch was saved: derived where the config tells."""
    if cfg.flow.coupling in ("independent", "pairs"):
        return
    saved_world, saved = int(state.get("world_size") or 1), state.get("micro_batch_size")
    if saved is None and cfg.train.micro_batch_size != "auto":
        saved = cfg.train.micro_batch_size or cfg.train.global_batch_size // saved_world
    if saved is None or int(saved) == micro:
        return
    def processes(n: int) -> str:
        return "1 process" if n == 1 else f"{n} processes"

    if saved_world == world:
        todo = "resume where its train.micro_batch_size='auto' was tuned (the run's autotune.json, the same kind of device)"
    else:
        todo = "resume in one process (without --nproc/--gpus)" if saved_world == 1 else f"resume with --nproc {saved_world} (or --gpus {saved_world})"
    raise UsageError(f"{path} trained flow.coupling={cfg.flow.coupling} on micro-batches of {saved} images per process ({processes(saved_world)}); "
                     f"this resume's would be {micro} ({processes(world)}), another coupling: {todo}")


def auto_micro_batch_note(cfg: Config, state: dict, micro: int, world: int, path: Path) -> str | None:
    """A resume with train.micro_batch_size="auto" whose autotune (this machine's cache or probe) gave another micro
    batch than the checkpoint trained: the line that says so (None where it is the same, or unknown). The run goes on at
    the new one (a machine with less memory needs it); gradient accumulation then sums in another order, so the losses
    continue to float tolerance, not bit for bit. Coupled runs (minibatch OT) are refused before (check_coupled_micro_batch)."""
    saved, saved_world = state.get("micro_batch_size"), int(state.get("world_size") or 1)
    if cfg.train.micro_batch_size != "auto" or saved is None or int(saved) == micro:
        return None
    accum = cfg.train.global_batch_size // (int(saved) * saved_world), cfg.train.global_batch_size // (micro * world)
    return (f"note: train.micro_batch_size=auto is {micro} per process here, {path} trained {saved} (gradient accumulation "
            f"{accum[0]} -> {accum[1]}): the losses continue to float tolerance, not bit for bit (autotune.json of the run "
            "directory keeps the tuned size per machine)")


# Model settings that change what a network computes but no weight's shape (model.heads splits the same
# projections otherwise; model.prediction reads the output as data or as velocity): init_from compares them.
SHAPELESS_MODEL_SETTINGS = ("heads", "prediction")


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
    theirs, mine = (state.get("config") or {}).get("model") or {}, step_fn.cfg.model.model_dump(mode="json")
    try:
        # The attention heads and the output's meaning change what the weights compute, not their shapes: such
        # weights would load without a word and start the run from another network than the checkpoint's.
        if any(k in theirs and theirs[k] != mine[k] for k in SHAPELESS_MODEL_SETTINGS):
            raise RuntimeError("the same shapes, another network")
        step_fn.model.load_state_dict(weights)
        step_fn.ema.load_state_dict(weights)
    except RuntimeError:
        what, todo = _model_mismatch(theirs, mine, weights, step_fn.model.state_dict())
        raise UsageError(f"train.init_from={source}: its model differs from this one ({what}); {todo}") from None


def _model_mismatch(theirs: dict, mine: dict, weights: dict, own: dict) -> tuple[str, str]:
    """Why init_from's weights do not fit this model and what to do, short enough for one line: the model settings
    (`mine`: this run's) that differ from the checkpoint's and the --set that matches them; where the settings agree,
    how many weights are missing, extra or of another shape, and the first few."""

    def text(value) -> str:  # as --set reads it back (config.parse_override)
        return "none" if value is None else value if isinstance(value, str) else json.dumps(value)

    # A mean-flow model may start from a flow model (init_weights), so end_time true here and false there is no mismatch.
    differ = [k for k in mine if k in theirs and theirs[k] != mine[k] and not (k == "end_time" and mine[k])]
    if differ:
        what = ", ".join(f"model.{k} {text(theirs[k])} in the checkpoint, {text(mine[k])} here" for k in differ)
        # model.end_time follows flow.objective (config): a mean-flow checkpoint's settings are that objective's.
        sets = [f"--set model.{k}={text(theirs[k])}" if k != "end_time" else "--set flow.objective=meanflow --set sample.solver=meanflow" for k in differ]
        return what, f"train with the checkpoint's model settings: {' '.join(sets)}"
    groups = (
        ("missing", [k for k in own if k not in weights]), ("unexpected", [k for k in weights if k not in own]),
        ("of another shape", [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]),
    )  # fmt: skip
    what = ", ".join(f"{len(keys)} weights {label} (e.g. {', '.join(keys[:3])})" for label, keys in groups if keys)
    return what or "its weights do not load", "use the checkpoint's model settings"


def make_evaluator(cfg: Config, dataset: PreparedDataset, ctx: D.DistContext, log):
    """The evaluator of a run with eval.every: the feature extractor on every rank (generation is sharded),
    the reference's features (FID's statistics, the fidelity metrics' features) computed by every rank on its share and
    held by rank 0 (None without a reference for FID). FID (inception/tiny) against eval.ref, or the fidelity metrics (domain/dinov2)
    against eval.ref or the training data."""
    fidelity = cfg.eval.features in ("domain", "dinov2")
    # Presets schedule evaluation (eval.every) but only the user knows the reference data: without one,
    # say so once and train on.
    if cfg.eval.ref is None and not fidelity:
        from .evaluate import training_eval_unavailable

        if reason := training_eval_unavailable(cfg, data_space(dataset.manifest)):  # its remedies would be refused
            log.info(f"note: eval.every={cfg.eval.every}, but {reason}")
        else:
            log.info(f"note: eval.every={cfg.eval.every} but eval.ref is unset, so no FID during training (--set eval.ref=DATA|STATS.npz, or eval.features=domain)")
        return None
    from .evaluate import refuse_training_eval

    refuse_training_eval(cfg, data_space(dataset.manifest))  # before any step, not at the first evaluation
    if fidelity:
        from .fidelity import TrainingFidelity

        return TrainingFidelity(cfg, cfg.data.path, ctx.device, log=log.info, with_reference=ctx.rank == 0, ctx=ctx)
    from .evaluate import TrainingEvaluator

    manifest = {**dataset.manifest, "kind": "pixels"}  # reflow pairs of a pixel model: samples are pixels
    return TrainingEvaluator(cfg, manifest, ctx.device, log=log.info, with_reference=ctx.rank == 0, ctx=ctx)  # the reference: every rank its share


def build_step(cfg: Config, dataset: PreparedDataset, ctx: D.DistContext, log, run_dir: Path, *, fresh: bool):
    """What the config decides: (config, text conditioning, HardwareRecord, TrainingStep) for `cfg` as given, resolved against the data and this machine; a `fresh` run's step starts from train.init_from's
    weights (a resumed run's checkpoint already holds them). A bad setting fails here, before any work."""
    from .hardware import check_precision, choice_lines, resolve_hardware

    shape = tuple(dataset.manifest["shape"])
    text, cfg = resolve_for_training(cfg, dataset, ctx.device)
    # flow.coupling = "pairs" trains on `fm reflow` pairs, and such pairs only with it.
    if cfg.flow.coupling == "pairs" and not dataset.is_pairs:
        raise UsageError(f"flow.coupling='pairs' needs a reflow pairs dataset (`fm reflow --out DIR`), and {dataset.path} holds {dataset.manifest['kind']}")
    if dataset.is_pairs and cfg.flow.coupling != "pairs":
        raise UsageError(f"{dataset.path} holds reflow pairs: train on them with --set flow.coupling=pairs")
    # Guidance extrapolates from the unconditional branch, which only condition dropout trains: without it the
    # run's sample grids (and `fm sample` at the run's default) would guide from an untrained null class.
    conditional = cfg.model.num_classes or cfg.model.cross_attention
    if conditional and cfg.flow.cond_dropout == 0 and cfg.sample.cfg != 1 and cfg.sample.guidance in ("cfg", "cfg-zero"):
        raise UsageError(f"flow.cond_dropout=0 trains no unconditional branch, which sample.cfg={cfg.sample.cfg:g} guides from: "
                         "--set sample.cfg=1 (a reflow student samples unguided), or a flow.cond_dropout above 0 (e.g. 0.1)")
    if dataset.is_pairs and cfg.data.flip:
        raise UsageError("data.flip would separate reflow pairs (the flipped x1 is not the teacher's sample of x0): --set data.flip=false")
    if cfg.data.flip and dataset.space == "latents" and not dataset.is_mirrored:  # a flipped latent is not the mirrored image's latent
        raise UsageError(f"data.flip on {dataset.path}, whose latents have no mirrored copies (a flipped latent is not the mirrored image's "
                         f"latent): re-prepare it with `fm prepare-data ... --vae DIR --flip --out {dataset.path} --force` (a resume too), "
                         "or start the run with --set data.flip=false")
    check_precision(cfg.train.precision, ctx.device, "train.precision")  # every rank, before rank 0 resolves "auto"
    # train.precision / train.compile "auto" -> what this machine does well; rank 0 decides for every rank.
    # The resolved precision replaces "auto" in the config (config.json, checkpoint), so a resumed run keeps
    # it on any machine; the decision, its reason and the probe's numbers go to env.json and the checkpoint.
    decision = resolve_hardware(cfg, ctx.device, shape) if ctx.rank == 0 else None
    hardware = HardwareRecord(*D.all_gather_objects(decision, ctx)[0])
    for line in choice_lines(hardware.precision, hardware.compile):
        log.info(line)
    cfg = with_setting(cfg, "train.precision", hardware.precision.precision)  # validated before config.json sees it
    check_precision(cfg.train.precision, ctx.device, "train.precision")  # an "auto" that resolved to fp16 on a CPU
    if (warning := flip_warning(cfg)) and ctx.rank == 0:
        log.info(warning)
    micro = cfg.train.micro_batch_size
    if micro == "auto":  # the autotune cache in the run directory (DDP ranks never tune: the launcher did, single-process)
        from .autotune import auto_micro_batch

        micro = auto_micro_batch(cfg, run_dir, ctx.device, ctx.world_size, hardware.compile.compile, log=log.info, ns_dtype=hardware.muon_ns_dtype)
    micro, accum = batch_geometry(cfg.train.global_batch_size, micro, ctx.world_size, resumed=not fresh)
    if cfg.train.global_batch_size > len(dataset):
        raise UsageError(f"train.global_batch_size {cfg.train.global_batch_size} exceeds the dataset size {len(dataset)}")
    encoder = None
    if cfg.repa.classifier and cfg.repa.encoder == "none" and ctx.rank == 0:  # said, not silently dropped
        log.info(f"repa.classifier={cfg.repa.classifier} is unused: REPA is off in this run (repa.encoder resolved to 'none')")
    if cfg.repa.encoder == "domain":  # REPA's encoder (the first run on a dataset trains it, about a minute)
        encoder = load_encoder(cfg, log=log.info, resuming=not fresh)
        if ctx.rank == 0:
            log.info(f"repa: the tokens after block {cfg.repa.depth} are aligned with the domain classifier of {cfg.data.path} "
                     f"(seed {cfg.repa.seed}; off: --set repa.encoder=none)")
    step_fn = TrainingStep(cfg, ctx, micro=micro, accum=accum, shape=shape, text=text, ns_dtype=hardware.muon_ns_dtype, encoder=encoder)
    if fresh and cfg.train.init_from:
        init_weights(step_fn, cfg.train.init_from)
        log.info(f"initialised from {cfg.train.init_from}")
    hardware.muon_ns_dtype = step_fn.optimizer.muon_ns_dtype
    return step_fn.cfg, text, hardware, step_fn


class Trainer:
    """One run on one rank. Setup is __init__: a bad setting fails before any work, then the checkpoint is
    restored (or train.init_from loaded), the step compiled and a fresh run's budget fitted, its fallback
    chosen; nothing is written before `run`, which loops and saves."""

    def __init__(self, cfg: Config, run_dir: Path, ctx: D.DistContext, log, started: float, resume_from: Path | None = None,
                 stop_at_step: int | None = None):
        self.run_dir, self.ctx, self.log, self.resume_from = run_dir, ctx, log, resume_from
        self.dataset = PreparedDataset(cfg.data.path, text=cfg.model.cross_attention)
        # The evaluator depends on eval.* and the data only, which train.budget_fallback never changes: built
        # once, first, so that a bad eval.ref fails before any other work; each evaluation passes the run's config.
        self.evaluator = make_evaluator(cfg, self.dataset, ctx, log) if cfg.eval.every else None
        # What the config decides (built again, once, where train.budget_fallback applies): the config trained,
        # the text conditioning, the hardware choice and the step. `cfg` is the step's own config, replaced
        # where a refit changes it: its train.steps is the run's length, the one copy.
        self.cfg, self.text, self.hardware, self.step_fn = build_step(cfg, self.dataset, ctx, log, run_dir, fresh=resume_from is None)
        self.step = 0  # optimizer steps taken
        self.batches = 0  # global batches drawn; equals `step` unless non-finite steps were skipped
        self.stop_requested = False
        self.stopped = False  # a requested stop's checkpoint is saved: the run is only winding down (loader workers)
        self.closing = False  # the loop is over (ended, stopped or failed): the tracker closes, nothing is left to save
        self.pid = os.getpid()  # the stop handler's process: DataLoader workers inherit the handler (fork) and a terminal's Ctrl-C
        self.tracker = NullTracker()  # train.tracker (W&B / TensorBoard), rank 0, opened in run()
        self.vae = None  # loaded when a latent sample grid is first decoded
        self.ot_window: list[tuple[float, float]] = []  # (cost before, after) per coupled micro-batch, rank 0
        self.budget = RunBudget(cfg.train.budget_minutes, started, ctx, log)
        # (step, file) resumed from, until the first save or sample grid sets the abandoned branch aside (rank 0)
        self.branch_point = None
        self.on_disk: tuple[int, Path] | None = None  # (step, file) of the checkpoint last resumed from or saved: the run's state at that step
        self.metrics_mark = 0  # where this run's metrics.jsonl records begin (a resume: the earlier ones are before it)
        self.resumed_every = (0, 0)  # the checkpoint resumed from: its (train.sample_every, eval.every), what was due at its step
        if resume_from is not None:
            self._restore(resume_from)
            check_stop_at_step(self.step, stop_at_step, resume_from)  # the launcher checked too; train() callers
        if self.step < self.cfg.train.steps:
            self._start(cfg)

    def _start(self, cfg: Config) -> None:
        """Wrap the step (DDP + torch.compile), proven on one forward/backward of a first micro-batch (eager
        after one warning if compiling fails); a fresh run then fits train.budget_minutes (RunBudget.start),
        timing that micro-batch's step, a checkpoint's state, a grid and the evaluator's features. Where the
        budget fits too few steps for the recipe, train.budget_fallback's config builds the step again (nothing
        is written yet; that config has no fallback of its own), whose own step time the budget measures and
        fits. A resume continues its checkpoint's schedule: it never re-measures, refits or falls back."""
        steps = None
        while steps is None:
            example = collate_batched(self.dataset.__getitems__(list(range(self.step_fn.micro))))
            choice = self.hardware.compile
            if not self.step_fn.wrap(choice.compile, example, log=self.log.info) and choice.compile:
                choice.compile, choice.fell_back = False, True
            if self.resume_from is not None:
                return
            features = None
            if self.evaluator is not None:
                from .evaluate import to_rgb
                from .images import to_uint8

                extractor = self.evaluator.extractor
                features = lambda images: extractor(to_rgb(torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()))  # noqa: E731
            steps = self.budget.start(self.cfg, Probes(self.step_fn, example, self._state, self._grid, features))
            if steps is None:  # train.budget_fallback applies
                fallback = budget_fallback_config(cfg)
                self.cfg, self.text, self.hardware, self.step_fn = build_step(fallback, self.dataset, self.ctx, self.log, self.run_dir, fresh=True)
        if steps != self.cfg.train.steps:
            self.cfg = self.step_fn.set_total_steps(steps, at_step=self.step)

    # The run reads top to bottom: steps, checkpoints, samples, evaluation.
    def run(self, stop_at_step: int | None) -> TrainResult:
        result = TrainResult(run_dir=self.run_dir, step=self.step)
        if self.step >= self.cfg.train.steps:
            self.log.info(f"the run is already at step {self.step} of train.steps={self.cfg.train.steps}; extend it with --set train.steps=N")
            result.checkpoint = self.resume_from
            return result
        with run_dir_lock(self.run_dir) if self.ctx.rank == 0 else contextlib.nullcontext():  # one process trains a run
            return self._run_locked(stop_at_step, result)

    def _run_locked(self, stop_at_step: int | None, result: TrainResult) -> TrainResult:
        if self.ctx.rank == 0:
            resumed_at = None if self.resume_from is None else self.step
            self.metrics_mark = metrics_end(self.run_dir)
            self.tracker = make_tracker(self.cfg.train.tracker, self.run_dir, config=config_to_dict(self.cfg), resumed_at=resumed_at, log=self.log.info)
            write_run_files(self.run_dir, config_to_dict(self.cfg), self.ctx.device, self.ctx.world_size, self.hardware.record(self.budget.snapshot),
                            resumed_at=resumed_at)  # a resume records its own launch in env.json
            self._note_final_evaluation()
        D.barrier(self.ctx)
        old_handlers = {}  # SIGINT and SIGTERM ask for a stop at the next step boundary
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                old_handlers[sig] = signal.signal(sig, self._request_stop)
        progress = self.log.progress(self.cfg.train.steps, self.step)
        # This rank's micro-batches from the data position (epoch, index in it) on (data/sampler.py).
        epoch, index = data_position(self.batches, len(self.dataset), self.cfg.train.global_batch_size)
        sampler = RankBatchSampler(len(self.dataset), self.cfg.train.global_batch_size, self.step_fn.micro, self.step_fn.accum, self.ctx,
                                   self.cfg.train.seed, epoch, index)
        workers = self.cfg.data.num_workers
        # Its own generator: iter(loader) draws a worker base seed (unused: every draw is keyed, seeding.STREAMS)
        # and must not draw it from the global RNG that a checkpoint restores, or a resumed run's would differ.
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_batched, pin_memory=self.ctx.device.type == "cuda",
                            persistent_workers=False, prefetch_factor=2 if workers else None, generator=torch.Generator().manual_seed(self.cfg.train.seed))
        failed = True  # until the loop returns: the tracker records how the run ended
        try:
            if not self._catch_up(result):
                self._loop(iter(loader), stop_at_step, result, progress)
            failed = False
        finally:
            self.closing = True  # a signal now: nothing is left to save (the handler says so; Ctrl-C twice stops at once)
            try:
                progress(None, None)
                self._close_tracker(failed)
            finally:  # restored even where a second Ctrl-C interrupts the tracker's close
                for sig, handler in old_handlers.items():
                    signal.signal(sig, handler)
                del loader
        result.step = self.step
        return result

    def _loop(self, batches, stop_at_step: int | None, result: TrainResult, progress) -> None:
        cfg = self.cfg.train
        # Non-finite steps skipped so far in this run, resumes included (batches drawn without an optimizer step):
        # train.max_nan_skips is the run's allowance, not each invocation's.
        window, window_start, nan_skips, done = [], time.perf_counter(), self.batches - self.step, self.step >= self.cfg.train.steps
        last = None  # the last step taken (its lr and grad_norm for a stop's log record; a skipped step has none)
        # Test hook: FM_TEST_FAIL_RANK=r [FM_TEST_FAIL_STEP=s] makes rank r fail at step s (checks no-hang exits).
        fail_rank = os.environ.get("FM_TEST_FAIL_RANK")
        fail_at = int(os.environ.get("FM_TEST_FAIL_STEP", "1")) if fail_rank is not None and int(fail_rank) == self.ctx.rank else None
        while not done:
            if self.step == fail_at:
                raise RuntimeFailure(f"injected failure on rank {self.ctx.rank} at step {self.step}")
            out = self.step_fn(batches, self.batches, self.step)
            self.batches += 1
            if not math.isfinite(out.loss):
                nan_skips += 1
                self._on_non_finite(nan_skips)
                # A stop asked for during a stretch of skipped steps (up to train.max_nan_skips of them) stops here too.
                if D.any_rank(self.stop_requested, self.ctx):
                    return self._stop(result, window, last, window_start, saved=self._state_on_disk(result))
                continue
            self.step, last = self.step + 1, out
            result.losses.append(out.loss)
            window.append(out.loss)
            if self.ctx.rank == 0:
                self.ot_window += out.ot_costs
            progress(self.step, out.loss)
            done = self.step >= self.cfg.train.steps
            if self.step % cfg.log_every == 0 or done:
                self._log_metrics(window, out, time.perf_counter() - window_start)
                window, window_start = [], time.perf_counter()
                if not done and (fitted := self.budget.at_log_interval(self.step, self.cfg.train.steps)) is not None:
                    self.cfg = self.step_fn.set_total_steps(fitted, at_step=self.step)
                    progress(self.step, out.loss, fitted)
                    done = self.step >= fitted
            # A requested stop checkpoints before anything slow (samples, FID): under a launcher the
            # workers get only a grace period after the signal before they are killed.
            stop = D.any_rank(self.stop_requested, self.ctx) or (stop_at_step is not None and self.step >= stop_at_step)
            if stop and not done:
                return self._stop(result, window, out, window_start, saved=False)
            saved = done or self._every(cfg.checkpoint_every)
            # img_per_s is training images per second of training time: the window's clock stops for the periodic work.
            paused = time.perf_counter()
            if saved:
                result.checkpoint = self.budget.timed(CHECKPOINTS, self._save_checkpoint)
            for due, part, work in ((self._every(cfg.sample_every) or done, SAMPLES, self._save_samples), (self._every(self.cfg.eval.every), EVALUATION, self._evaluate)):
                # A stop asked for during this step's checkpoint or grid stops here, not after the FID and another step.
                if (due or saved) and not done and D.any_rank(self.stop_requested, self.ctx):
                    return self._stop(result, window, out, window_start + time.perf_counter() - paused, saved=saved)
                if due:
                    self.budget.timed(part, work)
            window_start += time.perf_counter() - paused

    def _close_tracker(self, failed: bool) -> None:
        """Rank 0's tracker closed (W&B's finish uploads). Its error is one line, not the command's: a training error on
        its way out stays the one reported, and a finished run's checkpoints and grids are all on disk already."""
        try:
            self.tracker.close(failed=failed)
        except Exception as err:  # noqa: BLE001 (a tracker's upload error; KeyboardInterrupt goes on)
            saved = "" if failed else f"; the run's checkpoints and grids in {self.run_dir} are complete"
            self.log.info(f"warning: train.tracker={self.cfg.train.tracker} failed to close ({type(err).__name__}: {err}){saved}")

    def _catch_up(self, result: TrainResult) -> bool:
        """A resumed run, before its first step: the sample grid and the evaluation that were due at the resumed step
        (by its checkpoint's intervals) and are missing, made now: a stop at a step saves and ends before that step's
        grid and evaluation (`_loop`), which the straight run has. The model and EMA are the straight run's at that
        step and neither touches the training draws, so the run goes on bit for bit. True where a stop asked for
        meanwhile ended the run (the checkpoint resumed from is its state)."""
        if self.resume_from is None:
            return False
        todo = D.all_gather_objects(self._skipped_work() if self.ctx.rank == 0 else None, self.ctx)[0]
        if todo:
            self.log.info(f"step {self.step}: the {' and '.join(what for what, _, _ in todo)} due at this step and missing (a stop skipped it, or a rollback set it aside)")
        for _, part, work in todo:
            if D.any_rank(self.stop_requested, self.ctx):  # a stop asked for during the grid: not the evaluation too
                break
            self.budget.timed(part, getattr(self, work))
        if not D.any_rank(self.stop_requested, self.ctx):
            return False
        self._stop(result, [], None, 0.0, saved=self._state_on_disk(result))
        return True

    def _skipped_work(self) -> list[tuple[str, int, str]]:
        """Rank 0: (what, budget part, method) of the resumed step's due work that this run lacks, and does (its grids
        and evaluations not turned off by the resume). A grid file or an evaluation record of the step is this run's
        unless the branch resumed left the current one before the step (`fork_step`): those a rollback sets aside."""
        step, (sample_every, eval_every) = self.step, self.resumed_every
        other_branch = step > fork_step(self.run_dir / "checkpoints", *self.branch_point)
        todo = []
        if step and sample_every and step % sample_every == 0 and self.cfg.train.sample_every:
            if other_branch or not (self.run_dir / "samples" / step_name(step, ".png")).is_file():
                todo.append(("sample grid", SAMPLES, "_save_samples"))
        if step and eval_every and step % eval_every == 0 and self.evaluator is not None:
            if other_branch or not evaluated_at(self.run_dir, step):
                todo.append(("evaluation", EVALUATION, "_evaluate"))
        return todo

    def _stop(self, result: TrainResult, window: list[float], out, window_start: float, saved: bool) -> None:
        """A requested stop at this step: its steps since the last log interval logged (or no record would hold them),
        its checkpoint saved (unless `saved` already), the run stopped."""
        if window:
            self._log_metrics(window, out, time.perf_counter() - window_start)
        if not saved:
            result.checkpoint = self.budget.timed(CHECKPOINTS, self._save_checkpoint)
        result.stopped_early = self.stopped = True
        self.log.info(f"stopped at step {self.step}; continue with: fm resume {self.run_dir if self.branch_point is None else result.checkpoint}")

    def _state_on_disk(self, result: TrainResult) -> bool:
        """A stop during a stretch of skipped steps with no step taken since the checkpoint last resumed from or saved:
        that checkpoint holds the run's state (model, EMA, optimizer, schedule, RNG), all but the skipped batches, which a
        resume draws again (and counts against train.max_nan_skips again, as they are not in it). It is not saved
        again: a second file of the same step would replace it or set it aside. True (`result.checkpoint` set) if so."""
        if self.on_disk is None or self.on_disk[0] != self.step:
            return False
        result.checkpoint = self.on_disk[1]
        return True

    def _note_final_evaluation(self) -> None:
        """Rank 0, at the start: eval.every evaluates at its multiples only, not at the end as the final checkpoint
        and grid are; where it does not divide train.steps one line says which step is evaluated last (or none)."""
        every, steps = self.cfg.eval.every, self.cfg.train.steps
        if self.evaluator is None or steps % every == 0:
            return
        last = steps // every * every
        when = f"the last evaluation is at step {last}" if last > self.step else f"no evaluation falls in steps {self.step + 1}-{steps}"
        command = "fm eval" if self.cfg.eval.features in ("domain", "dinov2") else "fm fid"
        self.log.info(f"note: eval.every={every} does not divide train.steps={steps}: {when}, none at the final step "
                      f"(score the final checkpoint with {command} --ckpt {self.run_dir})")

    def _every(self, k: int) -> bool:
        return bool(k) and self.step % k == 0

    def _on_non_finite(self, skips: int) -> None:
        if skips > self.cfg.train.max_nan_skips:
            raise RuntimeFailure(
                f"non-finite loss or gradients at step {self.step + 1}; stopping without saving "
                f"(the last checkpoint in {self.run_dir / 'checkpoints'} is intact)"
            )
        self.log.info(f"step {self.step + 1}: non-finite loss or gradients, step skipped ({skips}/{self.cfg.train.max_nan_skips})")

    # ----------------------------------------------------------------------------------- checkpoints

    def _state(self) -> dict:
        """The checkpoint's contents (checkpoint.training_state); collective: every rank calls it."""
        hardware = self.hardware.record(self.budget.snapshot)  # how precision / compile were resolved, the probe, the budget
        manifest = self.dataset.manifest  # what sampling needs to know of it; a student of reflow pairs samples its teacher's kind
        keys = ("kind", "shape", "count", "num_classes", "class_names", "source", "image_size", "vae", "text_encoder", "fingerprint")
        data_info = {**{k: manifest.get(k) for k in keys}, "kind": data_space(manifest)}
        position = data_position(self.batches, len(self.dataset), self.cfg.train.global_batch_size)
        return training_state(self.step_fn.state_dict(), step=self.step, batches=self.batches, position=position, ctx=self.ctx,
                              config=config_to_dict(self.cfg), data_info=data_info, hardware=hardware, micro=self.step_fn.micro)

    def _save_checkpoint(self) -> Path:
        state = self._state()  # collective (RNG gather): every rank takes part
        path = self.run_dir / "checkpoints" / step_name(self.step, ".pt")
        D.barrier(self.ctx)
        if self.ctx.rank == 0:
            cfg = self.cfg.train
            path = save_checkpoint(state, self.run_dir / "checkpoints", self.step, cfg.keep_last, cfg.keep_every, log=self.log.info,
                                   resumed_from=self.branch_point, on_set_aside=self._set_aside_outputs)
            write_config(self.run_dir, state["config"])  # config.json follows the run's newest checkpoint
            write_env_hardware(self.run_dir, state["hardware"])  # and env.json's hardware record (the budget's last fit)
            self.log.info(f"checkpoint: {path}")
        D.barrier(self.ctx)
        self.branch_point, self.on_disk = None, (self.step, path)
        return path

    def _set_aside_branch(self) -> None:
        """Rank 0, before a rolled-back run's first sample grid where no save came first: the abandoned branch (its
        checkpoints, grids and records after the resumed step) set aside now, before a grid of it is replaced."""
        moved = set_aside_branch(self.run_dir / "checkpoints", *self.branch_point)
        if moved:
            self.log.info(f"rollback: moved {len(moved)} checkpoint(s) of the abandoned branch to {moved[0].parent}")
            self._set_aside_outputs(moved[0].parent)
        self.branch_point = None

    def _set_aside_outputs(self, aside: Path) -> None:
        """The abandoned branch's sample grids and metrics.jsonl records (after the resumed step) into `aside`, the
        folder its checkpoints went to: the new branch overwrites none of them, and the records read as one branch.
        A resumed set-aside checkpoint's branch left the current one at its folder's step (`fork_step`): from there."""
        step = fork_step(self.run_dir / "checkpoints", *self.branch_point)
        grids = set_aside_samples(self.run_dir / "samples", step, aside)
        records = set_aside_metrics(self.run_dir, step, self.metrics_mark, aside)
        if grids or records:
            self.log.info(f"rollback: moved {grids} sample file(s) and {records} metrics.jsonl record(s) of the abandoned branch to {aside}")

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.ctx.device)  # every rank loads it itself
        restore_training(self.step_fn, state, path)
        self.budget.restore((state.get("hardware") or {}).get("budget"))  # the fitted steps are in the config
        self.step = int(state["step"])
        self.batches = int(state["data_position"]["batches"])
        self._check_same_data(path, state.get("data_info") or {})
        saved = (state["data_position"]["epoch"], state["data_position"]["index"])
        if saved != data_position(self.batches, len(self.dataset), self.cfg.train.global_batch_size):
            raise RuntimeFailure(f"{path}: data position {saved} does not match this dataset; was it re-prepared with another size?")
        check_coupled_micro_batch(self.cfg, state, self.step_fn.micro, self.ctx.world_size, path)
        if note := auto_micro_batch_note(self.cfg, state, self.step_fn.micro, self.ctx.world_size, path):
            self.log.info(note)
        restore_rng(state, self.ctx)  # the streams of the rank it was (a resume at another world size starts them fresh: none is a step's)
        ended_at = state["config"]["train"]["steps"]  # the saved run's length (its schedule's end), --set train.steps aside
        if note := extension_note(self.step, ended_at, self.cfg.train.steps, self.cfg.optim):
            self.log.info(note)
        self.hardware.muon_ns_dtype = self.step_fn.optimizer.muon_ns_dtype  # a resumed run keeps its saved one
        self.branch_point = self.on_disk = (self.step, path)
        saved_cfg = state["config"]
        self.resumed_every = tuple(v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0
                                   for v in (saved_cfg["train"].get("sample_every"), (saved_cfg.get("eval") or {}).get("every")))
        self.log.info(f"resumed from {path} at step {self.step}")

    def _check_same_data(self, path: Path, info: dict) -> None:
        """A resume continues the saved data position in the same images: the dataset must be the one trained on, by
        its image count and, where the checkpoint and the manifest both hold one (not an older fm's), its content
        fingerprint (a copy elsewhere is the same dataset)."""
        # The data position indexes this dataset's epoch permutations, which depend on its size (older checkpoints
        # lack the count: only a position that falls elsewhere in the epochs is caught then).
        data, count = self.cfg.data.path, info.get("count")
        new = f"a resume continues the same data; to go on with other data start a new run with --set train.init_from={path}"
        if count is not None and int(count) != len(self.dataset):
            raise UsageError(f"{path} was trained on {count} images, but {data} holds {len(self.dataset)} (re-prepared?): {new}")
        saved, current = info.get("fingerprint"), self.dataset.manifest.get("fingerprint")
        if saved is not None and current is not None and saved != current:
            raise UsageError(f"{path} was trained on other images than {data} holds (the same count, content fingerprint {str(saved)[:12]} "
                             f"then, {current[:12]} now: re-prepared or replaced?): {new}")
        if saved is None or current is None:
            older = "the checkpoint" if saved is None else f"the dataset {data}"
            self.log.info(f"note: {older} has no content fingerprint (written by an older fm): on resume only the image count "
                          "shows the data is the one trained on")

    # ---------------------------------------------------------------------------------------- outputs

    def _log_metrics(self, window: list[float], out, elapsed: float) -> None:
        if self.ctx.rank != 0:
            return
        record = {
            "step": self.step,
            "loss": sum(window) / len(window),
            "lr": out.lr,
            "grad_norm": out.grad_norm,
            "img_per_s": len(window) * self.cfg.train.global_batch_size / max(elapsed, 1e-9),
            "mem_mib": memory_mib(self.ctx.device),
            "epoch": data_position(self.batches, len(self.dataset), self.cfg.train.global_batch_size)[0],
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
        if self.ctx.rank != 0:
            return
        if self.branch_point is not None:  # a rollback's grid before its first save: the old branch's grids go first
            self._set_aside_branch()
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
        ema = SamplingNet(self.step_fn.ema, self.cfg.train.precision, self.ctx.device)  # eager: a grid is too small to repay compiling
        result = sample_batch(
            ema, x0, labels, sample_cfg, sigma_min=self.cfg.flow.sigma_min, conditions=conditions,
            seed=self.cfg.train.seed, indices=range(n),  # euler-sde's noise, keyed like the initial noise
        )
        x = self._decode_latents(result.x) if data_space(self.dataset.manifest) == "latents" else result.x
        return x, result.nfe

    def _evaluate(self) -> None:
        """FID of the EMA model on eval.num_samples samples (sample indices sharded across ranks),
        appended to metrics.jsonl by rank 0."""
        if self.evaluator is None:
            return
        ema = SamplingNet(self.step_fn.ema, self.cfg.train.precision, self.ctx.device)
        record = self.evaluator(ema, self.cfg, self.step, batch_size=self.step_fn.micro, ctx=self.ctx)
        if self.ctx.rank != 0:
            return
        append_metrics(self.run_dir, record)
        self.tracker.log(record, self.step)
        self.log.info(f"step {self.step}: {evaluation_line(record)}")

    def _decode_latents(self, x: torch.Tensor) -> torch.Tensor | None:
        from .encoders import FrozenVAE

        if self.vae is None:
            # `fm train` has no --vae, and a resumed run's config (the path it recorded) comes before FM_VAE: --set works for both.
            hint = "to draw the grids, give the VAE with --set encoders.vae=PATH (FM_VAE is read by a fresh run only)"
            if not self.cfg.encoders.vae:
                self.log.info(f"sample grid skipped: latents need a VAE to decode; {hint}")
                return None
            try:
                self.vae = FrozenVAE(self.cfg.encoders.vae, self.ctx.device, self.cfg.encoders.vae_precision, remedy=hint)
            except UsageError as err:  # training needs no VAE (setup does not check one that is not there): it costs the grid, not the run
                self.log.info(f"sample grid skipped: {err}")
                return None
        return self.vae.decode(x)

    # ---------------------------------------------------------------------------------------- signals

    def _request_stop(self, signum, frame) -> None:
        if os.getpid() != self.pid or (self.stopped and not self.closing):  # a DataLoader worker (the main process stops the
            return  # run and its workers), or a stop already saved: a second Ctrl-C while the workers shut down has nothing to stop
        if self.stop_requested:  # a second Ctrl-C means: stop now; a SIGTERM again is the same stop (a scheduler that
            if signum == signal.SIGINT:  # signals every process of a job reaches the ranks, and torchrun forwards it too)
                raise KeyboardInterrupt
            return
        self.stop_requested = True
        name = signal.Signals(signum).name
        if self.closing:  # the loop is over: only the tracker's close (W&B's upload) is left
            self.log.info(f"{name}: the training loop is over; closing train.tracker (Ctrl-C again stops it now)")
        elif self.step >= self.cfg.train.steps:  # the last step is taken: its checkpoint (atomic), grid and evaluation are being made
            self.log.info(f"{name}: training is done; finishing the last checkpoint, grid and evaluation (Ctrl-C again stops now)")
        else:
            self.log.info(f"{name}: finishing this step, then saving a checkpoint")


def evaluation_line(record: dict) -> str:
    """An in-training evaluation record, as its log line says it."""
    if "fid" in record:
        return f"FID {record['fid']:.4f} ({record['fid_num_samples']} samples, {record['fid_features']})"
    accuracy = f", accuracy {record['accuracy']:.3f}" if "accuracy" in record else ""
    return (f"FD {record['fd']:.4f} (floor {record['fd_floor']:.4f}), precision {record['precision']:.3f}, "
            f"recall {record['recall']:.3f}, coverage {record['coverage']:.3f}{accuracy} ({record['eval_num_samples']} samples, {record['eval_features']} features)")
