"""train.tracker: W&B (offline) and TensorBoard receive the metrics.jsonl records and the sample grids.

The backends are the `wandb` / `tensorboard` extras, installed by .ci/run so these tests run in CI.
"""

import glob
import json
import struct
import sys
from pathlib import Path

import pytest

from conftest import fm_in_process, run_fm
from fmcli.errors import UsageError
from fmcli.tracking import NullTracker, make_tracker


def _wandb_records(path):
    """Records of a W&B transaction log (.wandb): a 7-byte ':W&B' header, then LevelDB-log framing
    (32 KiB blocks of [crc32 u32][length u16][type u8] chunks: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _train(shapes16, run_dir, tracker, env=None):
    args = ("train", "--preset", "debug", "--data", shapes16, "--run-dir", run_dir,
            "--set", "train.steps=4", "--set", "train.log_every=2", "--set", "train.sample_every=2", "--set", f"train.tracker={tracker}")
    # W&B starts a service process and atexit hooks of its own: its run stays in a process of its own.
    res = run_fm(*args, env=env, timeout=300) if tracker == "wandb" else fm_in_process(*args, env=env)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_wandb_offline_run_logs_the_metrics_jsonl_records_and_grids(tmp_path, shapes16):
    pytest.importorskip("wandb")  # the `wandb` extra
    run_dir = tmp_path / "run"
    metrics = _train(shapes16, run_dir, "wandb", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert [m["step"] for m in metrics] == [2, 4]  # metrics.jsonl is still written
    runs = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert runs[0].endswith(run_id)
    logs = glob.glob(f"{runs[0]}/run-{run_id}.wandb")
    assert len(logs) == 1
    history = {}
    for record in _wandb_records(logs[0]):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
    assert sorted(history) == [2, 4]
    for m in metrics:
        logged = history[m["step"]]
        for key in ("loss", "lr", "grad_norm", "img_per_s", "epoch"):
            assert logged[key] == pytest.approx(m[key], rel=1e-12), key
        assert logged["samples/_type"] == "image-file"  # the sample grid of that step
    images = glob.glob(f"{runs[0]}/files/media/images/samples_*.png")
    assert len(images) == 2


def test_tensorboard_event_files_hold_the_metrics(tmp_path, shapes16):
    pytest.importorskip("tensorboard")  # the `tensorboard` extra
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    metrics = _train(shapes16, run_dir, "tensorboard")
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in loss] == [m["step"] for m in metrics]
    assert [v for _, v in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)  # stored as float32
    assert [e.step for e in acc.Images("samples")] == [2, 4]


def test_missing_backend_is_a_usage_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(UsageError, match=r"pip install wandb \(or, in the fm checkout: pip install -e '\.\[wandb\]'\)"):
        make_tracker("wandb", tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UsageError, match=r"pip install tensorboard \(or, in the fm checkout: pip install -e '\.\[tensorboard\]'\)"):
        make_tracker("tensorboard", tmp_path)
    assert isinstance(make_tracker("none", tmp_path), NullTracker)
    assert not list(tmp_path.iterdir())  # nothing written by a failed or null tracker


def test_tensorboard_of_a_rolled_back_run_shows_each_step_once_with_the_current_branch(tmp_path, shapes16):
    """A resume from step 2 of a run that had logged steps 1-6 (here a rollback with a longer schedule, so the
    new branch's losses differ from the old ones from step 5 on) appends steps 3-6 again: TensorBoard must show
    steps 1-10 once each, steps 3-10 with the new branch's losses (those the resumed train() returned)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import QuietLog
    from fmcli.checkpoint import load_checkpoint
    from fmcli.config import load_config, validate_config
    from fmcli.train import train

    run_dir = tmp_path / "run"
    over = [f"data.path='{shapes16}'", "train.steps=6", "train.log_every=1", "train.checkpoint_every=2", "train.keep_last=5", "train.tracker='tensorboard'"]
    first = train(load_config("debug", over), run_dir, log=QuietLog())
    ckpt = run_dir / "checkpoints" / "step-0000002.pt"
    cfg = validate_config({**load_checkpoint(ckpt)["config"]}).with_section("train", steps=10)
    second = train(cfg, run_dir, resume_from=ckpt, log=QuietLog())
    assert second.losses[:4] != first.losses[2:]  # the branches differ where they overlap
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in loss] == list(range(1, 11))
    assert [v for _, v in loss] == pytest.approx(first.losses[:2] + second.losses, rel=1e-6)


def test_a_tracker_can_be_turned_on_or_off_when_resuming(tmp_path, shapes16):
    """train.tracker does not change the training math: `fm resume --set train.tracker=...` is accepted. Turned
    on at step 4, TensorBoard holds exactly the records metrics.jsonl gets from then on; turned off, nothing more."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    _train(shapes16, run_dir, "none")
    res = fm_in_process("resume", run_dir, "--set", "train.tracker=tensorboard", "--set", "train.steps=8", "--set", "train.device=cpu")
    assert res.returncode == 0, res.stderr
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in loss] == [6, 8]
    assert [v for _, v in loss] == pytest.approx([m["loss"] for m in metrics[2:]], rel=1e-6)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["tracker"] == "tensorboard" and config["train"]["device"] == "cpu"
    events = sorted((run_dir / "tb").iterdir())
    res = fm_in_process("resume", run_dir, "--set", "train.tracker=none", "--set", "train.steps=10")
    assert res.returncode == 0, res.stderr
    assert sorted((run_dir / "tb").iterdir()) == events and [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1] == 10


class _FakeWandb:
    """A stand-in `wandb` module (no network, no service process): init returns a run that records its calls."""

    class Run:
        id = "fake123"

        def __init__(self, **kwargs):
            self.kwargs, self.logged = kwargs, []

        def log(self, metrics, step):
            self.logged.append(step)

        def finish(self, exit_code=None):
            self.exit_code = exit_code

    def init(self, **kwargs):
        self.run = self.Run(**kwargs)
        return self.run

    def Image(self, path):  # noqa: N802 (wandb's name)
        return str(path)


def test_a_wandb_run_continued_before_its_last_logged_step_warns_once_which_steps_it_drops(tmp_path, monkeypatch):
    """W&B ignores a record whose step is below the run's last (steps must increase): a rollback to step 10 of a run
    that logged up to step 20 (two records set aside already: steps 25, 30) loses steps 11..30 there. Said once."""
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb())
    (tmp_path / "wandb_id.txt").write_text("fake123\n")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (5, 10, 15, 20)))
    aside = tmp_path / "checkpoints" / "abandoned-from-step-0000020"
    aside.mkdir(parents=True)
    (aside / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (25, 30)))
    messages = []
    tracker = make_tracker("wandb", tmp_path, resumed_at=10, log=messages.append)
    assert tracker.run.kwargs["id"] == "fake123" and tracker.run.kwargs["resume"] == "allow"
    assert len(messages) == 1 and "steps 11..30 will not reach W&B" in messages[0] and "wandb_id.txt" in messages[0], messages
    messages.clear()
    make_tracker("wandb", tmp_path, resumed_at=30, log=messages.append)  # a resume at the last logged step loses nothing
    (tmp_path / "wandb_id.txt").unlink()
    make_tracker("wandb", tmp_path, resumed_at=10, log=messages.append)  # a new W&B run: nothing to drop
    assert messages == []


def test_wandb_without_a_login_is_one_line_saying_what_to_do(tmp_path, shapes16):
    """train.tracker=wandb on a machine not logged in to W&B ended in "error: UsageError: No API key configured ...
    (rerun with --debug for the traceback)", exit 1, as if fm had crashed: it is the machine's setup, exit 2 with the
    three ways on (wandb login, WANDB_MODE=offline, train.tracker=none); nothing of a run is left to block a retry."""
    pytest.importorskip("wandb")
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "WANDB_API_KEY": "", "WANDB_MODE": "online", "WANDB_CONFIG_DIR": str(home / ".config"), "WANDB_SILENT": "true"}
    args = ("train", "--preset", "debug", "--data", shapes16, "--run-dir", tmp_path / "run", "--set", "train.steps=2", "--set", "train.tracker=wandb")
    res = run_fm(*args, env=env, timeout=300)
    lines = [line for line in res.stderr.splitlines() if line.startswith("error")]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "train.tracker=wandb" in lines[0] and "wandb login" in lines[0] and "WANDB_MODE=offline" in lines[0] and "train.tracker=none" in lines[0], lines
    again = fm_in_process(*args[:-2], "--set", "train.tracker=none")  # the same --run-dir trains
    assert again.returncode == 0, again.stderr


def test_env_json_git_sha_is_fm_s_commit_not_the_working_directory_s(tmp_path, monkeypatch):
    """env.json's git_sha names the code that trained: fm's checkout, asked by its own folder. Started inside
    another repository (a user's project), the old code recorded that repository's commit."""
    import shutil
    import subprocess

    import fmcli
    from fmcli.runlog import fm_source_commit

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    project = tmp_path / "project"
    project.mkdir()
    git = ["git", "-C", str(project), "-c", "user.name=u", "-c", "user.email=u@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "user's work"], check=True)
    theirs = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    root = Path(fmcli.__file__).resolve().parent.parent
    expected = None
    if (root / ".git").exists():
        expected = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    monkeypatch.chdir(project)
    assert fm_source_commit() == expected
    assert fm_source_commit() != theirs


@pytest.mark.parametrize("env, var", [({"WANDB_MODE": "ofline"}, "WANDB_MODE"), ({"WANDB_MODE": "offline", "WANDB_INIT_TIMEOUT": "soon"}, "WANDB_INIT_TIMEOUT")])
def test_a_wandb_variable_wandb_cannot_read_is_one_line_naming_it(tmp_path, monkeypatch, env, var):
    """A typo in WANDB_MODE made wandb.init raise pydantic's four-line ValidationError (exit 1, not naming the variable)."""
    pytest.importorskip("wandb")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UsageError) as err:
        make_tracker("wandb", tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and message.startswith("train.tracker=wandb: ") and f"unset {var} in the environment" in message
    assert repr(env[var]) in message
    assert not (tmp_path / "run" / "wandb_id.txt").exists()


def test_a_run_that_fails_ends_its_wandb_run_as_failed(tmp_path, shapes16, monkeypatch):
    """W&B reads finish(exit_code): 0 is "finished", any other "failed". A run that raised (here an injected failure
    after step 1) called finish() all the same, and W&B showed it as finished like a completed one."""
    from conftest import QuietLog
    from fmcli.config import load_config
    from fmcli.train import train

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    make_tracker("wandb", tmp_path / "ok").close()  # a run that ends normally
    assert fake.run.exit_code == 0
    monkeypatch.setenv("FM_TEST_FAIL_RANK", "0")
    monkeypatch.setenv("FM_TEST_FAIL_STEP", "1")
    cfg = load_config("debug", [f"data.path='{shapes16}'", "train.steps=2", "train.log_every=1", "train.tracker='wandb'"])
    with pytest.raises(Exception, match="injected failure on rank 0 at step 1"):
        train(cfg, tmp_path / "run", log=QuietLog())
    assert fake.run.logged == [1]  # this run's tracker: step 1 logged, then the failure
    assert fake.run.exit_code == 1


@pytest.mark.parametrize("failure", ["error", "ctrl-c"])
def test_a_wandb_start_that_fails_leaves_nothing_that_blocks_a_retry(tmp_path, monkeypatch, failure):
    """wandb.init writes RUN_DIR/wandb before it reaches the server: a start that failed there (no network, a refused
    key) or was stopped with Ctrl-C during W&B's wait left that folder, and the retry the error advises (WANDB_MODE=offline,
    train.tracker=none) was refused: "run directory ... holds files that are not an fm run (e.g. wandb)"."""
    import types

    from fmcli.launch import holds_a_run

    class Error(Exception):
        pass

    def init(**kwargs):
        (Path(kwargs["dir"]) / "wandb" / "run-x").mkdir(parents=True)  # as W&B does before it contacts its server
        (Path(kwargs["dir"]) / "wandb" / "debug.log").write_text("...")
        raise Error("Timed out while retrying") if failure == "error" else KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, errors=types.SimpleNamespace(Error=Error)))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").touch()  # the launch's own files
    with pytest.raises(UsageError if failure == "error" else KeyboardInterrupt):
        make_tracker("wandb", run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"] and not holds_a_run(run_dir)
    (run_dir / "wandb" / "offline-run-1").mkdir(parents=True)  # a resumed run's W&B folder, from its earlier start: kept
    with pytest.raises(UsageError if failure == "error" else KeyboardInterrupt):
        make_tracker("wandb", run_dir)
    assert (run_dir / "wandb" / "offline-run-1").is_dir()
