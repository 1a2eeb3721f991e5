"""A run directory's records: config.json, env.json, metrics.jsonl, and the lock of a run being trained (docs/architecture.md
section 7)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import UsageError
from .fsutil import write_text_atomic


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
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise _busy_error(run_dir) from None
    except OSError:
        pass  # a filesystem without flock: no lock, as run_dir_lock
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
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy_error(run_dir) from None
        except OSError:
            pass  # a filesystem without flock (some network mounts): no lock, as before
        yield
    finally:
        os.close(fd)


def memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_run_files(run_dir: Path, config: dict, device: torch.device, world_size: int, hardware: dict, resumed_at: int | None = None) -> None:
    """config.json (the config trained) and env.json (this launch: the machine, the software, how the hardware was
    chosen). A resume (`resumed_at`: its step) rewrites env.json only: this launch's record, `resumed_at_step`, and
    the earlier launches' records under `launches` (oldest first), so that it never describes a launch that is over."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
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
        "git_sha": sha,
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


def append_metrics(run_dir: Path, record: dict) -> None:
    """Append one record; a torn last line (a run killed mid-write, before the resume that appends now) is cut
    off first: the record appended would otherwise continue it, one line that is neither record."""
    with open(run_dir / "metrics.jsonl", "ab+") as f:
        drop_torn_tail(f)
        f.write((json.dumps(record) + "\n").encode())


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
