"""`fm sample`, `fm reflow`, `fm export` and `fm class-grid`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..console import emit_json, stderr_console
from ..errors import UsageError
from ..fsutil import named_path, refuse_existing
from .app import app, log_line, torch_device
from .options import (
    Atol, BatchSize, Ckpt, Device, Ema, Force, Gpus, Json, Nproc, Rtol, SampleCompile, SamplePrecision, SamplingFlags, Seed, float_option,
    read_prompts, sampling_options, seed_option,
)  # fmt: skip


@app.command()
@sampling_options
def sample(
    ckpt: Ckpt,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-n", min=1, max=10**9, help="Number of images (default 16, or one per prompt).")] = None,
    class_label: Annotated[Optional[int], typer.Option("--class-label", help="Class index for every sample (default: cycle).")] = None,
    prompt: Annotated[List[str], typer.Option("--prompt", help="Text prompt (text models; repeatable: samples cycle through them).")] = [],
    prompts_file: Annotated[Optional[str], typer.Option("--prompts", help="File with one prompt per line, or - for stdin.")] = None,
    vae: Annotated[Optional[str], typer.Option("--vae", help="Local VAE directory (latent models; default: FM_VAE, then the run's).")] = None,
    text_encoder: Annotated[Optional[str], typer.Option("--text-encoder", help="Local text encoder directory (default: FM_TEXT_ENCODER, then the run's).")] = None,
    sampling: SamplingFlags = SamplingFlags(),  # the shared sampling options (see sampling_options)
    seed: Seed = 0,
    out: Annotated[Path, typer.Option("--out", help="Directory (one PNG per sample + grid.png) or FILE.png (grid only).")] = Path("samples"),
    gif: Annotated[Optional[Path], typer.Option("--gif", help="Also write a trajectory GIF (noise to image) of the grid.")] = None,
    gif_frames: Annotated[Optional[int], typer.Option("--gif-frames", min=2, help="Most frames in the --gif (default 16): the solver states nearest to evenly spaced times (fewer when the solver takes fewer steps).")] = None,
    grid: Annotated[Optional[int], typer.Option("--grid", min=1, help="Samples the grid (and GIF) shows, the first ones (default: all for --out FILE.png, the checkpoint's sample.grid_size for --out DIR).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing output files (grid, samples, GIF).")] = False,
    batch_size: BatchSize = 64,
    ema: Ema = True,
    device: Device = "auto",
    as_json: Json = False,
    gpus: Gpus = 0,
    nproc: Nproc = 0,
):
    """Generate images from a checkpoint.

    Examples:
      fm sample --ckpt runs/quickstart --num-samples 16 --out samples/
      fm sample --ckpt runs/cifar10/checkpoints/step-0100000.pt --cfg 4 --steps 100 --class-label 3 --out cat.png
      fm sample --ckpt runs/quickstart -n 16 --solver heun --steps 20 --out grid.png --gif trajectory.gif
      fm sample --ckpt runs/quickstart --solver dopri5 --rtol 1e-4 --atol 1e-4 --out grid.png --json
      fm sample --ckpt runs/quickstart --solver euler-sde --sde-noise 1 --steps 32 --out sde.png
      fm sample --ckpt runs/quickstart --cfg 2 --guide-ckpt runs/short --out auto.png   # guide: a shorter run of the same data
      fm sample --ckpt runs/quickstart-text --prompt "a red circle on a black background" -n 8 --out red.png
      echo "a blue star on a white background" | fm sample --ckpt runs/quickstart-text --prompts - --out star.png
    """

    from ..generate import sample_command, sample_outputs
    from ..launch import on_ranks

    _check_out(out)
    _check_gif(gif, gif_frames, gpus, nproc)
    overrides = sampling.overrides()
    piped = read_prompts(prompts_file)  # read stdin once, in the launching process
    texts = list(prompt) + piped
    n = num_samples or len(texts) or 16
    refuse_existing(sample_outputs(out, n, force) + [gif], force)  # before any work; every rank checks again
    work = functools.partial(
        sample_command, ckpt=ckpt, texts=texts, n=n, class_label=class_label, sample_overrides=overrides, seed=seed, out=out, gif=gif, gif_frames=gif_frames or 16,
        batch_size=batch_size, ema=ema, vae=vae, text_encoder=text_encoder, force=force, guide_ckpt=sampling.guide_ckpt, grid=grid, log=log_line,
    )  # fmt: skip
    summary = on_ranks(work, device=device, gpus=gpus, nproc=nproc, extra=_prompt_args(n, piped) if prompts_file == "-" else None)
    if summary is None:  # a launcher, or not rank 0
        return
    if as_json:
        emit_json(summary)
    else:
        print("\n".join(path for path in (summary["grid"], summary["gif"]) if path))


# Image suffixes that `--out` does not write a still grid in: such a name would otherwise become a folder.
NOT_A_GRID_SUFFIXES = (".gif", ".bmp", ".tif", ".tiff")


def _check_out(out: Path) -> None:
    if out.suffix.lower() in NOT_A_GRID_SUFFIXES:
        also = "; a trajectory GIF is --gif FILE.gif" if out.suffix.lower() == ".gif" else ""
        raise UsageError(f"--out {out}: the grid is written as .png, .jpg, .jpeg or .webp, or give a directory{also}")


def _check_gif(gif: Optional[Path], gif_frames: Optional[int], gpus: int, nproc: int) -> None:
    if gif is None and gif_frames is not None:
        raise UsageError("--gif-frames sets the frames of the trajectory GIF: add --gif FILE.gif, or drop --gif-frames")
    if gif is not None and gif.suffix.lower() != ".gif":
        raise UsageError(f"--gif expects a .gif file name, got {gif}")
    if gif is not None and (gpus > 1 or nproc > 1):
        raise UsageError("--gif is drawn by one process: drop --gpus/--nproc")


def _prompt_args(n: int | None, piped: list[str]) -> list[str]:
    """Stdin's prompts (read once, in the launcher) as arguments for the relaunched ranks, with the count they imply.
    Only stdin's: the ranks keep the command's own --prompt ones, which come first in their list as in the launcher's
    (passing those again made prompt i of the ranks another prompt than the launcher's)."""
    return (["--num-samples", str(n)] if n is not None else []) + [a for t in piped for a in ("--prompt", t)]


# ------------------------------------------------------------------------------------------- reflow


@app.command()
def reflow(
    *,
    ckpt: Annotated[str, typer.Option("--ckpt", help="Teacher: checkpoint file, run directory or export directory.")],
    num_pairs: Annotated[int, typer.Option("--num-pairs", "-n", min=1, max=10**9, help="Number of (noise, sample) pairs.")],
    out: Annotated[Path, typer.Option("--out", help="Output dataset directory (kind 'pairs', written atomically).")],
    solver: Annotated[Optional[str], typer.Option("--solver", help="Teacher ODE solver: heun, euler, midpoint, rk4, ab2 or dopri5 (euler-sde is refused: pairs need the ODE); default heun, meanflow for a mean-flow teacher.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, max=100_000, help="Solver steps (fixed-step solvers; default 50).")] = None,
    cfg_scale: Annotated[Optional[float], float_option("--cfg", min=0.0, help="Classifier-free guidance weight (default: the teacher's sample.cfg).")] = None,
    rtol: Rtol = None,
    atol: Atol = None,
    prompt: Annotated[List[str], typer.Option("--prompt", help="Text prompt (text teachers; repeatable: pair i takes prompt i mod P).")] = [],
    prompts_file: Annotated[Optional[str], typer.Option("--prompts", help="File with one prompt per line, or - for stdin.")] = None,
    seed: Annotated[int, seed_option("--seed", help="Seed, 0 to 2^32-1: pair i's noise depends only on (seed, i).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Pairs per solver batch (and per restartable chunk).")] = 256,
    precision: SamplePrecision = None,
    compile_model: SampleCompile = None,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the teacher's EMA weights (default) or the raw ones.")] = True,
    text_encoder: Annotated[Optional[str], typer.Option("--text-encoder", help="Local text encoder directory (text teachers).")] = None,
    device: Device = "auto",
    force: Force = False,
    as_json: Json = False,
    gpus: Gpus = 0,
    nproc: Nproc = 0,
):
    """Reflow pairs: noise x0 and the teacher's ODE sample x1 = ODE(x0), a dataset for flow.coupling = "pairs".

    An interrupted run continues when the same command is run again (finished chunks are kept in OUT.partial).

    Examples:
      fm reflow --ckpt runs/quickstart --num-pairs 4000 --out data/quickstart-pairs --solver heun --steps 50
      fm reflow --ckpt runs/cifar10 -n 50000 --solver dopri5 --cfg 1.5 --gpus 2 --out data/cifar10-pairs
      fm train --preset quickstart --data data/quickstart-pairs --set flow.coupling=pairs --set train.init_from=runs/quickstart --set flow.cond_dropout=0 --set sample.cfg=1 --set flow.time_sampler=uniform --set flow.shift=1
      (the student of guided pairs samples unguided; README, "Few-step generation", has the whole recipe)
    """

    from ..distributed import launched_externally
    from ..launch import on_ranks
    from ..reflow import check_teacher, reflow_command
    from ..solvers import MEAN_FLOW_SOLVERS

    piped = read_prompts(prompts_file)  # read stdin once, in the launching process
    texts = list(prompt) + piped
    out = named_path(out)  # `--out .`: the folder by its name, so that OUT.partial lies beside it, not inside
    flags = SamplingFlags(cfg_scale=cfg_scale, steps=steps, solver=solver, rtol=rtol, atol=atol, precision=precision, compile_model=compile_model)
    # The defaults: 50 steps for fixed-step solvers (dopri5 chooses its own: --steps is refused); heun, or a
    # mean-flow teacher's own jumps (no other solver fits it).
    overrides = flags.overrides(steps=50, solver=lambda base: base.solver if base.solver in MEAN_FLOW_SOLVERS else "heun",
                                guidance=functools.partial(_reflow_guidance, cfg_scale))
    if not launched_externally():  # the one-line refusals come before relaunching or solving anything
        check_teacher(ckpt, out, texts, force, overrides)
    work = functools.partial(
        reflow_command, ckpt=ckpt, out=out, texts=texts, sample_overrides=overrides, num_pairs=num_pairs, seed=seed, batch_size=batch_size, ema=ema,
        text_encoder=text_encoder, force=force, log=log_line,
    )  # fmt: skip
    summary = on_ranks(work, device=device, gpus=gpus, nproc=nproc, extra=_prompt_args(None, piped) if prompts_file == "-" else None)
    if summary is None:  # a launcher, or not rank 0
        return
    if as_json:
        emit_json(summary.row())
    else:
        stderr_console().print(f"{summary.count} pairs, {summary.nfe:g} NFE per pair (mean; most {summary.nfe_max}), {summary.seconds:.1f} s ({summary.chunks_reused} chunks reused)", highlight=False)
        print(summary.path)


def _reflow_guidance(cfg_scale: Optional[float], base) -> Optional[str]:
    """A teacher whose config samples with autoguidance (sample.guidance 'auto', of an older fm) needs a guide
    checkpoint, which `fm reflow` does not take: refused before anything is written, unless --cfg W is given, which
    guides the pairs with classifier-free guidance (what --cfg is here). Other guidances are the teacher's own (None)."""
    if base.guidance != "auto":
        return None
    if cfg_scale is None:
        raise UsageError(f"this teacher's config samples with autoguidance (sample.guidance='auto', cfg {base.cfg:g}), whose guide "
                         "checkpoint fm reflow does not take: pass --cfg W for classifier-free guided pairs (--cfg 1: unguided)")
    return "cfg"


# ------------------------------------------------------------------------------------------- export


@app.command()
def export(
    *,
    ckpt: Ckpt,
    out: Annotated[Path, typer.Option("--out", help="Output directory (written atomically).")],
    fmt: Annotated[str, typer.Option("--format", help="diffusers (class-conditional DiTs: a DiTTransformer2DModel directory) or fm (any model).")] = "diffusers",
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Export the EMA weights (default) or the raw ones.")] = True,
    force: Force = False,
    as_json: Json = False,
):
    """Export a checkpoint's weights as safetensors (never pickles), for diffusers or for fm.

    Examples:
      fm export --ckpt runs/quickstart --format diffusers --out exported/quickstart
      fm export --ckpt runs/quickstart-text --format fm --out exported/quickstart-text
      fm sample --ckpt exported/quickstart --out samples/
    """

    from ..export import export_checkpoint

    summary = export_checkpoint(ckpt, named_path(out), fmt, use_ema=ema, force=force)  # `--out .`: the folder by its name
    if as_json:
        emit_json(vars(summary))
    else:
        print(summary.path)



# --------------------------------------------------------------------------------------- class-grid


@app.command("class-grid")
@sampling_options
def class_grid(
    *,
    ckpt: Ckpt,
    samples_per_class: Annotated[int, typer.Option("--samples-per-class", min=1, help="Images per class (one row per class).")] = 8,
    out: Annotated[Path, typer.Option("--out", help="Output image, FILE.png.")],
    sampling: SamplingFlags = SamplingFlags(),  # the shared sampling options (see sampling_options)
    seed: Seed = 0,
    batch_size: BatchSize = 64,
    ema: Ema = True,
    device: Device = "auto",
    force: Force = False,
    as_json: Json = False,
):
    """One row of samples per class, labelled with the class names recorded at training time.

    Examples:
      fm class-grid --ckpt runs/quickstart --samples-per-class 8 --out classes.png
      fm class-grid --ckpt runs/cifar10 --samples-per-class 10 --cfg 3 --steps 50 --solver heun --out cifar.png
      fm class-grid --ckpt runs/quickstart --cfg 3 --guidance cfg-zero --solver ab2 --steps 8 --out zero.png
    """

    from ..generate import class_grid_command

    if out.suffix.lower() != ".png":
        raise UsageError(f"--out expects a .png file name, got {out}")
    refuse_existing(out, force)
    summary = class_grid_command(
        ckpt, out, per_class=samples_per_class, sample_overrides=sampling.overrides(), guide_ckpt=sampling.guide_ckpt, seed=seed,
        batch_size=batch_size, ema=ema, device=torch_device(device), log=log_line,
    )  # fmt: skip
    if as_json:
        emit_json(summary)
    else:
        print(summary["path"])
