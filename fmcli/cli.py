"""The `fm` command line: parse, validate, dispatch. No training or math logic lives here.

Results (and --json) go to stdout; logs and progress go to stderr. Exit codes: 0 ok, 1 runtime failure,
2 bad usage or input (one line, no traceback unless --debug).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, List, Optional

import typer

from . import __version__
from .console import emit_json, print_error, stderr_console
from .data.prepare import SOURCES
from .errors import FmError, UsageError
from .fsutil import refuse_existing

# ------------------------------------------------------------------------------------------- the app


class _App(typer.Typer):
    """Typer app whose errors meant for users become one stderr line and exit code 2 (usage) or 1."""

    def __call__(self, *args, **kwargs):
        kwargs["standalone_mode"] = False  # click's errors come here, to be printed as one line too
        argv = kwargs.get("args")
        if any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else map(str, argv))):
            _fill_lazy_help()
        try:
            result = super().__call__(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the one error handler of every command
            sys.exit(_exit_code(err))
        except KeyboardInterrupt:
            print_error("interrupted")
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)


def _exit_code(err: Exception) -> int:
    """Print `err` as one line (or re-raise it under --debug) and return the exit code: 2 for usage errors
    (FmError's own code, click's parse errors), 1 for anything unexpected."""
    from typer._click import exceptions as click  # typer >= 0.24 vendors click; its errors live here

    if isinstance(err, FmError):
        print_error(str(err))
        return err.exit_code
    if isinstance(err, click.NoArgsIsHelpError):
        err.show()  # `fm` alone: the help text, as click prints it
        return err.exit_code
    if isinstance(err, click.ClickException):  # bad option, out-of-range value, missing argument
        where = f" (see `fm {err.ctx.info_name} --help`)" if isinstance(err, click.UsageError) and err.ctx and err.ctx.parent else ""
        print_error(err.format_message().replace("\n", " ") + where)
        return err.exit_code
    if isinstance(err, typer.Abort):
        print_error("aborted")
        return 1
    if _STATE["debug"]:
        raise err
    from .distributed import is_peer_failure

    if not is_peer_failure(err):  # else another rank failed first and printed the cause; stay quiet
        print_error(f"{type(err).__name__}: {err} (rerun with --debug for the traceback)")
    return 1


app = _App(
    name="fm",
    help="Flow-matching image generation: prepare data, train, sample, evaluate, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_STATE = {"debug": False}


def _version(value: bool):
    if value:
        print(f"fm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
):
    """fm: a flow-matching image-generation toolkit."""
    _STATE["debug"] = debug


def _log_line(message: str) -> None:
    """One log line on stderr (commands' notes: the sampling precision and compile choice, warnings)."""
    stderr_console().print(message, highlight=False, markup=False)


def _device(name: str):
    from .distributed import resolve_device

    return resolve_device(name)


# ------------------------------------------------------------------ options shared by several commands


def float_option(*args, min: float | None = None, **kwargs):
    """typer.Option for a float: every float option goes through `finite_float`, which refuses nan and inf
    (click's own float type accepts both, and `nan` slips past any range check)."""
    return typer.Option(*args, parser=finite_float(min), metavar="FLOAT", **kwargs)


def finite_float(minimum: float | None = None) -> Callable[[object], float]:
    """A parser: text -> a finite float (>= `minimum` when given); anything else is a one-line usage error."""

    def parse(value) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{value!r} is not a number") from None
        if not math.isfinite(number):
            raise typer.BadParameter(f"{value!r} is not a finite number (nan and inf are refused)")
        if minimum is not None and number < minimum:
            raise typer.BadParameter(f"{value!r} must be >= {minimum:g}")
        return number

    return parse


Preset = Annotated[str, typer.Option("--preset", "-p", help="Preset name (see presets/) or a .toml file.")]
Overrides = Annotated[List[str], typer.Option("--set", help="Override a setting, e.g. --set train.steps=200 (repeatable).")]
Ckpt = Annotated[str, typer.Option("--ckpt", help="Checkpoint file or run directory (its latest checkpoint).")]
CfgScale = Annotated[Optional[float], float_option("--cfg", min=0.0, help="Classifier-free guidance weight (1 = off).")]
Steps = Annotated[Optional[int], typer.Option("--steps", min=1, help="Solver steps (dopri5 picks its own; with cfg-zero its zero-init still spans the first --zero-init-steps of this grid).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed: sample i's noise depends only on (seed, i).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Samples per forward batch.")]
Ema = Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights (default) or the raw ones.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Gpus = Annotated[int, typer.Option("--gpus", min=0, help="Use N local GPUs (DDP over NCCL; sampling shards sample indices).")]
Nproc = Annotated[int, typer.Option("--nproc", min=0, help="Use N local processes (gloo on CPU).")]
StopAt = Annotated[Optional[int], typer.Option("--stop-at-step", min=1, help="Checkpoint and stop at this step (resume later).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]

# The solver and guidance names live in sampling.py, which needs torch (seconds to import): their help
# text is filled in only when --help is asked for, so that importing the CLI stays free of torch.
_LAZY_HELP: list[tuple[object, Callable[[], str]]] = []


def _lazy_option(decl: str, help_text: Callable[[], str]):
    info = typer.Option(decl, help="(see --help)")
    _LAZY_HELP.append((info, help_text))
    return info


def _fill_lazy_help() -> None:
    for info, text in _LAZY_HELP:
        info.help = text()


def _solver_help() -> str:
    from .sampling import SOLVERS

    return f"Solver: {', '.join(SOLVERS)} (default: the checkpoint's sample.solver)."


def _guidance_help() -> str:
    from .sampling import GUIDANCES

    return f"Guidance method of --cfg W: {', '.join(GUIDANCES)} (auto = autoguidance with --guide-ckpt)."


Solver = Annotated[Optional[str], _lazy_option("--solver", _solver_help)]
Guidance = Annotated[Optional[str], _lazy_option("--guidance", _guidance_help)]
GuideCkpt = Annotated[
    Optional[str], typer.Option("--guide-ckpt", help="Autoguidance guide: a smaller or earlier checkpoint of the same data (implies --guidance auto).")
]
SdeNoise = Annotated[Optional[float], float_option("--sde-noise", min=0.0, help="euler-sde diffusion scale: g(t)^2 = 2 * SCALE * (1 - t) (SiT's norm); 0 = plain Euler.")]
ZeroInit = Annotated[Optional[int], typer.Option("--zero-init-steps", help="cfg-zero: steps of the --steps grid at the start with zero velocity, below --steps (default 1; every solver).")]
Interval = Annotated[Optional[str], typer.Option("--guidance-interval", help="LO,HI: guide only for t in [LO, HI] (t=0 noise).")]
SamplePrecision = Annotated[
    Optional[str],
    typer.Option("--precision", help="Network precision: auto, bf16, fp16 (CUDA) or fp32 (default: the checkpoint's sample.precision; auto = bf16 where measured faster, see `fm env`)."),
]
SampleCompile = Annotated[
    Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the network (default: sample.compile; auto = where inductor works).")
]


def parse_interval(text: Optional[str]):
    """--guidance-interval LO,HI -> (lo, hi) (range checks are SampleConfig's)."""
    if text is None:
        return None
    try:
        interval = tuple(float(v) for v in text.split(","))
    except ValueError:
        interval = ()
    if len(interval) != 2:
        raise UsageError(f"--guidance-interval expects LO,HI (e.g. 0.1,0.8), got {text!r}")
    return interval


@dataclass(frozen=True)
class SamplingFlags:
    """The sampling options that `sample`, `class-grid` and `fid` share, declared once (see `sampling_options`);
    `reflow` and `demo` take the precision and compile ones too."""

    cfg_scale: Optional[float] = None
    steps: Optional[int] = None
    solver: Optional[str] = None
    guidance: Optional[str] = None
    guide_ckpt: Optional[str] = None
    guidance_interval: Optional[str] = None
    zero_init_steps: Optional[int] = None
    sde_noise: Optional[float] = None
    precision: Optional[str] = None
    compile_model: Optional[bool] = None

    def overrides(self, **extra):
        """A function base -> base with these options (validated in config.sample_settings).
        --guide-ckpt implies --guidance auto, and --guidance auto needs it."""
        from .config import sample_settings

        given = dict(
            cfg=self.cfg_scale, steps=self.steps, solver=self.solver, guidance=self.guidance,
            guidance_interval=parse_interval(self.guidance_interval), zero_init_steps=self.zero_init_steps,
            sde_noise=self.sde_noise, precision=self.precision, compile=self.compile_model, **extra,
        )  # fmt: skip
        guide_ckpt = self.guide_ckpt
        if guide_ckpt is not None and given["guidance"] not in (None, "auto"):
            raise UsageError(f"--guide-ckpt is autoguidance's guide: it goes with --guidance auto, not {given['guidance']}")
        if guide_ckpt is not None:
            given["guidance"] = "auto"

        def settings(base):
            out = sample_settings(base, **given)
            if out.guidance == "auto" and guide_ckpt is None:
                raise UsageError("--guidance auto needs --guide-ckpt CKPT: a smaller or earlier checkpoint of the same data")
            return out

        return settings


_SAMPLING_OPTIONS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
    for name, annotation in (
        ("cfg_scale", CfgScale), ("steps", Steps), ("solver", Solver), ("guidance", Guidance), ("guide_ckpt", GuideCkpt),
        ("guidance_interval", Interval), ("zero_init_steps", ZeroInit), ("sde_noise", SdeNoise),
        ("precision", SamplePrecision), ("compile_model", SampleCompile),
    )
]  # fmt: skip


def sampling_options(command):
    """Give `command` the shared sampling options in place of its `sampling: SamplingFlags` parameter.

    Typer reads a command's options from its signature, so the wrapper's signature lists the options
    (where `sampling` stood) and the wrapper packs their values into one SamplingFlags."""
    signature = inspect.signature(command, eval_str=True)
    names = [p.name for p in _SAMPLING_OPTIONS]

    @functools.wraps(command)
    def wrapper(**kwargs):
        flags = SamplingFlags(**{name: kwargs.pop(name) for name in names})
        return command(sampling=flags, **kwargs)

    params = []
    for p in signature.parameters.values():
        params.extend(_SAMPLING_OPTIONS if p.name == "sampling" else [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)])
    wrapper.__signature__ = signature.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


# ------------------------------------------------------------------------------------- prepare-data

@app.command("prepare-data")
def prepare_data(
    *,
    source: Annotated[str, typer.Argument(help=f"Data source: {', '.join(SOURCES)}.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (written atomically).")],
    root: Annotated[Optional[str], typer.Option("--root", help="Input: archive, folder, jsonl file, or a quoted tar glob 'shards/*.tar'.")] = None,
    split: Annotated[str, typer.Option("--split", help="train or test (cifar10, mnist, sklearn-digits).")] = "train",
    size: Annotated[int, typer.Option("--size", min=8, help="Output size: resize the short side, center crop (Lanczos).")] = 32,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Stop after N usable images.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Decoding processes (default: cores, at most 8).")] = None,
    count: Annotated[int, typer.Option("--count", min=1, help="Number of images (shapes).")] = 20000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (shapes).")] = 0,
    max_member_mib: Annotated[float, float_option("--max-member-mib", min=0.001, help="tar: skip (and count) members larger than this, unread.")] = 64.0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    vae: Annotated[Optional[str], typer.Option("--vae", help="Local diffusers VAE directory: store float16 latents instead of pixels.")] = None,
    text_encoder: Annotated[Optional[str], typer.Option("--text-encoder", help="Local text encoder directory (T5/CLIP) recorded for the captions.")] = None,
    cache_text: Annotated[bool, typer.Option("--cache-text", help="Also store the text encoder's states and masks (text.npy, text_mask.npy).")] = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Text tokens per caption (padding masked).")] = 128,
    encode_batch: Annotated[int, typer.Option("--encode-batch-size", min=1, help="Images per encoder batch.")] = 64,
    device: Annotated[str, typer.Option("--device", help="Encoder device: auto, cpu or cuda.")] = "auto",
):
    """Turn a dataset into fm's prepared format (manifest.json + x.npy + y.npy + captions.jsonl).

    Examples:

      fm prepare-data shapes --out data/shapes-32 --size 32 --count 20000

      fm prepare-data cifar10 --root cifar-10-python.tar.gz --split train --out data/cifar10

      fm prepare-data mnist --root mnist/ --size 32 --out data/mnist

      fm prepare-data sklearn-digits --size 32 --out data/digits32            # scikit-learn's 8x8 digits, upscaled

      fm prepare-data folder --root celeba_hq/ --size 256 --workers 8 --out data/celebahq256

      fm prepare-data tar --root 'shards/*.tar' --size 64 --out data/captions64

      fm prepare-data captions --root pairs.jsonl --size 64 --out data/t2i-64 --vae weights/sd-vae-ft-mse --text-encoder weights/t5-small --cache-text
    """

    from .data.prepare import prepare_dataset, skipped_note

    refuse_existing(out, force)
    encode = dict(vae=vae, text_encoder=text_encoder, cache_text=cache_text, max_tokens=max_tokens, batch_size=encode_batch) if vae or text_encoder else None
    summary = prepare_dataset(
        source, out, root=root, split=split, size=size, limit=limit, workers=workers, count=count, seed=seed, max_member_mib=max_member_mib,
        force=force, encode=encode, device=device,
    )  # fmt: skip
    if note := skipped_note(summary):
        _log_line(note)
    if as_json:
        emit_json({k: v for k, v in vars(summary).items() if k != "skipped_examples"})
    else:
        stderr_console().print(f"wrote {summary.count} images ({summary.bytes / 1e6:.1f} MB) in {summary.seconds:.1f} s", highlight=False)
        print(summary.path)


# -------------------------------------------------------------------------------------------- train


@app.command()
def train(
    preset: Preset = "quickstart",
    data: Annotated[Optional[Path], typer.Option("--data", help="Prepared dataset directory (overrides data.path).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Run directory (default runs/NAME).")] = None,
    overrides: Overrides = [],
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config as JSON and exit.")] = False,
    resume: Annotated[Optional[str], typer.Option("--resume", help="'latest' (in the run directory) or a checkpoint path.")] = None,
    stop_at_step: StopAt = None,
    gpus: Gpus = 0,
    nproc: Nproc = 0,
    nnodes: Annotated[int, typer.Option("--nnodes", min=1, help="Number of nodes (multi-node DDP).")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", min=0, help="This node's rank (multi-node DDP).")] = 0,
    rdzv_endpoint: Annotated[Optional[str], typer.Option("--rdzv-endpoint", help="HOST:PORT of the rendezvous (multi-node).")] = None,
    rdzv_id: Annotated[Optional[str], typer.Option("--rdzv-id", help="Rendezvous id shared by all nodes.")] = None,
):
    """Train a flow-matching model.

    Examples:
      fm train --preset quickstart
      fm train --preset cifar10 --data data/cifar10 --gpus 2 --set train.steps=100000
      fm train --preset quickstart --set train.steps=200 --print-config
    """

    from .config import config_to_dict
    from .launch import launch_options, run_training, training_config

    launch = launch_options(gpus, nproc, nnodes, node_rank, rdzv_endpoint, rdzv_id)
    cfg, target = training_config(preset, overrides, data=data, run_dir=run_dir, resume=resume)
    if print_config:
        emit_json(config_to_dict(cfg))
        return
    _print_checkpoint(run_training(cfg, target, resume, stop_at_step, launch))


@app.command()
def resume(
    *,
    target: Annotated[Path, typer.Argument(help="A run directory (resumes its latest checkpoint) or a checkpoint file.")],
    overrides: Annotated[List[str], typer.Option("--set", help="Change a resume-safe setting, e.g. --set train.steps=2000.")] = [],
    stop_at_step: StopAt = None,
    gpus: Gpus = 0,
    nproc: Nproc = 0,
):
    """Continue a stopped run exactly where it left off.

    Examples:
      fm resume runs/quickstart
      fm resume runs/quickstart --set train.steps=4000
    """

    from .launch import launch_options, resume_training

    _print_checkpoint(resume_training(target, overrides, stop_at_step, launch_options(gpus, nproc)))


@app.command("_train-resolved", hidden=True)
def train_resolved(
    *,
    config_file: Annotated[Path, typer.Argument()],
    run_dir: Annotated[Path, typer.Option("--run-dir")],
    resume_arg: Annotated[Optional[str], typer.Option("--resume")] = None,
    stop_at_step: Annotated[Optional[int], typer.Option("--stop-at-step")] = None,
):
    """Internal: one rank of a run whose config the launching parent already resolved."""

    from .launch import train_resolved as train_rank

    _print_checkpoint(train_rank(config_file, run_dir, resume_arg, stop_at_step))


def _print_checkpoint(path) -> None:
    """The last checkpoint on stdout (rank 0 only), for scripts: `ckpt=$(fm train ...)`."""
    if path is not None and int(os.environ.get("RANK", "0")) == 0:
        print(path)


# ------------------------------------------------------------------------------------------- sample


@app.command()
@sampling_options
def sample(
    ckpt: Ckpt,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-n", min=1, help="Number of images (default 16, or one per prompt).")] = None,
    class_label: Annotated[Optional[int], typer.Option("--class-label", help="Class index for every sample (default: cycle).")] = None,
    prompt: Annotated[List[str], typer.Option("--prompt", help="Text prompt (text models; repeatable: samples cycle through them).")] = [],
    prompts_file: Annotated[Optional[str], typer.Option("--prompts", help="File with one prompt per line, or - for stdin.")] = None,
    vae: Annotated[Optional[str], typer.Option("--vae", help="Local VAE directory (latent models; default: FM_VAE, then the run's).")] = None,
    text_encoder: Annotated[Optional[str], typer.Option("--text-encoder", help="Local text encoder directory (default: FM_TEXT_ENCODER, then the run's).")] = None,
    sampling: SamplingFlags = SamplingFlags(),  # the shared sampling options (see sampling_options)
    rtol: Annotated[Optional[float], float_option("--rtol", help="Relative tolerance (dopri5).")] = None,
    atol: Annotated[Optional[float], float_option("--atol", help="Absolute tolerance (dopri5).")] = None,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option("--out", help="Directory (one PNG per sample + grid.png) or FILE.png (grid only).")] = Path("samples"),
    gif: Annotated[Optional[Path], typer.Option("--gif", help="Also write a trajectory GIF (noise to image) of the grid.")] = None,
    gif_frames: Annotated[int, typer.Option("--gif-frames", min=2, help="Frames in the GIF, at evenly spaced solver times.")] = 16,
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
      fm sample --ckpt runs/quickstart --cfg 2 --guide-ckpt runs/quickstart/checkpoints/step-0000950.pt --out auto.png
      fm sample --ckpt runs/quickstart-text --prompt "a red circle on a black background" -n 8 --out red.png
      echo "a blue star on a white background" | fm sample --ckpt runs/quickstart-text --prompts - --out star.png
    """

    from .generate import sample_command, sample_outputs
    from .launch import on_ranks

    if gif is not None and gif.suffix.lower() != ".gif":
        raise UsageError(f"--gif expects a .gif file name, got {gif}")
    if gif is not None and (gpus > 1 or nproc > 1):
        raise UsageError("--gif is drawn by one process: drop --gpus/--nproc")
    overrides = sampling.overrides(rtol=rtol, atol=atol)
    texts = list(prompt) + _read_prompts(prompts_file)  # read stdin once, in the launching process
    n = num_samples or len(texts) or 16
    refuse_existing(sample_outputs(out, n) + [gif], force)  # before any work; every rank checks again
    work = functools.partial(
        sample_command, ckpt=ckpt, texts=texts, n=n, class_label=class_label, sample_overrides=overrides, seed=seed, out=out, gif=gif, gif_frames=gif_frames,
        batch_size=batch_size, ema=ema, vae=vae, text_encoder=text_encoder, force=force, guide_ckpt=sampling.guide_ckpt, grid=grid, log=_log_line,
    )  # fmt: skip
    summary = on_ranks(work, device=device, gpus=gpus, nproc=nproc, extra=_prompt_args(n, texts) if prompts_file == "-" else None)
    if summary is None:  # a launcher, or not rank 0
        return
    if as_json:
        emit_json(summary)
    else:
        print(summary["grid"])
        if summary["gif"]:
            print(summary["gif"])


def _prompt_args(n: int | None, texts: list[str]) -> list[str]:
    """Stdin's prompts (read once, in the launcher) as arguments for the relaunched ranks, with the count they imply."""
    return (["--num-samples", str(n)] if n is not None else []) + [a for t in texts for a in ("--prompt", t)]


# ------------------------------------------------------------------------------------------- reflow


@app.command()
def reflow(
    *,
    ckpt: Annotated[str, typer.Option("--ckpt", help="Teacher: checkpoint file, run directory or export directory.")],
    num_pairs: Annotated[int, typer.Option("--num-pairs", "-n", min=1, help="Number of (noise, sample) pairs.")],
    out: Annotated[Path, typer.Option("--out", help="Output dataset directory (kind 'pairs', written atomically).")],
    solver: Annotated[str, typer.Option("--solver", help="Teacher ODE solver: heun, euler, midpoint, rk4, ab2 or dopri5 (euler-sde is refused: pairs need the ODE).")] = "heun",
    steps: Annotated[int, typer.Option("--steps", min=1, help="Solver steps (fixed-step solvers).")] = 50,
    cfg_scale: Annotated[Optional[float], float_option("--cfg", min=0.0, help="Classifier-free guidance weight (default: the teacher's sample.cfg).")] = None,
    rtol: Annotated[Optional[float], float_option("--rtol", help="Relative tolerance (dopri5).")] = None,
    atol: Annotated[Optional[float], float_option("--atol", help="Absolute tolerance (dopri5).")] = None,
    prompt: Annotated[List[str], typer.Option("--prompt", help="Text prompt (text teachers; repeatable: pair i takes prompt i mod P).")] = [],
    prompts_file: Annotated[Optional[str], typer.Option("--prompts", help="File with one prompt per line, or - for stdin.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed: pair i's noise depends only on (seed, i).")] = 0,
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
      fm train --preset quickstart --data data/quickstart-pairs --set flow.coupling=pairs --set train.init_from=runs/quickstart
    """

    from .distributed import launched_externally
    from .launch import on_ranks
    from .reflow import check_teacher, reflow_command

    texts = list(prompt) + _read_prompts(prompts_file)  # read stdin once, in the launching process
    flags = SamplingFlags(cfg_scale=cfg_scale, steps=steps, solver=solver, precision=precision, compile_model=compile_model)
    overrides = flags.overrides(rtol=rtol, atol=atol)
    if not launched_externally():  # the one-line refusals come before relaunching or solving anything
        check_teacher(ckpt, out, texts, force, overrides)
    work = functools.partial(
        reflow_command, ckpt=ckpt, out=out, texts=texts, sample_overrides=overrides, num_pairs=num_pairs, seed=seed, batch_size=batch_size, ema=ema,
        text_encoder=text_encoder, force=force, log=_log_line,
    )  # fmt: skip
    summary = on_ranks(work, device=device, gpus=gpus, nproc=nproc, extra=_prompt_args(None, texts) if prompts_file == "-" else None)
    if summary is None:  # a launcher, or not rank 0
        return
    if as_json:
        emit_json(vars(summary))
    else:
        stderr_console().print(f"{summary.count} pairs, {summary.nfe} NFE each, {summary.seconds:.1f} s ({summary.chunks_reused} chunks reused)", highlight=False)
        print(summary.path)


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

    from .export import export_checkpoint

    summary = export_checkpoint(ckpt, out, fmt, use_ema=ema, force=force)
    if as_json:
        emit_json(vars(summary))
    else:
        print(summary.path)


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

    from .generate import class_grid_command

    if out.suffix.lower() != ".png":
        raise UsageError(f"--out expects a .png file name, got {out}")
    refuse_existing(out, force)
    summary = class_grid_command(
        ckpt, out, per_class=samples_per_class, sample_overrides=sampling.overrides(), guide_ckpt=sampling.guide_ckpt, seed=seed,
        batch_size=batch_size, ema=ema, device=_device(device), log=_log_line,
    )  # fmt: skip
    if as_json:
        emit_json(summary)
    else:
        print(summary["path"])


# ---------------------------------------------------------------------------------------------- fid


@app.command()
@sampling_options
def fid(
    *,
    ref: Annotated[Path, typer.Option("--ref", help="Reference: prepared dataset directory, image folder, or statistics .npz.")],
    gen: Annotated[Optional[Path], typer.Option("--gen", help="Folder of generated images to score.")] = None,
    ckpt: Annotated[Optional[str], typer.Option("--ckpt", help="Checkpoint (or run directory) to sample from and score.")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-n", min=2, help="Samples to generate with --ckpt.")] = None,
    save_stats: Annotated[Optional[Path], typer.Option("--save-stats", help="Write the reference statistics to FILE.npz.")] = None,
    features: Annotated[str, typer.Option("--features", help="inception (default), tiny, or module:factory; only inception is comparable to published FID.")] = "inception",
    inception: Annotated[Optional[str], typer.Option("--inception", help="Path to inception-2015-12-05.pt (default: $FM_INCEPTION).")] = None,
    inception_unverified: Annotated[bool, typer.Option("--inception-unverified", help="Use an Inception file whose sha256 differs from the reference (FID not comparable).")] = False,
    sampling: SamplingFlags = SamplingFlags(),  # the shared sampling options (see sampling_options)
    seed: Seed = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch (generation and features).")] = 64,
    ema: Ema = True,
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

    from .launch import on_ranks

    budgets = _parse_nfe(nfe) if nfe is not None else None
    if budgets is not None and sampling.steps is not None:
        raise UsageError("--nfe chooses the steps for each budget: drop --steps")
    overrides = sampling.overrides()
    if (gpus or nproc) and ckpt is None:
        raise UsageError("--gpus/--nproc shard sample generation: they go with --ckpt")
    work = functools.partial(
        _fid_rank, ref=ref, gen=gen, ckpt=ckpt, save_stats=save_stats, features=features, inception=inception, inception_unverified=inception_unverified,
        num_samples=num_samples, sample_overrides=overrides, guide_ckpt=sampling.guide_ckpt, nfe=budgets, seed=seed, batch_size=batch_size, ema=ema,
        out=out, kid=kid, force=force,
    )  # fmt: skip
    result = on_ranks(work, device=device, gpus=gpus, nproc=nproc)
    if result is None:  # a launcher, or not rank 0
        return
    if as_json:
        emit_json(result)
    elif isinstance(result, list):
        _print_nfe_table(result)
    elif "fid" not in result:
        print(result["stats"])
    else:
        for key, value in result.items():
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")


def _fid_rank(ctx, **request):
    """One rank of `fm fid`: rank 0 logs, shows progress and returns the result."""
    from .console import progress

    log = _log_line if ctx.is_main else (lambda message: None)
    result = fid_checked(ctx=ctx, device=ctx.device, log=log, progress_factory=lambda total: progress(stderr_console(), "sampling", total), **request)
    return result if ctx.is_main else None


def fid_checked(*, force: bool, device, log, ctx=None, progress_factory=None, **request):
    """`fm fid` past parsing: its flags checked (on every rank), then `evaluate.fid`."""
    from .evaluate import FidRequest, fid

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
        refuse_existing(req.save_stats, force)
    if req.gen is not None and not Path(req.gen).is_dir():
        raise UsageError(f"--gen {req.gen} is not a directory of images")
    if req.gen is not None and (req.num_samples is not None or req.out is not None):
        raise UsageError("--num-samples and --out go with --ckpt; --gen scores every image in its folder")
    if req.nfe is not None and req.ckpt is None:
        raise UsageError("--nfe sweeps the sampler of a model: it goes with --ckpt")
    if req.out is not None and req.num_samples is not None:
        from .distributed import barrier
        from .images import sample_file

        refuse_existing([sample_file(req.out, i) for i in range(req.num_samples)], force)
        if ctx is not None:
            barrier(ctx)  # every rank has checked before any rank writes its samples


def _parse_nfe(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8]; anything but positive integers is a usage error."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"--nfe expects positive integers separated by commas (e.g. 1,2,4,8), got {text!r}")
    return [int(p) for p in parts]


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
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-n", min=6, help="Samples per setting with --ckpt (the reference and the floor use as many real images).")] = None,
    features: Annotated[str, typer.Option("--features", help="Feature spaces, comma-separated: domain (a classifier of --data), inception, dinov2, tiny.")] = "domain",
    classifier: Annotated[Optional[str], typer.Option("--classifier", help="Where the domain classifier is cached (default DATA/fm-classifier-sSEED.pt).")] = None,
    classifier_seed: Annotated[int, typer.Option("--classifier-seed", help="Seed of the domain classifier's training.")] = 0,
    classifier_steps: Annotated[Optional[int], typer.Option("--classifier-steps", min=1, help="Training steps of the domain classifier (default 1500).")] = None,
    inception: Annotated[Optional[str], typer.Option("--inception", help="inception-2015-12-05.pt (default: $FM_INCEPTION).")] = None,
    dinov2: Annotated[Optional[str], typer.Option("--dinov2", help="Local transformers Dinov2Model directory (default: $FM_DINOV2).")] = None,
    cfg_scales: Annotated[Optional[str], typer.Option("--cfg", help="Guidance scale(s), comma-separated: a sweep, one row each (e.g. 1,1.5,2,4).")] = None,
    intervals: Annotated[List[str], typer.Option("--guidance-interval", help="LO,HI guidance interval (repeatable: a sweep).")] = [],
    nfe: Annotated[Optional[str], typer.Option("--nfe", help="NFE budgets, comma-separated (the solver's steps per budget).")] = None,
    steps: Steps = None,
    solver: Solver = None,
    guidance: Guidance = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours for precision/recall/density/coverage.")] = 5,
    kid: Annotated[bool, typer.Option("--kid/--no-kid", help="Also report KID (100 subsets of up to 1,000).")] = True,
    seed: Seed = 0,
    batch_size: BatchSize = 64,
    ema: Ema = True,
    device: Device = "auto",
    as_json: Json = False,
):
    """Fidelity against a prepared dataset: FD, KID, precision/recall, density/coverage per feature space, conditional
    accuracy and per-class FD (domain features), each beside its real-vs-real floor, and the NFE.

    Examples:
      fm eval --ckpt runs/quickstart --data data/shapes-32-n20000-s0 -n 1000
      fm eval --ckpt runs/quickstart --data data/shapes-32-n20000-s0 -n 500 --cfg 1,1.5,2,4 --guidance-interval 0,1 --guidance-interval 0.2,1 --json > frontier.json
      fm plot frontier.json     # recall against accuracy, one point per setting
      fm eval --gen samples/ --data data/digits32 --features domain,dinov2 --dinov2 weights/dinov2-base
    """

    from .console import progress
    from .fidelity import EvalRequest, evaluate_fidelity, format_table

    if nfe is not None and steps is not None:
        raise UsageError("--nfe chooses the steps for each budget: drop --steps")
    request = EvalRequest(
        data=data, ckpt=ckpt, gen=gen, num_samples=num_samples, spaces=tuple(s.strip() for s in features.split(",") if s.strip()),
        cfgs=_parse_floats("--cfg", cfg_scales), intervals=[parse_interval(i) for i in intervals] or None,
        nfes=_parse_nfe(nfe) if nfe is not None else None, sample_overrides=SamplingFlags(steps=steps, solver=solver, guidance=guidance).overrides(),
        classifier=classifier, classifier_seed=classifier_seed, classifier_steps=classifier_steps, inception=inception, dinov2=dinov2, k=k, kid=kid, seed=seed, batch_size=batch_size, ema=ema,
    )  # fmt: skip
    console = stderr_console()
    floor, rows = evaluate_fidelity(request, device=_device(device), log=lambda m: console.print(m, highlight=False, markup=False),
                                    progress_factory=lambda total: progress(console, "sampling", total))  # fmt: skip
    if as_json:
        emit_json(rows)
    else:
        print(format_table(floor, rows))


def _parse_floats(flag: str, text: Optional[str]) -> Optional[list[float]]:
    """'1,1.5,2' -> [1.0, 1.5, 2.0]; anything else is a usage error."""
    if text is None:
        return None
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} expects numbers separated by commas (e.g. 1,1.5,2,4), got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag} expects finite numbers (no nan or inf), got {text!r}")
    return values


# -------------------------------------------------------------------------------------------- bench


@app.command()
def bench(
    preset: Preset = "quickstart",
    overrides: Overrides = [],
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="'auto' (autotune the training batch) or a number.")] = "auto",
    mode: Annotated[str, typer.Option("--mode", help="train, sample or both.")] = "both",
    steps: Annotated[int, typer.Option("--steps", help="Timed iterations: consecutive training steps (img/s over the block, as the training log computes it); solver steps for sampling.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed warmup training steps before the clock starts.")] = 2,
    precision: Annotated[Optional[str], typer.Option("--precision", help="auto, bf16, fp16 or fp32 (default: the preset's train.precision; auto = measured, see `fm env`).")] = None,
    compile_model: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model (default: the preset's train.compile; auto = where inductor works).")] = None,
    max_memory: Annotated[Optional[float], float_option("--max-memory", help="Memory budget in GiB for autotune (CPU default: half the RAM).")] = None,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", help="Largest batch autotune tries (default: the preset's train.global_batch_size).")] = None,
    compare: Annotated[Optional[str], typer.Option("--compare", help="'diffusers': also measure diffusers' DiTTransformer2DModel.")] = None,
    device: Device = "auto",
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Cache the autotune result in RUN_DIR/autotune.json (for micro_batch_size='auto').")] = None,
    as_json: Json = False,
):
    """Autotune the batch size; report training and sampling throughput, memory, FLOPs and MFU.

    Examples:
      fm bench --preset quickstart
      fm bench --preset cifar10 --batch-size 256 --precision bf16 --compare diffusers --json
      fm bench --preset quickstart --mode train --max-memory 4
    """

    from .bench import BenchOptions, bench_notes, bench_table, run_bench
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
    report = run_bench(cfg, opts, log=_log_line)
    stderr_console().print(bench_table(report))
    for line in bench_notes(report):
        stderr_console().print(line, highlight=False)
    if as_json:
        emit_json(report)


# -------------------------------------------------------------------------------------------- env


@app.command("env")
def env_command(
    device: Device = "auto",
    width: Annotated[int, typer.Option("--width", min=8, help="Model width for the probe's GEMM (the quickstart DiT is 128).")] = 384,
    remeasure: Annotated[bool, typer.Option("--remeasure", help="Forget this machine's cached probes and measure again (e.g. one taken under heavy load).")] = False,
    as_json: Json = False,
):
    """What this machine is and what `auto` picks on it: device, CPU flags, GPUs, versions, the fp32/bf16 probe,
    precision and compile choice, C++ compiler, optional extras.

    The probe takes a few seconds the first time and is cached in $XDG_CACHE_HOME/fm/probe.json (~/.cache/fm);
    --remeasure measures it again.

    Examples:
      fm env
      fm env --json
      fm env --width 128
      fm env --remeasure
    """

    from .distributed import resolve_device
    from .hardware import environment_report, environment_text

    report = environment_report(resolve_device(device), width=width, remeasure=remeasure)
    if as_json:
        emit_json(report)
    else:
        print(environment_text(report))


# ------------------------------------------------------------------------------------------- plot


@app.command()
def plot(
    *,
    run_dir: Annotated[Path, typer.Argument(help="Run directory (reads RUN_DIR/metrics.jsonl), or the JSON of `fm fid --nfe ... --json`.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output image (.png, .svg, .pdf); default RUN_DIR/loss.png (or SWEEP.png), refreshed.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    y_metric: Annotated[str, typer.Option("--y", help="fm eval sweeps: recall, precision, coverage, density or fd against accuracy.")] = "recall",
):
    """Plot loss and learning-rate curves (and FID or FD/precision/recall/coverage/accuracy when logged) from a
    run's metrics.jsonl, FID against NFE from `fm fid --nfe` sweeps (one curve per solver/guidance), or the
    frontier of an `fm eval` sweep: recall (or --y fd ...) against conditional accuracy (needs matplotlib).

    Examples:
      fm plot runs/quickstart
      fm plot runs/cifar10 --out cifar10-curves.png
      fm fid --ckpt runs/quickstart -n 500 --ref data/shapes --features tiny --nfe 2,4,8,16 --solver heun --json >> sweep.json
      fm plot sweep.json
      fm eval --ckpt runs/quickstart --data data/shapes-32-n20000-s0 -n 500 --cfg 1,2,3,4 --json > frontier.json
      fm plot frontier.json --y fd --out frontier-fd.png
    """

    from .plot import plot_run, plot_sweep

    refuse_existing(out, force)  # the default RUN_DIR/loss.png is fm's own view of metrics.jsonl: refreshed
    print(plot_sweep(run_dir, out, y=y_metric) if run_dir.is_file() else plot_run(run_dir, out))


# ------------------------------------------------------------------------------------------- demo


@app.command()
def demo(
    ckpt: Ckpt,
    host: Annotated[str, typer.Option("--host", help="Interface to bind (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 7860,
    share: Annotated[bool, typer.Option("--share", help="Also open a public Gradio share link.")] = False,
    device: Device = "auto",
    vae: Annotated[Optional[str], typer.Option("--vae", help="Local diffusers VAE directory (latent models).")] = None,
    text_encoder: Annotated[Optional[str], typer.Option("--text-encoder", help="Local text encoder directory (text models).")] = None,
    max_images: Annotated[int, typer.Option("--max-images", min=1, help="Largest grid a visitor may request.")] = 16,
    guide_ckpt: GuideCkpt = None,
    precision: SamplePrecision = None,
    compile_model: SampleCompile = None,
):
    """Interactive web demo (needs gradio): prompt or class, guidance, steps, solver, seed; the image forms step by step.

    Examples:
      fm demo --ckpt runs/quickstart
      fm demo --ckpt runs/quickstart-text --port 8080
      fm demo --ckpt runs/quickstart --guide-ckpt runs/quickstart/checkpoints/step-0000950.pt   # offers autoguidance
    """

    from .demo import launch_demo

    launch_demo(
        ckpt, host=host, port=port, share=share, device=_device(device), vae=vae, text_encoder=text_encoder, max_images=max_images,
        guide_ckpt=guide_ckpt, precision=precision, compile_model=compile_model, log=_log_line,
    )  # fmt: skip


if __name__ == "__main__":
    app()
