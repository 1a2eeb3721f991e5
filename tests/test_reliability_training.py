"""Reliability of long runs (issue #15): rollback, resume overrides, stop ordering, external launchers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import QuietLog, fm_in_process, run_fm
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
    aside = ckpts / "abandoned-from-step-0000020" / "step-0000030.pt"  # named for the step resumed from
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
        r = fm_in_process(*args, "--set", key_value, "--set", "train.steps=6")
        assert r.returncode == 2, (args, r.stderr)
        assert key_value.split("=")[0] in r.stderr and "Traceback" not in r.stderr
        assert r.stdout == ""
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    # A resume-safe override goes through both entry points, and the checkpoint's config is the one used.
    r = fm_in_process("train", "--preset", "quickstart", "--run-dir", run, "--resume", "latest", "--set", "train.steps=6", "--print-config")
    assert r.returncode == 0, r.stderr
    import json

    printed = json.loads(r.stdout)
    assert printed["train"]["steps"] == 6 and printed["name"] == "debug" and printed["data"]["path"] == str(shapes16)
    r = fm_in_process("train", "--preset", "debug", "--run-dir", run, "--resume", "latest", "--data", tmp_path)
    assert r.returncode == 2 and "data" in r.stderr


def test_item04_in_training_fid_of_a_text_model_is_refused_before_any_step(tmp_path, shapes16):
    import pytest

    from fmcli.errors import UsageError

    cfg = load_config("quickstart-text", [f"data.path='{shapes16}'", "model.hidden_size=32", "model.depth=1", "model.heads=2",
                                          "train.steps=4", "train.global_batch_size=8", "eval.every=2", f"eval.ref='{shapes16}'",
                                          "eval.features=tiny", "train.compile=false", "train.precision=fp32"])
    with pytest.raises(UsageError, match="text-conditioned"):
        train(cfg, tmp_path / "run", log=QuietLog())
    assert not (tmp_path / "run").exists()  # nothing was created, no work lost


def test_item06_a_stop_request_checkpoints_before_samples_and_fid(tmp_path, shapes16, monkeypatch):
    from fmcli import train as train_mod

    calls = []
    real_save = train_mod.Trainer._save_checkpoint
    monkeypatch.setattr(train_mod.Trainer, "_save_samples", lambda self: calls.append(("samples", self.step)))
    monkeypatch.setattr(train_mod.Trainer, "_evaluate", lambda self: calls.append(("fid", self.step)))
    monkeypatch.setattr(train_mod.Trainer, "_save_checkpoint", lambda self: calls.append(("checkpoint", self.step)) or real_save(self))
    result = train(_debug(shapes16, "train.steps=8", "train.sample_every=4", "eval.every=4"), tmp_path / "run", stop_at_step=4, log=QuietLog())
    assert result.stopped_early
    assert calls == [("checkpoint", 4)]


@pytest.mark.parametrize("during", ["_save_samples", "_save_checkpoint"])
def test_a_stop_asked_for_during_a_checkpoint_or_grid_stops_before_the_next_slow_part(tmp_path, shapes16, monkeypatch, during):
    """SIGTERM arriving while step 4's grid (or checkpoint) is written: the run used to evaluate step 4 (FID on
    eval.num_samples samples: minutes, past a launcher's grace period) and train step 5 before its stop
    checkpoint. By the docs' rule (a stop saves before anything slow) the order is: what was running finishes,
    step 4's checkpoint (saved now where it was not yet), stop. The resume continues bit for bit: its losses and
    weights are a straight run's."""
    from fmcli import train as train_mod

    calls = []
    real = {name: getattr(train_mod.Trainer, name) for name in ("_save_samples", "_save_checkpoint")}

    def hook(name):
        def run(self):
            calls.append((name.strip("_").split("_")[-1], self.step))
            if name == during and self.step == 4 and not self.stop_requested:
                self.stop_requested = True  # what the SIGTERM handler (_request_stop) sets, mid-write
            return real[name](self)
        return run

    for name in real:
        monkeypatch.setattr(train_mod.Trainer, name, hook(name))
    monkeypatch.setattr(train_mod.Trainer, "_evaluate", lambda self: calls.append(("fid", self.step)))
    common = ["train.steps=8", "train.sample_every=4", "eval.every=4", "train.log_every=3", "sample.grid_size=2", "sample.steps=2",
              f"train.checkpoint_every={4 if during == '_save_checkpoint' else 0}"]
    first = train(_debug(shapes16, *common), tmp_path / "run", log=QuietLog())
    assert first.stopped_early and first.step == 4
    assert calls == [("samples", 4), ("checkpoint", 4)] if during == "_save_samples" else [("checkpoint", 4)]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 4]  # step 4 (after the record at 3) is in a record
    monkeypatch.undo()
    ckpt = resolve_checkpoint(tmp_path / "run")
    assert load_checkpoint(ckpt)["step"] == 4
    second = train(validate_config(load_checkpoint(ckpt)["config"]), tmp_path / "run", resume_from=ckpt, log=QuietLog())
    straight = train(_debug(shapes16, *common), tmp_path / "straight", log=QuietLog())
    assert first.losses + second.losses == straight.losses
    a, b = (load_checkpoint(resolve_checkpoint(tmp_path / d)) for d in ("run", "straight"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_item06_the_launcher_passes_an_explicit_shutdown_timeout(monkeypatch):
    import torch.distributed.run as torchrun

    from fmcli import distributed as D

    seen = []
    monkeypatch.setattr(torchrun, "run", lambda parsed: seen.append(parsed.shutdown_timeout))
    assert D.relaunch(2, ["--version"]) == 0
    monkeypatch.setenv("FM_SHUTDOWN_TIMEOUT", "45")
    assert D.relaunch(2, ["--version"]) == 0
    assert seen == [600, 45]


def test_item07_other_ranks_wait_for_local_rank_0_to_prepare_the_default_data(tmp_path, monkeypatch):
    import threading
    import time

    import pytest

    from fmcli import launch
    from fmcli.data.shapes import prepare_shapes
    from fmcli.errors import RuntimeFailure

    monkeypatch.chdir(tmp_path)
    cfg = load_config("debug", ["data.count=64"])
    monkeypatch.setenv("FM_DATA_WAIT", "0.5")
    with pytest.raises(RuntimeFailure, match="timed out"):
        launch.default_data(cfg, prepare=False)
    monkeypatch.setenv("FM_DATA_WAIT", "60")
    target = Path("data") / f"shapes-{cfg.data.image_size}-n64-s0"
    maker = threading.Thread(target=lambda: (time.sleep(1.0), prepare_shapes(target, size=cfg.data.image_size, count=64, seed=0)))
    maker.start()
    resolved = launch.default_data(cfg, prepare=False)  # returns only once the manifest is there
    maker.join()
    assert Path(resolved.data.path) == target and (target / "manifest.json").is_file()


def test_a_stop_at_step_the_resumed_checkpoint_has_passed_is_refused_before_training(tmp_path, shapes16):
    """train() resumed at step 4 with stop_at_step 2 or 4 trained on to the end (the stop test was `==`)."""
    import pytest

    from fmcli.errors import UsageError

    run = tmp_path / "run"
    train(_debug(shapes16, "train.steps=8", "train.checkpoint_every=0"), run, stop_at_step=4, log=QuietLog())
    ckpt = resolve_checkpoint(run)
    for stop in (2, 4):
        with pytest.raises(UsageError, match=f"--stop-at-step {stop} is not after step 4"):
            train(validate_config(load_checkpoint(ckpt)["config"]), run, resume_from=ckpt, stop_at_step=stop, log=QuietLog())
    assert sorted(list_checkpoints(run / "checkpoints")) == [4]  # nothing trained
    result = train(validate_config(load_checkpoint(ckpt)["config"]), run, resume_from=ckpt, stop_at_step=6, log=QuietLog())
    assert result.step == 6 and result.stopped_early


def test_a_resume_whose_set_train_steps_is_not_after_the_checkpoint_is_refused(tmp_path, shapes16):
    """`fm resume RUN --set train.steps=N` with N at or before the checkpoint's step (6 here) exited 0 training nothing,
    saying "extend it with --set train.steps=N" to a user who had just set it: the --set had no effect. Refused (exit 2)
    before any setup, as a --stop-at-step the checkpoint has passed is; without the --set a finished run is still exit 0."""
    run = tmp_path / "run"
    train(_debug(shapes16, "train.steps=6", "train.checkpoint_every=0"), run, log=QuietLog())
    for steps in (3, 6):
        for command in (["resume", run], ["train", "--resume", "latest", "--run-dir", run]):
            r = fm_in_process(*command, "--set", f"train.steps={steps}")
            assert r.returncode == 2 and f"--set train.steps={steps} is not after step 6" in r.stderr, r.stderr
    assert fm_in_process("resume", run).returncode == 0  # a finished run, nothing asked: nothing to do
    r = fm_in_process("resume", run, "--set", "train.steps=7")
    assert r.returncode == 0, r.stderr
    assert sorted(list_checkpoints(run / "checkpoints")) == [6, 7]
