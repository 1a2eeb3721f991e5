"""The `fm` command line: parse, validate, dispatch. No training or math logic lives here.

Results (and --json) go to stdout; logs and progress go to stderr. Exit codes: 0 ok, 1 runtime failure,
2 bad usage or input (one line, no traceback unless --debug).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .errors import FmError, UsageError

# ------------------------------------------------------------------------------------------- the app


class _App(typer.Typer):
    """Typer app whose errors meant for users become one stderr line and exit code 2 (usage) or 1."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except FmError as err:
            _print_error(str(err))
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            _print_error("interrupted")
            sys.exit(130)


app = _App(
    name="fm",
    help="Flow-matching image generation: prepare data, train, sample, evaluate, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_STATE = {"debug": False}


def _print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _version(value: bool):
    if value:
        print(f"fm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
):
    """fm: a flow-matching image-generation toolkit."""
    _STATE["debug"] = debug


def _guard(fn):
    """Run a command body; unexpected exceptions become exit 1 with one line (traceback with --debug)."""
    try:
        return fn()
    except (FmError, typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        if _STATE["debug"]:
            raise
        from .distributed import is_peer_failure

        if is_peer_failure(err):  # another rank failed first and printed the cause; stay quiet
            raise typer.Exit(1)
        raise FmError(f"{type(err).__name__}: {err} (rerun with --debug for the traceback)", exit_code=1) from None


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


# ------------------------------------------------------------------------------------- prepare-data

PREPARE_SOURCES = ("shapes", "cifar10", "mnist", "folder", "captions", "tar")


@app.command("prepare-data")
def prepare_data(
    source: str = typer.Argument(..., help=f"Data source: {', '.join(PREPARE_SOURCES)}."),
    out: Path = typer.Option(..., "--out", help="Output directory (written atomically)."),
    root: Optional[str] = typer.Option(None, "--root", help="Input: archive, folder, jsonl file, or a quoted tar glob 'shards/*.tar'."),
    split: str = typer.Option("train", "--split", help="train or test (cifar10, mnist)."),
    size: int = typer.Option(32, "--size", min=8, help="Output size: resize the short side, center crop (Lanczos)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Stop after N usable images."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Decoding processes (default: cores, at most 8)."),
    count: int = typer.Option(20000, "--count", min=1, help="Number of images (shapes)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (shapes)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Local diffusers VAE directory: store float16 latents instead of pixels."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="Local text encoder directory (T5/CLIP) recorded for the captions."),
    cache_text: bool = typer.Option(False, "--cache-text", help="Also store the text encoder's states and masks (text.npy, text_mask.npy)."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="Text tokens per caption (padding masked)."),
    encode_batch: int = typer.Option(64, "--encode-batch-size", min=1, help="Images per encoder batch."),
    device: str = typer.Option("auto", "--device", help="Encoder device: auto, cpu or cuda."),
):
    """Turn a dataset into fm's prepared format (manifest.json + x.npy + y.npy + captions.jsonl).

    Examples:

      fm prepare-data shapes --out data/shapes-32 --size 32 --count 20000

      fm prepare-data cifar10 --root cifar-10-python.tar.gz --split train --out data/cifar10

      fm prepare-data mnist --root mnist/ --size 32 --out data/mnist

      fm prepare-data folder --root celeba_hq/ --size 256 --workers 8 --out data/celebahq256

      fm prepare-data tar --root 'shards/*.tar' --size 64 --out data/captions64

      fm prepare-data captions --root pairs.jsonl --size 64 --out data/t2i-64 --vae weights/sd-vae-ft-mse --text-encoder weights/t5-small --cache-text
    """

    def run():
        from .data.prepare import default_workers

        console = _stderr_console()
        summaries = []

        def pixels(target: Path) -> Path:
            """The pixel dataset of any source; with --vae/--text-encoder it is a temporary step before encoding."""
            summary = _prepare_with_progress(
                source, target, root=root, split=split, size=size, limit=limit, workers=workers or default_workers(), force=force, count=count, seed=seed
            )
            summaries.append(summary)
            return Path(summary.path)

        if vae or text_encoder:
            encode = dict(vae=vae, text_encoder=text_encoder, cache_text=cache_text, max_tokens=max_tokens, batch_size=encode_batch)
            total = limit or (count if source == "shapes" else None)  # other sources: known only once read
            path = _prepare_encoded_with_progress(pixels, out, total, _device(device), force, encode)
            summary = summaries[-1]
            summary.path = str(path)
            summary.bytes = sum(f.stat().st_size for f in Path(path).iterdir())
        else:
            pixels(out)
            summary = summaries[-1]
        if summary.skipped:
            shown = "; ".join(summary.skipped_examples)
            more = f" (and {summary.skipped - len(summary.skipped_examples)} more)" if summary.skipped > len(summary.skipped_examples) else ""
            console.print(f"skipped {summary.skipped} unusable item(s): {shown}{more}", highlight=False, markup=False)
        if as_json:
            _emit_json({k: v for k, v in vars(summary).items() if k != "skipped_examples"})
        else:
            console.print(f"wrote {summary.count} images ({summary.bytes / 1e6:.1f} MB) in {summary.seconds:.1f} s", highlight=False)
            print(summary.path)

    _guard(run)


def _prepare_with_progress(source: str, target: Path, **kwargs):
    """data.prepare.prepare with a progress bar on stderr (when it is a terminal); returns its Summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .data.prepare import prepare

    console = _stderr_console()
    columns = (TextColumn(source), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(source, total=None)
        return prepare(
            source,
            target,
            on_start=lambda total: bar.update(task, total=total),
            on_progress=lambda n: bar.advance(task, n),
            **kwargs,
        )


def _prepare_encoded_with_progress(pixels, out: Path, total: int | None, device, force: bool, encode: dict) -> Path:
    from rich.progress import Progress

    from .data.latents import prepare_encoded

    with Progress(console=_stderr_console(), transient=True) as bar:
        task = bar.add_task("encode", total=total)
        return prepare_encoded(pixels, out, force=force, device=device, progress=lambda n: bar.advance(task, n), **encode)


# -------------------------------------------------------------------------------------------- train

_SET_HELP = "Override a setting, e.g. --set train.steps=200 (repeatable)."


@app.command()
def train(
    preset: str = typer.Option("quickstart", "--preset", "-p", help="Preset name in presets/ or a .toml file."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared dataset directory (overrides data.path)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/NAME)."),
    overrides: List[str] = typer.Option([], "--set", help=_SET_HELP),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as JSON and exit."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' (in the run directory) or a checkpoint path."),
    stop_at_step: Optional[int] = typer.Option(None, "--stop-at-step", min=1, help="Checkpoint and stop at this step (resume later)."),
    gpus: int = typer.Option(0, "--gpus", min=0, help="Train on N local GPUs (DDP over NCCL)."),
    nproc: int = typer.Option(0, "--nproc", min=0, help="Train with N local processes (gloo on CPU)."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Number of nodes (multi-node DDP)."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's rank (multi-node DDP)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the rendezvous (multi-node)."),
    rdzv_id: Optional[str] = typer.Option(None, "--rdzv-id", help="Rendezvous id shared by all nodes."),
):
    """Train a flow-matching model.

    Examples:
      fm train --preset quickstart
      fm train --preset cifar10 --data data/cifar10 --gpus 2 --set train.steps=100000
      fm train --preset quickstart --set train.steps=200 --print-config
    """

    def run():
        from .config import load_config

        if resume is not None:  # the checkpoint's config plus resume-safe overrides, exactly as `fm resume`
            target = run_dir or Path("runs") / load_config(preset).name
            ckpt = _resume_checkpoint(target, resume)
            cfg = resume_config(ckpt, overrides, data=data)
            target = run_dir or _run_dir_of(ckpt)
        else:
            cfg = load_config(preset, overrides)
            if data is not None:
                cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(data)})})
            target = run_dir or Path("runs") / cfg.name
        if print_config:
            from .config import config_to_dict

            _emit_json(config_to_dict(cfg))
            return
        _run_training(cfg, target, resume, stop_at_step, _launch_opts(gpus, nproc, nnodes, node_rank, rdzv_endpoint, rdzv_id))

    _guard(run)


@app.command()
def resume(
    target: Path = typer.Argument(..., help="A run directory (resumes its latest checkpoint) or a checkpoint file."),
    overrides: List[str] = typer.Option([], "--set", help="Change a resume-safe setting, e.g. --set train.steps=2000."),
    stop_at_step: Optional[int] = typer.Option(None, "--stop-at-step", min=1, help="Checkpoint and stop at this step."),
    gpus: int = typer.Option(0, "--gpus", min=0, help="Resume on N local GPUs."),
    nproc: int = typer.Option(0, "--nproc", min=0, help="Resume with N local processes."),
):
    """Continue a stopped run exactly where it left off.

    Examples:
      fm resume runs/quickstart
      fm resume runs/quickstart --set train.steps=4000
    """

    def run():
        from .checkpoint import resolve_checkpoint

        ckpt = resolve_checkpoint(target)
        _run_training(resume_config(ckpt, overrides), _run_dir_of(ckpt), str(ckpt), stop_at_step, _launch_opts(gpus, nproc, 1, 0, None, None))

    _guard(run)


def resume_config(ckpt: Path, overrides: list[str], data: Optional[Path] = None):
    """The one way a resumed run's config is built: the checkpoint's config plus resume-safe overrides only
    (anything else would change the math of a run whose optimizer and EMA state are restored)."""
    from .checkpoint import load_checkpoint
    from .config import RESUME_SAFE_KEYS, apply_overrides, validate_config

    cfg = validate_config(load_checkpoint(ckpt)["config"], source=str(ckpt))
    if data is not None and Path(cfg.data.path or "").resolve() != data.resolve():
        raise UsageError(f"--data {data} differs from the resumed run's data.path {cfg.data.path}: a run cannot change its dataset on resume")
    return apply_overrides(cfg, overrides, allowed=RESUME_SAFE_KEYS)


def _run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _launch_opts(gpus, nproc, nnodes, node_rank, rdzv_endpoint, rdzv_id) -> dict:
    if gpus and nproc:
        raise UsageError("use either --gpus N or --nproc N, not both")
    return dict(gpus=gpus, nproc=nproc, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id)


def _run_training(cfg, run_dir: Path, resume_arg: Optional[str], stop_at_step, launch: dict) -> None:
    from . import distributed as D

    child = D.launched_externally()
    procs = launch["gpus"] or launch["nproc"]
    if launch["gpus"]:
        D.check_gpus(launch["gpus"])
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cuda"})})
    # The parent resolves everything that all ranks must agree on: data, run directory, checkpoint.
    # Under an external launcher (torchrun/SLURM, not our own relaunch) local rank 0 prepares the default
    # data and the other ranks wait for its manifest; our own relaunch prepared it in the parent already.
    cfg = _ensure_data(cfg, prepare=not child or int(os.environ.get("LOCAL_RANK", "0")) == 0)
    ckpt = _resume_checkpoint(run_dir, resume_arg)
    if ckpt is None and not os.environ.get("FM_RUN_RESOLVED") and int(os.environ.get("RANK", "0")) == 0:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UsageError(f"run directory {run_dir} already exists; continue it with `fm resume {run_dir}` or `--resume latest`, or pick --run-dir")
    if procs > 1 and not child or launch["nnodes"] > 1 and not child:
        if cfg.train.micro_batch_size == "auto":  # tune once here, single-process; the ranks read the cache
            import torch

            from .bench import auto_micro_batch

            device = torch.device("cuda" if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()) else "cpu")
            run_dir.mkdir(parents=True, exist_ok=True)
            auto_micro_batch(cfg, run_dir, device, world_size=procs * launch["nnodes"], log=lambda m: print(m, file=sys.stderr))
        argv = _child_argv(cfg, run_dir, ckpt, stop_at_step)
        code = D.relaunch(
            max(procs, 1),
            argv,
            nnodes=launch["nnodes"],
            node_rank=launch["node_rank"],
            rdzv_endpoint=launch["rdzv_endpoint"],
            rdzv_id=launch["rdzv_id"],
            extra_env={"FM_RUN_RESOLVED": "1"},
        )
        if code:
            raise typer.Exit(code)
        return
    from .train import train as train_loop

    result = train_loop(cfg, run_dir, resume_from=ckpt, stop_at_step=stop_at_step)
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.checkpoint)


def _child_argv(cfg, run_dir: Path, ckpt: Optional[Path], stop_at_step) -> list[str]:
    """The children get the fully resolved config as a file, so every rank trains the same thing."""
    from .config import config_to_dict

    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / ".launch-config.json"
    resolved.write_text(json.dumps(config_to_dict(cfg)))
    argv = ["_train-resolved", str(resolved), "--run-dir", str(run_dir)]
    if ckpt is not None:
        argv += ["--resume", str(ckpt)]
    if stop_at_step:
        argv += ["--stop-at-step", str(stop_at_step)]
    return argv


@app.command("_train-resolved", hidden=True)
def train_resolved(
    config_file: Path = typer.Argument(...),
    run_dir: Path = typer.Option(..., "--run-dir"),
    resume_arg: Optional[str] = typer.Option(None, "--resume"),
    stop_at_step: Optional[int] = typer.Option(None, "--stop-at-step"),
):
    """Internal: one rank of a run whose config the launching parent already resolved."""

    def run():
        from .config import validate_config
        from .train import train as train_loop

        cfg = validate_config(json.loads(config_file.read_text()), source=str(config_file))
        ckpt = Path(resume_arg) if resume_arg else None
        result = train_loop(cfg, run_dir, resume_from=ckpt, stop_at_step=stop_at_step)
        if int(os.environ.get("RANK", "0")) == 0:
            print(result.checkpoint)

    _guard(run)


def _resume_checkpoint(run_dir: Path, resume_arg: Optional[str]) -> Optional[Path]:
    from .checkpoint import resolve_checkpoint

    if resume_arg is None:
        return None
    return resolve_checkpoint(run_dir if resume_arg == "latest" else resume_arg)


def _ensure_data(cfg, prepare: bool):
    """Use data.path; for the shapes source with no path, prepare (once) a default dataset under data/."""
    if cfg.data.path:
        if not Path(cfg.data.path).exists():
            raise UsageError(f"data.path {cfg.data.path} does not exist; create it with `fm prepare-data {cfg.data.source} --out {cfg.data.path}`")
        return cfg
    if cfg.data.source != "shapes":
        raise UsageError(f"no dataset given: pass --data DIR, prepared with `fm prepare-data {cfg.data.source} --root ... --out DIR`")
    from .data.prepared import read_manifest
    from .data.sources import GENERATOR_VERSION

    path = Path("data") / f"shapes-{cfg.data.image_size}-n{cfg.data.count}-s{cfg.train.seed}"

    def current() -> dict | None:
        existing = read_manifest(path) if (path / "manifest.json").is_file() else None
        return existing if existing is not None and existing.get("generator_version") == GENERATOR_VERSION else None

    if current() is None:
        if prepare:
            stale = (path / "manifest.json").is_file()
            why = " (the existing one came from an older shapes generator)" if stale else ""
            _stderr_console().print(f"preparing shapes data in {path}{why}", highlight=False)
            _prepare_with_progress("shapes", path, size=cfg.data.image_size, count=cfg.data.count, seed=cfg.train.seed, force=stale)
        else:
            from .distributed import wait_until

            timeout = float(os.environ.get("FM_DATA_WAIT", "1800"))
            wait_until(lambda: current() is not None, timeout, f"local rank 0 to prepare the shapes data in {path}")
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(path)})})


# ------------------------------------------------------------------------------------------- sample


@app.command()
def sample(
    ckpt: str = typer.Option(..., "--ckpt", help="Checkpoint file or run directory."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", min=1, help="Number of images (default 16, or one per prompt)."),
    class_label: Optional[int] = typer.Option(None, "--class-label", help="Class index for every sample (default: cycle)."),
    prompt: List[str] = typer.Option([], "--prompt", help="Text prompt (text models; repeatable: samples cycle through them)."),
    prompts_file: Optional[str] = typer.Option(None, "--prompts", help="File with one prompt per line, or - for stdin."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Local VAE directory (latent models; default: FM_VAE, then the run's)."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="Local text encoder directory (default: FM_TEXT_ENCODER, then the run's)."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg", min=0.0, help="Classifier-free guidance weight (1 = off)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Solver steps (fixed-step solvers)."),
    solver: Optional[str] = typer.Option(None, "--solver", help="euler, midpoint, heun, rk4 or dopri5."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance (dopri5)."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance (dopri5)."),
    guidance_interval: Optional[str] = typer.Option(None, "--guidance-interval", help="LO,HI: apply CFG only for t in [LO, HI] (t=0 noise)."),
    seed: int = typer.Option(0, "--seed", help="Seed: sample i's noise depends only on (seed, i)."),
    out: Path = typer.Option(Path("samples"), "--out", help="Directory (one PNG per sample + grid.png) or FILE.png (grid only)."),
    gif: Optional[Path] = typer.Option(None, "--gif", help="Also write a trajectory GIF (noise to image) of the grid."),
    gif_frames: int = typer.Option(16, "--gif-frames", min=2, help="Frames in the GIF, at evenly spaced solver times."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Samples per forward batch."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights (default) or the raw ones."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print paths, NFE and seconds as JSON on stdout."),
    gpus: int = typer.Option(0, "--gpus", min=0, help="Generate on N local GPUs (sample indices sharded)."),
    nproc: int = typer.Option(0, "--nproc", min=0, help="Generate with N local processes."),
):
    """Generate images from a checkpoint.

    Examples:
      fm sample --ckpt runs/quickstart --num-samples 16 --out samples/
      fm sample --ckpt runs/cifar10/checkpoints/step-0100000.pt --cfg 4 --steps 100 --class-label 3 --out cat.png
      fm sample --ckpt runs/quickstart -n 16 --solver heun --steps 20 --out grid.png --gif trajectory.gif
      fm sample --ckpt runs/quickstart --solver dopri5 --rtol 1e-4 --atol 1e-4 --out grid.png --json
      fm sample --ckpt runs/quickstart-text --prompt "a red circle on a black background" -n 8 --out red.png
      echo "a blue star on a white background" | fm sample --ckpt runs/quickstart-text --prompts - --out star.png
    """

    def run():
        if gif is not None and gif.suffix.lower() != ".gif":
            raise UsageError(f"--gif expects a .gif file name, got {gif}")
        if gif is not None and (gpus > 1 or nproc > 1):
            raise UsageError("--gif is drawn by one process: drop --gpus/--nproc")
        texts = list(prompt) + _read_prompts(prompts_file)  # read stdin once, in the launching process
        n = num_samples or len(texts) or 16
        if _relaunched(gpus, nproc, extra=["--num-samples", str(n)] + [a for t in texts for a in ("--prompt", t)] if prompts_file == "-" else None):
            return
        ctx = _rank_context(device, gpus)
        _with_process_group(lambda: _sample_ranks(ctx, texts, n))

    def _sample_ranks(ctx, texts, n):
        import torch

        from . import distributed as D
        from .generate import iterate_samples, load_for_sampling, merge_trajectories
        from .images import save_gif, save_grid, save_images, trajectory_frames

        dev = ctx.device
        loaded = load_for_sampling(ckpt, dev, use_ema=ema, vae=vae, text_encoder=text_encoder)
        sample_cfg = _sample_settings(loaded.config.sample, cfg_scale, steps, solver, rtol, atol, guidance_interval)
        start = time.perf_counter()
        xs, nfes, paths, trajectories = [], [], [], []
        to_dir = out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp")
        indices = D.shard_indices(n, ctx)  # sample i depends only on (seed, i): any split gives the same images
        for chunk, _, result in iterate_samples(
            loaded,
            indices,
            seed=seed,
            sample_cfg=sample_cfg,
            batch_size=batch_size,
            device=dev,
            class_label=class_label,
            shift=loaded.config.flow.shift,
            capture=gif_frames if gif is not None else 0,
            prompts=[texts[i % len(texts)] for i in indices] if texts else None,
        ):
            xs.append(result.x.cpu())
            nfes.append(result.nfe)
            if gif is not None:
                trajectories.append([(t, x.cpu()) for t, x in result.trajectory])
            if to_dir:
                for k, i in enumerate(chunk):  # each rank writes its own samples, named by global index
                    paths += save_images(result.x[k : k + 1], out, start_index=i)
        local = torch.cat(xs) if xs else torch.empty(0)
        images = torch.stack(D.gather_in_index_order(indices, list(local), ctx))
        paths = [p for part in D.all_gather_objects(paths, ctx) for p in part]
        nfes = [v for part in D.all_gather_objects(nfes, ctx) for v in part]
        if not ctx.is_main:
            return
        paths.sort()
        grid = save_grid(images, out / "grid.png" if to_dir else out)
        gif_path = save_gif(trajectory_frames(merge_trajectories(trajectories)), gif) if gif is not None else None
        seconds = time.perf_counter() - start
        if as_json:
            _emit_json(
                {
                    "paths": [str(p) for p in paths],
                    "grid": str(grid),
                    "gif": str(gif_path) if gif_path else None,
                    "num_samples": n,
                    "nfe": max(nfes),  # network evaluations per sample trajectory (a CFG pair counts once)
                    "nfe_total": sum(nfes),  # batched forward passes over all batches
                    "seconds": round(seconds, 3),
                    "solver": sample_cfg.solver,
                    "steps": sample_cfg.steps,
                    "cfg": sample_cfg.cfg,
                    "seed": seed,
                }
            )
        else:
            print(grid)
            if gif_path:
                print(gif_path)

    _guard(run)


# ------------------------------------------------------------------------------------------- reflow


@app.command()
def reflow(
    ckpt: str = typer.Option(..., "--ckpt", help="Teacher: checkpoint file, run directory or export directory."),
    num_pairs: int = typer.Option(..., "--num-pairs", "-n", min=1, help="Number of (noise, sample) pairs."),
    out: Path = typer.Option(..., "--out", help="Output dataset directory (kind 'pairs', written atomically)."),
    solver: str = typer.Option("heun", "--solver", help="Teacher ODE solver: heun, euler, midpoint, rk4 or dopri5."),
    steps: int = typer.Option(50, "--steps", min=1, help="Solver steps (fixed-step solvers)."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg", min=0.0, help="Classifier-free guidance weight (default: the teacher's sample.cfg)."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance (dopri5)."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance (dopri5)."),
    prompt: List[str] = typer.Option([], "--prompt", help="Text prompt (text teachers; repeatable: pair i takes prompt i mod P)."),
    prompts_file: Optional[str] = typer.Option(None, "--prompts", help="File with one prompt per line, or - for stdin."),
    seed: int = typer.Option(0, "--seed", help="Seed: pair i's noise depends only on (seed, i)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Pairs per solver batch (and per restartable chunk)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the teacher's EMA weights (default) or the raw ones."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="Local text encoder directory (text teachers)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output dataset."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    gpus: int = typer.Option(0, "--gpus", min=0, help="Solve on N local GPUs (chunks sharded)."),
    nproc: int = typer.Option(0, "--nproc", min=0, help="Solve with N local processes."),
):
    """Reflow pairs: noise x0 and the teacher's ODE sample x1 = ODE(x0), a dataset for flow.coupling = "pairs".

    An interrupted run continues when the same command is run again (finished chunks are kept in OUT.partial).

    Examples:
      fm reflow --ckpt runs/quickstart --num-pairs 4000 --out data/quickstart-pairs --solver heun --steps 50
      fm reflow --ckpt runs/cifar10 -n 50000 --solver dopri5 --cfg 1.5 --gpus 2 --out data/cifar10-pairs
      fm train --preset quickstart --data data/quickstart-pairs --set flow.coupling=pairs --set train.init_from=runs/quickstart
    """

    def run():
        from .checkpoint import resolve_checkpoint
        from .config import validate_config
        from .distributed import launched_externally
        from .generate import load_weights
        from .reflow import check_inputs

        texts = list(prompt) + _read_prompts(prompts_file)
        if not launched_externally():  # the one-line refusals come before relaunching or solving anything
            teacher = validate_config(load_weights(resolve_checkpoint(ckpt))["config"], source=str(ckpt))
            check_inputs(teacher, out, texts, force)
        if _relaunched(gpus, nproc, extra=[a for t in texts for a in ("--prompt", t)] if prompts_file == "-" else None):
            return
        ctx = _rank_context(device, gpus)
        _with_process_group(lambda: _reflow_rank(ctx, texts))

    def _reflow_rank(ctx, texts):
        from .generate import load_for_sampling
        from .reflow import generate_pairs, rank_share

        loaded = load_for_sampling(ckpt, ctx.device, use_ema=ema, text_encoder=text_encoder, with_vae=False)
        sample_cfg = _sample_settings(loaded.config.sample, cfg_scale, steps, solver, rtol, atol)
        console = _stderr_console()
        with _progress(console, "reflow", rank_share(num_pairs, batch_size, ctx)) as advance:
            summary = generate_pairs(
                loaded, out, num_pairs=num_pairs, seed=seed, sample_cfg=sample_cfg, batch_size=batch_size, ctx=ctx, checkpoint=ckpt,
                ema=ema, prompts=texts or None, force=force, on_chunk=advance if ctx.is_main else None,
            )
        if summary is None:
            return
        if as_json:
            _emit_json(vars(summary))
        else:
            console.print(f"{summary.count} pairs, {summary.nfe} NFE each, {summary.seconds:.1f} s ({summary.chunks_reused} chunks reused)", highlight=False)
            print(summary.path)

    _guard(run)


# ------------------------------------------------------------------------------------------- export


@app.command()
def export(
    ckpt: str = typer.Option(..., "--ckpt", help="Checkpoint file or run directory."),
    out: Path = typer.Option(..., "--out", help="Output directory (written atomically)."),
    fmt: str = typer.Option("diffusers", "--format", help="diffusers (class-conditional DiTs: a DiTTransformer2DModel directory) or fm (any model)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Export the EMA weights (default) or the raw ones."),
    force: bool = typer.Option(False, "--force", help="Replace an existing export directory."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
):
    """Export a checkpoint's weights as safetensors (never pickles), for diffusers or for fm.

    Examples:
      fm export --ckpt runs/quickstart --format diffusers --out exported/quickstart
      fm export --ckpt runs/quickstart-text --format fm --out exported/quickstart-text
      fm sample --ckpt exported/quickstart --out samples/
    """

    def run():
        from .export import export_checkpoint

        summary = export_checkpoint(ckpt, out, fmt, use_ema=ema, force=force)
        if as_json:
            _emit_json(vars(summary))
        else:
            print(summary.path)

    _guard(run)


def _read_prompts(source: Optional[str]) -> list[str]:
    """Prompts from a file (one per line, blank lines skipped) or from stdin with '-'."""
    if source is None:
        return []
    if source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"--prompts file {path} not found (one prompt per line, or - for stdin)")
        text = path.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"--prompts {source}: no prompts (one per line)")
    return lines


def _sample_settings(base, cfg_scale, steps, solver, rtol=None, atol=None, guidance_interval=None):
    """The checkpoint's sample.* settings with the command-line overrides, validated."""
    from pydantic import ValidationError

    from .config import SampleConfig

    interval = None
    if guidance_interval is not None:
        try:
            interval = tuple(float(v) for v in guidance_interval.split(","))
        except ValueError:
            interval = ()
        if len(interval) != 2:
            raise UsageError(f"--guidance-interval expects LO,HI (e.g. 0.1,0.8), got {guidance_interval!r}")
    given = {"cfg": cfg_scale, "steps": steps, "solver": solver, "rtol": rtol, "atol": atol, "guidance_interval": interval}
    update = {k: v for k, v in given.items() if v is not None}
    try:
        return SampleConfig.model_validate({**base.model_dump(), **update})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "guidance_interval"
        where = where.replace("_", "-")
        raise UsageError(f"invalid sampling option --{where}: {first['msg'].removeprefix('Value error, ')}") from None


def _relaunched(gpus: int, nproc: int, extra: list[str] | None = None) -> bool:
    """With --gpus/--nproc N > 1 in the launching process, rerun this same command as N ranks."""
    from . import distributed as D

    if gpus and nproc:
        raise UsageError("use either --gpus N or --nproc N, not both")
    if gpus:
        D.check_gpus(gpus)
    procs = gpus or nproc
    if procs <= 1 or D.launched_externally():
        return False
    argv = _without_launch_flags(sys.argv[1:]) + (["--device", "cuda"] if gpus else [])
    if extra is not None:  # stdin was consumed here: hand the ranks its prompts as arguments instead
        argv = [a for a in argv if a not in ("--prompts", "-")] + extra
    code = D.relaunch(procs, argv)
    if code:
        raise typer.Exit(code)
    return True


def _without_launch_flags(argv: list[str]) -> list[str]:
    """Drop --gpus/--nproc (and their values): the ranks know they are ranks from their environment."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--gpus", "--nproc"):
            skip = True
        elif not arg.startswith(("--gpus=", "--nproc=")):
            out.append(arg)
    return out


def _rank_context(device: str, gpus: int):
    """This process's rank and device (rank 0 of 1 when not distributed)."""
    from . import distributed as D

    if not D.launched_externally():
        return D.DistContext(device=_device("cuda" if gpus else device))
    return D.setup("cuda" if gpus else device)


def _with_process_group(fn):
    """Run a rank's work; all ranks meet at a barrier before the group is destroyed (a rank that tears
    down gloo while another still talks to it dies with "terminate called without an active exception")."""
    import torch.distributed as dist

    from . import distributed as D

    try:
        result = fn()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return result
    finally:
        D.cleanup()


def _device(name: str):
    from .distributed import resolve_device

    return resolve_device(name)


# ------------------------------------------------------------------------- not available yet (honest)


def _not_yet(name: str) -> None:
    _print_error(f"`fm {name}` is not available yet in fm {__version__}")
    raise typer.Exit(2)


@app.command("class-grid")
def class_grid(
    ckpt: str = typer.Option(..., "--ckpt", help="Checkpoint file or run directory (class-conditional model)."),
    samples_per_class: int = typer.Option(8, "--samples-per-class", min=1, help="Images per class (one row per class)."),
    out: Path = typer.Option(..., "--out", help="Output image, FILE.png."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg", min=0.0, help="Classifier-free guidance weight (1 = off)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Solver steps (fixed-step solvers)."),
    solver: Optional[str] = typer.Option(None, "--solver", help="euler, midpoint, heun, rk4 or dopri5."),
    seed: int = typer.Option(0, "--seed", help="Seed: sample i's noise depends only on (seed, i)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Samples per forward batch."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights (default) or the raw ones."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    as_json: bool = typer.Option(False, "--json", help="Print the path, NFE and seconds as JSON on stdout."),
):
    """One row of samples per class, labelled with the class names recorded at training time.

    Examples:
      fm class-grid --ckpt runs/quickstart --samples-per-class 8 --out classes.png
      fm class-grid --ckpt runs/cifar10 --samples-per-class 10 --cfg 3 --steps 50 --solver heun --out cifar.png
    """

    def run():
        from .generate import class_grid_samples, class_names_of, load_for_sampling
        from .images import class_grid_image, save_image_atomic

        if out.suffix.lower() != ".png":
            raise UsageError(f"--out expects a .png file name, got {out}")
        if out.exists() and not force:
            raise UsageError(f"{out} already exists; pass --force to replace it")
        dev = _device(device)
        loaded = load_for_sampling(ckpt, dev, use_ema=ema)
        sample_cfg = _sample_settings(loaded.config.sample, cfg_scale, steps, solver)
        start = time.perf_counter()
        images, nfe = class_grid_samples(
            loaded, samples_per_class, seed=seed, sample_cfg=sample_cfg, batch_size=batch_size, device=dev, shift=loaded.config.flow.shift
        )
        path = save_image_atomic(class_grid_image(images, samples_per_class, class_names_of(loaded)), out)
        seconds = time.perf_counter() - start
        if as_json:
            _emit_json({"path": str(path), "classes": loaded.num_classes, "samples_per_class": samples_per_class, "nfe": nfe, "seconds": round(seconds, 3), "solver": sample_cfg.solver, "steps": sample_cfg.steps, "cfg": sample_cfg.cfg})
        else:
            print(path)

    _guard(run)


@app.command()
def fid(
    ref: Path = typer.Option(..., "--ref", help="Reference: prepared dataset directory, image folder, or statistics .npz."),
    gen: Optional[Path] = typer.Option(None, "--gen", help="Folder of generated images to score."),
    ckpt: Optional[str] = typer.Option(None, "--ckpt", help="Checkpoint (or run directory) to sample from and score."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", min=2, help="Samples to generate with --ckpt."),
    save_stats: Optional[Path] = typer.Option(None, "--save-stats", help="Write the reference statistics to FILE.npz."),
    features: str = typer.Option("inception", "--features", help="inception (default), tiny, or module:factory; only inception is comparable to published FID."),
    inception: Optional[str] = typer.Option(None, "--inception", help="Path to inception-2015-12-05.pt (default: $FM_INCEPTION)."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg", min=0.0, help="Classifier-free guidance weight (1 = off)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Solver steps (fixed-step solvers)."),
    solver: Optional[str] = typer.Option(None, "--solver", help="euler, midpoint, heun, rk4 or dopri5."),
    seed: int = typer.Option(0, "--seed", help="Seed: sample i's noise depends only on (seed, i)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per batch (generation and features)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights (default) or the raw ones."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also save the generated samples as PNGs here."),
    kid: bool = typer.Option(False, "--kid", help="Also report KID (clean-fid's kernel distance)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --save-stats file."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    gpus: int = typer.Option(0, "--gpus", min=0, help="Generate on N local GPUs (sample indices sharded)."),
    nproc: int = typer.Option(0, "--nproc", min=0, help="Generate with N local processes."),
):
    """FID (clean-fid, "clean" mode) of generated samples against reference data.

    Examples:
      fm fid --ref data/cifar10 --save-stats stats/cifar10-train.npz --inception ~/inception-2015-12-05.pt
      fm fid --ckpt runs/cifar10 --num-samples 50000 --ref stats/cifar10-train.npz --cfg 1.5 --steps 100
      fm fid --gen samples/ --ref data/cifar10 --features tiny    # no Inception weights: not comparable to papers
    """

    def run():
        from .evaluate import fid_command

        if (gpus or nproc) and ckpt is None:
            raise UsageError("--gpus/--nproc shard sample generation: they go with --ckpt")
        if _relaunched(gpus, nproc):
            return
        ctx = _rank_context(device, gpus)
        console = _stderr_console()
        result = _with_process_group(lambda: fid_command(
            ctx=ctx,
            ref=ref,
            gen=gen,
            ckpt=ckpt,
            save_stats=save_stats,
            features=features,
            inception=inception,
            num_samples=num_samples,
            sample_overrides=lambda base: _sample_settings(base, cfg_scale, steps, solver),
            seed=seed,
            batch_size=batch_size,
            ema=ema,
            out=out,
            kid=kid,
            force=force,
            device=ctx.device,
            log=lambda message: console.print(message, highlight=False, markup=False) if ctx.is_main else None,
            progress_factory=lambda total: _progress(console, "sampling", total),
        ))
        if not ctx.is_main:
            return
        if as_json:
            _emit_json(result)
        elif "fid" not in result:
            print(result["stats"])
        else:
            for key, value in result.items():
                print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")

    _guard(run)


def _progress(console, label: str, total: int):
    """A context manager yielding advance(n) for a transient rich progress bar on stderr."""
    import contextlib

    from rich.progress import Progress

    @contextlib.contextmanager
    def bar():
        with Progress(console=console, transient=True) as p:
            task = p.add_task(label, total=total)
            yield lambda n: p.advance(task, n)

    return bar()


@app.command()
def bench(
    preset: str = typer.Option("quickstart", "--preset", "-p", help="Preset name in presets/ or a .toml file."),
    overrides: List[str] = typer.Option([], "--set", help=_SET_HELP),
    batch_size: str = typer.Option("auto", "--batch-size", "-b", help="'auto' (autotune the training batch) or a number."),
    mode: str = typer.Option("both", "--mode", help="train, sample or both."),
    steps: int = typer.Option(5, "--steps", help="Timed iterations (training steps; solver steps for sampling)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed warmup training steps before the clock starts."),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16, fp16 or fp32 (default: the preset's)."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", help="Memory budget in GiB for autotune (CPU default: half the RAM)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Largest batch autotune tries (default: the preset's train.global_batch_size)."),
    compare: Optional[str] = typer.Option(None, "--compare", help="'diffusers': also measure diffusers' DiTTransformer2DModel."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Cache the autotune result in RUN_DIR/autotune.json (for micro_batch_size='auto')."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
):
    """Autotune the batch size; report training and sampling throughput, memory, FLOPs and MFU.

    Examples:
      fm bench --preset quickstart
      fm bench --preset cifar10 --batch-size 256 --precision bf16 --compare diffusers --json
      fm bench --preset quickstart --mode train --max-memory 4
    """

    def run():
        from .bench import BenchOptions, run_bench
        from .config import load_config

        if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) > 0):
            raise UsageError(f"--batch-size must be 'auto' or a positive integer, not {batch_size!r}")
        if steps < 1 or warmup < 0 or (max_batch is not None and max_batch < 1) or (max_memory is not None and max_memory <= 0):
            raise UsageError("--steps and --max-batch must be >= 1, --warmup >= 0, --max-memory > 0")
        cfg = load_config(preset, overrides)
        opts = BenchOptions(
            batch_size=None if batch_size == "auto" else int(batch_size), mode=mode, steps=steps, warmup=warmup, precision=precision,
            compile=compile_model, max_memory_gib=max_memory, max_batch=max_batch, compare=compare, device=device, run_dir=run_dir,
        )
        console = _stderr_console()
        report = run_bench(cfg, opts, log=lambda msg: console.print(msg, highlight=False, markup=False))
        _print_bench_table(console, report)
        if as_json:
            _emit_json(report)

    _guard(run)


def _print_bench_table(console, report: dict) -> None:
    from rich.table import Table

    def num(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    table = Table(title=f"fm bench: {report['preset']} on {report['device']} ({report['precision']}, batch {report['batch_size']})")
    table.add_column("model")
    for col in ("train img/s", "train MFU", "sample img/s", "sample img*NFE/s", "peak MiB", "params (M)", "GFLOPs/img fwd"):
        table.add_column(col, justify="right")
    rows = [("fm", report)] + ([("diffusers", report["compare"]["diffusers"])] if report.get("compare") else [])
    for name, r in rows:
        tr, sa, mem = r.get("train") or {}, r.get("sample") or {}, r["memory"]
        peak = mem["peak_reserved_mib"] if mem["peak_reserved_mib"] is not None else mem["peak_rss_mib"]
        table.add_row(
            name, num(tr.get("img_per_s")), num(tr.get("mfu"), "{:.1%}"), num(sa.get("img_per_s"), "{:.2f}"), num(sa.get("img_nfe_per_s")),
            num(peak, "{:.0f}"), f"{r['params'] / 1e6:.2f}", f"{report['flops_per_image']['forward'] / 1e9:.3f}",
        )
    console.print(table)
    if report.get("compare"):
        ratio = ", ".join(f"{k} {v:.2f}x" for k, v in report["compare"]["ratio"].items())
        console.print(f"ours / diffusers: {ratio}", highlight=False)


# ------------------------------------------------------------------------------------------- plot


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="Run directory (reads RUN_DIR/metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output image (.png, .svg, .pdf); default RUN_DIR/loss.png."),
):
    """Plot loss and learning-rate curves (and FID when logged) from a run's metrics.jsonl (needs matplotlib).

    Examples:
      fm plot runs/quickstart
      fm plot runs/cifar10 --out cifar10-curves.png
    """

    def run():
        from .plot import plot_run

        print(plot_run(run_dir, out))

    _guard(run)


# ------------------------------------------------------------------------------------------- demo


@app.command()
def demo(
    ckpt: str = typer.Option(..., "--ckpt", help="Checkpoint file or run directory (its latest checkpoint)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (default: this machine only)."),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="Port to listen on."),
    share: bool = typer.Option(False, "--share", help="Also open a public Gradio share link."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Local diffusers VAE directory (latent models)."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="Local text encoder directory (text models)."),
    max_images: int = typer.Option(16, "--max-images", min=1, help="Largest grid a visitor may request."),
):
    """Interactive web demo (needs gradio): prompt or class, CFG, steps, solver, seed; the image forms step by step.

    Examples:
      fm demo --ckpt runs/quickstart
      fm demo --ckpt runs/quickstart-text --port 8080
    """

    def run():
        from .demo import launch_demo

        launch_demo(ckpt, host=host, port=port, share=share, device=_device(device), vae=vae, text_encoder=text_encoder, max_images=max_images)

    _guard(run)


if __name__ == "__main__":
    app()
