"""`fm sample --gif`, `fm class-grid` and OT coupling in training, end to end on a tiny debug checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import fm_in_process


@pytest.fixture(scope="module")
def ot_run(shapes16, tmp_path_factory):
    """The debug preset trained 10 steps with ot-exact coupling (class-conditional, 10 classes)."""
    run_dir = tmp_path_factory.mktemp("ot") / "run"
    proc = fm_in_process("train", "--preset", "debug", "--data", shapes16, "--run-dir", run_dir, "--set", "train.steps=10", "--set", "flow.coupling=ot-exact")
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
    proc = fm_in_process("sample", "--ckpt", ot_run, "-n", "4", "--solver", "midpoint", "--steps", "4", "--cfg", "1", "--gif", gif, "--gif-frames", "5", "--out", tmp_path / "g.png", "--json", "--batch-size", "3")
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


def test_sample_out_with_a_gif_or_other_non_grid_image_suffix_is_refused(ot_run, tmp_path, capsys):
    # `--out traj.gif` used to become a folder named traj.gif holding PNGs (exit 0): the user asked for an
    # image file, so it is one line and exit 2, pointing to --gif, and nothing is written.
    for name in ("traj.gif", "grid.TIFF", "grid.bmp"):
        code, _, err = _fm_inprocess(capsys, "sample", "--ckpt", ot_run, "-n", "2", "--steps", "2", "--device", "cpu", "--out", tmp_path / name)
        assert code == 2 and err.count("\n") == 1 and "--out" in err, err
        assert not (tmp_path / name).exists()
    assert "--gif" in _fm_inprocess(capsys, "sample", "--ckpt", ot_run, "--out", tmp_path / "t.gif")[2]


def test_gif_has_at_most_gif_frames_frames_in_time_order(ot_run, tmp_path, capsys):
    # README: each frame is the solver state nearest to one of --gif-frames evenly spaced times, so Euler with
    # 3 steps (4 states, t = 0, 1/3, 2/3, 1) gives 4 frames for 16 asked, and 3 asked give t = 0, 1/3 or 2/3, 1.
    for frames, steps, want in ((16, 3, 4), (3, 3, 3), (3, 9, 3)):
        gif = tmp_path / f"f{frames}-{steps}.gif"
        code, _, err = _fm_inprocess(capsys, "sample", "--ckpt", ot_run, "-n", "2", "--solver", "euler", "--steps", steps, "--cfg", "1", "--device", "cpu",
                                     "--out", tmp_path / f"f{frames}-{steps}.png", "--gif", gif, "--gif-frames", frames)  # fmt: skip
        assert code == 0, err
        assert Image.open(gif).n_frames == want


def test_dopri5_that_diverges_is_one_clear_line_and_exit_1(ot_run, tmp_path, capsys):
    # A --cfg too large for float32 makes the velocity non-finite; dopri5 then rejects every step. This used to
    # print "AssertionError: underflow in dt 0.0" (torchdiffeq's internals); now it says what diverged and what to try.
    code, _, err = _fm_inprocess(capsys, "sample", "--ckpt", ot_run, "-n", "2", "--solver", "dopri5", "--cfg", "1e38", "--device", "cpu", "--out", tmp_path / "d.png")
    assert code == 1 and err.count("\n") == 1, err
    assert "dopri5 could not step past t = " in err and "--cfg" in err and "AssertionError" not in err, err
    assert not (tmp_path / "d.png").exists()


def test_class_grid(ot_run, tmp_path):
    out = tmp_path / "classes.png"
    proc = fm_in_process("class-grid", "--ckpt", ot_run, "--samples-per-class", "3", "--out", out, "--steps", "3", "--json")
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

    # The option reaches the sampler settings (the guidance math itself is tested in test_solvers.py).
    settings = sample_settings(SampleConfig(), cfg=3.0, guidance_interval=parse_interval("0.2,0.8"))
    assert settings.guidance_interval == (0.2, 0.8) and settings.cfg == 3.0
    for bad in ("0.8,0.2", "0.5", "a,b", "-0.1,0.5"):
        with pytest.raises(UsageError, match="guidance-interval"):
            sample_settings(SampleConfig(), guidance_interval=parse_interval(bad))
    code, out, err = _fm_inprocess(capsys, "sample", "--ckpt", ot_run, "-n", "2", "--steps", "2", "--cfg", "3", "--guidance-interval", "0,0.5", "--device", "cpu", "--out", tmp_path / "g.png")
    assert code == 0, err
    code, _, err = _fm_inprocess(capsys, "sample", "--ckpt", ot_run, "--guidance-interval", "0.8,0.2", "--out", tmp_path / "x.png")
    assert code == 2 and "guidance" in err


def _fake_checkpoint(path, ot_run, **model):
    """A checkpoint like ot_run's but with other model facts (random weights; only its shape is used)."""
    import torch

    from fmcli.checkpoint import load_checkpoint, resolve_checkpoint
    from fmcli.config import config_to_dict, validate_config
    from fmcli.models import build_model

    state = load_checkpoint(resolve_checkpoint(ot_run))
    cfg = validate_config(state["config"])
    cfg = cfg.with_section("model", **model)
    weights = build_model(cfg.model).state_dict()
    torch.save({"model": weights, "ema": weights, "config": config_to_dict(cfg), "step": 1, "data_info": state.get("data_info", {})}, path)
    return path


def test_new_solvers_and_guidance_from_the_command_line(ot_run, tmp_path, capsys):
    def sample(name, *args):
        code, out, err = _fm_inprocess(capsys, "sample", "--ckpt", ot_run, "-n", "3", "--out", tmp_path / f"{name}.png", "--json", "--device", "cpu", *args)
        assert code == 0, err
        return json.loads(out), np.asarray(Image.open(tmp_path / f"{name}.png"))

    info, _ = sample("ab2", "--solver", "ab2", "--steps", "5", "--cfg", "1")
    assert info["nfe"] == 6 and info["solver"] == "ab2"  # one Heun start-up evaluation more than its steps
    info, sde = sample("sde", "--solver", "euler-sde", "--steps", "6", "--sde-noise", "1.5", "--batch-size", "2")
    assert info["nfe"] == 6
    _, sde_again = sample("sde2", "--solver", "euler-sde", "--steps", "6", "--sde-noise", "1.5", "--batch-size", "3")
    assert np.array_equal(sde, sde_again)  # noise per (seed, sample index, step): the batch size does not matter
    _, ode = sample("sde0", "--solver", "euler-sde", "--steps", "6", "--sde-noise", "0")
    _, euler = sample("euler", "--solver", "euler", "--steps", "6")
    assert np.array_equal(ode, euler) and not np.array_equal(sde, euler)
    info, zero = sample("zero", "--guidance", "cfg-zero", "--cfg", "3", "--steps", "4", "--zero-init-steps", "1")
    assert info["nfe"] == 3 and info["guidance"] == "cfg-zero"  # the zero-init step evaluates nothing
    # Autoguidance with the model itself as the guide is the unguided model.
    info, auto = sample("auto", "--guide-ckpt", str(ot_run), "--cfg", "3", "--steps", "4")
    _, plain = sample("plain", "--cfg", "1", "--steps", "4")
    assert info["guidance"] == "auto" and np.array_equal(auto, plain)


def test_bad_sampling_input_is_one_line_and_exit_2(ot_run, tmp_path, capsys):
    out = ["--out", tmp_path / "x.png", "--device", "cpu"]
    other_classes = _fake_checkpoint(tmp_path / "k3.pt", ot_run, num_classes=3)
    other_size = _fake_checkpoint(tmp_path / "s8.pt", ot_run, image_size=8)
    cases = [
        (("sample", "--solver", "leapfrog"), "--solver"),
        (("sample", "--guidance", "pag"), "--guidance"),
        (("sample", "--guidance", "auto", "--cfg", "2"), "--guide-ckpt"),
        (("sample", "--guidance", "cfg", "--guide-ckpt", str(ot_run)), "--guidance auto"),
        (("sample", "--guide-ckpt", other_classes, "--cfg", "2"), "class count"),
        (("class-grid", "--guide-ckpt", other_size, "--cfg", "2"), "sample shape"),
        (("sample", "--guidance", "cfg-zero", "--steps", "2", "--zero-init-steps", "2"), "zero_init_steps"),
        (("sample", "--sde-noise", "-1"), "--sde-noise"),
    ]
    for args, expected in cases:
        code, _, err = _fm_inprocess(capsys, args[0], "--ckpt", ot_run, *args[1:], *out)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], (args, err)
    for bad in ("0", "1,x", "-2", "", "2,,4"):
        code, _, err = _fm_inprocess(capsys, "fid", "--ckpt", ot_run, "-n", "4", "--ref", tmp_path, "--nfe", bad, "--device", "cpu")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--nfe" in err, (bad, err)
    code, _, err = _fm_inprocess(capsys, "fid", "--ckpt", ot_run, "-n", "4", "--ref", tmp_path, "--nfe", "4", "--solver", "dopri5", "--device", "cpu", "--features", "tiny")
    assert code == 2 and "tolerances" in err


def test_fid_nfe_sweep_table_json_and_plot(ot_run, shapes16, tmp_path, capsys):
    args = ["fid", "--ckpt", ot_run, "-n", "20", "--ref", shapes16, "--features", "tiny", "--device", "cpu", "--cfg", "1"]
    code, out, err = _fm_inprocess(capsys, *args, "--nfe", "1,2,4", "--solver", "heun", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["nfe_budget"] for r in rows] == [2, 4] and [r["steps"] for r in rows] == [1, 2]
    assert [r["nfe_per_sample"] for r in rows] == [2, 4] and "NFE 1: skipped" in err  # one heun step is 2 NFE: over budget 1
    assert all(r["fid"] > 0 and r["solver"] == "heun" for r in rows)
    code, table, err = _fm_inprocess(capsys, *args, "--nfe", "2,4", "--solver", "ab2")
    assert code == 0, err
    assert table.splitlines()[0].split()[:3] == ["NFE", "used", "steps"] and len(table.splitlines()) == 4
    sweep = tmp_path / "sweep.json"
    sweep.write_text(out + json.dumps([{**r, "solver": "euler"} for r in rows]) + "\n")  # two `--json` outputs appended
    pytest.importorskip("matplotlib")
    code, printed, err = _fm_inprocess(capsys, "plot", sweep)
    assert code == 0, err
    assert printed.strip() == str(tmp_path / "sweep.png") and Image.open(tmp_path / "sweep.png").size[0] > 100


def test_class_grid_of_a_text_model_says_it_is_one():
    """A text model has no classes either, but it is not unconditional: the refusal names what it is and what to use."""
    from types import SimpleNamespace

    from fmcli.errors import UsageError
    from fmcli.generate import LoadedModel, class_grid_samples

    text_model = LoadedModel(model=None, config=SimpleNamespace(model=SimpleNamespace(cross_attention=True, num_classes=0)), info={}, step=0)
    with pytest.raises(UsageError, match=r"text-conditioned.*fm sample --prompt"):
        class_grid_samples(text_model, 1, seed=0, sample_cfg=None, batch_size=1, device="cpu")


def test_rows_at_cfg_1_report_no_guidance_interval(debug_run, tmp_path):
    """A checkpoint whose sample.guidance_interval is set, sampled at --cfg 1: the model alone at every t, so no
    interval ran and the rows say so (the same images as the checkpoint without an interval); at its cfg 2 it ran."""
    import torch

    from fmcli.checkpoint import load_checkpoint, resolve_checkpoint

    state = load_checkpoint(resolve_checkpoint(debug_run))
    state["config"]["sample"]["guidance_interval"] = [0.25, 1.0]
    interval_ckpt = tmp_path / "interval.pt"
    torch.save(state, interval_ckpt)
    common = ("-n", "4", "--steps", "2", "--json")
    plain = json.loads(fm_in_process("sample", "--ckpt", debug_run, *common, "--cfg", "1", "--out", tmp_path / "plain.png").stdout)
    at_1 = fm_in_process("sample", "--ckpt", interval_ckpt, *common, "--cfg", "1", "--out", tmp_path / "at1.png")
    assert at_1.returncode == 0, at_1.stderr
    assert json.loads(at_1.stdout)["guidance_interval"] is None and plain["guidance_interval"] is None
    assert np.array_equal(np.asarray(Image.open(tmp_path / "at1.png")), np.asarray(Image.open(tmp_path / "plain.png")))
    guided = json.loads(fm_in_process("sample", "--ckpt", interval_ckpt, *common, "--out", tmp_path / "at2.png").stdout)
    assert guided["cfg"] == 2.0 and guided["guidance_interval"] == [0.25, 1.0]
    grid = fm_in_process("class-grid", "--ckpt", interval_ckpt, "--samples-per-class", "1", "--steps", "2", "--cfg", "1", "--out", tmp_path / "g.png", "--json")
    assert grid.returncode == 0, grid.stderr
    assert json.loads(grid.stdout)["guidance_interval"] is None
