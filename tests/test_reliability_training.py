"""Reliability of long runs (issue #15): rollback, resume overrides, stop ordering, external launchers."""

from __future__ import annotations

from pathlib import Path

from conftest import QuietLog, run_fm
from fmcli.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint
from fmcli.config import load_config, validate_config
from fmcli.train import train


def _debug(data: Path, *overrides):
    return load_config("debug", [f"data.path='{data}'", *overrides])


def test_item01_rollback_keeps_the_new_checkpoint_and_sets_the_abandoned_branch_aside(tmp_path, shapes16):
    run = tmp_path / "run"
    train(_debug(shapes16, "train.steps=30", "train.checkpoint_every=10", "train.keep_last=1", "train.keep_every=20"), run, log=QuietLog())
    ckpts = run / "checkpoints"
    assert sorted(list_checkpoints(ckpts)) == [20, 30]
    old = ckpts / "step-0000020.pt"
    messages = []

    class Log(QuietLog):
        def info(self, message):
            messages.append(message)

    cfg = validate_config(load_checkpoint(old)["config"])
    train(cfg, run, resume_from=old, stop_at_step=25, log=Log())
    assert resolve_checkpoint(run) == ckpts / "step-0000025.pt"  # latest names a file that exists
    assert sorted(list_checkpoints(ckpts)) == [20, 25]
    aside = ckpts / "abandoned-from-step-0000025" / "step-0000030.pt"
    assert aside.is_file() and load_checkpoint(aside)["step"] == 30  # moved, not deleted
    assert any("rollback" in m and "abandoned" in m for m in messages)
    # And the run continues from the new branch.
    result = train(validate_config(load_checkpoint(ckpts / "step-0000025.pt")["config"]), run, resume_from=ckpts / "step-0000025.pt", log=QuietLog())
    assert result.step == 30 and resolve_checkpoint(run) == ckpts / "step-0000030.pt"


def test_item02_train_resume_refuses_non_resume_safe_overrides_like_fm_resume(tmp_path, shapes16):
    run = tmp_path / "run"
    train(_debug(shapes16, "train.steps=4"), run, log=QuietLog())
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    train_resume = ["train", "--preset", "debug", "--run-dir", run, "--resume", "latest"]
    for key_value, args in (("optim.lr=0.5", train_resume), ("optim.lr=0.5", ["resume", run]), ("flow.sigma_min=0.5", train_resume), ("train.ema_decay=0", train_resume)):
        r = run_fm(*args, "--set", key_value, "--set", "train.steps=6")
        assert r.returncode == 2, (args, r.stderr)
        assert key_value.split("=")[0] in r.stderr and "Traceback" not in r.stderr
        assert r.stdout == ""
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    # A resume-safe override goes through both entry points, and the checkpoint's config is the one used.
    r = run_fm("train", "--preset", "quickstart", "--run-dir", run, "--resume", "latest", "--set", "train.steps=6", "--print-config")
    assert r.returncode == 0, r.stderr
    import json

    printed = json.loads(r.stdout)
    assert printed["train"]["steps"] == 6 and printed["name"] == "debug" and printed["data"]["path"] == str(shapes16)
    r = run_fm("train", "--preset", "debug", "--run-dir", run, "--resume", "latest", "--data", tmp_path)
    assert r.returncode == 2 and "data" in r.stderr
