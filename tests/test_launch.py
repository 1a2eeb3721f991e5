"""fmcli.launch: which run a resume continues, and what a refused or failed launch leaves in a run directory."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import fm_in_process, run_fm
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
    refused = fm_in_process(*train, "--nnodes", "2")
    assert refused.returncode == 2 and "--rdzv-endpoint" in refused.stderr, refused.stderr
    assert not run.exists()
    # What a launch whose ranks failed before writing the run leaves: the hand-off config and the autotune cache.
    run.mkdir()
    (run / ".launch-config.json").write_text("{}")
    (run / "autotune.json").write_text("{}")
    ok = fm_in_process(*train)
    assert ok.returncode == 0, ok.stderr
    assert (run / "config.json").is_file()
    again = fm_in_process(*train)  # a real run in it is never reused
    assert again.returncode == 2 and "fm resume" in again.stderr


@pytest.mark.parametrize("nodes", [[], ["--nproc", "2"], ["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:1"]],
                         ids=["one-process", "nproc", "beyond-nnodes"])
def test_a_node_rank_that_is_not_a_node_of_the_run_is_refused(shapes16, tmp_path, nodes):
    """Node ranks run 0..nnodes-1. `--node-rank 1` without `--nnodes` (a node of a two-node run whose command lost it)
    trained a whole run of its own in one process, or as a one-node --nproc run, the node rank dropped silently: now
    refused (exit 2) before anything is written."""
    run = tmp_path / "run"
    args = ("train", "--preset", "debug", "--data", shapes16, "--run-dir", run, "--set", "train.steps=1", "--set", "train.device=cpu")
    out = fm_in_process(*args, *nodes, *(["--node-rank", "1"] if "--node-rank" not in nodes else []))
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "--nnodes" in errors[0], out.stderr
    assert not run.exists()


def test_a_folder_of_the_users_files_is_not_called_a_run_to_delete(shapes16, tmp_path):
    """--run-dir naming a folder that holds only the user's own files: refused (exit 2) as not an fm run, without
    the advice for a run that stopped before its first checkpoint ("delete it to start that run over")."""
    folder = tmp_path / "my-notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    refused = fm_in_process("train", "--preset", "debug", "--data", shapes16, "--run-dir", folder, "--set", "train.steps=2")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused
    assert "not an fm run" in refused.stderr and "notes.txt" in refused.stderr, refused.stderr
    assert "delete" not in refused.stderr and "stopped before" not in refused.stderr, refused.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"] and (folder / "notes.txt").read_text() == "mine"
    (folder / "config.json").write_text("{}")  # what a run that failed at its first step leaves: still that advice
    stopped = fm_in_process("train", "--preset", "debug", "--data", shapes16, "--run-dir", folder, "--set", "train.steps=2")
    assert stopped.returncode == 2 and "stopped before the first" in stopped.stderr, stopped.stderr


def test_refusals_that_need_no_data_come_before_the_default_data_is_prepared(tmp_path):
    """A used --run-dir, a missing train.init_from and FID during training without Inception weights were refused only
    after the default shapes data was prepared into ./data (and, for init_from, after REPA's domain classifier trained
    on it): files and minutes the user did not ask for. Each is one line (exit 2) now, with nothing written here."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # a run that stopped before its first checkpoint
    small = ["--set", "data.count=16", "--set", "data.image_size=16", "--set", "train.steps=1"]
    used = fm_in_process("train", "--preset", "debug", "--run-dir", run, *small, cwd=tmp_path)
    assert used.returncode == 2 and "already exists" in used.stderr and len(used.stderr.strip().splitlines()) == 1, used.stderr
    missing = fm_in_process("train", "--preset", "debug", "--run-dir", tmp_path / "new", *small,
                            "--set", f"train.init_from={tmp_path / 'nowhere.pt'}", cwd=tmp_path)
    assert missing.returncode == 2 and "not found" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    no_inception = fm_in_process("train", "--preset", "debug", "--run-dir", tmp_path / "new", *small, "--set", "eval.every=1",
                                 "--set", f"eval.ref={tmp_path / 'run'}", "--set", "eval.features=inception", cwd=tmp_path, env={"FM_INCEPTION": ""})
    assert no_inception.returncode == 2 and "Inception weights" in no_inception.stderr, no_inception.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and [p.name for p in run.iterdir()] == ["config.json"]


def test_a_resumed_run_whose_data_moved_is_told_what_the_data_was(shapes16, tmp_path, monkeypatch):
    """A run trained with --data on another source than its preset's data.source (here the debug preset's "shapes"
    on a copy of a folder-made dataset), its data then moved: the resume names the dataset the checkpoint trained on
    and how to give it back, never `fm prepare-data shapes` (which would make other images)."""
    from fmcli.config import load_config
    from fmcli.data.dataset import read_manifest
    from fmcli.train import train

    monkeypatch.chdir(tmp_path)
    shutil.copytree(shapes16, tmp_path / "mine")
    manifest = read_manifest(tmp_path / "mine")
    manifest["source"] = "folder"  # the premise: what --data holds is not what the preset's data.source says
    (tmp_path / "mine" / "manifest.json").write_text(__import__("json").dumps(manifest))
    cfg = load_config("debug", ["data.path='mine'", "train.steps=2", "train.checkpoint_every=0"])
    assert cfg.data.source == "shapes"
    train(cfg, tmp_path / "run")
    (tmp_path / "mine").rename(tmp_path / "moved")
    for args in (("resume", "run"), ("train", "--resume", "latest", "--run-dir", "run")):
        res = fm_in_process(*args)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res
        assert "data.path mine" in res.stderr and "folder, 512 images" in res.stderr and str(tmp_path) in res.stderr, res.stderr
        assert "prepare-data shapes" not in res.stderr, res.stderr


def test_a_second_resume_of_a_run_being_trained_is_refused(debug_run, tmp_path):
    """Two `fm resume` of one run at once (a requeued job beside the old one, a second terminal) each took the other's
    new checkpoints for an abandoned branch and moved them aside, and one crashed on a rename (exit 1). While a
    process holds the run's lock (here this test, with flock directly), a resume is refused before writing anything."""
    import fcntl
    import os

    run = tmp_path / "run"
    shutil.copytree(debug_run, run)
    listing = lambda: sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name != ".lock")  # noqa: E731
    before, metrics = listing(), (run / "metrics.jsonl").read_bytes()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the other process's lock
        busy = fm_in_process("resume", run, "--set", "train.steps=6")
        lines = busy.stderr.strip().splitlines()
        assert busy.returncode == 2 and [line for line in lines if line.startswith("error")] == lines[-1:], busy
        assert "another fm process" in lines[-1] and "Traceback" not in busy.stderr, busy.stderr
        assert listing() == before and (run / "metrics.jsonl").read_bytes() == metrics
    finally:
        os.close(fd)  # the other process ended: the same command now resumes
    done = fm_in_process("resume", run, "--set", "train.steps=6")
    assert done.returncode == 0 and "step-0000006.pt" in done.stdout, done
    again = fm_in_process("train", "--preset", "debug", "--run-dir", run)  # its lock file does not make a run
    assert again.returncode == 2 and "fm resume" in again.stderr


def test_a_run_being_trained_is_refused_before_any_setup(debug_run, shapes16, tmp_path, monkeypatch):
    """The run's lock was taken where rank 0 starts to train (Trainer.run): a second `fm resume` of a run being trained
    loaded its data, built and probed its step, autotuned (writing autotune.json into the other process's run) and
    compiled, or with --nproc wrote .launch-config.json and started the ranks, before it was refused. The launcher now
    checks the lock first: exit 2 before any of that work, and the run's files byte for byte as they were."""
    import fcntl
    import os

    import fmcli.data.dataset
    import fmcli.distributed
    import fmcli.train

    run = tmp_path / "run"
    shutil.copytree(debug_run, run)
    snapshot = lambda: {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}  # noqa: E731
    work = []
    for module, name in ((fmcli.data.dataset, "validate_prepared"), (fmcli.train.Trainer, "__init__")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _name=name, _original=original, **k: work.append(_name) or _original(*a, **k))
    monkeypatch.setattr(fmcli.distributed, "relaunch", lambda *a, **k: work.append("relaunch") or 0)  # never start ranks here
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process trains the run
        before = snapshot()
        more = ("--set", "train.steps=6")  # the run ended at step 4: a resume that extends it
        for args in (("resume", run, *more), ("train", "--resume", "latest", "--run-dir", run, *more), ("resume", run, "--nproc", "2", *more),
                     ("train", "--preset", "debug", "--data", shapes16, "--run-dir", run)):
            busy = fm_in_process(*args)
            assert busy.returncode == 2 and busy.stderr.count("error:") == 1 and "another fm process" in busy.stderr, (args, busy.stderr)
            assert work == [] and snapshot() == before, (args, work)
    finally:
        os.close(fd)


def test_the_launchers_autotune_times_muon_in_the_dtype_the_ranks_train_with(tmp_path, shapes16, monkeypatch):
    """--nproc/--gpus with train.micro_batch_size=auto tunes once in the launcher: its trials must run the step the
    ranks run. On a CPU without fast bf16 (bf16-slow) training orthogonalises in fp32; the trials ran bf16 (the
    emulated GEMMs that made Muon 5x slower), which favours larger batches."""
    import fmcli.autotune as autotune_mod
    from fmcli import distributed as D
    from fmcli import launch as launch_mod
    from fmcli.autotune import AutotuneResult, Trial
    from fmcli.config import load_config

    bases = []

    def fake_autotune(cfg, base, **kw):
        bases.append(base)
        return AutotuneResult(batch=4, stop="max batch", trials=[Trial(4, ok=True, throughput=1.0, memory_mib=1.0)])

    monkeypatch.setattr(autotune_mod, "autotune_training", fake_autotune)
    monkeypatch.setattr(D, "relaunch", lambda *a, **k: 0)
    monkeypatch.setenv("FM_PROBE_FORCE", "bf16-slow")
    cfg = load_config("debug", [f"data.path='{shapes16}'", "optim.name=muon", "train.micro_batch_size=auto", "train.precision=auto"])
    launch = {"nnodes": 1, "node_rank": 0, "rdzv_endpoint": None, "rdzv_id": None}
    launch_mod._relaunch_training(cfg, tmp_path / "run", None, None, launch, 2, 0.0)
    assert [b.muon_ns_dtype for b in bases] == ["fp32"]


def test_an_srun_task_is_its_rank_before_the_data_and_the_run_directory(tmp_path, monkeypatch):
    """`srun` with one task per GPU (no torchrun): SLURM's variables were mapped only when the process group was
    joined, after the launcher's data step, so every task (here local rank 1) prepared the default shapes data
    itself, concurrently into one directory. Local rank 1 now waits for local rank 0's data, as the README says."""
    slurm = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": "29517", "FM_DATA_WAIT": "1"}
    waited = run_fm("train", "--preset", "debug", "--run-dir", tmp_path / "run", cwd=tmp_path, env=slurm, timeout=60)
    assert waited.returncode == 1, waited.stderr
    assert "waiting for local rank 0 to prepare the shapes data" in waited.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
    # Without MASTER_ADDR the task cannot join: one usage line before any data or directory.
    del slurm["MASTER_ADDR"]
    refused = run_fm("train", "--preset", "debug", "--run-dir", tmp_path / "run", cwd=tmp_path, env=slurm, timeout=60)
    assert refused.returncode == 2 and "set MASTER_ADDR" in refused.stderr
    assert not (tmp_path / "data").exists()
    # Sampling commands ask the same question: a task is one rank (its shard), not a whole command of its own.
    from fmcli import distributed as D
    from fmcli.launch import relaunched

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # set, then removed: monkeypatch removes what adopt_slurm sets
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    for key, value in {**slurm, "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    assert relaunched(0, 0) is False and D.launched_externally()
    import os

    assert (os.environ["WORLD_SIZE"], os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("2", "1", "1")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../escape", "ABSOLUTE"])
def test_a_name_that_is_not_one_folder_name_is_refused_before_anything_is_written(tmp_path, name):
    # runs/NAME must be a direct child of runs/ (by os.path, independently of fm): '' gave runs/ itself, '..',
    # '../x' and '/abs' a folder outside runs/. One line, exit 2, nothing written; --run-dir places a run elsewhere.
    if name == "ABSOLUTE":
        name = str(tmp_path / "abs-run")
    result = run_fm("train", "--preset", "debug", "--set", f"name={name}", "--set", "train.steps=1", cwd=tmp_path)
    assert result.returncode == 2 and "is not a run name" in result.stderr and "--run-dir" in result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []
    assert training_config("debug", [f"name={name}"], data=None, run_dir=tmp_path / "mine", resume=None)[1] == tmp_path / "mine"


@pytest.mark.parametrize("name", ["run", "2024", "my run.v2"])
def test_a_one_folder_name_is_a_child_of_runs(name):
    run_dir = training_config("debug", [f"name={name}"], data=None, run_dir=None, resume=None)[1]
    assert os.path.dirname(os.path.normpath(run_dir)) == "runs" and os.path.basename(run_dir) == name


_PREPARE_AT_ONCE = """
import os, sys, time
from pathlib import Path
from fmcli.config import load_config
from fmcli.launch import default_data
import fmcli.data.prepare, fmcli.data.shapes  # imported before the start line: both reach the check together
Path(f"ready-{sys.argv[1]}").touch()
while not all(Path(f"ready-{k}").exists() for k in (0, 1)):
    time.sleep(0.01)
cfg = default_data(load_config("debug", ["data.count=3000"]), prepare=True)
print(cfg.data.path)
"""


def test_two_runs_started_at_once_share_the_default_shapes_data(tmp_path):
    """Two `fm train` of a sweep started together in one directory both need data/shapes-...: one prepares it, the
    other waits for it; before, both prepared it: the second either failed ("already exists; pass --force", exit 2)
    or replaced the first one's dataset under it."""
    import subprocess
    import sys

    import numpy as np

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE_AT_ONCE, str(k)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err
        assert out.strip() == os.path.join("data", "shapes-16-n3000-s0")
    assert sum("preparing shapes data" in err for _, err, _ in results) == 1  # one prepared, the other waited
    data = tmp_path / "data" / "shapes-16-n3000-s0"
    assert np.load(data / "x.npy").shape == (3000, 3, 16, 16)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["shapes-16-n3000-s0"]  # no temporaries left
