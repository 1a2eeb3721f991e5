"""`fm sample --gif`, `fm class-grid` and OT coupling in training, end to end on a tiny debug checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_fm


@pytest.fixture(scope="module")
def ot_run(shapes16, tmp_path_factory):
    """The debug preset trained 10 steps with ot-exact coupling (class-conditional, 10 classes)."""
    run_dir = tmp_path_factory.mktemp("ot") / "run"
    proc = run_fm("train", "--preset", "debug", "--data", shapes16, "--run-dir", run_dir, "--set", "train.steps=10", "--set", "flow.coupling=ot-exact")
    assert proc.returncode == 0, proc.stderr
    return run_dir


def test_training_logs_the_ot_cost_reduction(ot_run):
    records = [json.loads(line) for line in (ot_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10]
    for r in records:
        # Within-class OT can only lower the mean squared distance (identity is one of its options).
        assert 0 < r["ot_cost_after"] <= r["ot_cost_before"]


def test_sample_gif_and_json(ot_run, tmp_path):
    gif = tmp_path / "traj.gif"
    proc = run_fm("sample", "--ckpt", ot_run, "-n", "4", "--solver", "midpoint", "--steps", "4", "--cfg", "1", "--gif", gif, "--gif-frames", "5", "--out", tmp_path / "g.png", "--json", "--batch-size", "3")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["gif"] == str(gif) and out["grid"] == str(tmp_path / "g.png")
    assert out["nfe"] == 8 and out["nfe_total"] == 16 and out["seconds"] > 0  # 2 batches x 4 midpoint steps x 2
    frames = Image.open(gif)
    assert frames.n_frames == 5
    grid = Image.open(tmp_path / "g.png")
    assert frames.size[0] == grid.size[0] and frames.size[1] > grid.size[1]
    frames.seek(0)
    first = np.asarray(frames.convert("RGB")).astype(int)
    frames.seek(4)
    last = np.asarray(frames.convert("RGB")).astype(int)
    assert np.abs(first - last).mean() > 1  # the trajectory moves
    # The last frame is the final grid (up to GIF palette quantisation).
    assert np.abs(last[: grid.size[1]] - np.asarray(grid.convert("RGB")).astype(int)).mean() < 12


def _fm_inprocess(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from fmcli.cli import app

    with pytest.raises(SystemExit) as exit_info:
        app(args=[str(a) for a in args], prog_name="fm")
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def test_sample_dopri5_tolerances(ot_run, tmp_path, capsys):
    nfe = {}
    for tol in ("1e-2", "1e-6"):
        code, out, err = _fm_inprocess(capsys, "sample", "--ckpt", ot_run, "-n", "2", "--solver", "dopri5", "--rtol", tol, "--atol", tol, "--out", tmp_path / f"{tol}.png", "--json", "--device", "cpu")
        assert code == 0, err
        nfe[tol] = json.loads(out)["nfe"]
    assert nfe["1e-6"] > nfe["1e-2"] > 0
    code, _, err = _fm_inprocess(capsys, "sample", "--ckpt", ot_run, "--rtol", "0", "--out", tmp_path / "c.png")
    assert code == 2 and "rtol" in err
    code, _, err = _fm_inprocess(capsys, "sample", "--ckpt", ot_run, "--gif", tmp_path / "x.png", "--out", tmp_path / "c.png")
    assert code == 2 and "--gif" in err


def test_class_grid(ot_run, tmp_path):
    out = tmp_path / "classes.png"
    proc = run_fm("class-grid", "--ckpt", ot_run, "--samples-per-class", "3", "--out", out, "--steps", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["path"] == str(out) and info["classes"] == 10 and info["nfe"] == 3
    img = Image.open(out)
    # 10 rows of 16-pixel images with 2-pixel padding; 3 columns plus a left margin for the class names.
    assert img.height == 2 + 10 * 18 and img.width > 2 + 3 * 18


def test_class_grid_refuses_to_overwrite(ot_run, tmp_path, capsys):
    out = tmp_path / "classes.png"
    args = ("class-grid", "--ckpt", ot_run, "--samples-per-class", "1", "--steps", "1", "--out", out, "--device", "cpu")
    assert _fm_inprocess(capsys, *args)[0] == 0
    code, _, err = _fm_inprocess(capsys, *args)
    assert code == 2 and "--force" in err
    assert _fm_inprocess(capsys, *args, "--force")[0] == 0
    code, _, err = _fm_inprocess(capsys, "class-grid", "--ckpt", ot_run, "--out", tmp_path / "x.jpg")
    assert code == 2 and ".png" in err


def test_guidance_interval_option(ot_run, tmp_path, capsys):
    from fmcli.cli import parse_interval
    from fmcli.config import SampleConfig, sample_settings
    from fmcli.errors import UsageError

    # The option reaches the sampler settings (the guidance math itself is tested in test_sampling.py).
    settings = sample_settings(SampleConfig(), cfg=3.0, guidance_interval=parse_interval("0.2,0.8"))
    assert settings.guidance_interval == (0.2, 0.8) and settings.cfg == 3.0
    for bad in ("0.8,0.2", "0.5", "a,b", "-0.1,0.5"):
        with pytest.raises(UsageError, match="guidance-interval"):
            sample_settings(SampleConfig(), guidance_interval=parse_interval(bad))
    code, out, err = _fm_inprocess(capsys, "sample", "--ckpt", ot_run, "-n", "2", "--steps", "2", "--cfg", "3", "--guidance-interval", "0,0.5", "--device", "cpu", "--out", tmp_path / "g.png")
    assert code == 0, err
    code, _, err = _fm_inprocess(capsys, "sample", "--ckpt", ot_run, "--guidance-interval", "0.8,0.2", "--out", tmp_path / "x.png")
    assert code == 2 and "guidance" in err
