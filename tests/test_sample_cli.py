"""`fm sample`: byte-identical output for a seed, independent of batch size (at each precision); JSON and usage errors."""

import json
import re

import pytest
import torch
from PIL import Image

from conftest import fm_in_process, run_fm
from fmcli.checkpoint import resolve_checkpoint


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_gives_byte_identical_pngs(tmp_path, debug_run, precision):
    how = ("--precision", precision, "--no-compile")
    a = fm_in_process("sample", "--ckpt", debug_run, "--num-samples", "5", "--seed", "7", "--out", tmp_path / "a", *how)
    b = fm_in_process("sample", "--ckpt", debug_run, "--num-samples", "5", "--seed", "7", "--out", tmp_path / "b", "--batch-size", "2", *how)
    c = fm_in_process("sample", "--ckpt", debug_run, "--num-samples", "5", "--seed", "8", "--out", tmp_path / "c", *how)
    for r in (a, b, c):
        assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png", "000004.png", "fm-sample.json", "grid.png"]
    for name in names:  # the batch size is not in fm-sample.json: it does not change the images
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
    guide = str(resolve_checkpoint(debug_run))  # autoguidance: the row names its guide, as fm fid's and fm eval's do
    auto = json.loads(_ok(fm_in_process("class-grid", "--ckpt", debug_run, "--samples-per-class", "1", "--steps", "2", "--cfg", "2", "--guide-ckpt", guide,
                                        "--out", tmp_path / "a.png", "--json")).stdout)  # fmt: skip
    assert (auto["guidance"], auto["guide_ckpt"]) == ("auto", guide) and "guide_ckpt" not in grid


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
    # torchvision's import pulls in torch._dynamo (~1.3 s a command start): only a grid (images.grid_image) imports it
    probe = "import sys, fmcli.train, fmcli.generate, fmcli.evaluate, fmcli.images; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=fm_env(), timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_fm_help_lists_each_command_in_one_sentence_not_broken_mid_line():
    """`fm --help` shows each command's first docstring paragraph, and typer's rich mode keeps its line breaks
    there: a paragraph wrapped over two source lines listed as "... conditional" / "accuracy ..." in the table.
    At a width where every summary fits, each command's summary is one line of the listing."""
    import inspect

    import typer

    from fmcli.cli.app import app

    commands = {name: c for name, c in typer.main.get_command(app).commands.items() if not c.hidden}
    r = fm_in_process("--help", env={"COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    for name, command in commands.items():
        first = inspect.cleandoc(command.help or "").split("\n\n")[0]
        assert "\n" not in first, f"fm {name}: its help's first paragraph spans lines: {first!r}"
        row = next(line for line in r.stdout.splitlines() if re.search(rf"│ {re.escape(name)} ", line))
        assert first.split()[-1].rstrip(".") in row, (name, row)


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
    assert json.loads(auto.stdout)["guide_ckpt"] == str(unconditional_run) and "guide_ckpt" not in json.loads(r.stdout)  # the guide that ran


def test_a_guidance_interval_that_ran_nothing_is_not_reported(tmp_path, unconditional_run):
    """An unconditional model's cfg is forced to 1, and at cfg 1 the interval guides nothing; its --json still
    reported `guidance_interval: [0.3, 1.0]`. The samples are those of `--cfg 1` without an interval (byte for
    byte), and the row now says null."""
    how = ("-n", "2", "--steps", "2", "--no-compile", "--json")
    forced = _ok(run_fm("sample", "--ckpt", unconditional_run, "--cfg", "3", "--guidance-interval", "0.3,1", "--out", tmp_path / "a.png", *how))
    plain = _ok(run_fm("sample", "--ckpt", unconditional_run, "--cfg", "1", "--out", tmp_path / "b.png", *how))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert [json.loads(r.stdout)["guidance_interval"] for r in (forced, plain)] == [None, None]


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


def test_bad_sampling_input_is_refused_before_the_precision_probe_and_its_lines(tmp_path, debug_run, unconditional_run):
    """A class label or prompt the model cannot take, a class grid of a model without classes, or a reference of
    another image size was refused after `sample.precision = "auto"` had run the probe and logged its choice: the
    usage error came second. Now the error is the only line on stderr."""
    from fmcli.data.shapes import prepare_shapes

    ref32 = prepare_shapes(tmp_path / "ref32", size=32, count=8, seed=0)
    out = ["--out", tmp_path / "x.png", "--precision", "auto"]
    cases = [
        (("sample", "--ckpt", debug_run, "--class-label", "99", *out), "--class-label 99 is out of range"),
        (("sample", "--ckpt", debug_run, "--prompt", "a red circle", *out), "not text-conditioned"),
        (("class-grid", "--ckpt", unconditional_run, *out), "unconditional"),
        (("fid", "--ckpt", debug_run, "--ref", ref32, "-n", "4", "--features", "tiny", "--precision", "auto"), "image sizes differ"),
    ]
    for args, message in cases:
        refused = fm_in_process(*args, env={"FM_PROBE_FORCE": "bf16-slow"})
        assert refused.returncode == 2 and refused.stderr.splitlines() == [refused.stderr.strip()], (args, refused.stderr)
        assert refused.stderr.startswith("error: ") and message in refused.stderr, (args, refused.stderr)
    assert not (tmp_path / "x.png").exists()


def test_a_rank_with_no_samples_of_a_text_model_needs_no_prompts():
    """`fm sample --ckpt TEXT_RUN -n 1 --prompt P --nproc 2`: rank 1's share of the indices is empty, and so its
    share of the prompts; iterate_samples took that for a text model without prompts and the run failed (exit 2).
    An empty share samples nothing (the command checked the prompts on every rank first)."""
    from types import SimpleNamespace

    from fmcli.errors import UsageError
    from fmcli.generate import iterate_samples

    text_model = SimpleNamespace(is_text=True)
    assert list(iterate_samples(text_model, [], seed=0, sample_cfg=None, batch_size=4, device="cpu", prompts=[])) == []
    with pytest.raises(UsageError, match="give --prompt"):
        list(iterate_samples(text_model, [0], seed=0, sample_cfg=None, batch_size=4, device="cpu", prompts=[]))


# ------------------------------------------------------------- options that do nothing, rows that say what ran


@pytest.mark.parametrize(
    "command, extra, option",
    [
        ("sample", ("--solver", "euler", "--rtol", "1e-3", "--out", "{tmp}/x.png"), "--rtol/--atol"),
        ("sample", ("--solver", "dopri5", "--steps", "20", "--out", "{tmp}/x.png"), "--steps"),
        ("sample", ("--solver", "heun", "--sde-noise", "0.5", "--out", "{tmp}/x.png"), "--sde-noise"),
        ("sample", ("--guidance", "cfg", "--zero-init-steps", "2", "--out", "{tmp}/x.png"), "--zero-init-steps"),
        ("class-grid", ("--solver", "ab2", "--atol", "1e-3", "--out", "{tmp}/x.png"), "--rtol/--atol"),
        ("fid", ("-n", "2", "--ref", "{data}", "--features", "tiny", "--solver", "midpoint", "--rtol", "1e-3"), "--rtol/--atol"),
        ("eval", ("-n", "8", "--data", "{data}", "--features", "tiny", "--solver", "dopri5", "--steps", "9"), "--steps"),
        ("reflow", ("-n", "2", "--out", "{tmp}/pairs", "--solver", "heun", "--rtol", "1e-3"), "--rtol/--atol"),
        ("sample", ("--cfg", "1", "--guidance-interval", "0.2,0.8", "--out", "{tmp}/x.png"), "--guidance-interval"),
        ("class-grid", ("--cfg", "1", "--guide-ckpt", "{ckpt}", "--out", "{tmp}/x.png"), "--guide-ckpt"),
        ("fid", ("-n", "2", "--ref", "{data}", "--features", "tiny", "--cfg", "1", "--guidance", "cfg-zero"), "--guidance cfg-zero"),
    ],
)  # fmt: skip
def test_an_option_the_solver_or_guidance_never_reads_is_refused(tmp_path, debug_run, shapes16, command, extra, option):
    """--rtol/--atol with a fixed-step solver, --steps with dopri5, --sde-noise without euler-sde, --zero-init-steps
    without cfg-zero, and guidance options at --cfg 1 (unguided) were accepted and did nothing (test_generate checks
    by brute force that they change no sample): exit 2, one line naming the option, nothing written."""
    args = [a.format(tmp=tmp_path, data=shapes16, ckpt=debug_run) for a in extra]
    r = fm_in_process(command, "--ckpt", debug_run, *args, "--device", "cpu")
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1 and option in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_guidance_options_beside_a_cfg_sweep_that_includes_1_are_kept(debug_run, shapes16):
    """`fm eval --cfg 1,2 --guidance cfg-zero`: the cfg 1 row is the sweep's unguided baseline, not an option ignored."""
    r = fm_in_process("eval", "--ckpt", debug_run, "-n", "6", "--data", shapes16, "--features", "tiny", "--k", "2", "--no-kid", "--cfg", "1,2",
                      "--guidance", "cfg-zero", "--steps", "2", "--device", "cpu", "--json")  # fmt: skip
    assert [(row["cfg"], row["guidance"]) for row in json.loads(_ok(r).stdout)] == [(1.0, "cfg-zero"), (2.0, "cfg-zero")]


def test_options_nothing_reads_here_are_refused(tmp_path, debug_run, shapes16):
    """--gif-frames without --gif, --vae on a pixel model, --text-encoder on a class model, and sampling options
    beside `fm fid --gen` / `fm eval --gen` (nothing is sampled) were accepted and did nothing: exit 2."""
    gen = tmp_path / "gen"
    gen.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 10, 10)).save(gen / f"{i:06d}.png")
    refused = {
        "--gif-frames": ("sample", "--ckpt", debug_run, "--gif-frames", "4", "--out", tmp_path / "a.png"),
        "--vae": ("sample", "--ckpt", debug_run, "--vae", tmp_path, "--out", tmp_path / "b.png"),
        "--text-encoder": ("sample", "--ckpt", debug_run, "--text-encoder", "builtin:tiny-t5", "--out", tmp_path / "c.png"),
        "--cfg, --solver": ("fid", "--gen", gen, "--ref", shapes16, "--features", "tiny", "--cfg", "3", "--solver", "heun"),
        "--steps": ("eval", "--gen", gen, "--data", shapes16, "--features", "tiny", "--steps", "3", "--no-kid"),
    }
    for option, args in refused.items():
        r = fm_in_process(*args, "--device", "cpu")
        assert r.returncode == 2 and option in r.stderr and len(r.stderr.splitlines()) == 1, (option, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]


def test_repeated_sweep_values_are_refused(debug_run, shapes16):
    """`--nfe 2,2`, `--cfg 2,2.0` and a repeated --guidance-interval gave two rows of one setting: exit 2."""
    common = ("--ckpt", debug_run, "--device", "cpu")
    cases = [
        ("fid", "-n", "2", "--ref", shapes16, "--features", "tiny", "--nfe", "2,4,2"),
        ("eval", "-n", "8", "--data", shapes16, "--features", "tiny", "--nfe", "8,8"),
        ("eval", "-n", "8", "--data", shapes16, "--features", "tiny", "--cfg", "2,2.0"),
        ("eval", "-n", "8", "--data", shapes16, "--features", "tiny", "--guidance-interval", "0.2,1", "--guidance-interval", "0.2,1.0"),
    ]
    for args in cases:
        r = fm_in_process(*args, *common)
        assert r.returncode == 2 and "twice" in r.stderr and r.stdout == "", (args, r.stderr)


def test_eval_scores_budgets_that_buy_the_same_steps_once(debug_run, shapes16):
    """heun at --nfe 8,9: both budgets buy 4 steps (2 NFE a step, by hand), and eval rows carry no budget, so the
    sweep gave two identical rows of one run: one row now, with a note."""
    r = _ok(fm_in_process("eval", "--ckpt", debug_run, "-n", "6", "--data", shapes16, "--features", "tiny", "--k", "2", "--no-kid", "--solver", "heun",
                          "--nfe", "8,9", "--device", "cpu", "--json"))  # fmt: skip
    assert [(row["steps"], row["nfe_per_sample"]) for row in json.loads(r.stdout)] == [(4, 8)] and "one row" in r.stderr


class _Stiff(torch.nn.Module):
    """v = -k x with k = 41 for class 1 and 1 otherwise: dopri5 takes many more steps for a batch holding class 1."""

    null_class = 10

    def forward(self, x, t, y):
        return -(1.0 + 40.0 * (y == 1).float()).view(-1, 1, 1, 1) * x


def test_json_rows_say_what_ran_with_one_nfe_meaning(tmp_path, debug_run, shapes16, monkeypatch):
    """dopri5 rows reported the unused configured `steps` and (fm sample) no rtol/atol; `nfe` was the largest batch's
    in fm sample and class-grid but the per-sample mean (`nfe_per_sample`) in fid and eval. Every row now has steps
    null, rtol/atol, `nfe` = the mean over samples and `nfe_max`, checked against per-batch NFE of the solver run
    directly on each batch (batches of 2, labels 0..5: only the first batch holds the stiff class 1)."""
    import dataclasses

    from fmcli import generate
    from fmcli.solvers import solve

    real = generate.load_for_sampling
    monkeypatch.setattr(generate, "load_for_sampling", lambda *a, **k: dataclasses.replace(real(*a, **k), model=_Stiff()))
    tol = ("--solver", "dopri5", "--rtol", "1e-3", "--atol", "1e-3", "--cfg", "1", "--batch-size", "2", "--device", "cpu", "--json")
    def batch_nfe(n):  # dopri5's NFE of each batch of 2 of samples 0..n-1 (labels cycle 0..9), solved directly
        ks = [(1.0 + 40.0 * (torch.tensor([i, i + 1]) == 1).float()).view(-1, 1, 1, 1) for i in range(0, n, 2)]
        return [solve(lambda x, t: -k * x, generate.initial_noise(0, [i, i + 1], (3, 16, 16)), "dopri5", rtol=1e-3, atol=1e-3).nfe
                for i, k in zip(range(0, n, 2), ks)]  # fmt: skip

    per_batch = batch_nfe(6)
    assert per_batch[0] > per_batch[1] == per_batch[2]  # the batches differ: mean and max are two numbers
    mean, most = sum(2 * n for n in per_batch) / 6, max(per_batch)

    sample = json.loads(_ok(fm_in_process("sample", "--ckpt", debug_run, "-n", "6", "--out", tmp_path / "s.png", *tol)).stdout)
    fid = json.loads(_ok(fm_in_process("fid", "--ckpt", debug_run, "-n", "6", "--ref", shapes16, "--features", "tiny", *tol)).stdout)
    rows = json.loads(_ok(fm_in_process("eval", "--ckpt", debug_run, "-n", "6", "--data", shapes16, "--features", "tiny", "--k", "2", "--no-kid", *tol)).stdout)
    for row in (sample, fid, rows[0]):
        assert (row["steps"], row["rtol"], row["atol"], row["solver"]) == (None, 1e-3, 1e-3, "dopri5"), row
        assert row["nfe"] == pytest.approx(mean) and row["nfe_max"] == most, row
        assert (row["precision"], row["compile"]) == ("fp32", False)
    assert fid["nfe_per_sample"] == rows[0]["nfe_per_sample"] == pytest.approx(mean)  # the name fm plot reads, kept
    grid = json.loads(_ok(fm_in_process("class-grid", "--ckpt", debug_run, "--samples-per-class", "1", "--out", tmp_path / "c.png", *tol)).stdout)
    ten = batch_nfe(10)  # class-grid: sample index = class, one per class
    assert (grid["steps"], grid["rtol"], grid["nfe_max"]) == (None, 1e-3, max(ten)) and grid["nfe"] == pytest.approx(sum(ten) / 5)
    euler = json.loads(_ok(fm_in_process("sample", "--ckpt", debug_run, "-n", "1", "--steps", "3", "--out", tmp_path / "e.png", "--json")).stdout)
    assert (euler["steps"], euler["nfe"], euler["nfe_max"]) == (3, 3, 3) and "rtol" not in euler


def test_an_interrupted_sample_folder_continues_to_the_images_of_an_uninterrupted_run(tmp_path, debug_run, monkeypatch):
    """A 50k-image `fm sample --out DIR` interrupted after an hour could only be refused (its files exist) or redone
    from scratch with --force. Run again, the same command now makes only the missing samples; the folder ends
    byte-identical to an uninterrupted run's (the reference), other settings are refused, a user's file is kept."""
    import fmcli.images as images

    how = ("--ckpt", debug_run, "-n", "9", "--steps", "2", "--seed", "3", "--grid", "2", "--batch-size", "2", "--precision", "fp32", "--no-compile")
    assert fm_in_process("sample", *how, "--out", tmp_path / "ref").returncode == 0
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    real, calls = images.save_images, []

    def interrupted(*args, **kwargs):  # Ctrl-C after the fifth sample is written
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(kwargs.get("start_index"))
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "save_images", interrupted)
    r = fm_in_process("sample", *how, "--out", tmp_path / "run")
    assert r.returncode == 130 and "run the same command again" in r.stderr, r.stderr
    written = sorted(p.name for p in (tmp_path / "run").glob("0*.png"))
    assert written == [f"{i:06d}.png" for i in range(5)]  # complete files only, no grid yet
    monkeypatch.setattr(images, "save_images", real)
    (tmp_path / "run" / "000003.png").unlink()  # a lost file is made again
    other = fm_in_process("sample", *[("3" if a == "2" and how[k - 1] == "--steps" else a) for k, a in enumerate(how)], "--out", tmp_path / "run")
    assert other.returncode == 2 and "other settings (steps)" in other.stderr, other.stderr
    again = fm_in_process("sample", *how, "--out", tmp_path / "run", "--json")
    assert again.returncode == 0, again.stderr
    assert "4 of 9 samples are there" in again.stderr, again.stderr  # 000003 lost; the grid's 000000-000001 are drawn again
    ref = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(ref + ["notes.txt"])
    for name in ref:
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert len(json.loads(again.stdout)["paths"]) == 9


def test_sampling_over_a_larger_earlier_run_warns_of_the_samples_it_leaves(tmp_path, debug_run):
    # --force with a smaller -n replaces samples 0..n-1 and leaves the earlier run's higher-numbered ones, which
    # `fm fid --gen` would score with the new ones: said on stderr (never removed: they may be a user's to keep).
    out = tmp_path / "s"
    first = fm_in_process("sample", "--ckpt", debug_run, "-n", "4", "--steps", "1", "--out", out)
    assert first.returncode == 0 and "warning" not in first.stderr, first.stderr
    again = fm_in_process("sample", "--ckpt", debug_run, "-n", "2", "--steps", "1", "--out", out, "--force")
    assert again.returncode == 0, again.stderr
    assert "holds 2 sample file(s) numbered 2 or above" in again.stderr, again.stderr
    assert sorted(p.name for p in out.glob("0*.png")) == ["000000.png", "000001.png", "000002.png", "000003.png"]


def test_a_force_run_stopped_over_an_earlier_folder_is_never_continued_as_its_own(tmp_path, debug_run, monkeypatch):
    """`--force` over a folder of another run's samples, stopped half way, left a manifest of the new settings beside
    the earlier run's files: run again without --force, it took them for its own ("6 of 6 samples are there") and
    the folder ended a mix of two settings. Now such a folder is refused until --force has sampled it over; the
    end is byte-identical to an uninterrupted run into an empty folder (the reference)."""
    import fmcli.images as images

    how = ("--ckpt", debug_run, "-n", "6", "--seed", "4", "--batch-size", "2", "--precision", "fp32", "--no-compile", "--cfg", "2")
    assert fm_in_process("sample", *how, "--steps", "2", "--out", tmp_path / "ref").returncode == 0
    assert fm_in_process("sample", *how, "--steps", "1", "--out", tmp_path / "run").returncode == 0  # the earlier run
    real, calls = images.save_images, []

    def interrupted(*args, **kwargs):  # Ctrl-C after the second sample of the --force run is written
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(kwargs.get("start_index"))
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "save_images", interrupted)
    assert fm_in_process("sample", *how, "--steps", "2", "--out", tmp_path / "run", "--force").returncode == 130
    monkeypatch.setattr(images, "save_images", real)
    ref = sorted(p.name for p in (tmp_path / "ref").glob("0*.png"))
    mixed = [name for name in ref if (tmp_path / "run" / name).read_bytes() != (tmp_path / "ref" / name).read_bytes()]
    assert mixed  # the earlier run's samples are still there
    again = fm_in_process("sample", *how, "--steps", "2", "--out", tmp_path / "run")
    assert again.returncode == 2 and "sampled over with --force" in again.stderr, again.stderr
    assert fm_in_process("sample", *how, "--steps", "2", "--out", tmp_path / "run", "--force").returncode == 0
    for name in ref + ["grid.png", "fm-sample.json"]:
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    done = fm_in_process("sample", *how, "--steps", "2", "--out", tmp_path / "run")  # a finished --force run continues as any
    assert done.returncode == 0 and "6 of 6 samples are there" in done.stderr, done.stderr


def test_a_text_folder_continued_with_another_text_encoder_is_refused(tmp_path):
    """fm-sample.json recorded the VAE but not the text encoder: continued with another --text-encoder (same width,
    other weights), a folder took the first encoder's samples as its own ("same settings") and ended a mix of two
    conditionings. Now refused; continued with the same encoder it ends as the uninterrupted run (the reference)."""
    from fmcli.checkpoint import save_atomic
    from fmcli.config import config_to_dict, load_config
    from fmcli.encoders import build_tiny_text_encoder
    from fmcli.models import build_model

    for s in (0, 1):
        build_tiny_text_encoder(tmp_path / f"enc{s}", seed=s, d_model=8, layers=1, heads=2)
    cfg = load_config("debug", ["model.cross_attention=true", "model.text_dim=8", "model.image_size=16", "model.in_channels=3", "model.num_classes=0",
                                f"encoders.text_encoder='{tmp_path / 'enc0'}'", "encoders.max_tokens=8"])  # fmt: skip
    torch.manual_seed(0)  # weights away from the zero-velocity init, so that the text changes the images
    sd = {k: v + 0.2 * torch.randn_like(v) if v.is_floating_point() else v for k, v in build_model(cfg.model).state_dict().items()}
    save_atomic({"model": sd, "ema": sd, "config": config_to_dict(cfg), "step": 1, "data_info": {}}, tmp_path / "text.pt")
    how = ("--ckpt", tmp_path / "text.pt", "--prompt", "a red circle", "-n", "4", "--steps", "2", "--cfg", "2", "--grid", "1", "--no-compile")
    for s in (0, 1):
        assert fm_in_process("sample", *how, "--text-encoder", tmp_path / f"enc{s}", "--out", tmp_path / f"ref{s}").returncode == 0
    assert (tmp_path / "ref0" / "000003.png").read_bytes() != (tmp_path / "ref1" / "000003.png").read_bytes()
    assert fm_in_process("sample", *how, "--text-encoder", tmp_path / "enc0", "--out", tmp_path / "run").returncode == 0
    for i in (2, 3):  # an interrupted run's missing samples
        (tmp_path / "run" / f"00000{i}.png").unlink()
    other = fm_in_process("sample", *how, "--text-encoder", tmp_path / "enc1", "--out", tmp_path / "run")
    assert other.returncode == 2 and "other settings (text_encoder)" in other.stderr, other.stderr
    same = fm_in_process("sample", *how, "--text-encoder", tmp_path / "enc0", "--out", tmp_path / "run")
    assert same.returncode == 0 and "2 of 4 samples are there" in same.stderr, same.stderr
    for i in range(4):
        assert (tmp_path / "run" / f"00000{i}.png").read_bytes() == (tmp_path / "ref0" / f"00000{i}.png").read_bytes(), i


def test_a_guided_folder_continued_after_the_guide_run_moved_on_is_refused(tmp_path, debug_run):
    """--guide-ckpt RUN_DIR samples with that run's latest checkpoint; fm-sample.json recorded the path but not the
    guide's step, so continued after the guide run had trained on, a folder kept the old guide's samples as "same
    settings" beside the new guide's. Now the guide's step is recorded: refused, as the main checkpoint's is."""
    from fmcli.checkpoint import load_checkpoint, resolve_checkpoint, save_atomic

    state = load_checkpoint(resolve_checkpoint(debug_run), map_location="cpu")
    guide = tmp_path / "guide" / "checkpoints"
    guide.mkdir(parents=True)
    save_atomic(state, guide / "step-0000004.pt")
    torch.manual_seed(0)  # a guide trained on: other weights at a later step
    later = {**state, "step": 8, "ema": {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state["ema"].items()}}
    save_atomic(later, guide / "step-0000008.pt")
    (guide / "latest").write_text("step-0000004.pt\n")
    how = ("--ckpt", debug_run, "--guide-ckpt", tmp_path / "guide", "-n", "4", "--steps", "2", "--cfg", "3", "--grid", "1", "--no-compile")
    assert fm_in_process("sample", *how, "--out", tmp_path / "run").returncode == 0
    (tmp_path / "run" / "000003.png").unlink()  # an interrupted run's missing sample
    (guide / "latest").write_text("step-0000008.pt\n")
    moved = fm_in_process("sample", *how, "--out", tmp_path / "run")
    assert moved.returncode == 2 and "other settings (guide_step)" in moved.stderr, moved.stderr
    (guide / "latest").write_text("step-0000004.pt\n")
    same = fm_in_process("sample", *how, "--out", tmp_path / "run")
    assert same.returncode == 0 and "3 of 4 samples are there" in same.stderr, same.stderr
