"""`fm train`, `fm resume` and the hidden `fm _train-resolved` (one relaunched rank)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..console import emit_json
from .app import app
from .options import Gpus, Nproc, Overrides, Preset, StopAt


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

    from ..config import config_to_dict
    from ..launch import launch_options, run_training, training_config

    launch = launch_options(gpus, nproc, nnodes, node_rank, rdzv_endpoint, rdzv_id)
    cfg, target, ckpt = training_config(preset, overrides, data=data, run_dir=run_dir, resume=resume, stop_at_step=stop_at_step)
    if print_config:
        emit_json(config_to_dict(cfg))
        return
    _print_checkpoint(run_training(cfg, target, ckpt, stop_at_step, launch))


@app.command()
def resume(
    *,
    target: Annotated[Path, typer.Argument(help="A run directory (resumes its latest checkpoint) or a checkpoint file (an older one rolls back: "
                                                 "later checkpoints are moved, never deleted, to checkpoints/abandoned-from-step-N/).")],
    overrides: Annotated[List[str], typer.Option("--set", help="Change a resume-safe setting, e.g. --set train.steps=2000.")] = [],
    stop_at_step: StopAt = None,
    gpus: Gpus = 0,
    nproc: Nproc = 0,
):
    """Continue a stopped run exactly where it left off, extend it, or roll it back to an older checkpoint.

    Examples:
      fm resume runs/quickstart
      fm resume runs/quickstart --set train.steps=10000       # extend it past the preset's 7,600 steps
      fm resume runs/x/checkpoints/step-0002000.pt   # roll back: later checkpoints move to abandoned-from-step-0002000/
    """

    from ..launch import launch_options, resume_training

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

    from ..launch import train_resolved as train_rank

    _print_checkpoint(train_rank(config_file, run_dir, resume_arg, stop_at_step))


def _print_checkpoint(path) -> None:
    """The last checkpoint on stdout (rank 0 only), for scripts: `ckpt=$(fm train ...)`."""
    if path is not None and int(os.environ.get("RANK", "0")) == 0:
        print(path)
