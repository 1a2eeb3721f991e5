"""Reliability hardening 2 (issue #32), the training side: budget timing and fallback, resume LR, rollback,
reflow work folders, `fm sample -n` memory, demo bounds, diffusers exports, switching the budget off."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import QuietLog, fm_in_process
from test_budget import SimulatedMachine as BudgetMachine
from fmcli.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint
from fmcli.config import load_config, validate_config
from fmcli.train import train


# torch on one thread for this module's tiny in-process models (conftest.one_thread): the same checks, faster.
pytestmark = pytest.mark.usefixtures("one_thread")


def _debug(data: Path, *overrides):
    return load_config("debug", [f"data.path='{data}'", *overrides])


def _resume(run: Path, step: int, **kwargs):
    path = run / "checkpoints" / f"step-{step:07d}.pt"
    return train(validate_config(load_checkpoint(path)["config"]), run, resume_from=path, log=QuietLog(), **kwargs)


def test_item10_a_rollback_never_overwrites_a_checkpoint(tmp_path, shapes16):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    train(_debug(shapes16, "train.steps=30", "train.checkpoint_every=10", "train.keep_last=10"), run, log=QuietLog())
    first_30 = (ckpts / "step-0000030.pt").read_bytes()
    # Back to 20 and on to 30: the abandoned branch's step 30 is set aside before the new one is written.
    _resume(run, 20)
    aside = ckpts / "abandoned-from-step-0000020" / "step-0000030.pt"
    assert aside.read_bytes() == first_30
    assert resolve_checkpoint(run) == ckpts / "step-0000030.pt"
    # Two rollbacks to the same step: each gets its own folder, nothing is replaced.
    _resume(run, 10, stop_at_step=20)
    _resume(run, 10, stop_at_step=20)
    first, second = ckpts / "abandoned-from-step-0000010", ckpts / "abandoned-from-step-0000010-2"
    assert sorted(p.name for p in first.glob("*.pt")) == ["step-0000020.pt", "step-0000030.pt"]  # (and that branch's grid, records)
    assert sorted(p.name for p in second.glob("*.pt")) == ["step-0000020.pt"]
    assert sorted(list_checkpoints(ckpts)) == [10, 20]
    assert aside.read_bytes() == first_30


def test_item11_reflow_takes_over_only_an_empty_or_planned_partial_folder(tmp_path, debug_run):
    out = tmp_path / "pairs"
    partial = tmp_path / "pairs.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("the user's own file")
    r = fm_in_process("reflow", "--ckpt", debug_run, "-n", "4", "--steps", "1", "--batch-size", "4", "--out", out, "--device", "cpu")
    assert r.returncode == 2 and "plan.json" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (partial / "notes.txt").read_text() == "the user's own file" and not out.exists()
    (partial / "notes.txt").unlink()
    (partial / "plan.json").write_text("{damaged")
    r = fm_in_process("reflow", "--ckpt", debug_run, "-n", "4", "--steps", "1", "--batch-size", "4", "--out", out, "--device", "cpu")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(partial / "plan.json") in r.stderr and "delete" in r.stderr
    assert (partial / "plan.json").read_text() == "{damaged"
    # An empty folder is taken over (an interrupted run that had not written its plan yet).
    (partial / "plan.json").unlink()
    r = fm_in_process("reflow", "--ckpt", debug_run, "-n", "4", "--steps", "1", "--batch-size", "4", "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert out.is_dir() and not partial.exists()


@pytest.fixture(scope="module")
def diffusers_export(tmp_path_factory, debug_run):
    from fmcli.export import export_checkpoint

    root = tmp_path_factory.mktemp("export")
    export_checkpoint(resolve_checkpoint(debug_run), root / "dit", "diffusers")
    return root / "dit"


def _damaged_copy(export: Path, to: Path, damage) -> Path:
    import shutil

    shutil.copytree(export, to)
    damage(to)
    return to


def _edit(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    change(weights)
    save_file(weights, str(path))


def _edit_manifest(folder: Path, **fields) -> None:
    import json

    manifest = json.loads((folder / "fm_export.json").read_text())
    manifest.update(fields)
    for key, value in fields.items():
        if value is None:
            del manifest[key]
    (folder / "fm_export.json").write_text(json.dumps(manifest))


def _with_model(folder: Path, **fields) -> dict:
    import json

    config = json.loads((folder / "fm_export.json").read_text())["config"]
    return {**config, "model": {**config["model"], **fields}}


def test_item15_a_modified_or_damaged_export_is_refused_in_one_line(tmp_path, diffusers_export):
    import torch

    from fmcli.errors import UsageError
    from fmcli.export import load_export
    from fmcli.generate import load_for_sampling

    weights = "diffusion_pytorch_model.safetensors"
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
    fine_tuned = _damaged_copy(diffusers_export, tmp_path / "tuned", lambda d: _edit(d / weights, lambda w: w[key].add_(0.01)))
    with pytest.raises(UsageError, match="different time/class embeddings"):
        load_export(fine_tuned)

    def outside(d: Path) -> None:
        (d / weights).rename(tmp_path / "elsewhere.safetensors")
        _edit_manifest(d, weights_file="../elsewhere.safetensors")

    cases = {
        "outside": outside,
        "no-weights-key": lambda d: _edit_manifest(d, weights_file=None),
        "truncated": lambda d: (d / weights).write_bytes((d / weights).read_bytes()[:-1000]),
        "missing-tensor": lambda d: _edit(d / weights, lambda w: w.pop("proj_out_2.bias")),
        "other-width": lambda d: _edit_manifest(d, config=_with_model(d, hidden_size=64)),
    }
    for name, damage in cases.items():
        folder = _damaged_copy(diffusers_export, tmp_path / name, damage)
        with pytest.raises(UsageError) as err:
            load_for_sampling(str(folder), torch.device("cpu"))
        assert len(str(err.value).splitlines()) == 1, (name, str(err.value))


def test_item17_switching_the_budget_off_drops_the_fallback_with_one_line(tmp_path):
    import json

    r = fm_in_process("train", "--preset", "quickstart", "--set", "train.budget_minutes=null", "--print-config")
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert printed["train"]["budget_minutes"] is None and printed["train"]["budget_fallback"] is None
    notes = [line for line in r.stderr.splitlines() if "budget_fallback" in line]
    assert len(notes) == 1 and "off" in notes[0]
    # In process too, and a run's config resumed with the budget off (resume-safe) loads.
    from fmcli.config import apply_overrides

    heard = []
    cfg = load_config("quickstart", ["train.budget_minutes=null"], note=heard.append)
    assert cfg.train.budget_fallback is None and len(heard) == 1
    budgeted = load_config("quickstart")
    assert budgeted.train.budget_fallback is not None  # the preset keeps it while its budget is on
    assert apply_overrides(budgeted, ["train.budget_minutes=null"]).train.budget_fallback is None


def _lrs_of_a_resume_with_new_steps(shapes16, run, *, steps: int, stop_at: int, new_steps: int, warmup_frac: float) -> list[float]:
    """A `steps`-step run stopped at `stop_at`, resumed with train.steps=`new_steps`: the LR logged at every step."""
    import json

    common = ["train.log_every=1", "train.checkpoint_every=0", f"optim.warmup_frac={warmup_frac}", "optim.warmup_start_factor=0.1",
              "optim.min_lr_factor=0.1", "optim.lr=1e-3"]
    train(_debug(shapes16, f"train.steps={steps}", *common), run, stop_at_step=stop_at, log=QuietLog())
    saved = load_checkpoint(resolve_checkpoint(run))
    changed = validate_config({**saved["config"], "train": {**saved["config"]["train"], "steps": new_steps}})
    train(changed, run, resume_from=resolve_checkpoint(run), log=QuietLog())
    return [r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r]


def test_item07_a_resume_with_new_train_steps_continues_the_lr_without_a_jump(tmp_path, shapes16):
    from fmcli.optim import LRSchedule

    run = tmp_path / "run"
    lrs = _lrs_of_a_resume_with_new_steps(shapes16, run, steps=20, stop_at=10, new_steps=40, warmup_frac=0.1)
    assert len(lrs) == 40
    # The reference: the 20-step schedule, retargeted at step 10 to end at 40 (what a budget refit does).
    reference = LRSchedule(20, 0.1, 0.1, 0.1)
    reference.retarget(10, 40)
    assert lrs[10:] == pytest.approx([1e-3 * reference(s) for s in range(10, 40)], rel=1e-9)
    # Continuous: the first step after the resume runs at the rate the interrupted run would have used.
    assert lrs[10] == pytest.approx(1e-3 * LRSchedule(20, 0.1, 0.1, 0.1)(10), rel=1e-9)
    assert lrs[-1] == pytest.approx(1e-3 * reference(39), rel=1e-9) and lrs[-1] < lrs[10]


def test_a_resume_that_shortens_a_run_during_warmup_decays_the_lr_to_its_floor_by_the_new_end(tmp_path, shapes16):
    """Stopped at step 4 of 200 (warmup: 10 steps) and resumed with train.steps=9: the old schedule kept warming
    up to its old warmup's end, so the run's last step trained at 8.2x the LR it resumed at."""
    from fmcli.optim import LRSchedule

    run = tmp_path / "run"
    lrs = _lrs_of_a_resume_with_new_steps(shapes16, run, steps=200, stop_at=4, new_steps=9, warmup_frac=0.05)
    assert len(lrs) == 9
    assert lrs[4] == pytest.approx(1e-3 * LRSchedule(200, 0.05, 0.1, 0.1)(4), rel=1e-9)  # continuous at the resume
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # decaying from there
    # After the last step the optimizer's LR is the schedule's floor, min_lr_factor x lr.
    final = load_checkpoint(resolve_checkpoint(run))["optimizer"]["optimizers"][0]["param_groups"][0]["lr"]
    assert final == pytest.approx(1e-3 * 0.1, rel=1e-9)


def test_item14_the_demo_clamps_every_number_and_caps_dopri5(debug_run):
    import math

    import torch

    from fmcli.config import sample_settings
    from fmcli.demo import MAX_CFG, MAX_DOPRI5_NFE, MAX_SDE_NOISE, bounded_sampling, progressive
    from fmcli.errors import UsageError
    from fmcli.generate import load_for_sampling

    assert bounded_sampling(1e6, 1e9, 2**32 - 1) == (MAX_CFG, MAX_SDE_NOISE, 2**32 - 1)
    assert bounded_sampling(-5, -1, 0) == (0.0, 0.0, 0)
    assert bounded_sampling("2.5", 1, 7.0) == (2.5, 1.0, 7)
    assert bounded_sampling(math.inf, 0.5, 3) == (MAX_CFG, 0.5, 3)
    # A seed outside [0, 2**32) is refused, not clamped: it would repeat another seed's images (fmcli.seeding).
    for bad in (("nan", 1, 0), (1, None, 0), (1, 1, "nan"), (1, 1, "seed"), (1, 1, 10**40), (1, 1, -(10**40)), (1, 1, math.inf)):
        with pytest.raises(UsageError):
            bounded_sampling(*bad)
    assert MAX_DOPRI5_NFE <= 500
    # dopri5 on a stiff request (guidance 1e6, past the clamp) stops at the cap with one line, not after hundreds.
    loaded = load_for_sampling(str(debug_run), torch.device("cpu"))
    stiff = sample_settings(loaded.config.sample, solver="dopri5", cfg=1e6)
    frames = []
    with pytest.raises(UsageError, match="more than 12 network evaluations") as err:
        for frame in progressive(loaded, n=2, seed=0, sample_cfg=stiff, every=1, device=torch.device("cpu"), max_nfe=12):
            frames.append(frame)
    assert len(str(err.value).splitlines()) == 1 and not any(f.final for f in frames)


RSS_PROBE = """
import resource, sys
from fmcli.cli import app
try:
    app(args=sys.argv[1:], prog_name="fm")
except SystemExit as stop:
    assert not stop.code, stop.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_kib(*args) -> int:
    import subprocess
    import sys

    from conftest import fm_env

    r = subprocess.run([sys.executable, "-c", RSS_PROBE, *map(str, args)], capture_output=True, text=True, env=fm_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1])


def test_item13_fm_sample_memory_stays_flat_in_the_number_of_samples(tmp_path):
    """8,000 samples of 3x32x32 (98 MB as float tensors, a ~3,000 px grid) must peak like 500: only the grid's are kept."""
    import torch

    from fmcli.checkpoint import save_atomic
    from fmcli.config import config_to_dict
    from fmcli.models import build_model

    cfg = load_config("debug", ["model.image_size=32", "model.in_channels=3", "model.num_classes=0"])
    model = build_model(cfg.model)
    info = {"kind": "pixels", "shape": [3, 32, 32], "num_classes": 0, "class_names": None}
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "config": config_to_dict(cfg), "step": 1, "data_info": info}, tmp_path / "ckpt.pt")
    # --out FILE.png with --grid: the same keep-only-the-grid path as --out DIR, without writing 8,000 PNGs
    common = ("sample", "--ckpt", tmp_path / "ckpt.pt", "--steps", "1", "--cfg", "1", "--batch-size", "500", "--device", "cpu", "--grid", "10")
    small = _peak_rss_kib(*common, "-n", "500", "--out", tmp_path / "small.png")
    large = _peak_rss_kib(*common, "-n", "8000", "--out", tmp_path / "large.png")
    assert large <= 1.10 * small, (small, large)
    from PIL import Image

    assert Image.open(tmp_path / "large.png").size == Image.open(tmp_path / "small.png").size


def test_item13_fm_sample_to_a_folder_writes_every_sample_and_a_grid_of_sample_grid_size(tmp_path, debug_run):
    from PIL import Image

    r = fm_in_process("sample", "--ckpt", debug_run, "-n", "13", "--steps", "1", "--batch-size", "4", "--out", tmp_path / "dir", "--json")
    assert r.returncode == 0, r.stderr
    import json

    assert json.loads(r.stdout)["grid_samples"] == 10  # the debug preset's sample.grid_size
    assert len(list((tmp_path / "dir").glob("0*.png"))) == 13
    full = fm_in_process("sample", "--ckpt", debug_run, "-n", "13", "--steps", "1", "--batch-size", "4", "--out", tmp_path / "all.png", "--gif", tmp_path / "all.gif")
    assert full.returncode == 0, full.stderr
    few = fm_in_process("sample", "--ckpt", debug_run, "-n", "13", "--steps", "1", "--batch-size", "4", "--out", tmp_path / "few.png", "--grid", "5",
                 "--gif", tmp_path / "few.gif")
    assert few.returncode == 0, few.stderr
    grid10, grid13, grid5 = (Image.open(p).size for p in (tmp_path / "dir" / "grid.png", tmp_path / "all.png", tmp_path / "few.png"))
    assert grid5[0] * grid5[1] < grid10[0] * grid10[1] < grid13[0] * grid13[1]  # FILE.png shows all samples unless --grid
    gif5, gif13 = Image.open(tmp_path / "few.gif").size, Image.open(tmp_path / "all.gif").size
    assert gif5[0] == grid5[0] and gif5[1] < gif13[1]  # the GIF shows the grid's samples (under a caption strip)


class SimulatedMachine(BudgetMachine):
    """test_budget's fake clock for train.budget_minutes with a constant `pace` seconds per training step."""

    def __init__(self, pace: float):
        super().__init__(lambda step: pace)


def test_item04_the_fallback_is_decided_from_timed_checkpoints_and_grids_not_a_guess(tmp_path, shapes16, monkeypatch):
    """100 steps at 0.1 s fit a 12 s budget with real (tens of ms) checkpoints every 5 steps; reserved at
    2 % of the budget each, they had cut the run to ~80 steps, under min_steps=99: a needless fallback."""
    import time

    from fmcli import budget as budget_mod

    machine = SimulatedMachine(0.1)
    simulated = lambda: machine.now  # noqa: E731
    monkeypatch.setattr(budget_mod, "clock", simulated)
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_step_seconds", lambda self, probes: 0.1)
    real_measure, measured = budget_mod.RunBudget._measure_work, []

    def measure_on_the_real_clock(self, cfg, probes):  # the real checkpoint save and grid, timed for real
        monkeypatch.setattr(budget_mod, "clock", time.perf_counter)
        try:
            measured.append(real_measure(self, cfg, probes))
        finally:
            monkeypatch.setattr(budget_mod, "clock", simulated)
        return measured[-1]

    monkeypatch.setattr(budget_mod.RunBudget, "_measure_work", measure_on_the_real_clock)
    fallback = ["train.budget_fallback.min_steps=99", "train.budget_fallback.overrides=['model.hidden_size=16']"]
    cfg = _debug(shapes16, "train.steps=100", "train.budget_minutes=0.2", "train.checkpoint_every=5", "train.keep_last=1",
                 "sample.grid_size=2", "sample.steps=1", "eval.every=20", *fallback)  # eval.every without eval.ref: no work
    result = train(cfg, tmp_path / "run", log=machine)
    budget = load_checkpoint(resolve_checkpoint(tmp_path / "run"))["hardware"]["budget"]
    assert budget["fallback"] is None, (measured, budget)
    checkpoint_s, grid_s, eval_s = measured[0]
    assert 0 < checkpoint_s < 0.02 * 12 and 0 < grid_s and eval_s is None
    assert result.step == 100 and budget["work_seconds"]["every"] == [5, 0, 0]
    assert not any("fallback instead" in line for line in machine.lines)


def test_item16_a_budget_reserves_the_final_grid_at_its_measured_cost_and_ends_within_it(tmp_path, shapes16, monkeypatch):
    """The final sample grid costs 4 s of a 6 s budget (0.05 s per image and network evaluation, simulated):
    reserved at 2 % it had let the run fit ~115 steps and end near 10 s."""
    from fmcli import budget as budget_mod
    from fmcli import train as train_mod

    machine = SimulatedMachine(0.05)
    monkeypatch.setattr(budget_mod, "clock", lambda: machine.now)
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_step_seconds", lambda self, probes: 0.05)
    real_sample = train_mod.sample_batch

    def slow_sample(model, x0, labels, sample_cfg, **kwargs):
        result = real_sample(model, x0, labels, sample_cfg, **kwargs)
        machine.now += 0.05 * len(x0) * result.nfe
        return result

    monkeypatch.setattr(train_mod, "sample_batch", slow_sample)
    cfg = _debug(shapes16, "train.steps=1000", "train.budget_minutes=0.1", "train.checkpoint_every=0", "sample.grid_size=10", "sample.steps=8")
    result = train(cfg, tmp_path / "run", log=machine)
    assert (tmp_path / "run" / "samples").is_dir()  # the final grid was made (and its time counted)
    assert 0 < result.step < 1000
    assert machine.now <= 6.0 * 1.02, (machine.now, result.step)
    assert machine.now >= 6.0 * 0.9  # and the budget was used, not wasted on an overestimate
