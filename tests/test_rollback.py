"""Rollback and damaged checkpoints: an abandoned branch is set aside whole (never rotated away), a failed save
leaves the run resumable, a set-aside checkpoint resumes into its own run, a damaged checkpoint is one line."""

from __future__ import annotations

import copy
import errno
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import QuietLog, fm_in_process, run_fm
from fmcli.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint
from fmcli.config import load_config, validate_config
from fmcli.errors import RuntimeFailure, UsageError
from fmcli.train import train


def _debug(data: Path, *overrides):
    given = {item.split("=", 1)[0] for item in overrides}  # a test's own value replaces the default here (a key is given once)
    defaults = [d for d in ("train.checkpoint_every=10", "train.keep_last=2", "train.sample_every=0") if d.split("=", 1)[0] not in given]
    return load_config("debug", [f"data.path='{data}'", *defaults, *overrides])


def _resume(path: Path, run: Path, log=None, **kwargs):
    return train(validate_config(load_checkpoint(path)["config"]), run, resume_from=path, log=log or QuietLog(), **kwargs)


def test_rollback_sets_aside_the_checkpoints_between_the_resumed_step_and_the_first_save(tmp_path, shapes16):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    train(_debug(shapes16, "train.steps=30"), run, stop_at_step=12, log=QuietLog())
    assert sorted(list_checkpoints(ckpts)) == [10, 12]
    abandoned = (ckpts / "step-0000012.pt").read_bytes()
    messages = []

    class Log(QuietLog):
        def info(self, message):
            messages.append(message)

    # Back to 10: the branch's first save is at 20, but 12 is the abandoned future too (keep_last=2 rotated it away).
    _resume(ckpts / "step-0000010.pt", run, log=Log())
    aside = ckpts / "abandoned-from-step-0000010" / "step-0000012.pt"
    assert aside.read_bytes() == abandoned
    assert sorted(list_checkpoints(ckpts)) == [20, 30] and resolve_checkpoint(run) == ckpts / "step-0000030.pt"
    assert any(m.startswith("rollback: moved 1 checkpoint(s)") for m in messages), messages


def test_rollback_sets_aside_the_abandoned_branchs_sample_grids_and_metrics_records(tmp_path, shapes16):
    """Back to step 10 of a run that had reached 20 (a longer schedule, so the branches differ): the old branch's grids
    of steps 15 and 20 and its records of steps 15 and 20 go to the folder its checkpoint went to, byte for byte, before
    the new branch writes its own (its grid at 15 comes before its first save); metrics.jsonl and fm plot's reader
    hold the live branch only: the records up to 10, then those of the losses the resumed run returned."""
    from fmcli.plot import read_metrics

    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    cfg = _debug(shapes16, "train.steps=20", "sample.grid_size=2").with_section("train", sample_every=5)
    train(cfg, run, log=QuietLog())
    grids = {p.name: p.read_bytes() for p in (run / "samples").iterdir()}
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert sorted(grids) == [f"step-00000{s:02d}.png" for s in (5, 10, 15, 20)] and len(lines) == 4
    ckpt = ckpts / "step-0000010.pt"
    cfg = validate_config(load_checkpoint(ckpt)["config"]).with_section("train", steps=30, log_every=1)
    second = train(cfg, run, resume_from=ckpt, log=QuietLog())
    aside = ckpts / "abandoned-from-step-0000010"
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "samples", "step-0000020.pt"]
    assert {p.name: p.read_bytes() for p in (aside / "samples").iterdir()} == {k: grids[k] for k in ("step-0000015.png", "step-0000020.png")}
    assert (aside / "metrics.jsonl").read_text() == "".join(lines[2:])  # steps 15, 20 of the old branch
    assert (run / "samples" / "step-0000015.png").read_bytes() != grids["step-0000015.png"]  # the new branch's own
    now = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert now[:2] == lines[:2] and [json.loads(line)["step"] for line in now[2:]] == list(range(11, 31))
    assert [json.loads(line)["loss"] for line in now[2:]] == pytest.approx(second.losses, rel=1e-12)
    records, _ = read_metrics(run)
    assert [r["step"] for r in records] == [5, 10, *range(11, 31)]


def test_a_failed_save_moves_nothing_and_latest_never_names_a_moved_file(tmp_path, shapes16, monkeypatch):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    train(_debug(shapes16, "train.steps=20"), run, log=QuietLog())
    step20 = (ckpts / "step-0000020.pt").read_bytes()

    def disk_full(state, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    # The write fails (a full disk): nothing was moved, latest still names step 20, no temp file is left.
    with monkeypatch.context() as m:
        m.setattr(torch, "save", disk_full)
        with pytest.raises(Exception) as failed:
            _resume(ckpts / "step-0000010.pt", run)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000010.pt", "step-0000020.pt"]
    assert resolve_checkpoint(run) == ckpts / "step-0000020.pt"
    assert isinstance(failed.value, RuntimeFailure) and "step-0000020.pt" in str(failed.value), failed.value

    # The new file cannot be renamed into place after the abandoned branch moved: latest names the resumed checkpoint.
    real_replace = os.replace

    def rename_fails(src, dst):
        if Path(src).name.startswith(".step-"):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", rename_fails)
        with pytest.raises(OSError):
            _resume(ckpts / "step-0000010.pt", run)
    assert resolve_checkpoint(run) == ckpts / "step-0000010.pt"
    aside = list(ckpts.glob("abandoned-from-step-*/step-0000020.pt"))
    assert len(aside) == 1 and aside[0].read_bytes() == step20
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]


def test_resuming_a_set_aside_checkpoint_continues_its_run_and_sets_the_current_branch_aside(tmp_path, shapes16):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    train(_debug(shapes16, "train.steps=20"), run, log=QuietLog())
    first20 = (ckpts / "step-0000020.pt").read_bytes()
    _resume(ckpts / "step-0000010.pt", run)  # the first branch's step 20 goes aside
    [old20] = ckpts.glob("abandoned-from-step-*/step-0000020.pt")
    assert old20.read_bytes() == first20
    second20 = (ckpts / "step-0000020.pt").read_bytes()
    r = fm_in_process("resume", old20, "--set", "train.steps=30")
    assert r.returncode == 0, r.stderr
    # No run nested inside the folder: the first branch's checkpoint, grid and records only.
    assert sorted(p.name for p in old20.parent.iterdir()) == ["metrics.jsonl", "samples", "step-0000020.pt"]
    assert resolve_checkpoint(run) == ckpts / "step-0000030.pt" and sorted(list_checkpoints(ckpts)) == [10, 30]
    # The second branch's step 20 (same step, another file) is set aside, not deleted.
    assert [p.read_bytes() == second20 for p in ckpts.glob("abandoned-from-step-*/step-0000020.pt")].count(True) == 1


def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, debug_run):
    state = load_checkpoint(resolve_checkpoint(debug_run))
    no_optimizer = {k: v for k, v in state.items() if k != "optimizer"}
    wider = copy.deepcopy(state)
    wider["config"]["model"]["hidden_size"] *= 2  # the config no longer fits the weights
    for name, damaged, why in (("no-optimizer", no_optimizer, "optimizer"), ("wider", wider, "size mismatch")):
        path = tmp_path / name / "checkpoints" / "step-0000004.pt"
        path.parent.mkdir(parents=True)
        torch.save(damaged, path)
        r = fm_in_process("resume", path, "--set", "train.steps=8")
        assert r.returncode == 2, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and str(path) in r.stderr and why in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_save_removes_the_temp_file_a_killed_save_left_and_nothing_else(tmp_path, shapes16):
    """A kill during torch.save leaves `.step-N.pt.tmp-XXXXXXXX` (fsutil.temp_path) behind, a checkpoint's size,
    that rotation never sees; the resumed run's first save removes it, and no other file."""
    train(_debug(shapes16, "train.steps=2", "train.checkpoint_every=2"), tmp_path / "run", log=QuietLog())
    ckpt_dir = tmp_path / "run" / "checkpoints"
    left = [ckpt_dir / ".step-0000004.pt.tmp-0123abcd", ckpt_dir / ".latest.tmp-89abcdef"]
    kept = [ckpt_dir / "notes.txt", ckpt_dir / "step-0000004.pt.tmp-0123abcd", ckpt_dir / ".step-0000004.pt.tmp-mine"]
    for p in left + kept:
        p.write_bytes(b"PK\x03\x04 partial")
    ckpt = resolve_checkpoint(tmp_path / "run")
    train(validate_config(load_checkpoint(ckpt)["config"]).with_section("train", steps=3), tmp_path / "run", resume_from=ckpt, log=QuietLog())
    assert [p.exists() for p in left + kept] == [False, False, True, True, True]
    assert load_checkpoint(resolve_checkpoint(tmp_path / "run"))["step"] == 3


def test_resume_help_says_an_older_checkpoint_rolls_back():
    """The README's rollback (an older checkpoint continues on a new branch, later ones moved aside) is what
    `fm resume CKPT` does to a run's checkpoints folder: its --help says so, not only "continue a stopped run"."""
    from conftest import fm_in_process

    shown = fm_in_process("resume", "--help", env={"COLUMNS": "400"})
    assert shown.returncode == 0 and "roll" in shown.stdout and "abandoned-from-step-" in shown.stdout, shown.stdout


@pytest.mark.parametrize("pointer", ["", "../../r1/checkpoints/step-0000001.pt", "/abs/step-0000001.pt", "config.json", "step-0000001.pt\nx"])
def test_latest_that_names_no_checkpoint_of_its_own_folder_is_refused(tmp_path, pointer):
    # Two runs side by side; r2's pointer is hand-edited or damaged. It must never resolve to r1's file (a
    # resume of it trained and rolled back r1) nor be guessed: one line naming the pointer, exit 2.
    for run in ("r1", "r2"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        (tmp_path / run / "checkpoints" / "step-0000001.pt").write_bytes(b"x")
        (tmp_path / run / "config.json").write_text("{}")
    (tmp_path / "r2" / "checkpoints" / "latest").write_text(pointer + "\n")
    with pytest.raises(UsageError, match="latest does not name a checkpoint in its folder"):
        resolve_checkpoint(tmp_path / "r2")
    if pointer.startswith(".."):
        result = run_fm("resume", tmp_path / "r2")
        assert result.returncode == 2 and "latest does not name a checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (tmp_path / "r1" / "checkpoints").iterdir()) == ["step-0000001.pt"]


def _latest_naming_each_kind_of_checkpoint(ckpts):
    """ckpts/latest pointing at its own checkpoint, then at a set-aside one: yields (latest's text, the file)."""
    (ckpts / "abandoned-from-step-0000001").mkdir(parents=True)
    for rel in ("step-0000001.pt", "abandoned-from-step-0000001/step-0000002.pt"):
        (ckpts / rel).write_bytes(b"x")
        (ckpts / "latest").write_text(rel + "\n")
        yield rel, ckpts / rel


def test_latest_naming_its_own_or_a_set_aside_checkpoint_resolves_to_it(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for _, named in _latest_naming_each_kind_of_checkpoint(ckpts):
        assert resolve_checkpoint(tmp_path / "run") == named
    (ckpts / "latest").write_text("step-0000009.pt\n")
    with pytest.raises(UsageError, match="names step-0000009.pt, which does not exist"):
        resolve_checkpoint(tmp_path / "run")


def test_the_latest_pointer_given_itself_resolves_to_the_checkpoint_it_names(tmp_path, debug_run):
    """`fm resume RUN/checkpoints/latest` (a tab completion) loaded the one-line pointer as a checkpoint: "cannot load
    checkpoint .../latest: corrupt or truncated (pop from empty list)", exit 2, for a healthy run. It is followed as
    the folder's `latest` is; one naming nothing is refused as that one is."""
    ckpts = tmp_path / "run" / "checkpoints"
    for _, named in _latest_naming_each_kind_of_checkpoint(ckpts):
        assert resolve_checkpoint(ckpts / "latest") == named
    (ckpts / "latest").write_text("../../elsewhere.pt\n")
    with pytest.raises(UsageError, match="does not name a checkpoint in its folder"):
        resolve_checkpoint(ckpts / "latest")
    run = tmp_path / "debug"
    import shutil

    shutil.copytree(debug_run, run)
    named = (run / "checkpoints" / "latest").read_text().strip()
    r = fm_in_process("resume", run / "checkpoints" / "latest", "--set", "train.steps=5")
    assert r.returncode == 0 and r.stdout.strip().endswith("step-0000005.pt"), r.stderr
    assert f"resumed from {run / 'checkpoints' / named} at step 4" in r.stderr, r.stderr


def test_resuming_a_set_aside_checkpoint_sets_aside_every_checkpoint_the_current_branch_made_after_their_fork(tmp_path, shapes16):
    """Branch A reached 20 (checkpoints 10, 20); a rollback to 10 made branch B (checkpoint 15), A's 20 going to
    abandoned-from-step-0000010/. Resuming A's 20 from there: B left A at 10, so B's 15 (before 20, but not A's) is
    another branch's and is set aside with B's record of step 15; before, it stayed in rotation and keep_last=2
    deleted it at A's step 40, and metrics.jsonl read B's 15 then A's 25."""
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    train(_debug(shapes16, "train.steps=20"), run, log=QuietLog())
    b_cfg = validate_config(load_checkpoint(ckpts / "step-0000010.pt")["config"]).with_section("train", checkpoint_every=5)
    train(b_cfg, run, resume_from=ckpts / "step-0000010.pt", stop_at_step=15, log=QuietLog())
    assert sorted(list_checkpoints(ckpts)) == [10, 15]
    b15 = (ckpts / "step-0000015.pt").read_bytes()
    a20 = ckpts / "abandoned-from-step-0000010" / "step-0000020.pt"
    a_cfg = validate_config(load_checkpoint(a20)["config"]).with_section("train", steps=40)
    train(a_cfg, run, resume_from=a20, log=QuietLog())
    assert sorted(list_checkpoints(ckpts)) == [30, 40]
    assert [p.read_bytes() == b15 for p in ckpts.rglob("step-0000015.pt")] == [True]  # kept, out of rotation
    assert sorted(list_checkpoints(ckpts / "abandoned-from-step-0000010-2")) == [15]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 25, 30, 35, 40]  # up to the fork, then A's own: no record of B
