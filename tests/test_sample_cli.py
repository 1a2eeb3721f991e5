"""`fm sample`: byte-identical output for a seed, independent of batch size (at each precision); JSON and usage errors."""

import json

import pytest
from PIL import Image

from conftest import run_fm


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_gives_byte_identical_pngs(tmp_path, debug_run, precision):
    how = ("--precision", precision, "--no-compile")
    a = run_fm("sample", "--ckpt", debug_run, "--num-samples", "5", "--seed", "7", "--out", tmp_path / "a", *how)
    b = run_fm("sample", "--ckpt", debug_run, "--num-samples", "5", "--seed", "7", "--out", tmp_path / "b", "--batch-size", "2", *how)
    c = run_fm("sample", "--ckpt", debug_run, "--num-samples", "5", "--seed", "8", "--out", tmp_path / "c", *how)
    for r in (a, b, c):
        assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png", "000004.png", "grid.png"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "000000.png").read_bytes() != (tmp_path / "c" / "000000.png").read_bytes()
    assert Image.open(tmp_path / "a" / "000000.png").size == (16, 16)


def test_json_output_and_nfe(tmp_path, debug_run):
    r = run_fm("sample", "--ckpt", debug_run, "-n", "3", "--steps", "5", "--solver", "heun", "--cfg", "3", "--out", tmp_path / "g.png", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["nfe"] == 10 and info["grid"].endswith("g.png") and info["paths"] == []
    assert (tmp_path / "g.png").is_file()


def test_sample_usage_errors(tmp_path, debug_run):
    bad_label = run_fm("sample", "--ckpt", debug_run, "--class-label", "99", "--out", tmp_path / "x.png")
    assert bad_label.returncode == 2 and "class-label" in bad_label.stderr
    bad_solver = run_fm("sample", "--ckpt", debug_run, "--solver", "leapfrog", "--out", tmp_path / "x.png")
    assert bad_solver.returncode == 2 and bad_solver.stdout == ""
    missing = run_fm("sample", "--ckpt", tmp_path / "nope.pt")
    assert missing.returncode == 2 and "not found" in missing.stderr
    assert not (tmp_path / "x.png").exists()


def test_help_lists_the_solver_and_guidance_names_without_torch_at_import():
    """The names come from solvers.py (no second copy); importing the CLI alone stays free of torch."""
    import subprocess
    import sys

    from conftest import fm_env
    from fmcli.solvers import GUIDANCES, SOLVERS

    for command in ("sample", "class-grid", "fid"):
        r = run_fm(command, "--help", env={"COLUMNS": "400"})
        assert r.returncode == 0, r.stderr
        assert all(name in r.stdout for name in SOLVERS + GUIDANCES), (command, r.stdout)
    probe = "import sys, fmcli.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=fm_env(), timeout=120)
    assert out.stdout.strip() == "False", out.stderr
