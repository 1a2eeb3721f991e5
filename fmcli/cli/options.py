"""Options several commands share, each declared once as an Annotated alias, and the parsers of option values."""

from __future__ import annotations

import functools
import inspect
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, List, Optional

import typer

from ..errors import UsageError


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


def seed_option(*args, **kwargs):
    """typer.Option for a seed of fm's random streams: `seed_value` refuses what is not a 32-bit seed."""
    return typer.Option(*args, parser=seed_value, metavar="INTEGER", **kwargs)


def seed_value(value) -> int:
    """A parser: text -> a seed in [0, 2**32) (fmcli.seeding.seed_problem); anything else is a one-line usage error."""
    from ..seeding import seed_problem  # imports torch: only when a command with a seed runs, never for --help

    try:
        seed = int(value)
    except (TypeError, ValueError):
        raise typer.BadParameter(f"{value!r} is not a whole number") from None
    if problem := seed_problem(seed):
        raise typer.BadParameter(problem)
    return seed


Preset = Annotated[str, typer.Option("--preset", "-p", help="Preset name (see presets/) or a .toml file.")]
Overrides = Annotated[List[str], typer.Option("--set", help="Override a setting, e.g. --set train.steps=200 (repeatable).")]
Ckpt = Annotated[str, typer.Option("--ckpt", help="Checkpoint file or run directory (its latest checkpoint).")]
CfgScale = Annotated[Optional[float], float_option("--cfg", min=0.0, help="Classifier-free guidance weight (1 = off).")]
Steps = Annotated[Optional[int], typer.Option("--steps", min=1, max=100_000, help="Solver steps (refused with dopri5, which picks its own, except with cfg-zero: its zero-init spans the first --zero-init-steps of this grid).")]
Seed = Annotated[int, seed_option("--seed", help="Seed, 0 to 2^32-1: sample i's noise depends only on (seed, i).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Samples per forward batch.")]
Ema = Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights (default) or the raw ones.")]
# fid and eval also score a folder (--gen), where nothing is sampled: None tells an option not given from its default.
SeedIfGiven = Annotated[Optional[int], seed_option("--seed", help="Seed, 0 to 2^32-1 (default 0): sample i's noise depends only on (seed, i).")]
EmaIfGiven = Annotated[Optional[bool], typer.Option("--ema/--no-ema", help="Use the EMA weights (default) or the raw ones.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Gpus = Annotated[int, typer.Option("--gpus", min=0, help="Use N local GPUs (DDP over NCCL; sampling shards sample indices).")]
Nproc = Annotated[int, typer.Option("--nproc", min=0, help="Use N local processes (DDP over gloo on CPU, NCCL on CUDA, one GPU each: where --device, or train.device for training, resolves; auto is CUDA when there is one).")]
StopAt = Annotated[Optional[int], typer.Option("--stop-at-step", min=1, help="Checkpoint and stop at this step (resume later).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]

# The solver and guidance names live in solvers.py, which needs torch (seconds to import): their help
# text is filled in only when --help is asked for, so that importing the CLI stays free of torch.
_LAZY_HELP: list[tuple[object, Callable[[], str]]] = []


def _lazy_option(decl: str, help_text: Callable[[], str]):
    info = typer.Option(decl, help="(see --help)")
    _LAZY_HELP.append((info, help_text))
    return info


def fill_lazy_help() -> None:
    for info, text in _LAZY_HELP:
        info.help = text()


def _solver_help() -> str:
    from ..solvers import SOLVERS

    return f"Solver: {', '.join(SOLVERS)} (default: the checkpoint's sample.solver)."


def _guidance_help() -> str:
    from ..solvers import GUIDANCES

    return f"Guidance method of --cfg W: {', '.join(GUIDANCES)} (auto = autoguidance with --guide-ckpt)."


Solver = Annotated[Optional[str], _lazy_option("--solver", _solver_help)]
Guidance = Annotated[Optional[str], _lazy_option("--guidance", _guidance_help)]
GuideCkpt = Annotated[
    Optional[str], typer.Option("--guide-ckpt", help="Autoguidance guide: a smaller or earlier checkpoint of the same data (implies --guidance auto).")
]
SdeNoise = Annotated[Optional[float], float_option("--sde-noise", min=0.0, help="euler-sde diffusion scale: g(t)^2 = 2 * SCALE * (1 - t) (SiT's norm); 0 = plain Euler.")]
ZeroInit = Annotated[Optional[int], typer.Option("--zero-init-steps", help="cfg-zero: steps of the --steps grid at the start with zero velocity, below --steps (default 1; every solver).")]
Interval = Annotated[Optional[str], typer.Option("--guidance-interval", help="LO,HI: guide only for t in [LO, HI] (t=0 noise).")]
Rtol = Annotated[Optional[float], float_option("--rtol", help="Relative tolerance of dopri5, refused with other solvers (default: the checkpoint's sample.rtol).")]
Atol = Annotated[Optional[float], float_option("--atol", help="Absolute tolerance of dopri5, refused with other solvers (default: the checkpoint's sample.atol).")]
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
    `eval` and `reflow` take the solver, precision and compile ones, `demo` precision and compile."""

    cfg_scale: Optional[float] = None
    steps: Optional[int] = None
    solver: Optional[str] = None
    guidance: Optional[str] = None
    guide_ckpt: Optional[str] = None
    guidance_interval: Optional[str] = None
    zero_init_steps: Optional[int] = None
    sde_noise: Optional[float] = None
    rtol: Optional[float] = None
    atol: Optional[float] = None
    precision: Optional[str] = None
    compile_model: Optional[bool] = None

    def given(self) -> list[str]:
        """The options given (not None), as the user spelled them."""
        names = {"cfg_scale": "--cfg", "compile_model": "--compile/--no-compile"}
        return [names.get(k, f"--{k.replace('_', '-')}") for k, v in vars(self).items() if v is not None]

    def refuse_without_ckpt(self, **others) -> None:
        """Sampling options beside --gen DIR (or with nothing to sample) would be accepted and do nothing: exit 2.
        `others`: the command's own sampling-only options (seed, ema, batch_size), None where not given."""
        flags = {"ema": "--ema/--no-ema"}
        given = self.given() + [flags.get(k, f"--{k.replace('_', '-')}") for k, v in others.items() if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} set how --ckpt samples, and nothing is sampled here: drop them (--gen scores the images in its folder)")

    def overrides(self, cfg_runs: bool = True, **extra):
        """A function base -> base with these options (validated in config.sample_settings).
        --guide-ckpt implies --guidance auto, and --guidance auto needs it. `cfg_runs`: the resolved cfg is the
        one that runs (False for `fm eval --cfg W,...`, whose sweep sets it later); `extra`: the command's defaults (a value, or a function of the checkpoint's sample settings)."""
        from ..config import sample_settings

        given = dict(
            cfg=self.cfg_scale, steps=self.steps, solver=self.solver, guidance=self.guidance,
            guidance_interval=parse_interval(self.guidance_interval), zero_init_steps=self.zero_init_steps,
            sde_noise=self.sde_noise, rtol=self.rtol, atol=self.atol, precision=self.precision, compile=self.compile_model,
        )  # fmt: skip
        mine = dict(given)  # the user's options; `extra` are the command's own defaults (reflow's steps)
        given.update({k: v for k, v in extra.items() if given.get(k) is None})
        guide_ckpt = self.guide_ckpt
        if guide_ckpt is not None and given["guidance"] not in (None, "auto"):
            raise UsageError(f"--guide-ckpt is autoguidance's guide: it goes with --guidance auto, not {given['guidance']}")
        if guide_ckpt is not None:
            given["guidance"] = "auto"

        def settings(base):  # a command default may depend on the checkpoint's settings (reflow's solver)
            out = sample_settings(base, **{k: v(base) if callable(v) else v for k, v in given.items()})
            if out.guidance == "auto" and guide_ckpt is None:
                raise UsageError("--guidance auto needs --guide-ckpt CKPT: a smaller or earlier checkpoint of the same data")
            refuse_unused(mine, out)
            if cfg_runs and out.cfg == 1.0:
                refuse_unguided(mine, guide_ckpt)
            return out

        return settings


def refuse_unused(given: dict, settings) -> None:
    """A sampling option the resolved solver or guidance never reads (e.g. --rtol with euler) is a usage error,
    not an option accepted that does nothing; one not given (None) keeps the checkpoint's value, unused or not."""
    from ..solvers import unused_settings

    unused = unused_settings(settings.solver, settings.guidance)
    for key in ("rtol", "atol", "steps", "sde_noise", "zero_init_steps"):
        if given.get(key) is not None and key in unused:
            option = "--rtol/--atol" if key in ("rtol", "atol") else f"--{key.replace('_', '-')}"
            ran = f"--guidance {settings.guidance}" if key == "zero_init_steps" else f"--solver {settings.solver}"
            raise UsageError(f"{option} is not used by {ran} (it goes with {unused[key]}): drop {option} or change {ran.split()[0]}")


def refuse_unguided(given: dict, guide_ckpt) -> None:
    """Guidance options when the guidance weight is 1 (off: the main model alone, whatever the method, interval or
    guide) would be accepted and do nothing: a usage error."""
    options = [f"--guidance {given['guidance']}"] if given.get("guidance") in ("cfg-zero", "auto") else []
    options += [f"--{k.replace('_', '-')}" for k in ("guidance_interval", "zero_init_steps") if given.get(k) is not None]
    options += ["--guide-ckpt"] if guide_ckpt is not None else []
    if options:
        raise UsageError(f"{', '.join(options)} shape guidance of weight --cfg, and cfg is 1 (unguided): give --cfg W (e.g. 2) or drop {', '.join(options)}")


_SAMPLING_OPTIONS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
    for name, annotation in (
        ("cfg_scale", CfgScale), ("steps", Steps), ("solver", Solver), ("guidance", Guidance), ("guide_ckpt", GuideCkpt),
        ("guidance_interval", Interval), ("zero_init_steps", ZeroInit), ("sde_noise", SdeNoise), ("rtol", Rtol), ("atol", Atol),
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



def read_prompts(source: Optional[str]) -> list[str]:
    """Prompts from a file (one per line, blank lines skipped) or from stdin with '-'."""
    if source is None:
        return []
    if source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"--prompts file {path} not found (one prompt per line, or - for stdin)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"--prompts {path} is not a UTF-8 text file (one prompt per line)") from None
        except OSError as err:
            raise UsageError(f"cannot read --prompts {path}: {err.strerror or err}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"--prompts {source}: no prompts (one per line)")
    return lines



def parse_nfe(text: Optional[str], steps: Optional[int] = None) -> Optional[list[int]]:
    """--nfe '1,2,4,8' -> [1, 2, 4, 8] (None without --nfe); anything but positive integers is a usage error, and
    so is --steps beside it (each budget chooses its own steps)."""
    if text is None:
        return None
    if steps is not None:
        raise UsageError("--nfe chooses the steps for each budget: drop --steps")
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"--nfe expects positive integers separated by commas (e.g. 1,2,4,8), got {text!r}")
    return refuse_repeats("--nfe", [int(p) for p in parts])


def refuse_repeats(flag: str, values: list) -> list:
    """A sweep's values, each once: a value listed twice would give two rows of one setting (exit 2, not a row twice)."""
    repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if repeated is not None:
        shown = f"{repeated:g}" if isinstance(repeated, float) else ",".join(f"{v:g}" for v in repeated) if isinstance(repeated, tuple) else repeated
        raise UsageError(f"{flag} lists {shown} twice: give each value once (one row each)")
    return values


def parse_floats(flag: str, text: Optional[str]) -> Optional[list[float]]:
    """'1,1.5,2' -> [1.0, 1.5, 2.0]; anything else is a usage error."""
    if text is None:
        return None
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} expects numbers separated by commas (e.g. 1,1.5,2,4), got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag} expects finite numbers (no nan or inf), got {text!r}")
    return refuse_repeats(flag, values)
