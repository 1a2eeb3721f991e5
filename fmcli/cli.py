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
    size: int = typer.Option(32, "--size", min=8, help="Image size in pixels."),
    count: int = typer.Option(20000, "--count", min=1, help="Number of images (shapes)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (shapes)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
):
    """Turn a dataset into fm's prepared format (manifest.json + x.npy + y.npy + captions.jsonl).

    Example: fm prepare-data shapes --out data/shapes-32 --size 32 --count 20000
    """

    def run():
        if source not in PREPARE_SOURCES:
            raise UsageError(f"unknown source {source!r}; choose one of {', '.join(PREPARE_SOURCES)}")
        if source != "shapes":
            raise UsageError(f"source {source!r} is not available yet in fm {__version__} (only 'shapes')")
        start = time.perf_counter()
        path = _prepare_shapes_with_progress(out, size=size, count=count, seed=seed, force=force)
        summary = {"path": str(path), "count": count, "skipped": 0, "classes": 10, "seconds": round(time.perf_counter() - start, 2)}
        if as_json:
            _emit_json(summary)
        else:
            print(path)

    _guard(run)


def _prepare_shapes_with_progress(out: Path, **kwargs) -> Path:
    from rich.progress import Progress

    from .data.sources import prepare_shapes

    with Progress(console=_stderr_console(), transient=True) as bar:
        task = bar.add_task("shapes", total=kwargs["count"])
        return prepare_shapes(out, progress=lambda n: bar.advance(task, n), **kwargs)


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

        cfg = load_config(preset, overrides)
        if data is not None:
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(data)})})
        if print_config:
            from .config import config_to_dict

            _emit_json(config_to_dict(cfg))
            return
        _run_training(cfg, run_dir or Path("runs") / cfg.name, resume, stop_at_step, _launch_opts(gpus, nproc, nnodes, node_rank, rdzv_endpoint, rdzv_id))

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
        from .checkpoint import load_checkpoint, resolve_checkpoint
        from .config import RESUME_SAFE_KEYS, apply_overrides, validate_config

        ckpt = resolve_checkpoint(target)
        state = load_checkpoint(ckpt)
        cfg = apply_overrides(validate_config(state["config"], source=str(ckpt)), overrides, allowed=RESUME_SAFE_KEYS)
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        _run_training(cfg, run_dir, str(ckpt), stop_at_step, _launch_opts(gpus, nproc, 1, 0, None, None))

    _guard(run)


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
    cfg = _ensure_data(cfg, prepare=not child or int(os.environ.get("RANK", "0")) == 0)
    ckpt = _resume_checkpoint(run_dir, resume_arg)
    if ckpt is None and not os.environ.get("FM_RUN_RESOLVED") and int(os.environ.get("RANK", "0")) == 0:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UsageError(f"run directory {run_dir} already exists; continue it with `fm resume {run_dir}` or `--resume latest`, or pick --run-dir")
    if procs > 1 and not child or launch["nnodes"] > 1 and not child:
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
    path = Path("data") / f"shapes-{cfg.data.image_size}-n{cfg.data.count}-s{cfg.train.seed}"
    if prepare and not (path / "manifest.json").exists():
        _stderr_console().print(f"preparing shapes data in {path}", highlight=False)
        _prepare_shapes_with_progress(path, size=cfg.data.image_size, count=cfg.data.count, seed=cfg.train.seed, force=False)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(path)})})


# ------------------------------------------------------------------------------------------- sample


@app.command()
def sample(
    ckpt: str = typer.Option(..., "--ckpt", help="Checkpoint file or run directory."),
    num_samples: int = typer.Option(16, "--num-samples", "-n", min=1, help="Number of images."),
    class_label: Optional[int] = typer.Option(None, "--class-label", help="Class index for every sample (default: cycle)."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg", min=0.0, help="Classifier-free guidance weight (1 = off)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Solver steps (fixed-step solvers)."),
    solver: Optional[str] = typer.Option(None, "--solver", help="euler, midpoint, heun, rk4 or dopri5."),
    seed: int = typer.Option(0, "--seed", help="Seed: sample i's noise depends only on (seed, i)."),
    out: Path = typer.Option(Path("samples"), "--out", help="Directory (one PNG per sample + grid.png) or FILE.png (grid only)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Samples per forward batch."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights (default) or the raw ones."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print paths, NFE and seconds as JSON on stdout."),
):
    """Generate images from a checkpoint.

    Examples:
      fm sample --ckpt runs/quickstart --num-samples 16 --out samples/
      fm sample --ckpt runs/cifar10/checkpoints/step-0100000.pt --cfg 4 --steps 100 --class-label 3 --out cat.png
    """

    def run():
        import torch

        from .config import SampleConfig
        from .generate import iterate_samples, load_for_sampling
        from .images import save_grid, save_images

        dev = _device(device)
        loaded = load_for_sampling(ckpt, dev, use_ema=ema)
        sample_cfg = _sample_settings(loaded.config.sample, cfg_scale, steps, solver)
        start = time.perf_counter()
        xs, nfe, paths = [], 0, []
        to_dir = out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp")
        for chunk, _, result in iterate_samples(
            loaded, list(range(num_samples)), seed=seed, sample_cfg=sample_cfg, batch_size=batch_size, device=dev, class_label=class_label, shift=loaded.config.flow.shift
        ):
            xs.append(result.x.cpu())
            nfe = result.nfe
            if to_dir:
                paths += save_images(result.x, out, start_index=chunk[0])
        images = torch.cat(xs)
        grid = save_grid(images, out / "grid.png" if to_dir else out)
        seconds = time.perf_counter() - start
        if as_json:
            _emit_json({"paths": [str(p) for p in paths], "grid": str(grid), "num_samples": num_samples, "nfe": nfe, "seconds": round(seconds, 3), "solver": sample_cfg.solver, "steps": sample_cfg.steps, "cfg": sample_cfg.cfg})
        else:
            print(grid)

    _guard(run)


def _sample_settings(base, cfg_scale, steps, solver):
    from .config import SampleConfig

    update = {k: v for k, v in {"cfg": cfg_scale, "steps": steps, "solver": solver}.items() if v is not None}
    try:
        return SampleConfig.model_validate({**base.model_dump(), **update})
    except Exception as err:
        raise UsageError(f"invalid sampling option: {str(err).splitlines()[-1].strip()}") from None


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available")
    return torch.device(name)


# ------------------------------------------------------------------------- not available yet (honest)


def _not_yet(name: str) -> None:
    _print_error(f"`fm {name}` is not available yet in fm {__version__}")
    raise typer.Exit(2)


@app.command("class-grid", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def class_grid(ctx: typer.Context):
    """(not available yet) One row of samples per class."""
    _not_yet("class-grid")


@app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def fid(ctx: typer.Context):
    """(not available yet) FID of generated samples against reference data."""
    _not_yet("fid")


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


if __name__ == "__main__":
    app()
