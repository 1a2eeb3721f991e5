"""`fm sample`: byte-identical output for a seed, independent of batch size (at each precision); JSON and usage errors."""

import json

import pytest
from PIL import Image

from conftest import fm_in_process


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_gives_byte_identical_pngs(tmp_path, debug_run, precision):
    how = ("--precision", precision, "--no-compile")
    a = fm_in_process("sample", "--ckpt", debug_run, "--num-samples", "5", "--seed", "7", "--out", tmp_path / "a", *how)
    b = fm_in_process("sample", "--ckpt", debug_run, "--num-samples", "5", "--seed", "7", "--out", tmp_path / "b", "--batch-size", "2", *how)
    c = fm_in_process("sample", "--ckpt", debug_run, "--num-samples", "5", "--seed", "8", "--out", tmp_path / "c", *how)
    for r in (a, b, c):
        assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png", "000004.png", "grid.png"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "000000.png").read_bytes() != (tmp_path / "c" / "000000.png").read_bytes()
    assert Image.open(tmp_path / "a" / "000000.png").size == (16, 16)


def test_json_output_and_nfe(tmp_path, debug_run):
    r = fm_in_process("sample", "--ckpt", debug_run, "-n", "3", "--steps", "5", "--solver", "heun", "--cfg", "3", "--out", tmp_path / "g.png", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["nfe"] == 10 and info["grid"].endswith("g.png") and info["paths"] == []
    assert (tmp_path / "g.png").is_file()


def test_json_of_sample_and_class_grid_says_which_guidance_interval_and_seed_ran(tmp_path, debug_run):
    """`--cfg 4 --guidance-interval 0.25,1` guides only part of the path; --json reported cfg 4 and no interval
    (class-grid not even its seed), so the record of a run claimed full-path guidance."""
    how = ("--ckpt", debug_run, "--steps", "4", "--cfg", "4", "--guidance-interval", "0.25,1", "--seed", "5", "--no-compile", "--json")
    sample = json.loads(_ok(fm_in_process("sample", "-n", "2", "--out", tmp_path / "s.png", *how)).stdout)
    grid = json.loads(_ok(fm_in_process("class-grid", "--samples-per-class", "1", "--out", tmp_path / "c.png", *how)).stdout)
    for info in (sample, grid):
        assert (info["cfg"], info["guidance_interval"], info["seed"]) == (4.0, [0.25, 1.0], 5)
    plain = json.loads(_ok(fm_in_process("sample", "--ckpt", debug_run, "-n", "1", "--steps", "2", "--out", tmp_path / "p.png", "--json")).stdout)
    assert plain["guidance_interval"] is None  # the debug preset guides the whole path


def test_sample_usage_errors(tmp_path, debug_run):
    bad_label = fm_in_process("sample", "--ckpt", debug_run, "--class-label", "99", "--out", tmp_path / "x.png")
    assert bad_label.returncode == 2 and "class-label" in bad_label.stderr
    bad_solver = fm_in_process("sample", "--ckpt", debug_run, "--solver", "leapfrog", "--out", tmp_path / "x.png")
    assert bad_solver.returncode == 2 and bad_solver.stdout == ""
    missing = fm_in_process("sample", "--ckpt", tmp_path / "nope.pt")
    assert missing.returncode == 2 and "not found" in missing.stderr
    assert not (tmp_path / "x.png").exists()


def test_prompts_file_that_is_not_text_is_a_usage_error(tmp_path, debug_run, capsys):
    """A binary --prompts file (an image given by mistake) is bad input: exit 2 naming the file, not exit 1 with
    a UnicodeDecodeError."""
    from fmcli.cli import app

    image = tmp_path / "prompts.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    with pytest.raises(SystemExit) as exit_info:
        app(args=["sample", "--ckpt", str(debug_run), "--prompts", str(image), "--out", str(tmp_path / "x.png")], prog_name="fm")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and "prompts.png" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_help_lists_the_solver_and_guidance_names_without_torch_at_import():
    """The names come from solvers.py (no second copy); importing the CLI alone stays free of torch."""
    import subprocess
    import sys

    from conftest import fm_env
    from fmcli.solvers import GUIDANCES, SOLVERS

    for command in ("sample", "class-grid", "fid"):
        r = fm_in_process(command, "--help", env={"COLUMNS": "400"})
        assert r.returncode == 0, r.stderr
        assert all(name in r.stdout for name in SOLVERS + GUIDANCES), (command, r.stdout)
    probe = "import sys, fmcli.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=fm_env(), timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_every_sampling_command_takes_the_dopri5_tolerances(tmp_path, debug_run, shapes16):
    """--rtol/--atol are SAMPLING options (README, docs/architecture.md), and `--nfe` with dopri5 points to them:
    sample, class-grid, fid and eval all take them, and they reach the solver (looser = fewer NFE)."""
    for command in ("sample", "class-grid", "fid", "eval"):
        r = fm_in_process(command, "--help", env={"COLUMNS": "400"})
        assert r.returncode == 0 and "--rtol" in r.stdout and "--atol" in r.stdout, command
    common = ("--ckpt", debug_run, "-n", "2", "--ref", shapes16, "--features", "tiny", "--solver", "dopri5", "--json")
    loose, tight = (json.loads(_ok(fm_in_process("fid", *common, "--rtol", tol, "--atol", tol)).stdout) for tol in ("1e-1", "1e-5"))
    assert (loose["rtol"], loose["atol"], tight["rtol"]) == (0.1, 0.1, 1e-5) and loose["nfe_per_sample"] < tight["nfe_per_sample"]
    grid = json.loads(_ok(fm_in_process("class-grid", "--ckpt", debug_run, "--samples-per-class", "1", "--solver", "dopri5", "--rtol", "1e-1", "--atol", "1e-1",
                                 "--out", tmp_path / "c.png", "--json")).stdout)  # fmt: skip
    assert grid["nfe"] < tight["nfe_per_sample"]
    swept = fm_in_process("fid", *common, "--nfe", "4,8")
    assert swept.returncode == 2 and "--rtol/--atol" in swept.stderr


def _ok(result):
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def unconditional_run(tmp_path_factory):
    """The debug preset trained 2 steps on 8 unlabelled images (an unconditional model; its sample.cfg is 2)."""
    import numpy as np

    from fmcli.config import load_config
    from fmcli.data.dataset import PreparedWriter
    from fmcli.train import train

    root = tmp_path_factory.mktemp("unconditional")
    rng = np.random.default_rng(0)
    with PreparedWriter(root / "data", 8, (3, 16, 16), labels=False) as w:
        for _ in range(8):
            w.add(rng.integers(0, 256, (3, 16, 16), dtype=np.uint8), None)
        w.finish(num_classes=0, class_names=None, source="test")
    cfg = load_config("debug", [f"data.path='{root / 'data'}'", "train.steps=2", "train.checkpoint_every=0", "train.global_batch_size=4"])
    train(cfg, root / "run")
    return root / "run"


def test_guidance_of_an_unconditional_model_reports_what_ran(tmp_path, unconditional_run):
    """cfg and cfg-zero need a class (or prompt) to guide away from: an unconditional model samples unguided,
    and the summary says cfg 1, with a note; autoguidance (--guide-ckpt) does guide it."""
    r = _ok(fm_in_process("sample", "--ckpt", unconditional_run, "-n", "2", "--steps", "2", "--cfg", "3", "--out", tmp_path / "a.png", "--json"))
    assert json.loads(r.stdout)["cfg"] == 1.0 and "unconditional" in r.stderr
    plain = _ok(fm_in_process("sample", "--ckpt", unconditional_run, "-n", "2", "--steps", "2", "--cfg", "1", "--out", tmp_path / "b.png"))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes() and "unconditional" not in plain.stderr
    auto = _ok(fm_in_process("sample", "--ckpt", unconditional_run, "-n", "2", "--steps", "2", "--cfg", "3", "--guide-ckpt", unconditional_run,
                      "--out", tmp_path / "c.png", "--json"))  # fmt: skip
    assert json.loads(auto.stdout)["cfg"] == 3.0 and json.loads(auto.stdout)["guidance"] == "auto"


def test_force_never_replaces_a_folder_by_a_file_or_a_file_by_a_folder(tmp_path, debug_run):
    """`--force` replaces an output of the same kind only: `fm sample --out x.png --force` onto a folder x.png
    sampled everything and then failed in the rename (IsADirectoryError, exit 1). Refused before any work."""
    from fmcli.errors import UsageError
    from fmcli.fsutil import refuse_existing

    (tmp_path / "x.png").mkdir()
    (tmp_path / "x.png" / "keep.txt").write_text("mine")
    r = fm_in_process("sample", "--ckpt", debug_run, "-n", "2", "--out", tmp_path / "x.png", "--force")
    assert r.returncode == 2 and "is a folder, and a file would be written there" in r.stderr, r.stderr
    assert (tmp_path / "x.png" / "keep.txt").read_text() == "mine"
    (tmp_path / "data").write_text("a file where a dataset would go")
    with pytest.raises(UsageError, match="is a file, and a folder would be written there"):
        refuse_existing(tmp_path / "data", True, folders=True)
    refuse_existing(tmp_path / "x.png", True, folders=True)  # a folder over a folder: --force's own case
    with pytest.raises(UsageError, match="already exists; pass --force"):
        refuse_existing(tmp_path / "x.png", False, folders=True)
