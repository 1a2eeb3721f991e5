"""fmcli.launch: which run a resume continues, and what a refused or failed launch leaves in a run directory."""

from __future__ import annotations

import shutil

import pytest

from conftest import run_fm
from fmcli.errors import UsageError
from fmcli.launch import training_config


def test_resume_continues_the_checkpoints_own_run_only(debug_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(debug_run, run)
    ckpts = run / "checkpoints"
    ckpt = ckpts / (ckpts / "latest").read_text().strip()
    aside = ckpts / "abandoned-from-step-0000002" / ckpt.name  # a set-aside checkpoint belongs to the run too
    aside.parent.mkdir()
    shutil.copy(ckpt, aside)
    monkeypatch.chdir(tmp_path)
    for resume, run_dir in ((str(ckpt), run), (str(aside), run), ("latest", run), (str(ckpt), "run"), (str(ckpt), None)):
        _, target, _ = training_config("debug", [], data=None, run_dir=None if run_dir is None else type(run)(run_dir), resume=resume)
        assert target.resolve() == run.resolve(), (resume, run_dir)
    for other in (tmp_path / "new-run", debug_run):  # a new directory, or another run
        with pytest.raises(UsageError, match="train.init_from="):
            training_config("debug", [], data=None, run_dir=other, resume=str(ckpt))
    assert not (tmp_path / "new-run").exists()


def test_a_refused_or_failed_launch_does_not_block_the_corrected_command(shapes16, tmp_path):
    run = tmp_path / "run"
    train = ("train", "--preset", "debug", "--data", shapes16, "--run-dir", run, "--set", "train.steps=2", "--set", "train.device=cpu")
    refused = run_fm(*train, "--nnodes", "2")
    assert refused.returncode == 2 and "--rdzv-endpoint" in refused.stderr, refused.stderr
    assert not run.exists()
    # What a launch whose ranks failed before writing the run leaves: the hand-off config and the autotune cache.
    run.mkdir()
    (run / ".launch-config.json").write_text("{}")
    (run / "autotune.json").write_text("{}")
    ok = run_fm(*train)
    assert ok.returncode == 0, ok.stderr
    assert (run / "config.json").is_file()
    again = run_fm(*train)  # a real run in it is never reused
    assert again.returncode == 2 and "fm resume" in again.stderr
