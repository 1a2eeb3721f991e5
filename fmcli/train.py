"""The run: setup -> restore -> loop -> save, for a single process and for every DDP rank.

The step itself (randomness, coupling, loss, optimizer, EMA) is step.TrainingStep; the wall-clock budget
is budget.RunBudget; the checkpoint's contents are checkpoint.training_state. This module owns what happens
around them: data, the order of setup, logs, sample grids, evaluation, signals.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import distributed as D
from .budget import CHECKPOINTS, EVALUATION, SAMPLES, Probes, RunBudget, started_on_clock
from .checkpoint import load_checkpoint, restore_rng, save_checkpoint, training_state
from .config import Config, budget_fallback_config, config_to_dict, flip_warning, resolve, with_setting
from .console import RankLog
from .data.dataset import PreparedDataset, collate_batched, data_space
from .data.sampler import RankBatchSampler, batch_geometry, data_position
from .errors import RuntimeFailure, UsageError
from .fsutil import write_text_atomic
from .generate import SamplingNet, initial_noise, sample_batch
from .images import save_grid
from .runlog import append_metrics, environment_info, memory_mib, step_name, write_run_files
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
    the choice, its reason, the probe's numbers) and Muon's Newton-Schulz dtype, for env.json and the checkpoint."""

    precision: object  # hardware.PrecisionChoice
    compile: object  # hardware.CompileChoice; `fell_back` once compiling failed at the first call
    muon_ns_dtype: str | None

    @classmethod
    def resolve(cls, cfg: Config, shape: tuple[int, ...], ctx: D.DistContext, log) -> HardwareRecord:
        """train.precision / train.compile "auto" -> what this machine does well; rank 0 decides for every rank.

        The resolved precision replaces "auto" in the config (config.json, checkpoint), so a resumed run keeps
        it on any machine; the decision, its reason and the probe's numbers go to env.json and the checkpoint.
        """
        from .hardware import choice_lines, resolve_hardware

        decision = resolve_hardware(cfg, ctx.device, shape) if ctx.rank == 0 else None
        precision, compile_choice, ns_dtype = D.all_gather_objects(decision, ctx)[0]
        for line in choice_lines(precision, compile_choice):
            log.info(line)
        return cls(precision, compile_choice, ns_dtype)

    def record(self, budget: dict | None) -> dict:
        """`hardware` of env.json and the checkpoint, with the budget's record (RunBudget.record)."""
        return {"precision": self.precision.record(), "compile": self.compile.record(), "muon_ns_dtype": self.muon_ns_dtype, "budget": budget}


def train(cfg: Config, run_dir: Path, *, resume_from: Path | None = None, stop_at_step: int | None = None, log=None, started_at: float | None = None) -> TrainResult:
    """Train (or resume) into `run_dir`. `stop_at_step` checkpoints and returns early at that step;
    `started_at` (time.time()) is when the command began, for train.budget_minutes (default: now)."""
    started = started_on_clock(started_at)  # the budget counts data preparation, setup and compiling
    ctx = D.setup(cfg.train.device)
    log = log or RankLog(ctx.rank == 0)
    try:
        result = Trainer(cfg, Path(run_dir), ctx, log, started, resume_from).run(stop_at_step)
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


def make_evaluator(cfg: Config, dataset: PreparedDataset, ctx: D.DistContext, log):
    """The evaluator: the feature extractor on every rank (generation is sharded), reference features
    computed once on rank 0. FID (inception/tiny) against eval.ref, or the fidelity metrics (domain/dinov2)
    against eval.ref or the training data."""
    if not cfg.eval.every:
        return None
    fidelity = cfg.eval.features in ("domain", "dinov2")
    # Presets schedule evaluation (eval.every) but only the user knows the reference data: without one,
    # say so once and train on.
    if cfg.eval.ref is None and not fidelity:
        log.info(f"note: eval.every={cfg.eval.every} but eval.ref is unset, so no FID during training (--set eval.ref=DATA|STATS.npz, or eval.features=domain)")
        return None
    from .evaluate import refuse_training_eval

    refuse_training_eval(cfg, data_space(dataset.manifest))  # before any step, not at the first evaluation
    if fidelity:
        from .fidelity import TrainingFidelity

        return TrainingFidelity(cfg, cfg.data.path, ctx.device, log=log.info, with_reference=ctx.rank == 0)
    from .evaluate import TrainingEvaluator

    manifest = {**dataset.manifest, "kind": "pixels"}  # reflow pairs of a pixel model: samples are pixels
    return TrainingEvaluator(cfg, manifest, ctx.device, log=log.info, with_reference=ctx.rank == 0)


def micro_setting(cfg: Config, run_dir: Path, ctx: D.DistContext, log, ns_dtype: str | None):
    """train.micro_batch_size, with "auto" answered by the autotune cache in the run directory (DDP
    ranks never tune: the launcher did, single-process, before starting them)."""
    if cfg.train.micro_batch_size != "auto":
        return cfg.train.micro_batch_size
    from .autotune import auto_micro_batch

    return auto_micro_batch(cfg, run_dir, ctx.device, ctx.world_size, log=log.info, ns_dtype=ns_dtype)


def make_loader(dataset: PreparedDataset, cfg: Config, step_fn: TrainingStep, ctx: D.DistContext, position: tuple[int, int]) -> DataLoader:
    """This rank's micro-batches from data position (epoch, index in it) on (data/sampler.py)."""
    epoch, index = position
    sampler = RankBatchSampler(len(dataset), cfg.train.global_batch_size, step_fn.micro, step_fn.accum, ctx, cfg.train.seed, epoch, index)
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_batched,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
    )


class Trainer:
    """One run on one rank. Setup is __init__: a bad setting fails before any work, then the checkpoint is
    restored (or train.init_from loaded), the step compiled and a fresh run's budget fitted, its fallback
    chosen; nothing is written before `run`, which loops and saves."""

    def __init__(self, cfg: Config, run_dir: Path, ctx: D.DistContext, log, started: float, resume_from: Path | None = None):
        self.run_dir, self.ctx, self.log, self.resume_from = run_dir, ctx, log, resume_from
        self.dataset = PreparedDataset(cfg.data.path, text=cfg.model.cross_attention)
        # What the config decides (built again, once, where train.budget_fallback applies): the text
        # conditioning, the hardware choice, the evaluator, and the step, whose config is the one trained.
        self.text, self.hardware, self.evaluator, self.step_fn = self._build(cfg)
        self.step = 0  # optimizer steps taken
        self.batches = 0  # global batches drawn; equals `step` unless non-finite steps were skipped
        self.stop_requested = False
        self.tracker = NullTracker()  # train.tracker (W&B / TensorBoard), rank 0, opened in run()
        self.vae = None  # loaded when a latent sample grid is first decoded
        self.ot_window: list[tuple[float, float]] = []  # (cost before, after) per coupled micro-batch, rank 0
        self.budget = RunBudget(cfg.train.budget_minutes, started, ctx, log)
        self._load_weights()
        if self.step < self.steps:
            self._start(cfg)

    @property
    def cfg(self) -> Config:
        """The config trained (the step's: its train.steps is the budget's latest fit)."""
        return self.step_fn.cfg

    @property
    def steps(self) -> int:
        return self.step_fn.total_steps

    # The run reads top to bottom: steps, checkpoints, samples, evaluation.
    def run(self, stop_at_step: int | None) -> TrainResult:
        result = TrainResult(run_dir=self.run_dir, step=self.step)
        if self.step >= self.steps:
            self.log.info(f"the run is already at step {self.step} of train.steps={self.steps}; extend it with --set train.steps=N")
            result.checkpoint = self.resume_from
            return result
        if self.ctx.rank == 0:
            self.tracker = make_tracker(self.cfg.train.tracker, self.run_dir, config=config_to_dict(self.cfg))
        if self.resume_from is None and self.ctx.rank == 0:
            env = {**environment_info(self.ctx.device, self.ctx.world_size), "hardware": self.hardware.record(self.budget.record())}
            write_run_files(self.run_dir, config_to_dict(self.cfg), env)
        D.barrier(self.ctx)
        old_handlers = install_signal_handlers(self._request_stop)
        progress = self.log.progress(self.steps, self.step)
        loader = make_loader(self.dataset, self.cfg, self.step_fn, self.ctx, self.data_position)
        try:
            self._loop(iter(loader), stop_at_step, result, progress)
        finally:
            progress(None, None)
            self.tracker.close()
            restore_signal_handlers(old_handlers)
            del loader
        result.step = self.step
        return result

    def _loop(self, batches, stop_at_step: int | None, result: TrainResult, progress) -> None:
        cfg = self.cfg.train
        window, window_start, nan_skips, done = [], time.perf_counter(), 0, self.step >= self.steps
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
            if self.ctx.rank == 0:
                self.ot_window += out.ot_costs
            progress(self.step, out.loss)
            done = self.step >= self.steps
            if self.step % cfg.log_every == 0 or done:
                self._log_metrics(window, out, time.perf_counter() - window_start)
                window, window_start = [], time.perf_counter()
                if not done and (fitted := self.budget.at_log_interval(self.step, self.steps)) is not None:
                    self.step_fn.set_total_steps(fitted, at_step=self.step)
                    progress(self.step, out.loss, fitted)
                    done = self.step >= fitted
            # A requested stop checkpoints before anything slow (samples, FID): under a launcher the
            # workers get only a grace period after the signal before they are killed.
            stop = D.any_rank(self.stop_requested, self.ctx) or self.step == stop_at_step
            if stop or done or self._every(cfg.checkpoint_every):
                result.checkpoint = self.budget.timed(CHECKPOINTS, self._save_checkpoint)
            if stop and not done:
                result.stopped_early = True
                self.log.info(f"stopped at step {self.step}; continue with: fm resume {self.run_dir}")
                return
            if self._every(cfg.sample_every) or done:
                self.budget.timed(SAMPLES, self._save_samples)
            if self._every(self.cfg.eval.every):
                self.budget.timed(EVALUATION, self._evaluate)

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

    def _build(self, cfg: Config):
        """(text conditioning, HardwareRecord, evaluator, TrainingStep) for `cfg` as given: resolved against
        the data and this machine (train.precision / train.compile "auto" -> what runs here)."""
        from .hardware import check_precision

        cfg, text = resolve_for_training(cfg, self.dataset, self.ctx.device)
        check_coupling_data(cfg, self.dataset)
        check_precision(cfg.train.precision, self.ctx.device, "train.precision")  # every rank, before rank 0 resolves "auto"
        hardware = HardwareRecord.resolve(cfg, tuple(self.dataset.manifest["shape"]), self.ctx, self.log)
        cfg = with_setting(cfg, "train.precision", hardware.precision.precision)  # validated before config.json sees it
        check_precision(cfg.train.precision, self.ctx.device, "train.precision")  # an "auto" that resolved to fp16 on a CPU
        evaluator = make_evaluator(cfg, self.dataset, self.ctx, self.log)  # before any step: a bad eval.ref fails now
        if (warning := flip_warning(cfg)) and self.ctx.rank == 0:
            self.log.info(warning)
        micro, accum = batch_geometry(cfg.train.global_batch_size, micro_setting(cfg, self.run_dir, self.ctx, self.log, hardware.muon_ns_dtype), self.ctx.world_size)
        if cfg.train.global_batch_size > len(self.dataset):
            raise UsageError(f"train.global_batch_size {cfg.train.global_batch_size} exceeds the dataset size {len(self.dataset)}")
        shape = tuple(self.dataset.manifest["shape"])
        step_fn = TrainingStep(cfg, self.ctx, micro=micro, accum=accum, shape=shape, text=text, ns_dtype=hardware.muon_ns_dtype)
        return text, hardware, evaluator, step_fn

    def _load_weights(self) -> None:
        """The checkpoint to resume, or train.init_from's weights (a resumed run's checkpoint already holds them)."""
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif self.cfg.train.init_from:
            init_weights(self.step_fn, self.cfg.train.init_from)
            self.log.info(f"initialised from {self.cfg.train.init_from}")
        self.hardware.muon_ns_dtype = self.step_fn.optimizer.muon_ns_dtype  # a resumed run keeps its saved one

    def _start(self, cfg: Config) -> None:
        """Compile the step; a fresh run then fits train.budget_minutes (RunBudget.start). Where the budget
        fits too few steps for the recipe, train.budget_fallback's config builds the step again (nothing is
        written yet), whose own step time the budget measures and fits. A resume continues its checkpoint's
        schedule: it never re-measures, refits or falls back."""
        example = self._wrap_step()
        if self.resume_from is not None:
            return
        steps = self.budget.start(self.cfg, self._probes(example))
        if steps is None:
            self.text, self.hardware, self.evaluator, self.step_fn = self._build(budget_fallback_config(cfg))
            self._load_weights()
            steps = self.budget.start(self.cfg, self._probes(self._wrap_step()))
        if steps != self.steps:
            self.step_fn.set_total_steps(steps, at_step=self.step)

    def _wrap_step(self) -> dict:
        """DDP + torch.compile, proven on one forward/backward of a first micro-batch (eager after one warning
        if compiling fails); returns that micro-batch."""
        example = collate_batched(self.dataset.__getitems__(list(range(self.step_fn.micro))))
        choice = self.hardware.compile
        compiled = self.step_fn.wrap(choice.compile, example, log=self.log.info)
        if choice.compile and not compiled:
            choice.compile, choice.fell_back = False, True
        return example

    def _probes(self, example: dict) -> Probes:
        """What the budget times before its first fit: a step, a checkpoint's state, a grid, the evaluator's features."""
        features = None
        if self.evaluator is not None:
            from .evaluate import to_rgb
            from .images import to_uint8

            extractor = self.evaluator.extractor
            features = lambda images: extractor(to_rgb(torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()))  # noqa: E731
        return Probes(self.step_fn, example, self._state, self._grid, features)

    # ------------------------------------------------------------------------------------------ data

    @property
    def data_position(self) -> tuple[int, int]:
        return data_position(self.batches, len(self.dataset), self.cfg.train.global_batch_size)

    # ----------------------------------------------------------------------------------- checkpoints

    def _state(self) -> dict:
        """The checkpoint's contents (checkpoint.training_state); collective: every rank calls it."""
        hardware = self.hardware.record(self.budget.record())  # how precision / compile were resolved, the probe, the budget
        return training_state(self.step_fn.state_dict(), step=self.step, batches=self.batches, position=self.data_position, ctx=self.ctx,
                              config=config_to_dict(self.cfg), data_info=_data_info(self.dataset.manifest), hardware=hardware)

    def _save_checkpoint(self) -> Path:
        state = self._state()  # collective (RNG gather): every rank takes part
        path = self.run_dir / "checkpoints" / step_name(self.step, ".pt")
        D.barrier(self.ctx)
        if self.ctx.rank == 0:
            cfg = self.cfg.train
            path = save_checkpoint(state, self.run_dir / "checkpoints", self.step, cfg.keep_last, cfg.keep_every, log=self.log.info)
            self.log.info(f"checkpoint: {path}")
        D.barrier(self.ctx)
        return path

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.ctx.device)  # every rank loads it itself
        self.step_fn.load_state_dict(state)
        self.budget.restore((state.get("hardware") or {}).get("budget"))  # the fitted steps are in the config
        self.step = int(state["step"])
        self.batches = int(state["data_position"]["batches"])
        saved = (state["data_position"]["epoch"], state["data_position"]["index"])
        if saved != self.data_position:
            raise RuntimeFailure(f"{path}: data position {saved} does not match this dataset; was it re-prepared with another size?")
        restore_rng(state, self.ctx)
        self.log.info(f"resumed from {path} at step {self.step}")

    # ---------------------------------------------------------------------------------------- outputs

    @property
    def ema_net(self) -> SamplingNet:
        """The EMA as grids and evaluation sample it: at the run's precision, eager (a grid is too small to repay compiling)."""
        return SamplingNet(self.step_fn.ema, self.cfg.train.precision, self.ctx.device)

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
        if self.ctx.rank != 0:
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
        record = self.evaluator(self.ema_net, self.step, batch_size=self.step_fn.micro, ctx=self.ctx)
        if self.ctx.rank != 0:
            return
        append_metrics(self.run_dir, record)
        self.tracker.log(record, self.step)
        self.log.info(f"step {self.step}: {evaluation_line(record)}")

    def _decode_latents(self, x: torch.Tensor) -> torch.Tensor | None:
        from .encoders import FrozenVAE

        if self.vae is None:
            if not self.cfg.encoders.vae:
                self.log.info("sample grid skipped: latents need a VAE to decode (set encoders.vae or FM_VAE)")
                return None
            self.vae = FrozenVAE(self.cfg.encoders.vae, self.ctx.device, self.cfg.encoders.vae_precision)
        return self.vae.decode(x)

    # ---------------------------------------------------------------------------------------- signals

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C means: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        self.log.info(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint")


def install_signal_handlers(handler) -> dict:
    """SIGINT and SIGTERM call `handler` (in the main thread); returns the handlers they replaced."""
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    return old


def restore_signal_handlers(old: dict) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)


def evaluation_line(record: dict) -> str:
    """An in-training evaluation record, as its log line says it."""
    if "fid" in record:
        return f"FID {record['fid']:.4f} ({record['fid_num_samples']} samples, {record['fid_features']})"
    accuracy = f", accuracy {record['accuracy']:.3f}" if "accuracy" in record else ""
    return (f"FD {record['fd']:.4f} (floor {record['fd_floor']:.4f}), precision {record['precision']:.3f}, "
            f"recall {record['recall']:.3f}, coverage {record['coverage']:.3f}{accuracy} ({record['eval_num_samples']} samples, {record['eval_features']} features)")


def _injected_failure(ctx: D.DistContext, step: int) -> None:
    """Test hook: FM_TEST_FAIL_RANK=r [FM_TEST_FAIL_STEP=s] makes rank r fail at step s (checks no-hang exits)."""
    rank = os.environ.get("FM_TEST_FAIL_RANK")
    if rank is not None and int(rank) == ctx.rank and step == int(os.environ.get("FM_TEST_FAIL_STEP", "1")):
        raise RuntimeFailure(f"injected failure on rank {ctx.rank} at step {step}")


def _data_info(manifest: dict) -> dict:
    """What sampling needs to know about the training data; a student of reflow pairs samples its teacher's kind."""
    keys = ("kind", "shape", "num_classes", "class_names", "source", "image_size", "vae", "text_encoder")
    return {**{k: manifest.get(k) for k in keys}, "kind": data_space(manifest)}
