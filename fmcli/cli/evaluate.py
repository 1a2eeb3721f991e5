"""`fm fid` and `fm eval`: their flags checked here, the work done by fmcli.evaluate and fmcli.fidelity."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..console import emit_json, stderr_console
from ..errors import UsageError
from ..fsutil import refuse_existing
from .app import app, log_line, torch_device
from .options import (
    Atol, Device, EmaIfGiven, Gpus, GuideCkpt, Guidance, Json, Nproc, Rtol, SampleCompile, SamplePrecision, SamplingFlags, SeedIfGiven, Solver, Steps,
    parse_floats, parse_interval, parse_nfe, refuse_repeats, sampling_options, seed_option,
)  # fmt: skip


@app.command()
@sampling_options
def fid(
    *,
    ref: Annotated[Path, typer.Option("--ref", help="Reference: prepared dataset directory, image folder, or statistics .npz.")],
    gen: Annotated[Optional[Path], typer.Option("--gen", help="Folder of generated images to score.")] = None,
    ckpt: Annotated[Optional[str], typer.Option("--ckpt", help="Checkpoint (or run directory) to sample from and score.")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-n", min=2, max=10**9, help="Samples to generate with --ckpt.")] = None,
    save_stats: Annotated[Optional[Path], typer.Option("--save-stats", help="Write the reference statistics to FILE.npz.")] = None,
    features: Annotated[str, typer.Option("--features", help="inception (default), tiny, or module:factory; only inception is comparable to published FID.")] = "inception",
    inception: Annotated[Optional[str], typer.Option("--inception", help="Path to inception-2015-12-05.pt (default: $FM_INCEPTION).")] = None,
    inception_unverified: Annotated[bool, typer.Option("--inception-unverified", help="Use an Inception file whose sha256 differs from the reference (FID not comparable).")] = False,
    sampling: SamplingFlags = SamplingFlags(),  # the shared sampling options (see sampling_options)
    seed: SeedIfGiven = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch (generation and features).")] = 64,
    ema: EmaIfGiven = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also save the generated samples as PNGs here.")] = None,
    kid: Annotated[bool, typer.Option("--kid", help="Also report KID (clean-fid's kernel distance).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --save-stats file or --out samples.")] = False,
    device: Device = "auto",
    as_json: Json = False,
    gpus: Gpus = 0,
    nproc: Nproc = 0,
    nfe: Annotated[Optional[str], typer.Option("--nfe", help="Sweep NFE budgets, e.g. 1,2,4,8,16,32: one row each (the solver's steps per budget; --json: a list).")] = None,
):
    """FID (clean-fid, "clean" mode) of generated samples against reference data.

    Examples:
      fm fid --ref data/cifar10 --save-stats stats/cifar10-train.npz --inception ~/inception-2015-12-05.pt
      fm fid --ckpt runs/cifar10 --num-samples 50000 --ref stats/cifar10-train.npz --cfg 1.5 --steps 100
      fm fid --gen samples/ --ref data/cifar10 --features tiny    # no Inception weights: not comparable to papers
      fm fid --ckpt runs/quickstart -n 1000 --ref data/shapes-32-n20000-s0 --features tiny --nfe 1,2,4,8,16 --solver ab2 --json > ab2.json
    """

    from ..launch import on_ranks

    budgets = parse_nfe(nfe, sampling.steps)
    overrides = sampling.overrides()
    if (gpus or nproc) and ckpt is None:
        raise UsageError("--gpus/--nproc shard sample generation: they go with --ckpt")
    if ckpt is None:
        sampling.refuse_without_ckpt(seed=seed, ema=ema)
    work = functools.partial(
        _fid_rank, ref=ref, gen=gen, ckpt=ckpt, save_stats=save_stats, features=features, inception=inception, inception_unverified=inception_unverified,
        num_samples=num_samples, sample_overrides=overrides, guide_ckpt=sampling.guide_ckpt, nfe=budgets, seed=seed or 0, batch_size=batch_size, ema=ema is not False,
        out=out, kid=kid, force=force,
    )  # fmt: skip
    result = on_ranks(work, device=device, gpus=gpus, nproc=nproc)
    if result is None:  # a launcher, or not rank 0
        return
    if as_json:
        emit_json(result)
    else:
        _print_fid(result)


def _print_fid(result: dict | list[dict]) -> None:
    """`fm fid`'s result as text: the NFE table, the statistics file written, or one `key: value` line each."""
    if isinstance(result, list):
        _print_nfe_table(result)
    elif "fid" not in result:
        print(result["stats"])
    else:
        for key, value in result.items():
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")


def _fid_rank(ctx, **request):
    """One rank of `fm fid`: rank 0 logs, shows progress and returns the result."""
    from ..console import progress

    log = log_line if ctx.rank == 0 else (lambda message: None)
    result = fid_checked(ctx=ctx, device=ctx.device, log=log, progress_factory=lambda total: progress(stderr_console(), "sampling", total), **request)
    return result if ctx.rank == 0 else None


def fid_checked(*, force: bool, device, log, ctx=None, progress_factory=None, **request):
    """`fm fid` past parsing: its flags checked (on every rank), then `evaluate.fid`."""
    from ..evaluate import FidRequest, fid

    req = FidRequest(**request)
    _check_fid_flags(req, force, ctx)
    return fid(req, device=device, log=log, ctx=ctx, progress_factory=progress_factory)


def _check_fid_flags(req, force: bool, ctx) -> None:
    """Which inputs go together, and no output replaced without --force."""
    if req.gen is not None and req.ckpt is not None:
        raise UsageError("use either --gen DIR or --ckpt CKPT, not both")
    if req.gen is None and req.ckpt is None and req.save_stats is None:
        raise UsageError("nothing to score: pass --gen DIR or --ckpt CKPT --num-samples N (or --save-stats FILE.npz)")
    if req.ckpt is not None and req.num_samples is None:
        raise UsageError("--ckpt needs --num-samples N (e.g. 50000 for CIFAR-10 results)")
    if req.save_stats is not None:
        if Path(req.ref).suffix == ".npz":
            raise UsageError("--save-stats needs image data as --ref (a prepared dataset or an image folder), not a .npz")
        if Path(req.save_stats).suffix != ".npz":  # --ref takes statistics only from a .npz file name
            raise UsageError(f"--save-stats expects a .npz file name, got {req.save_stats}")
        refuse_existing(req.save_stats, force)
    if req.gen is not None and not Path(req.gen).is_dir():
        raise UsageError(f"--gen {req.gen} is not a directory of images")
    if req.ckpt is None and (req.num_samples is not None or req.out is not None):
        raise UsageError("--num-samples and --out go with --ckpt; " + ("--gen scores every image in its folder" if req.gen is not None else "nothing is sampled here"))
    if req.features != "inception" and (req.inception is not None or req.inception_unverified):
        raise UsageError(f"--inception and --inception-unverified set the Inception network, which --features {req.features} does not use: drop them")
    if req.nfe is not None and req.ckpt is None:
        raise UsageError("--nfe sweeps the sampler of a model: it goes with --ckpt")
    if req.out is not None and req.num_samples is not None:
        from ..distributed import barrier
        from ..evaluate import sample_dir
        from ..images import sample_file

        # An NFE sweep writes each budget's samples under DIR/nfe-N: those are the files it would replace.
        dirs = [sample_dir(req.out, n) for n in req.nfe] if req.nfe is not None else [req.out]
        refuse_existing([sample_file(d, i) for d in dirs for i in range(req.num_samples)], force)
        if ctx is not None:
            barrier(ctx)  # every rank has checked before any rank writes its samples


def _print_nfe_table(rows: list[dict]) -> None:
    """The NFE sweep as a plain table on stdout."""
    kid = any("kid" in r for r in rows)
    print(f"{'NFE':>5} {'used':>6} {'steps':>5}  {'FID (' + rows[0]['features'] + ')':>16}" + ("  KID" if kid else ""))
    for r in rows:
        line = f"{r['nfe_budget']:>5} {r['nfe_per_sample']:>6g} {r['steps']:>5}  {r['fid']:>16.4f}"
        print(line + (f"  {r['kid']:.5f}" if kid else ""))
    print(f"solver {rows[0]['solver']}, guidance {rows[0]['guidance']}, cfg {rows[0]['cfg']:g}, {rows[0]['num_samples']} samples")


# --------------------------------------------------------------------------------------------- eval


@app.command("eval")
def eval_command(
    *,
    data: Annotated[Path, typer.Option("--data", help="The prepared dataset (pixels): reference, real-vs-real floor, domain classifier.")],
    ckpt: Annotated[Optional[str], typer.Option("--ckpt", help="Checkpoint (or run directory) to sample from and score.")] = None,
    gen: Annotated[Optional[Path], typer.Option("--gen", help="Folder of generated images to score instead.")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-n", min=6, max=10**9, help="Samples per setting with --ckpt (the reference and the floor use as many real images).")] = None,
    features: Annotated[str, typer.Option("--features", help="Feature spaces, comma-separated: domain (a classifier of --data), inception, dinov2, tiny.")] = "domain",
    classifier: Annotated[Optional[str], typer.Option("--classifier", help="Where the domain classifier is cached (default DATA/fm-classifier-sSEED.pt).")] = None,
    classifier_seed: Annotated[Optional[int], seed_option("--classifier-seed", help="Seed of the domain classifier's training (0 to 2^32-1; default 0).")] = None,
    classifier_steps: Annotated[Optional[int], typer.Option("--classifier-steps", min=1, help="Training steps of the domain classifier (default 1500).")] = None,
    inception: Annotated[Optional[str], typer.Option("--inception", help="inception-2015-12-05.pt (default: $FM_INCEPTION).")] = None,
    dinov2: Annotated[Optional[str], typer.Option("--dinov2", help="Local transformers Dinov2Model directory (default: $FM_DINOV2).")] = None,
    cfg_scales: Annotated[Optional[str], typer.Option("--cfg", help="Guidance scale(s), comma-separated: a sweep, one row each (e.g. 1,1.5,2,4).")] = None,
    intervals: Annotated[List[str], typer.Option("--guidance-interval", help="LO,HI guidance interval (repeatable: a sweep).")] = [],
    nfe: Annotated[Optional[str], typer.Option("--nfe", help="NFE budgets, comma-separated (the solver's steps per budget).")] = None,
    steps: Steps = None,
    solver: Solver = None,
    guidance: Guidance = None,
    guide_ckpt: GuideCkpt = None,
    rtol: Rtol = None,
    atol: Atol = None,
    precision: SamplePrecision = None,
    compile_model: SampleCompile = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours for precision/recall/density/coverage.")] = 5,
    kid: Annotated[bool, typer.Option("--kid/--no-kid", help="Also report KID (100 subsets of up to 1,000).")] = True,
    splits: Annotated[int, typer.Option("--splits", min=1, max=100, help="Draws of the reference and the floor (seeded splits of --data into two halves): each score is the mean over them, its standard deviation beside it (*_sd). 1: one draw.")] = 5,
    seed: SeedIfGiven = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Samples per forward batch (default 64).")] = None,
    ema: EmaIfGiven = None,
    device: Device = "auto",
    as_json: Json = False,
):
    """Fidelity against a prepared dataset: FD, KID, precision/recall, density/coverage, accuracy, beside real-vs-real.

    Each metric per feature space, conditional accuracy and per-class FD (domain features), each beside its
    real-vs-real floor, and the NFE.

    Examples:
      fm eval --ckpt runs/quickstart --data data/shapes-32-n20000-s0 -n 1000
      fm eval --ckpt runs/quickstart --data data/shapes-32-n20000-s0 -n 500 --cfg 1,1.5,2,4 --guidance-interval 0,1 --guidance-interval 0.2,1 --json > frontier.json
      fm plot frontier.json     # recall against accuracy, one point per setting
      fm eval --ckpt runs/quickstart --data data/shapes-32-n20000-s0 -n 1000 --cfg 2,3 --guide-ckpt runs/short   # autoguidance
      fm eval --gen samples/ --data data/digits32 --features domain,dinov2 --dinov2 weights/dinov2-base
    """

    from ..console import progress
    from ..fidelity import EvalRequest, evaluate_fidelity, format_table

    cfgs = parse_floats("--cfg", cfg_scales)
    unguided = cfgs is not None and all(w == 1.0 for w in cfgs)  # no row guides: the guidance options would shape nothing
    sampling = SamplingFlags(
        cfg_scale=1.0 if unguided else None, guidance_interval=intervals[0] if intervals else None, steps=steps, solver=solver, guidance=guidance,
        guide_ckpt=guide_ckpt, rtol=rtol, atol=atol, precision=precision, compile_model=compile_model,
    )  # fmt: skip
    request = EvalRequest(
        data=data, ckpt=ckpt, gen=gen, num_samples=num_samples, spaces=tuple(s.strip() for s in features.split(",") if s.strip()),
        cfgs=cfgs, intervals=refuse_repeats("--guidance-interval", [parse_interval(i) for i in intervals]) or None,
        nfes=parse_nfe(nfe, steps), sample_overrides=sampling.overrides(cfg_runs=cfgs is None or unguided), guide_ckpt=guide_ckpt,
        classifier=classifier, classifier_seed=classifier_seed or 0, classifier_steps=classifier_steps, inception=inception, dinov2=dinov2, k=k, kid=kid, splits=splits, seed=seed or 0, batch_size=batch_size or 64, ema=ema is not False,
    )  # fmt: skip
    _check_eval_flags(request)
    refuse_unscored_spaces(request.spaces, classifier=classifier, classifier_seed=classifier_seed, classifier_steps=classifier_steps,
                           inception=inception, dinov2=dinov2)  # fmt: skip
    if gen is not None:
        sampling.refuse_without_ckpt(seed=seed, batch_size=batch_size, ema=ema)
    progress_factory = lambda total: progress(stderr_console(), "sampling", total)  # noqa: E731
    floor, rows = evaluate_fidelity(request, device=torch_device(device), log=log_line, progress_factory=progress_factory)
    if as_json:
        emit_json(rows)
    else:
        print(format_table(floor, rows))


def _check_eval_flags(req) -> None:
    """Which inputs go together, and that --gen and --data are what they claim to be."""
    if (req.ckpt is None) == (req.gen is None):
        raise UsageError("score either a checkpoint (--ckpt CKPT -n N) or a folder of images (--gen DIR)")
    if req.ckpt is not None and req.num_samples is None:
        raise UsageError("--ckpt needs --num-samples N (e.g. 1000: the reference and the floor then use 1,000 real images each)")
    if req.gen is not None and (req.num_samples is not None or req.cfgs or req.intervals or req.nfes or req.guide_ckpt):
        raise UsageError("--num-samples, --cfg, --guidance-interval, --nfe and --guide-ckpt go with --ckpt; --gen scores the images in its folder")
    if req.gen is not None and not Path(req.gen).is_dir():
        raise UsageError(f"--gen {req.gen} is not a directory of images")
    if not (Path(req.data) / "manifest.json").is_file():
        raise UsageError(f"--data {req.data} is not a prepared dataset (no manifest.json); create one with `fm prepare-data`")
    from ..features import SPACES

    unknown = [s for s in req.spaces if s not in SPACES]
    if unknown or not req.spaces:
        raise UsageError(f"--features {','.join(req.spaces)}: choose among {', '.join(SPACES)}")
    if req.k < 1:
        raise UsageError("--k must be at least 1")


# The options of one feature space each: given without that space in --features, they would do nothing.
_SPACE_OPTIONS = {"classifier": "domain", "classifier_seed": "domain", "classifier_steps": "domain", "inception": "inception", "dinov2": "dinov2"}


def refuse_unscored_spaces(spaces: tuple[str, ...], **given) -> None:
    """An option of a feature space that --features leaves out (e.g. --dinov2 DIR with --features domain) is a
    usage error, not accepted to do nothing; `given`: the options by name, None where not given."""
    for name, value in given.items():
        space = _SPACE_OPTIONS[name]
        if value is not None and space not in spaces:
            flag = f"--{name.replace('_', '-')}"
            raise UsageError(f"{flag} sets the {space} features, which --features {','.join(spaces)} leaves out: add {space} to --features or drop {flag}")
