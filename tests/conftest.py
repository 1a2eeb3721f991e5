"""Shared fixtures: run the CLI as a subprocess of this checkout, and small prepared datasets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def assert_resumes_bit_exactly(run_root: Path, overrides: list[str], stop_at: int = 3) -> None:
    """A `debug`-preset run with `overrides`, straight through and stopped at `stop_at` then resumed from its
    checkpoint: the same losses and the same final weights, bit for bit."""
    import torch

    from fmcli.checkpoint import load_checkpoint, resolve_checkpoint
    from fmcli.config import load_config, validate_config
    from fmcli.train import train

    straight = train(load_config("debug", overrides), run_root / "straight")
    first = train(load_config("debug", overrides), run_root / "split", stop_at_step=stop_at)
    ckpt = resolve_checkpoint(run_root / "split")
    second = train(validate_config(load_checkpoint(ckpt)["config"]), run_root / "split", resume_from=ckpt)
    assert straight.losses == first.losses + second.losses
    a, b = (load_checkpoint(resolve_checkpoint(run_root / d)) for d in ("straight", "split"))
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])  # the global RNG continues as if never stopped


def one_and_two_processes(run_root: Path, data: Path, settings: list[str]) -> tuple[dict, dict]:
    """4 `debug`-preset steps with `settings` in one process and under `--nproc 2` at the same global batch: the
    same losses (to float rounding) and the same weights; returns both final checkpoints for more checks."""
    import json

    import numpy as np
    import torch

    from fmcli.checkpoint import load_checkpoint, resolve_checkpoint

    def args(name, *extra):
        return ["train", "--preset", "debug", "--data", data, "--run-dir", run_root / name, "--set", "train.steps=4", "--set", "train.log_every=1",
                "--set", "train.checkpoint_every=0", *[a for item in settings for a in ("--set", item)], *extra]

    one = fm_in_process(*args("one"))
    assert one.returncode == 0, one.stderr
    two = run_fm(*args("two", "--nproc", "2"))
    assert two.returncode == 0, two.stderr

    def losses(name):
        return [json.loads(line)["loss"] for line in (run_root / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]

    np.testing.assert_allclose(losses("two"), losses("one"), rtol=1e-5)
    a, b = (load_checkpoint(resolve_checkpoint(run_root / name)) for name in ("one", "two"))
    for name in a["model"]:
        torch.testing.assert_close(b["model"][name], a["model"][name], rtol=1e-5, atol=1e-6)
    return a, b


def fm_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.update(extra or {})
    return env


def fm_in_process(*args, env: dict | None = None, cwd=None, input: str | None = None) -> subprocess.CompletedProcess:
    """`fm ARGS` run by the same app and error handler inside this process, stdout and stderr captured (and
    `input` as stdin): for calls that test what a command does, not how a process behaves, which a fresh
    interpreter makes seconds slower each (importing torch, transformers, diffusers). `run_fm` stays for what
    only a process shows (torchrun ranks, signals, what the import pulls in, the real entry point, environment
    variables read at launch); `env` and `cwd` are set for the call and restored."""
    import contextlib
    import io

    from fmcli.cli import app

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    old_cwd, old_stdin = os.getcwd(), sys.stdin
    try:
        if cwd is not None:
            os.chdir(cwd)
        sys.stdin = io.StringIO(input or "")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                app(args=[str(a) for a in args], prog_name="fm")
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        sys.stdin = old_stdin
        os.chdir(old_cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["fm", *map(str, args)], code, out.getvalue(), err.getvalue())


def run_fm(*args, cwd=None, env=None, timeout=600, input=None) -> subprocess.CompletedProcess:
    """`fm ARGS` from this checkout (not whatever `fm` is on PATH); text stdout/stderr captured. Ranks of an
    `--nproc N` command get one torch thread each unless `env` says otherwise (fm_env's 2 per process put 2N busy
    threads on the machine's 2 cores, several times slower for these tiny models)."""
    strs = [str(a) for a in args]
    if "--nproc" in strs and "OMP_NUM_THREADS" not in (env or {}):
        env = {**(env or {}), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fmcli.cli", *strs],
        cwd=cwd,
        env=fm_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


class QuietLog:
    """A training log that prints nothing (for in-process train() calls in tests)."""

    def info(self, message):
        pass

    def progress(self, total, start):
        return lambda step, loss, total=None: None


@pytest.fixture(scope="session", autouse=True)
def hardware_cache(tmp_path_factory):
    """fmcli.hardware's probe cache in a temporary directory (never the user's ~/.cache/fm); subprocesses inherit it."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield Path(os.environ["XDG_CACHE_HOME"]) / "fm"
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread, from the first test of a module that asks for it to the module's end (restored
    then; a module's `pytestmark = pytest.mark.usefixtures("one_thread")` covers its module-scoped fixtures too): for
    in-process work on tiny tensors (toy MLPs, 16px debug models, 16x16 OT plans), where a second OpenMP thread on a
    2-core machine costs several times the work itself. Subprocesses are not affected (fm_env sets their threads)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shapes16(tmp_path_factory) -> Path:
    """512 shapes images at 16x16 (the `debug` preset's data), prepared once per test session."""
    from fmcli.data.shapes import prepare_shapes

    return prepare_shapes(tmp_path_factory.mktemp("data") / "shapes16", size=16, count=512, seed=0)


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory, shapes16) -> Path:
    """A run directory trained for a few steps with the `debug` preset (a real checkpoint to sample from)."""
    from fmcli.config import load_config
    from fmcli.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "debug"
    cfg = load_config("debug", [f"data.path='{shapes16}'", "train.steps=4", "train.checkpoint_every=0"])
    train(cfg, run_dir)
    return run_dir
