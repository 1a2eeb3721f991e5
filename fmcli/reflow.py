"""`fm reflow`: (noise, teacher sample) pairs for rectified-flow reflow (Liu et al. 2022, "Flow Straight and Fast").

Pair i is x0_i = noise from (seed, i) in reflow's own stream and x1_i = the teacher's ODE solution from x0_i
(with its class i mod K, or prompt i mod P, and CFG). Training a student on the stored pairs
(`flow.coupling = "pairs"`) straightens the flow: 1-RF -> 2-RF.

Work is cut into chunks of `batch_size` consecutive indices; rank r of W solves chunks r, r + W, ... and
saves each as DIR.partial/part-NNNNNNN.npz (atomically), so an interrupted run restarted with the same
settings (the resolved network precision and compile among them) solves only the missing chunks. Rank 0
then streams the parts, in index order, into a prepared dataset of kind "pairs" (docs/architecture.md section 5)
written as .DIR.tmp-* and renamed. Fixed-step solvers give each
pair independently of the chunking; dopri5 picks its steps per chunk, so there the pairs depend on the batch
size (within rtol/atol) but still not on the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed as D
from .data.dataset import PreparedWriter, refuse_unreplaceable
from .fsutil import atomic_write, refuse_existing, write_text_atomic
from .errors import UsageError
from .generate import class_conditions, nfe_record, sample_batch, sampling_record, settings_record
from .solvers import SDE_SOLVERS, SOLVERS, check_solver_for_model
from .seeding import STREAMS, normal

PLAN_FILE = "plan.json"


@dataclass
class ReflowPlan:
    """Everything that determines the pairs; a restart must find the same plan in DIR.partial."""

    checkpoint: str
    step: int
    ema: bool
    num_pairs: int
    seed: int
    solver: str
    steps: int
    cfg: float
    rtol: float
    atol: float
    shift: float
    chunk: int
    prompts_sha256: str | None
    precision: str  # the teacher's network precision (sample.precision resolved): bf16 pairs differ slightly from fp32 ones
    compile: bool  # compiled or eager (also changes the pairs' last bits)
    text_encoder: str | None = None  # a text teacher's encoder (its folder): another one encodes the prompts otherwise


# Plan fields an interrupted run of an older fm lacks in its plan.json: compared only where it has them.
LATER_PLAN_FIELDS = ("text_encoder",)


@dataclass
class ReflowSummary:
    path: str
    count: int
    chunks_solved: int  # by this invocation, all ranks
    chunks_reused: int  # found complete in DIR.partial from an earlier, interrupted invocation
    nfe: float  # network evaluations per pair, the mean over all pairs (a CFG pair of passes counts once): generate.nfe_fields
    nfe_max: int  # the most any pair took (dopri5 chooses its steps per chunk, so its chunks differ)
    seconds: float
    settings: dict  # what ran (`settings_record`, seed, precision, compile), as every sampling command's --json row has it

    def row(self) -> dict:
        """The `--json` row: the summary with its settings inline."""
        row = asdict(self)
        settings = row.pop("settings")  # popped first: `{**row, **row.pop(...)}` unpacks row before the pop
        return {**row, **settings}


def reflow_noise(seed: int, indices, shape: tuple[int, ...]) -> torch.Tensor:
    """[len(indices), *shape] standard normal; row k depends only on (seed, indices[k])."""
    return torch.stack([normal(tuple(shape), STREAMS["reflow_noise"], seed, int(i)) for i in indices])


def rank_share(num_pairs: int, batch_size: int, ctx: D.DistContext) -> int:
    """How many pairs this rank solves (its chunks r, r + W, ...)."""
    n_chunks = math.ceil(num_pairs / batch_size)
    return sum(min(batch_size, num_pairs - c * batch_size) for c in range(ctx.rank, n_chunks, ctx.world_size))


def check_teacher(ckpt: str, out: Path, prompts: list[str] | None, force: bool, sample_overrides) -> None:
    """In the launching process: the teacher's config (not its encoders) against the inputs, and the sampling options."""
    from .checkpoint import resolve_checkpoint
    from .config import validate_config, with_sampling_shift
    from .generate import load_weights

    path = resolve_checkpoint(ckpt)
    cfg = with_sampling_shift(validate_config(load_weights(path)["config"], source=str(path)))
    check_solver(sample_overrides(cfg.sample), cfg.model.end_time)
    check_inputs(cfg, out, prompts, force)
    read_work_plan(work_dir(out))  # here, before any rank starts; rank 0 reads it again when it opens the folder


def check_solver(sample_cfg, mean_flow: bool) -> None:
    """Reflow pairs are an ODE coupling: x1 must be a deterministic function of x0. A stochastic solver's
    pairs are neither that nor independent (and the student would learn a blurred map), so it is refused.
    And the solver must fit the teacher (sampling would refuse it only after DIR.partial/plan.json is written,
    which would then block the corrected command as "other settings")."""
    if sample_cfg.solver in SDE_SOLVERS:
        odes = ", ".join(s for s in SOLVERS if s not in SDE_SOLVERS)
        raise UsageError(f"--solver {sample_cfg.solver} is stochastic; reflow pairs need the teacher's ODE: use one of {odes}")
    try:
        check_solver_for_model(sample_cfg.solver, sample_cfg.guidance, mean_flow)
    except ValueError as err:
        raise UsageError(str(err)) from None


def check_inputs(loaded_config, out: Path, prompts: list[str] | None, force: bool) -> None:
    """The one-line refusals, before any work or any file: existing --out, text model without prompts."""
    refuse_unreplaceable(out)  # first: "pass --force" is advice only for what --force may replace
    refuse_existing(out, force, folders=True)  # also OUT's folder writable: OUT.partial and OUT go there
    text = loaded_config.model.cross_attention
    if text and not prompts:
        raise UsageError("this teacher is a text-to-image model: reflow needs prompts (--prompt TEXT, repeatable, or --prompts FILE|-)")
    if prompts and not text:
        raise UsageError("--prompt/--prompts given but this teacher is not text-conditioned")


def work_dir(out: Path) -> Path:
    """OUT.partial: the finished chunks of an interrupted run."""
    return out.parent / f"{out.name}.partial"


def read_work_plan(work: Path) -> dict | None:
    """The plan of an interrupted reflow in `work` (DIR.partial), None where there is none to continue (no
    folder, or an empty one). Anything else is not fm's to take over, and never deleted: a folder of other
    files, or a plan.json that is not a plan, is a one-line refusal."""
    if not work.exists():
        return None
    if not work.is_dir():
        raise UsageError(f"{work} exists and is not a folder of an interrupted reflow; move or delete it")
    plan_file = work / PLAN_FILE
    if not plan_file.exists():
        if any(work.iterdir()):
            raise UsageError(f"{work} holds files but no {PLAN_FILE}, so it is not an interrupted reflow; move or delete it")
        return None
    try:
        plan = json.loads(plan_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{plan_file} is damaged ({type(err).__name__}); delete {work} to start the reflow over") from None
    if not isinstance(plan, dict):
        raise UsageError(f"{plan_file} is not a reflow plan; delete {work} to start the reflow over")
    return plan


def reflow_command(ctx: D.DistContext, *, ckpt: str, out: Path, texts: list[str], sample_overrides, num_pairs: int, seed: int, batch_size: int,
                   ema: bool, text_encoder: str | None, force: bool, log=lambda message: None) -> ReflowSummary | None:
    """What `fm reflow` does on one rank: load the teacher, solve this rank's chunks (a progress bar on rank 0);
    rank 0 assembles the dataset and returns the summary."""
    from .console import progress, stderr_console
    from .generate import guidance_that_runs, load_for_sampling, prepare_for_sampling

    loaded = load_for_sampling(ckpt, ctx.device, use_ema=ema, text_encoder=text_encoder, with_vae=False)
    # An unconditional teacher samples unguided whatever its cfg: the plan and the manifest record cfg 1, what ran.
    sample_cfg = guidance_that_runs(loaded, sample_overrides(loaded.config.sample), log if ctx.rank == 0 else None)
    loaded = prepare_for_sampling(loaded, sample_cfg, ctx.device, log, ctx)
    with progress(stderr_console(), "reflow", rank_share(num_pairs, batch_size, ctx)) as advance:
        return generate_pairs(
            loaded, out, num_pairs=num_pairs, seed=seed, sample_cfg=sample_cfg, batch_size=batch_size, ctx=ctx,
            checkpoint=ckpt, ema=loaded.ema, prompts=texts or None, force=force, on_chunk=advance if ctx.rank == 0 else None,
        )


def generate_pairs(
    loaded,
    out: str | Path,
    *,
    num_pairs: int,
    seed: int,
    sample_cfg,
    batch_size: int,
    ctx: D.DistContext,
    checkpoint: str,
    ema: bool = True,
    prompts: list[str] | None = None,
    force: bool = False,
    on_chunk=None,
) -> ReflowSummary | None:
    """Solve this rank's missing chunks, then (rank 0) assemble the dataset. Returns the summary on rank 0."""
    out = Path(out)
    check_solver(sample_cfg, loaded.config.model.end_time)
    check_inputs(loaded.config, out, prompts, force)
    start = time.perf_counter()
    plan = ReflowPlan(
        checkpoint=str(Path(checkpoint).resolve()), step=loaded.step, ema=ema, num_pairs=num_pairs, seed=seed, solver=sample_cfg.solver,
        steps=sample_cfg.steps, cfg=sample_cfg.cfg, rtol=sample_cfg.rtol, atol=sample_cfg.atol, shift=sample_cfg.shift or 1.0,
        chunk=batch_size, prompts_sha256=hashlib.sha256("\n".join(prompts).encode()).hexdigest() if prompts else None,
        **sampling_record(loaded), text_encoder=_text_encoder_of(loaded),
    )
    work = work_dir(out)
    if ctx.rank == 0:
        _open_work_dir(work, plan)
    D.barrier(ctx)

    n_chunks = math.ceil(num_pairs / batch_size)
    solved = reused = 0
    for c in range(ctx.rank, n_chunks, ctx.world_size):
        part = work / f"part-{c:07d}.npz"
        indices = list(range(c * batch_size, min(num_pairs, (c + 1) * batch_size)))
        if part.is_file():
            reused += 1
            if on_chunk is not None:  # the bar counts every pair of this rank's share (rank_share), found or solved
                on_chunk(len(indices))
            continue
        x0, x1, y, nfe = _solve_chunk(loaded, indices, seed, sample_cfg, ctx.device, prompts)
        _save_part(part, x0=x0.numpy(), x1=x1.numpy(), nfe=np.asarray(nfe), **({"y": y.numpy()} if y is not None else {}))
        solved += 1
        if on_chunk is not None:
            on_chunk(len(indices))
    counts = D.all_gather_objects((solved, reused), ctx)
    D.barrier(ctx)
    if ctx.rank != 0:
        return None
    # What ran, as every sampling command records it (steps null for dopri5, the guidance and its interval); the
    # plan's own fields stay as they were, so that an interrupted run of an older fm still matches its plan.json.
    settings = {**settings_record(sample_cfg), "seed": seed, **sampling_record(loaded)}
    path, nfe = _assemble(work, out, loaded, plan, n_chunks, prompts, force, settings)
    shutil.rmtree(work, ignore_errors=True)
    return ReflowSummary(
        path=str(path), count=num_pairs, chunks_solved=sum(s for s, _ in counts), chunks_reused=sum(r for _, r in counts),
        **nfe, seconds=round(time.perf_counter() - start, 3), settings=settings,
    )


def _solve_chunk(loaded, indices, seed, sample_cfg, device, prompts):
    x0 = reflow_noise(seed, indices, loaded.shape)
    conditions, y = None, None
    if loaded.is_text:
        conditions = loaded.text.conditions([prompts[i % len(prompts)] for i in indices], device)
    elif loaded.num_classes:
        y = torch.tensor([i % loaded.num_classes for i in indices])
        conditions = class_conditions(y.to(device), loaded.model.null_class)
    result = sample_batch(loaded.model, x0.to(device), None, sample_cfg, conditions=conditions or ({}, None), seed=seed, indices=indices)
    return x0, result.x.float().cpu(), y, result.nfe


def _text_encoder_of(loaded) -> str | None:
    """The text encoder a text teacher's prompts are encoded with (its folder, absolute; None without text)."""
    if not loaded.is_text:
        return None
    path = Path(loaded.text.encoder.path)
    return str(path.resolve()) if path.exists() else str(path)  # the built-in tiny encoder is a name


def _open_work_dir(work: Path, plan: ReflowPlan) -> None:
    """Create DIR.partial with the plan, or check that an existing one (an interrupted run) has the same plan."""
    plan_file = work / PLAN_FILE
    before = read_work_plan(work)
    if before is not None:
        differ = sorted(k for k, v in asdict(plan).items() if before.get(k, v if k in LATER_PLAN_FIELDS else None) != v)
        if differ:
            which = "--precision / --compile for the network's" + (", --text-encoder or FM_TEXT_ENCODER for the prompts'" if "text_encoder" in differ else "")
            raise UsageError(
                f"{work} holds an interrupted reflow with other settings ({', '.join(differ)}); "
                f"rerun with the same options to continue it ({which}), or delete {work}"
            )
        return
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan_file, json.dumps(asdict(plan), indent=2) + "\n")


def _save_part(path: Path, **arrays) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def _assemble(work: Path, out: Path, loaded, plan: ReflowPlan, n_chunks: int, prompts, force: bool, settings: dict) -> tuple[Path, dict]:
    """Stream the parts in index order into the pairs dataset, whose manifest's `teacher` is the plan with the
    `settings` that ran over it; returns (its path, `nfe_record` of the chunks: `nfe` the mean per pair, `nfe_max`
    the most, as every sampling command reports them)."""
    labelled = bool(loaded.num_classes) and not loaded.is_text
    shape = tuple(loaded.shape)
    nfes = []  # (NFE, pairs) of every chunk
    writer = PreparedWriter(
        out, plan.num_pairs, shape, dtype="float32", kind="pairs", labels=labelled, captions=loaded.is_text, force=force,
        x_name="x1", extras={"x0": (shape, "float32")},
    )
    with writer:
        for c in range(n_chunks):
            part = work / f"part-{c:07d}.npz"
            if not part.is_file():
                raise UsageError(f"{part} is missing: a rank did not finish; rerun the same command to complete it")
            with np.load(part, allow_pickle=False) as z:
                first = c * plan.chunk
                captions = [prompts[i % len(prompts)] for i in range(first, first + len(z["x1"]))] if loaded.is_text else None
                writer.add_batch(z["x1"], z["y"] if labelled else None, captions, x0=z["x0"])
                nfes.append((int(z["nfe"]), len(z["x1"])))
        info = loaded.info
        path = writer.finish(
            num_classes=0 if loaded.is_text else loaded.num_classes,
            class_names=info.get("class_names"),
            source="reflow",
            space=info.get("kind", "pixels"),  # what x1 holds: pixels in [-1, 1] (float) or VAE latents
            vae=info.get("vae"),
            # The encoder that encoded the prompts (--text-encoder, FM_TEXT_ENCODER or the run's), by its absolute path: the
            # teacher's own record may name one that has moved, and its `cached` states are not in the pairs (captions are).
            text_encoder={**loaded.text.encoder.info(), "cached": False} if loaded.is_text else None,
            teacher={**asdict(plan), **settings, **nfe_record(nfes)},
        )
    return path, nfe_record(nfes)
