"""A run directory's records: config.json, env.json, metrics.jsonl, and the lock of a run being trained (docs/architecture.md
section 7)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .console import finite_json
from .errors import UsageError
from .fsutil import atomic_write, flock_exclusive, fsync_dir, write_text_atomic


RUN_LOCK = ".lock"  # the file rank 0 holds an advisory lock on while it trains in a run directory


def _busy_error(run_dir: Path) -> UsageError:
    return UsageError(f"{run_dir} is being trained by another fm process (fm train or fm resume of this run): "
                      "wait for it to end, or stop it (Ctrl-C saves a checkpoint), then resume")


def refuse_run_being_trained(run_dir: Path) -> None:
    """Exit 2 now if another process holds `run_dir`'s lock (`run_dir_lock`): the launcher's check before any setup
    (data, precision probe, autotune, compile, the ranks), which would otherwise run, and write autotune.json and
    .launch-config.json into the other process's run, before the refusal where rank 0 takes the lock to train.
    Creates nothing: no run directory, no lock file (a run that never trained there holds no lock)."""
    try:
        fd = os.open(run_dir / RUN_LOCK, os.O_RDONLY)
    except OSError:
        return
    try:
        if not flock_exclusive(fd, wait=False):  # taken here, it is released at the close
            raise _busy_error(run_dir)
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Held by rank 0 while a run trains in `run_dir`: a second `fm train`/`fm resume` of the same run is refused
    (exit 2) instead of both writing checkpoints, metrics and rollback set-asides over each other. An advisory
    flock on RUN_DIR/.lock, which the OS releases when the process ends however it ends; where the filesystem
    has no locks, the run goes unlocked."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not flock_exclusive(fd, wait=False):
            raise _busy_error(run_dir)
        yield
    finally:
        os.close(fd)


def memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def fm_source_commit() -> str | None:
    """The commit of the fm checkout this code runs from (`pip install -e .` or PYTHONPATH), None for an installed
    wheel. Asked of fm's own folder, not of the working directory: a run started inside the user's project repository
    recorded that repository's commit as if it were fm's."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():  # site-packages (even inside a user's repository) has none: not fm's commit
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_run_files(run_dir: Path, config: dict, device: torch.device, world_size: int, hardware: dict, resumed_at: int | None = None) -> None:
    """config.json (the config trained) and env.json (this launch: the machine, the software, how the hardware was
    chosen). A resume (`resumed_at`: its step) rewrites env.json only: this launch's record, `resumed_at_step`, and
    the earlier launches' records under `launches` (oldest first), so that it never describes a launch that is over."""
    env = {
        "fm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cuda": torch.version.cuda,
        "world_size": world_size,
        "cpu_threads": torch.get_num_threads(),
        "git_sha": fm_source_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hardware": hardware,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    if resumed_at is not None:
        earlier = _read_env(run_dir / "env.json")
        env.update(resumed_at_step=resumed_at, launches=[*earlier.pop("launches", []), earlier] if earlier else [])
    else:
        write_config(run_dir, config)
    write_text_atomic(run_dir / "env.json", json.dumps(env, indent=2) + "\n")


def _read_env(path: Path) -> dict:
    """The env.json a resume finds ({} where there is none, or it is damaged: its history is then lost, not the run)."""
    try:
        env = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(env, dict):
        return {}
    if not isinstance(env.get("launches", []), list):
        env.pop("launches")
    return env


def write_config(run_dir: Path, config: dict) -> None:
    """config.json: the config trained; rewritten with each checkpoint's, so that a resume's overrides (train.steps,
    the intervals) and the budget's refits show there too."""
    write_text_atomic(run_dir / "config.json", json.dumps(config, indent=2) + "\n")


def write_env_hardware(run_dir: Path, hardware: dict) -> None:
    """env.json's `hardware` rewritten with each checkpoint's, as config.json is: the budget's refits change its fit
    (`hardware.budget`) as the run goes, and env.json would otherwise keep the first fit of a run that trained another."""
    env = _read_env(run_dir / "env.json")
    if env:
        env["hardware"] = hardware
        write_text_atomic(run_dir / "env.json", json.dumps(env, indent=2) + "\n")


def append_metrics(run_dir: Path, record: dict) -> None:
    """Append one record; a torn last line (a run killed mid-write, before the resume that appends now) is cut
    off first: the record appended would otherwise continue it, one line that is neither record. A non-finite value
    (an fp16 overflow step's grad_norm) is written as null: Python's NaN/Infinity tokens are not JSON (`jq` stops there)."""
    line = json.dumps(finite_json(record), allow_nan=False) + "\n"
    with open(run_dir / "metrics.jsonl", "ab+") as f:
        drop_torn_tail(f)
        f.write(line.encode())


def metrics_end(run_dir: Path) -> int:
    """The size of metrics.jsonl (0 if there is none), after cutting off a torn last line: where a resumed run's
    records will begin (`set_aside_metrics` tells the rows of the earlier branch by it)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    with open(path, "ab+") as f:
        drop_torn_tail(f)
        return f.seek(0, os.SEEK_END)


def set_aside_metrics(run_dir: Path, step: int, before: int, aside: Path) -> int:
    """A rollback to `step`: move the records in metrics.jsonl's first `before` bytes (what the file held when the
    resumed run began) whose step is after `step`, the abandoned branch's, to aside/metrics.jsonl, and rewrite
    metrics.jsonl without them (both atomically, the copy first: a crash between leaves them twice, never lost).
    Returns the number of records moved."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    data = path.read_bytes()
    keep, gone = [], []
    for line in data[:before].splitlines(keepends=True):
        (gone if (_record_step(line) or 0) > step else keep).append(line)
    if gone:
        atomic_write(aside / "metrics.jsonl", lambda tmp: tmp.write_bytes(b"".join(gone)))
        atomic_write(path, lambda tmp: tmp.write_bytes(b"".join(keep) + data[before:]))
    return len(gone)


def _record_step(line: bytes):
    """A metrics.jsonl line's step, None where the line is not a record with a numeric one (kept where it is)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def evaluated_at(run_dir: Path, step: int) -> bool:
    """Whether metrics.jsonl holds an evaluation record (FID's `fid`, the fidelity metrics' `fd`) of `step`."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    # A line with a numeric step (_record_step) is a JSON object; a torn or damaged line is none.
    return any(_record_step(line) == step and {"fid", "fd"} & json.loads(line).keys() for line in path.read_bytes().splitlines())


def last_logged_step(run_dir: Path) -> int | None:
    """The highest step of a record the run has logged: metrics.jsonl's and those a rollback set aside
    (checkpoints/abandoned-from-step-*/metrics.jsonl), which a tracker was sent all the same; None if none."""
    files = [run_dir / "metrics.jsonl", *sorted((run_dir / "checkpoints").glob("abandoned-from-step-*/metrics.jsonl"))]
    steps = [s for f in files if f.is_file() for line in f.read_bytes().splitlines() if (s := _record_step(line)) is not None]
    return int(max(steps)) if steps else None


SAMPLE_FILE = re.compile(r"^step-(\d{7,})\.(png|txt)$")  # a sample grid and a text model's prompts (step_name)


def set_aside_samples(samples_dir: Path, step: int, aside: Path) -> int:
    """A rollback to `step`: move the sample grids (and prompt files) of steps after it, the abandoned branch's,
    into aside/samples/, before the new branch writes its own at those steps. Returns the number of files moved."""
    late = [p for p in samples_dir.iterdir() if (m := SAMPLE_FILE.match(p.name)) and int(m.group(1)) > step] if samples_dir.is_dir() else []
    if not late:
        return 0
    (aside / "samples").mkdir(parents=True, exist_ok=True)
    for p in sorted(late):
        os.replace(p, aside / "samples" / p.name)
    fsync_dir(aside / "samples")
    fsync_dir(samples_dir)
    return len(late)


def drop_torn_tail(f) -> None:
    """Truncate the file open in `f` (binary, appending) after its last newline, if its last byte is not one."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return
    keep, chunk = 0, end
    while chunk > 0:  # back from the end, a block at a time, to the last newline
        start = max(0, chunk - 65536)
        f.seek(start)
        newline = f.read(chunk - start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        chunk = start
    f.truncate(keep)


def step_name(step: int, suffix: str) -> str:
    """samples/step-0001000.png, checkpoints/step-0001000.pt: one naming scheme for every per-step file."""
    return f"step-{step:07d}{suffix}"
