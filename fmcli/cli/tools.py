"""`fm bench`, `fm env`, `fm plot` and `fm demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..console import emit_json, stderr_console
from ..errors import UsageError
from ..fsutil import refuse_existing
from .app import app, log_line, torch_device
from .options import Ckpt, Device, GuideCkpt, Json, Overrides, Preset, SampleCompile, SamplePrecision, float_option


@app.command()
def bench(
    preset: Preset = "quickstart",
    overrides: Overrides = [],
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="'auto' (autotune the training batch) or a number.")] = "auto",
    mode: Annotated[str, typer.Option("--mode", help="train, sample or both.")] = "both",
    steps: Annotated[int, typer.Option("--steps", help="Timed iterations a round: consecutive training steps (img/s over the block, as the training log computes it); solver steps for sampling.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed warmup training steps before the clock starts.")] = 2,
    rounds: Annotated[int, typer.Option("--rounds", help="Timed rounds: each figure is their median, with their range; ratios come from rounds interleaved in one trial.")] = 5,
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

    With mean flows or REPA on (the quickstart's repa.encoder = "auto" is, on the shapes), also what it costs a training step, against the same run without it.

    Examples:
      fm bench --preset quickstart
      fm bench --preset cifar10 --batch-size 256 --precision bf16 --compare diffusers --json
      fm bench --preset quickstart --mode train --max-memory 4
    """

    from rich.console import Console

    from ..bench import BenchOptions, bench_notes, bench_table, run_bench
    from ..config import load_config

    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) > 0):
        raise UsageError(f"--batch-size must be 'auto' or a positive integer, not {batch_size!r}")
    if steps < 1 or rounds < 1 or warmup < 0 or (max_batch is not None and max_batch < 1) or (max_memory is not None and max_memory <= 0):
        raise UsageError("--steps, --rounds and --max-batch must be >= 1, --warmup >= 0, --max-memory > 0")
    cfg = load_config(preset, overrides)
    opts = BenchOptions(
        batch_size=None if batch_size == "auto" else int(batch_size), mode=mode, steps=steps, warmup=warmup, rounds=rounds, precision=precision,
        compile=compile_model, max_memory_gib=max_memory, max_batch=max_batch, compare=compare, device=device, run_dir=run_dir,
    )
    report = run_bench(cfg, opts, log=log_line)
    # The table is the result (stdout); with --json stdout holds the JSON alone, so the table goes to stderr.
    console = stderr_console() if as_json else Console()
    console.print(bench_table(report))
    for line in bench_notes(report):
        console.print(line, highlight=False)
    if as_json:
        emit_json(report)


# -------------------------------------------------------------------------------------------- env


@app.command("env")
def env_command(
    device: Device = "auto",
    width: Annotated[int, typer.Option("--width", min=8, max=8192, help="Model width for the probe's GEMM (the quickstart DiT is 128; DiT-XL 1152).")] = 384,
    remeasure: Annotated[bool, typer.Option("--remeasure", help="Forget this machine's cached probes and measure again (e.g. one taken under heavy load).")] = False,
    as_json: Json = False,
):
    """What this machine is and what `auto` picks on it (precision, compile), with the probe behind the choice.

    Device, CPU flags, GPUs, versions, the fp32/bf16 probe, precision and compile choice, C++ compiler, optional extras.

    The probe takes a few seconds the first time and is cached in $XDG_CACHE_HOME/fm/probe.json (~/.cache/fm);
    --remeasure measures it again.

    Examples:
      fm env
      fm env --json
      fm env --width 128
      fm env --remeasure
    """

    from ..hardware import environment_report, environment_text

    report = environment_report(torch_device(device), width=width, remeasure=remeasure)
    if as_json:
        emit_json(report)
    else:
        print(environment_text(report))


# ------------------------------------------------------------------------------------------- plot


@app.command()
def plot(
    *,
    run_dir: Annotated[Path, typer.Argument(help="Run directory (reads RUN_DIR/metrics.jsonl), or the JSON of `fm fid --nfe ... --json` or `fm eval ... --json`.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output image (.png, .svg, .pdf); default RUN_DIR/loss.png (refreshed) or SWEEP.png.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file (or an existing SWEEP.png).")] = False,
    y_metric: Annotated[Optional[str], typer.Option("--y", help="fm eval sweeps only: recall (default), precision, coverage, density, fd or kid against accuracy.")] = None,
):
    """Plot a run's training curves, FID against NFE, or an `fm eval` sweep's frontier (needs matplotlib).

    Loss and learning-rate curves (and FID or FD/precision/recall/coverage/accuracy when logged) from a run's
    metrics.jsonl, FID against NFE from `fm fid --nfe` sweeps (one curve per appended sweep), or the frontier of an
    `fm eval` sweep: recall (or --y fd ...) against conditional accuracy.

    Examples:
      fm plot runs/quickstart
      fm plot runs/cifar10 --out cifar10-curves.png
      fm fid --ckpt runs/quickstart -n 500 --ref data/shapes-32-n20000-s0 --features tiny --nfe 2,4,8,16 --solver heun --json >> sweep.json
      fm plot sweep.json
      fm eval --ckpt runs/quickstart --data data/shapes-32-n20000-s0 -n 500 --cfg 1,2,3,4 --json > frontier.json
      fm plot frontier.json --y fd --out frontier-fd.png
    """

    from ..plot import plot_run, plot_sweep

    refuse_existing(out, force)  # the default RUN_DIR/loss.png is fm's own view of metrics.jsonl: refreshed
    if y_metric is not None and not run_dir.is_file():
        raise UsageError(f"--y chooses the metric of an `fm eval` sweep's frontier; {run_dir} is a run directory (its plot shows every logged metric)")
    print(plot_sweep(run_dir, out, y=y_metric, force=force) if run_dir.is_file() else plot_run(run_dir, out))


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
      fm demo --ckpt runs/quickstart --guide-ckpt runs/short   # offers autoguidance (a shorter run of the same data)
    """

    from ..demo import launch_demo

    launch_demo(
        ckpt, host=host, port=port, share=share, device=torch_device(device), vae=vae, text_encoder=text_encoder, max_images=max_images,
        guide_ckpt=guide_ckpt, precision=precision, compile_model=compile_model, log=log_line,
    )  # fmt: skip
