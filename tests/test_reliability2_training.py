"""Reliability hardening 2 (issue #32), the training side: budget timing and fallback, resume LR, rollback,
reflow work folders, `fm sample -n` memory, demo bounds, diffusers exports, switching the budget off."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import QuietLog, run_fm
from fmcli.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint
from fmcli.config import load_config, validate_config
from fmcli.train import train


def _debug(data: Path, *overrides):
    return load_config("debug", [f"data.path='{data}'", *overrides])


def _resume(run: Path, step: int, **kwargs):
    path = run / "checkpoints" / f"step-{step:07d}.pt"
    return train(validate_config(load_checkpoint(path)["config"]), run, resume_from=path, log=QuietLog(), **kwargs)


def test_item10_a_rollback_never_overwrites_a_checkpoint(tmp_path, shapes16):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    train(_debug(shapes16, "train.steps=30", "train.checkpoint_every=10", "train.keep_last=10"), run, log=QuietLog())
    first_30 = (ckpts / "step-0000030.pt").read_bytes()
    # Back to 20 and on to 30: the abandoned branch's step 30 is set aside before the new one is written.
    _resume(run, 20)
    aside = ckpts / "abandoned-from-step-0000030" / "step-0000030.pt"
    assert aside.read_bytes() == first_30
    assert resolve_checkpoint(run) == ckpts / "step-0000030.pt"
    # Two rollbacks to the same step: each gets its own folder, nothing is replaced.
    _resume(run, 10, stop_at_step=20)
    _resume(run, 10, stop_at_step=20)
    first, second = ckpts / "abandoned-from-step-0000020", ckpts / "abandoned-from-step-0000020-2"
    assert sorted(p.name for p in first.iterdir()) == ["step-0000020.pt", "step-0000030.pt"]
    assert sorted(p.name for p in second.iterdir()) == ["step-0000020.pt"]
    assert sorted(list_checkpoints(ckpts)) == [10, 20]
    assert aside.read_bytes() == first_30
